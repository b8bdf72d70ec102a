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

Tree verification (PardSpecDecodeConfig(tree_nodes=N)): PARD's K predictions are marginals (mask
j never sees the tokens drafted before it), so its top candidates at each depth combine freely.
The N most likely paths (product of the draft's probabilities; every prefix of a kept path is
kept) form a tree whose nodes the target verifies in one forward of N + 1 rows: each node at its
depth's position, attending to the cache and its ancestors only. The walk from the root follows
the target's argmax as long as a child holds it, so the output is still the target's greedy one;
the accepted path's KV rows are then moved into place (KVCache.move). With lookup_tokens=L the
tree also gets a branch from the sequence itself (prompt lookup): the up to L tokens that followed
the latest earlier occurrence of its last 3 (else 2) tokens: it pays where an answer quotes its
prompt or repeats itself, which a small draft predicts poorly.

State between rounds, per row (research/pard.md §1.3): the target cache holds every committed token
but the last (the bonus token, which is the next target input); a drafter keeps its own "pending"
list of committed tokens it has not encoded yet.
"""
from __future__ import annotations

import heapq
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
    tree_nodes: int = 0                      # 0: verify a chain of K drafts; N: a tree of the N likeliest (depth <= K)
    lookup_tokens: int = 0                   # trees: add a prompt-lookup branch of up to this many tokens


TREE_TOPK = 4                                # candidates per depth a tree may branch into


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


def check_tree(drafter, k: int, tree_nodes: int, lookup_tokens: int = 0) -> None:
    if not 0 <= tree_nodes <= 31:
        raise ValueError(f"tree_nodes={tree_nodes}: choose 0 (a chain of K drafts) .. 31")
    if not 0 <= lookup_tokens <= 16 or (lookup_tokens and not tree_nodes):
        raise ValueError(f"lookup_tokens={lookup_tokens}: choose 0 .. 16, and a tree (tree_nodes > 0) to graft it on")
    if tree_nodes and not hasattr(drafter, "propose_tree"):
        raise ValueError(f"tree_nodes={tree_nodes} needs a drafter that scores several candidates per depth "
                         f"(PARD, propose_tree); {type(drafter).__name__} proposes a single chain")


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

    def _forward(self, i: int, k: int):
        """The draft forward over the pending tokens + K-1 masks (its last K rows predict depths
        1 .. K); the mask rows are then dropped from the cache: they described masks."""
        c, slot = self.llm.cache, self.s0 + i
        n0, pend = c.lengths[slot], self.pending[i]
        p = self.llm.model.forward(torch.tensor([pend + [self.mask] * (k - 1)]), slot, all_logits=True)
        c.truncate(slot, n0 + len(pend))
        return p

    def propose(self, i: int, k: int) -> list:
        return self._forward(i, k).next[-k:].tolist()

    def propose_tree(self, i: int, k: int, topk: int = TREE_TOPK) -> tuple:
        """The draft's top candidates at each of k depths: (token ids [k][<=topk], probabilities),
        from the same single forward as propose; the mask token is never a candidate."""
        p = self._forward(i, k)
        prob, row = torch.softmax(p.logits[-k:], -1).topk(min(topk + 1, p.logits.shape[1]), -1)
        head_ids = self.llm.weights.head_ids
        ids = (row if head_ids is None else head_ids[row]).tolist()
        prob = prob.tolist()
        keep = [[j for j, t in enumerate(d) if t != self.mask][:topk] for d in ids]
        return [[d[j] for j in kj] for d, kj in zip(ids, keep)], [[q[j] for j in kj] for q, kj in zip(prob, keep)]

    def update(self, i: int, accepted: int, new: list):
        self.pending[i] = list(new)                       # the draft saw masks where the accepted drafts are


def build_tree(cands: list, probs: list, n: int) -> tuple:
    """The n likeliest draft paths, best first: (tokens, parents, depths) per node, node j being
    verification row j + 1 (row 0 is the root, the bonus token); a parent always comes before its
    children. A path's score is the product of its candidates' probabilities, so a prefix never
    scores below its extensions and the kept set is a tree."""
    heap = [(-probs[0][c], 0, c) for c in range(len(cands[0]))]           # (-score, parent row, candidate)
    heapq.heapify(heap)
    tokens, parents, depths = [], [], []
    while heap and len(tokens) < n:
        score, par, c = heapq.heappop(heap)
        d = depths[par - 1] + 1 if par else 1
        tokens.append(cands[d - 1][c])
        parents.append(par)
        depths.append(d)
        if d < len(cands):
            for c2 in range(len(cands[d])):
                heapq.heappush(heap, (score * probs[d][c2], len(tokens), c2))
    return tokens, parents, depths


class PromptLookup:
    """Prompt lookup over one sequence (its prompt and output so far): propose(k) returns the up to
    k tokens that followed the latest earlier occurrence of the last 3 (else 2) tokens."""

    def __init__(self, ids: list):
        self.ids, self.after = [], {}
        self.extend(ids)

    def extend(self, ids: list) -> None:
        for t in ids:
            self.ids.append(t)
            end = len(self.ids) - 1                               # the n-grams ending before the new token
            for n in (2, 3):
                if end >= n:
                    self.after[tuple(self.ids[end - n:end])] = end

    def propose(self, k: int) -> list:
        for n in (3, 2):
            j = self.after.get(tuple(self.ids[-n:]))
            if j is not None:
                return self.ids[j:j + k]
        return []


def graft(tree: tuple, path: list) -> tuple:
    """The tree (tokens, parents, depths) with `path` (tokens from the root) added as a branch: it
    follows existing nodes as far as they match, then new nodes hang below."""
    tokens, parents, depths = (list(x) for x in tree)
    cur = 0
    for tok in path:
        nxt = next((j + 1 for j in range(len(tokens)) if parents[j] == cur and tokens[j] == tok), None)
        if nxt is None:
            tokens.append(tok)
            parents.append(cur)
            depths.append(depths[cur - 1] + 1 if cur else 1)
            nxt = len(tokens)
        cur = nxt
    return tokens, parents, depths


def chain_tree(tokens: list) -> tuple:
    """A chain of drafts as a tree (tokens, parents, depths): node j hangs below node j - 1."""
    return list(tokens), list(range(len(tokens))), list(range(1, len(tokens) + 1))


def tree_inputs(parents: list, depths: list) -> tuple:
    """offs [T] (depths, root 0) and anc [T, T] (1 where column u is row t's ancestor or itself)."""
    t = len(parents) + 1
    anc = [[0] * t for _ in range(t)]
    anc[0][0] = 1
    for j, par in enumerate(parents, 1):
        anc[j] = list(anc[par])
        anc[j][j] = 1
    return [0] + list(depths), anc


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


def generate(llm, drafter, k: int, states, s0: int, t0: float, single: bool, tree_nodes: int = 0,
             lookup_tokens: int = 0):
    """The speculative loop over RowStates (llm/generate.py); yields the same events as plain decode.
    tree_nodes > 0 verifies a tree of that many drafts (drafter.propose_tree) instead of a chain,
    plus a prompt-lookup branch of up to lookup_tokens tokens."""
    from .generate import emit
    b, cache = len(states), llm.cache
    t = (tree_nodes or k) + 1                                      # verification rows per sequence (at least)
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
        lookups = [PromptLookup(r.prompt + r.out) for r in states] if lookup_tokens else None
        yield from emit(states)
        while any(r.finish is None for r in states):
            active = [i for i, r in enumerate(states) if r.finish is None]
            if tree_nodes:
                trees = {i: build_tree(*drafter.propose_tree(i, k), tree_nodes) for i in active}
                if lookups:
                    trees = {i: graft(tr, lookups[i].propose(lookup_tokens)) for i, tr in trees.items()}
                t = max(len(tr[0]) for tr in trees.values()) + 1
                for tr in trees.values():                          # equal row counts: pad with root children
                    tr[0].extend([0] * (t - 1 - len(tr[0])))
                    tr[1].extend([0] * (t - 1 - len(tr[1])))
                    tr[2].extend([1] * (t - 1 - len(tr[2])))
            else:
                trees = {i: chain_tree(drafter.propose(i, k)) for i in active}
            rows = [trees.get(i) or chain_tree([0] * (t - 1)) for i in range(b)]     # finished rows: placeholders
            x = torch.tensor([[r.out[-1]] + rows[i][0] for i, r in enumerate(states)])
            lengths = [cache.lengths[s0 + i] for i in range(b)]
            if tree_nodes:
                offs, anc = zip(*(tree_inputs(par, dep) for _, par, dep in rows))
                p = llm.model.forward(x, s0, all_logits=True, tree=(torch.tensor(offs), torch.tensor(anc)))
            else:
                p = llm.model.forward(x, s0, all_logits=True)      # verify K + 1 positions per row (causal)
            pred = p.next.view(b, t).tolist()
            for i, r in enumerate(states):
                if i not in trees:
                    cache.truncate(s0 + i, lengths[i])           # finished rows: nothing kept
                    continue
                tokens, parents, _ = trees[i]
                child = {}
                for j, (tok, par) in enumerate(zip(tokens, parents), 1):
                    child.setdefault((par, tok), j)
                path, cur = [], 0                                # walk the target's argmax down the tree
                while True:
                    g = pred[i][cur]
                    if len(r.out) + len(path) < r.cfg.min_new_tokens and g in llm.eos_ids:
                        g = r.pick(p.logits[i * t + cur], g)     # as plain decode: no EOS before min_new_tokens
                    nxt = child.get((cur, g))
                    if nxt is None:
                        break
                    path.append(nxt)
                    cur = nxt
                a = len(path)
                new = [tokens[j - 1] for j in path] + [g]
                taken = [tok for tok in new if r.accept(tok)]      # stops inside the block at EOS / max_new_tokens
                if lookups:
                    lookups[i].extend(taken)
                if path != list(range(1, a + 1)):                  # a side branch: its KV rows move into place
                    cache.move(s0 + i, [lengths[i] + j for j in path], lengths[i] + 1)
                cache.truncate(s0 + i, lengths[i] + 1 + a)         # keep the input bonus + accepted drafts
                r.rounds, r.drafted, r.accepted = r.rounds + 1, r.drafted + len(tokens), r.accepted + a
                log.debug("row %d round %d: drafts %s, accepted %d, committed %s", i, r.rounds, tokens, a, taken)
                if r.finish is None:
                    drafter.update(i, a, new)
            yield from emit(states)
    finally:
        drafter.release(b)
    yield ("done", [r.result() for r in states], single)
