"""LLMModel: load a model, generate text (greedy or sampled, streamed, batched), with metrics.

    from pacekern.llm import LLMModel, SamplingConfig
    m = LLMModel("smollm2-135m-instruct")                  # bf16 weights, pacekern kernels
    out = m.generate("The capital of France is", SamplingConfig(max_new_tokens=32))
    print(out.text, out.metrics.decode_tokens_per_s)
    for piece in m.stream([{"role": "user", "content": "Hi!"}]): print(piece, end="")

Prompts: a string, chat messages ([{"role", "content"}, ...]), token ids ([int, ...]), or a list of
any of these for a batch (rows of different lengths are prefilled one by one, then decoded
together, each at its own position).
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

DTYPES = {"bfloat16": "bf16", "float32": "f32"}
WEIGHTS = ("native", "int8")


@dataclass(frozen=True)
class Metrics:
    prompt_tokens: int
    new_tokens: int
    ttft_s: float                  # prompt in -> first new token out (prefill of this row and everything before it)
    tpot_s: float                  # mean time per output token after the first
    decode_tokens_per_s: float     # new tokens after the first / their time (per row)
    prefill_tokens_per_s: float


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: list                # new tokens only, no padding, EOS included when it ended the text
    text: str | None
    finish_reason: str             # "eos" | "length" | "stop"
    metrics: Metrics
    prompt_ids: list = field(repr=False, default_factory=list)


class LLMModel:
    def __init__(self, model_name_or_path=None, tokenizer_name_or_path=None, dtype: str = "bfloat16",
                 weights: str = "native", kv_cache: KVCacheConfig | None = None, opconfig: OpConfig | None = None,
                 threads: int | None = None):
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
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(models.resolve(tokenizer_name_or_path))
                                                       if tokenizer_name_or_path else str(self.path))
        self.spec = ModelSpec.from_dir(self.path)
        self.fmt = "int8" if weights == "int8" else DTYPES[dtype]
        self.weights = load(self.path, self.spec, self.fmt)
        self.cache = KVCache(self.spec, kv_cache or KVCacheConfig())
        self.model = Transformer(self.weights, self.cache, opconfig or OpConfig())
        eos = set(self.spec.eos_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos

    # ---- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt) -> list:
        """A string, chat messages or token ids -> token ids (validated)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"{self.path.name} has no chat template; pass a plain string prompt")
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        elif isinstance(prompt, (list, tuple, torch.Tensor)):
            ids = [int(i) for i in (prompt.reshape(-1).tolist() if isinstance(prompt, torch.Tensor) else prompt)]
            bad = [i for i in ids if not 0 <= i < self.spec.vocab]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0 .. {self.spec.vocab - 1})")
        else:
            raise TypeError(f"a prompt must be a string, chat messages or token ids, not {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

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
        raise ValueError("no prompt given")

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
        cfg = (sampling_config or SamplingConfig()).resolved(self.path)
        rows, single = self._batch(prompts)
        b = len(rows)
        for ids in rows:
            if len(ids) + cfg.max_new_tokens > self.cache.max_tokens:
                raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the "
                                 f"context of {self.cache.max_tokens} tokens")
        t0 = time.perf_counter()
        s0 = self.cache.alloc(b, max(len(r) for r in rows) + cfg.max_new_tokens)
        try:
            yield from self._generate(rows, cfg, s0, t0, single)
        finally:
            self.cache.free(s0, b)

    def _generate(self, rows, cfg, s0, t0, single):
        b = len(rows)
        samplers = [Sampler(cfg, self.spec.vocab, ids) for ids in rows]
        if cfg.seed is not None:                                  # a distinct, reproducible stream per row
            for i, s in enumerate(samplers):
                s.gen.manual_seed(cfg.seed + i)
        out = [[] for _ in range(b)]
        texts, emitted = [""] * b, [0] * b
        finish = [None] * b
        ttft = [0.0] * b
        first = [None] * b

        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long)

        def pick(i, logits, greedy_id):
            if len(out[i]) < cfg.min_new_tokens:                      # as HF: EOS cannot be chosen before min_new_tokens
                if cfg.greedy and int(greedy_id) not in self.eos_ids:
                    return int(greedy_id)
                logits = logits.clone()
                logits[eos] = -float("inf")
                return samplers[i](logits)
            return int(greedy_id) if cfg.greedy else samplers[i](logits)

        def accept(i, tok):
            if finish[i] is not None:
                return
            out[i].append(tok)
            samplers[i].observe(tok)
            n = len(out[i])
            if cfg.return_text or cfg.stop_strings:
                text = self.tokenizer.decode(out[i], skip_special_tokens=True)
                for stop in cfg.stop_strings if n >= cfg.min_new_tokens else ():
                    j = text.find(stop, max(0, emitted[i] - len(stop)))
                    if j >= 0:
                        texts[i], finish[i] = text[:j + len(stop)], "stop"
                        break
                else:
                    if not text.endswith("\ufffd"):               # wait for the rest of a multi-byte character
                        texts[i] = text
            if finish[i] is None and tok in self.eos_ids and n >= cfg.min_new_tokens:
                finish[i] = "eos"
            elif finish[i] is None and n >= cfg.max_new_tokens:
                finish[i] = "length"

        prefill = [0.0] * b
        for i, ids in enumerate(rows):                               # prefill row by row
            tp = time.perf_counter()
            p = self.model.forward(torch.tensor([ids]), s0 + i)
            prefill[i] = time.perf_counter() - tp
            accept(i, pick(i, p.logits[0], p.next[0]))
            first[i] = time.perf_counter()
            ttft[i] = first[i] - t0
        for ev in self._emit(texts, emitted):
            yield ev
        while any(f is None for f in finish):
            last = torch.tensor([[o[-1]] for o in out])
            p = self.model.forward(last, s0)
            for i in range(b):
                if finish[i] is None:
                    accept(i, pick(i, p.logits[i], p.next[i]))
            for ev in self._emit(texts, emitted):
                yield ev
        t_end = time.perf_counter()
        results = []
        for i in range(b):
            n = len(out[i])
            dec = t_end - first[i]
            results.append(GenerationOutput(
                token_ids=out[i], text=texts[i] if cfg.return_text else None, finish_reason=finish[i],
                prompt_ids=rows[i],
                metrics=Metrics(prompt_tokens=len(rows[i]), new_tokens=n, ttft_s=ttft[i],
                                tpot_s=dec / max(n - 1, 1), decode_tokens_per_s=(n - 1) / dec if n > 1 and dec > 0 else 0.0,
                                prefill_tokens_per_s=len(rows[i]) / prefill[i])))
        yield ("done", results, single)

    @staticmethod
    def _emit(texts, emitted):
        for i, t in enumerate(texts):
            if len(t) > emitted[i]:
                yield ("text", i, t[emitted[i]:])
                emitted[i] = len(t)
