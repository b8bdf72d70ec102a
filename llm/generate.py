"""LLMModel: load a model, generate text (greedy or sampled, streamed, batched), with metrics.

    from pacekern.llm import LLMModel, SamplingConfig
    m = LLMModel("smollm2-135m-instruct")                  # bf16 weights, pacekern kernels
    out = m.generate("The capital of France is", SamplingConfig(max_new_tokens=32))
    print(out.text, out.metrics.decode_tokens_per_s)
    for piece in m.stream([{"role": "user", "content": "Hi!"}]): print(piece, end="")

Prompts: a string, chat messages ([{"role", "content"}, ...]), token ids ([int, ...]), or a list of
any of these for a batch (consecutive rows of equal length are prefilled in one forward, up to
PREFILL_GROUP_ROWS tokens, other rows one by one; then all are decoded together, each at its own
position).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache, KVCacheConfig
from .model import Transformer
from .ops import OpConfig
from .sampling import Sampler, SamplingConfig
from .weights import ModelSpec, load

# A batch's equal-length prompts share one prefill forward of up to this many tokens (8 x 128 on
# SmolLM2, AMX host: 178 ms against 255 ms row by row, the same logits); the plan's buffers grow
# with it (Qwen2.5-1.5B's gate/up output alone is 72 KB a token).
PREFILL_GROUP_ROWS = 1024

DTYPES = {"bfloat16": "bf16", "float32": "f32"}
WEIGHTS = ("native", "int8", "int4")


@dataclass(frozen=True)
class Metrics:
    prompt_tokens: int
    new_tokens: int
    ttft_s: float                  # prompt in -> first new token out (prefill of this row and everything before it)
    tpot_s: float                  # mean time per output token after the first
    decode_tokens_per_s: float     # new tokens after the first / their time (per row)
    prefill_tokens_per_s: float    # prompt tokens / this row's share of its prefill forward
    rounds: int = 0                            # speculative decoding: draft/verify rounds after the first token
    acceptance_rate: float | None = None       # accepted drafts / proposed drafts
    mean_accepted_per_round: float | None = None   # tokens committed per round (accepted drafts + 1)


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: list                # new tokens only, no padding, EOS included when it ended the text
    text: str | None
    finish_reason: str             # "eos" | "length" | "stop"
    metrics: Metrics
    prompt_ids: list = field(repr=False, default_factory=list)


def encode_prompt(tokenizer, vocab: int, prompt, name: str = "this model") -> list:
    """A string, chat messages or token ids -> token ids (validated); needs only the tokenizer, so
    the server's front end encodes without the weights."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        ids = tokenizer(prompt, add_special_tokens=True).input_ids
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{name} has no chat template; pass a plain string prompt")
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    elif isinstance(prompt, (list, tuple, torch.Tensor)):
        ids = [int(i) for i in (prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0 .. {vocab - 1})")
    else:
        raise TypeError(f"a prompt must be a string, chat messages or token ids, not {type(prompt).__name__}")
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


class LLMModel:
    def __init__(self, model_name_or_path=None, tokenizer_name_or_path=None, dtype: str = "bfloat16",
                 weights: str = "native", kv_cache: KVCacheConfig | None = None, opconfig: OpConfig | None = None,
                 threads: int | None = None, pard_config=None):
        from . import models
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import pacekern as pk
        if threads:
            pk.set_num_threads(threads)
        torch.set_num_threads(pk.target().threads)
        self.path = models.resolve(model_name_or_path)
        from .tokenizer import Tokenizer
        self.tokenizer = Tokenizer(models.resolve(tokenizer_name_or_path) if tokenizer_name_or_path else self.path)
        self.spec = ModelSpec.from_dir(self.path)
        self.fmt = weights if weights in ("int8", "int4") else DTYPES[dtype]
        self.weights = load(self.path, self.spec, self.fmt)
        self.draft_only = self.weights.head_ids is not None     # its head scores a subset of the vocabulary
        self.cache = KVCache(self.spec, kv_cache or KVCacheConfig())
        self.model = Transformer(self.weights, self.cache, opconfig or OpConfig())
        eos = set(self.spec.eos_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self.spec_config, self.drafter = pard_config, None
        self.tree_nodes = getattr(pard_config, "tree_nodes", 0)
        self.lookup_tokens = getattr(pard_config, "lookup_tokens", 0)
        if pard_config is not None:
            self.drafter = self._load_drafter(pard_config, dtype, weights, opconfig)

    def set_drafter(self, drafter, num_speculative_tokens: int, tree_nodes: int = 0, lookup_tokens: int = 0) -> None:
        """Use any drafter (prefill / propose / update / begin / release; see llm/speculative.py),
        e.g. an oracle in tests or a new drafting idea in experiments; None turns drafting off.
        tree_nodes > 0 verifies trees (the drafter needs propose_tree, as PardDrafter has), with a
        prompt-lookup branch of up to lookup_tokens tokens."""
        from .speculative import DraftModelSpecDecodeConfig, check_tree
        check_tree(drafter, num_speculative_tokens, tree_nodes, lookup_tokens)
        self.drafter, self.tree_nodes, self.lookup_tokens = drafter, tree_nodes, lookup_tokens
        self.spec_config = None if drafter is None else DraftModelSpecDecodeConfig("<custom>", num_speculative_tokens)

    def _load_drafter(self, sc, dtype, weights, opconfig):
        from . import speculative as sd
        if not isinstance(sc, (sd.PardSpecDecodeConfig, sd.DraftModelSpecDecodeConfig)):
            raise TypeError(f"pard_config must be a PardSpecDecodeConfig or DraftModelSpecDecodeConfig, not {type(sc).__name__}")
        if not 1 <= sc.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens={sc.num_speculative_tokens}: choose 1 .. 32")
        draft = LLMModel(sc.model_name_or_path, tokenizer_name_or_path=str(self.path), dtype=dtype,
                         weights=sc.weights or weights, opconfig=opconfig)
        if draft.spec.vocab < len(self.tokenizer):
            raise ValueError(f"the draft's vocabulary ({draft.spec.vocab}) is smaller than the target tokenizer's "
                             f"({len(self.tokenizer)}): not a draft for this model")
        if isinstance(sc, sd.PardSpecDecodeConfig):
            drafter = sd.PardDrafter(draft, sd.pard_token_of(draft.path, sc.pard_token))
            sd.check_tree(drafter, sc.num_speculative_tokens, sc.tree_nodes, sc.lookup_tokens)
            return drafter
        return sd.ModelDrafter(draft)

    def _check_full_head(self):
        if self.draft_only:
            raise ValueError(f"{self.path} is a draft whose head scores only {self.weights.lm_head.n} tokens: "
                             f"use it as a drafter (pard_config=PardSpecDecodeConfig(...)), not on its own")

    # ---- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt) -> list:
        """A string, chat messages or token ids -> token ids (validated)."""
        return encode_prompt(self.tokenizer, self.spec.vocab, prompt, self.path.name)

    def _batch(self, prompts) -> tuple:
        """(list of token-id lists, whether a single prompt was given)."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and (all(isinstance(p, dict) for p in prompts)
                                             or all(isinstance(p, int) for p in prompts))):
            return [self.encode(prompts)], True
        if isinstance(prompts, torch.Tensor):
            return ([self.encode(prompts)], True) if prompts.dim() == 1 else ([self.encode(r) for r in prompts], False)
        if isinstance(prompts, (list, tuple)) and prompts:
            return [self.encode(p) for p in prompts], False
        if isinstance(prompts, (list, tuple)):
            raise ValueError("no prompt given")
        raise TypeError(f"a prompt must be a string, chat messages or token ids, not {type(prompts).__name__}")

    def logits(self, ids) -> torch.Tensor:
        """Logits [T, V] for every position of one token sequence (no cache kept): perplexity, tests."""
        self._check_full_head()
        ids = self.encode(ids)
        s0 = self.cache.alloc(1, len(ids))
        try:
            return self.model.forward(torch.tensor([ids]), s0, all_logits=True).logits.clone()
        finally:
            self.cache.free(s0)

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, prompts, sampling_config: SamplingConfig | None = None, streamer=None):
        """Generate for one prompt (returns a GenerationOutput) or a list (returns a list).
        `streamer`: "stdout", or a callable(row, text_piece) called as text is produced."""
        if streamer == "stdout":
            def streamer(row, piece):
                print(piece, end="", flush=True)
        outs = None
        for ev in self._run(prompts, sampling_config):
            if ev[0] == "text" and streamer is not None:
                streamer(ev[1], ev[2])
            elif ev[0] == "done":
                outs, single = ev[1], ev[2]
        return outs[0] if single else outs

    def stream(self, prompt, sampling_config: SamplingConfig | None = None):
        """Iterator over the text pieces of one prompt as they are generated."""
        for ev in self._run(prompt, sampling_config):
            if ev[0] == "text":
                yield ev[2]

    def _run(self, prompts, sampling_config):
        self._check_full_head()
        cfg = (sampling_config or SamplingConfig()).resolved(self.path)
        rows, single = self._batch(prompts)
        b = len(rows)
        for ids in rows:
            if len(ids) + cfg.max_new_tokens > self.cache.max_tokens:
                raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the "
                                 f"context of {self.cache.max_tokens} tokens")
        if self.drafter is not None and not cfg.greedy:
            raise ValueError("speculative decoding (PARD / draft model) is greedy only: use do_sample=False and no "
                             "repetition/frequency penalties, or load the model without pard_config")
        k = self.spec_config.num_speculative_tokens if self.drafter is not None else 0
        t0 = time.perf_counter()
        verify_rows = (self.tree_nodes + self.lookup_tokens or k) + 1
        s0 = self.cache.alloc(b, max(len(r) for r in rows) + cfg.max_new_tokens + verify_rows)
        try:
            if self.drafter is None:
                yield from self._generate(rows, cfg, s0, t0, single)
            else:
                from .speculative import generate as speculative_generate
                states = [RowState(self, cfg, ids, i) for i, ids in enumerate(rows)]
                yield from speculative_generate(self, self.drafter, k, states, s0, t0, single, self.tree_nodes,
                                                self.lookup_tokens)
        finally:
            self.cache.free(s0, b)

    def _generate(self, rows, cfg, s0, t0, single):
        b = len(rows)
        st = [RowState(self, cfg, ids, i) for i, ids in enumerate(rows)]
        i = 0
        while i < b:                                                 # prefill: runs of equal-length rows together
            n, t = 1, len(st[i].prompt)
            while i + n < b and len(st[i + n].prompt) == t and (n + 1) * t <= PREFILL_GROUP_ROWS:
                n += 1
            tp = time.perf_counter()
            p = self.model.forward(torch.tensor([r.prompt for r in st[i:i + n]]), s0 + i)
            dt = time.perf_counter() - tp
            for j, r in enumerate(st[i:i + n]):
                r.prefill_s = dt / n
                r.accept(r.pick(p.logits[j], p.next[j]))
                r.first = time.perf_counter()
                r.ttft_s = r.first - t0
            i += n
        yield from emit(st)
        while any(r.finish is None for r in st):
            last = torch.tensor([[r.out[-1]] for r in st])
            p = self.model.forward(last, s0)
            for i, r in enumerate(st):
                if r.finish is None:
                    r.accept(r.pick(p.logits[i], p.next[i]))
            yield from emit(st)
        yield ("done", [r.result() for r in st], single)


def emit(states):
    """("text", row, piece) events for text produced since the last call."""
    for r in states:
        if len(r.text) > r.emitted:
            yield ("text", r.row, r.text[r.emitted:])
            r.emitted = len(r.text)


class RowState:
    """One sequence being generated: its tokens, text, stop state and timings."""

    def __init__(self, llm, cfg, prompt, row):
        self.llm, self.cfg, self.prompt, self.row = llm, cfg, prompt, row
        self.sampler = Sampler(cfg, llm.spec.vocab, prompt)
        if cfg.seed is not None:                                     # a distinct, reproducible stream per row
            self.sampler.gen.manual_seed(cfg.seed + row)
        self.eos = torch.tensor(sorted(llm.eos_ids), dtype=torch.long)
        self.out, self.text, self.emitted, self.finish = [], "", 0, None
        self.prefill_s = self.ttft_s = 0.0
        self.first = None
        self.rounds = self.drafted = self.accepted = 0               # speculative decoding counters

    def pick(self, logits, greedy_id) -> int:
        cfg = self.cfg
        if len(self.out) < cfg.min_new_tokens:                       # as HF: EOS cannot be chosen before min_new_tokens
            if cfg.greedy and int(greedy_id) not in self.llm.eos_ids:
                return int(greedy_id)
            logits = logits.clone()
            logits[self.eos] = -float("inf")
            return self.sampler(logits)
        return int(greedy_id) if cfg.greedy else self.sampler(logits)

    def accept(self, tok: int) -> bool:
        """Append a token unless the row has finished; returns whether it was taken."""
        if self.finish is not None:
            return False
        cfg = self.cfg
        self.out.append(tok)
        self.sampler.observe(tok)
        n = len(self.out)
        if cfg.return_text or cfg.stop_strings:
            text = self.llm.tokenizer.decode(self.out, skip_special_tokens=True)
            for stop in cfg.stop_strings if n >= cfg.min_new_tokens else ():
                j = text.find(stop, max(0, self.emitted - len(stop)))
                if j >= 0:
                    self.text, self.finish = text[:j + len(stop)], "stop"
                    break
            else:
                if not text.endswith("\ufffd"):                      # wait for the rest of a multi-byte character
                    self.text = text
        if self.finish is None and tok in self.llm.eos_ids and n >= cfg.min_new_tokens:
            self.finish = "eos"
        elif self.finish is None and n >= cfg.max_new_tokens:
            self.finish = "length"
        return True

    def result(self) -> GenerationOutput:
        n, dec = len(self.out), time.perf_counter() - self.first
        spec = dict(rounds=self.rounds, acceptance_rate=self.accepted / self.drafted if self.drafted else None,
                    mean_accepted_per_round=(n - 1) / self.rounds if self.rounds else None)
        return GenerationOutput(
            token_ids=self.out, text=self.text if self.cfg.return_text else None, finish_reason=self.finish,
            prompt_ids=self.prompt,
            metrics=Metrics(prompt_tokens=len(self.prompt), new_tokens=n, ttft_s=self.ttft_s, tpot_s=dec / max(n - 1, 1),
                            decode_tokens_per_s=(n - 1) / dec if n > 1 and dec > 0 else 0.0,
                            prefill_tokens_per_s=len(self.prompt) / self.prefill_s, **spec))
