"""Speculative decoding, greedy and lossless: a drafter proposes K tokens, the target verifies them
in one forward over K + 1 positions (multi-token decode with a causal offset), the longest prefix
that matches the target's own argmax is kept plus one correction token, and both KV caches are
rolled back past what was rejected.

Drafters (same tokenizer as the target):
  PardDrafter   PARD (research: AMD's parallel draft): one draft forward over the tokens committed
                since the last round plus K-1 mask tokens gives all K proposals; the mask rows are
                then dropped from the draft cache, and the next round re-encodes the accepted tokens.
  ModelDrafter  a plain small model drafting token by token (K forwards of one token).
Any object with prefill / propose / update / release works (the tests use oracle drafters).

State between rounds, per row (research/pard.md §1.3): the target cache holds every committed token
but the last (the bonus token, which is the next target input); a drafter keeps its own "pending"
list of committed tokens it has not encoded yet.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pacekern.log import log


@dataclass(frozen=True)
class PardSpecDecodeConfig:
    model_name_or_path: str                  # the PARD draft (catalogue name, HF directory, ...)
    pard_token: int | None = None            # mask token id; None: the draft config's `pard_token`
    num_speculative_tokens: int = 12         # K
    weights: str | None = None               # the draft's weights, "native" | "int8" | "int4"; None: as the target's


@dataclass(frozen=True)
class DraftModelSpecDecodeConfig:
    model_name_or_path: str                  # a small model with the target's tokenizer
    num_speculative_tokens: int = 4          # K
    weights: str | None = None               # the draft's weights, "native" | "int8" | "int4"; None: as the target's


def pard_token_of(path: Path, given: int | None) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    tok = cfg.get("pard_token", given)
    if tok is None:
        raise ValueError(f"{path}: the draft's config.json has no `pard_token` and none was given "
                         f"(PardSpecDecodeConfig(pard_token=...)); is this a PARD draft model?")
    return int(tok)


def heldout_prompts(draft, n: int) -> list:
    """The last n held-out prompts of a draft made by experiments/pard_train.py (its pard_train.json):
    from passages split off before any training text was generated, and not its validation set."""
    from .models import resolve
    meta = json.loads((resolve(draft) / "pard_train.json").read_text())
    return [[{"role": "user", "content": p["text"]}] if p["kind"] == "chat" else p["text"]
            for p in meta["prompts"]["heldout"][-n:]]


class PardDrafter:
    def __init__(self, llm, mask_id: int):
        self.llm, self.mask = llm, mask_id
        if not 0 <= mask_id < llm.spec.vocab:
            raise ValueError(f"pard_token {mask_id} is outside the draft's vocabulary of {llm.spec.vocab}")
        self.s0, self.pending = 0, {}

    def begin(self, n_rows: int, max_tokens: int, k: int):
        self.s0 = self.llm.cache.alloc(n_rows, max_tokens + 2 * k)

    def release(self, n_rows: int):
        self.llm.cache.free(self.s0, n_rows)

    def prefill(self, i: int, prompt: list, first: int):
        self.llm.model.forward(torch.tensor([prompt]), self.s0 + i)
        self.pending[i] = [first]

    def propose(self, i: int, k: int) -> list:
        c, slot = self.llm.cache, self.s0 + i
        n0 = c.lengths[slot]
        pend = self.pending[i]
        p = self.llm.model.forward(torch.tensor([pend + [self.mask] * (k - 1)]), slot, all_logits=True)
        drafts = p.next[-k:].tolist()
        c.truncate(slot, n0 + len(pend))                  # drop the K-1 mask rows: they described masks
        return drafts

    def update(self, i: int, accepted: int, new: list):
        self.pending[i] = list(new)                       # the draft saw masks where the accepted drafts are


class ModelDrafter:
    def __init__(self, llm):
        self.llm, self.s0, self.pending, self.base = llm, 0, {}, {}

    begin, release, prefill = PardDrafter.begin, PardDrafter.release, PardDrafter.prefill

    def propose(self, i: int, k: int) -> list:
        slot = self.s0 + i
        self.base[i] = self.llm.cache.lengths[slot] + len(self.pending[i])
        ids, drafts = self.pending[i], []
        for _ in range(k):
            drafts.append(int(self.llm.model.forward(torch.tensor([ids]), slot).next[0]))
            ids = drafts[-1:]
        return drafts                                      # the cache now holds pending + d1 .. d(K-1)

    def update(self, i: int, accepted: int, new: list):
        kept = min(accepted, len(new) - 1, self.llm.cache.lengths[self.s0 + i] - self.base[i])
        self.llm.cache.truncate(self.s0 + i, self.base[i] + kept)
        self.pending[i] = list(new[kept:])


def generate(llm, drafter, k: int, states, s0: int, t0: float, single: bool):
    """The speculative loop over RowStates (llm/generate.py); yields the same events as plain decode."""
    from .generate import emit
    b, cache = len(states), llm.cache
    drafter.begin(b, max(len(r.prompt) for r in states) + states[0].cfg.max_new_tokens, k)
    try:
        for i, r in enumerate(states):                         # plain prefill of the target, then of the drafter
            tp = time.perf_counter()
            p = llm.model.forward(torch.tensor([r.prompt]), s0 + i)
            r.prefill_s = time.perf_counter() - tp
            r.accept(r.pick(p.logits[0], p.next[0]))
            r.first = time.perf_counter()
            r.ttft_s = r.first - t0
            if r.finish is None:
                drafter.prefill(i, r.prompt, r.out[-1])
        yield from emit(states)
        while any(r.finish is None for r in states):
            active = [i for i, r in enumerate(states) if r.finish is None]
            drafts = {i: drafter.propose(i, k) for i in active}
            x = torch.tensor([[r.out[-1]] + drafts.get(i, [0] * k) for i, r in enumerate(states)])
            lengths = [cache.lengths[s0 + i] for i in range(b)]
            p = llm.model.forward(x, s0, all_logits=True)        # verify K + 1 positions per row
            pred = p.next.view(b, k + 1).tolist()
            for i, r in enumerate(states):
                if i not in drafts:
                    cache.truncate(s0 + i, lengths[i])           # finished rows: nothing kept
                    continue
                d, g = drafts[i], pred[i]
                for j in range(k + 1):                               # as plain decode: no EOS before min_new_tokens
                    if len(r.out) + j < r.cfg.min_new_tokens and g[j] in llm.eos_ids:
                        g[j] = r.pick(p.logits[i * (k + 1) + j], g[j])
                a = 0
                while a < k and d[a] == g[a]:
                    a += 1
                new = d[:a] + [g[a]]
                taken = [t for t in new if r.accept(t)]            # stops inside the block at EOS / max_new_tokens
                cache.truncate(s0 + i, lengths[i] + 1 + a)         # keep the input bonus + accepted drafts
                r.rounds, r.drafted, r.accepted = r.rounds + 1, r.drafted + k, r.accepted + a
                log.debug("row %d round %d: drafts %s, accepted %d, committed %s", i, r.rounds, d, a, taken)
                if r.finish is None:
                    drafter.update(i, a, new)
            yield from emit(states)
    finally:
        drafter.release(b)
    yield ("done", [r.result() for r in states], single)
