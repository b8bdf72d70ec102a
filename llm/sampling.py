"""Sampling settings and the sampler: penalties -> temperature -> top-k -> top-p -> min-p ->
sample (or argmax). Unset fields of SamplingConfig come from the model's generation_config.json,
then from the defaults below; `seed` makes sampling reproducible per request."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

DEFAULTS = dict(max_new_tokens=128, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, stop_strings=(), seed=None, return_text=True)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None       # EOS and stop strings are ignored before this many tokens
    do_sample: bool | None = None           # False: greedy (argmax)
    temperature: float | None = None
    top_k: int | None = None                # 0: off
    top_p: float | None = None              # 1.0: off
    min_p: float | None = None              # 0.0: off; keeps tokens with p >= min_p * p_max
    repetition_penalty: float | None = None # 1.0: off; HF's (divide positive logits, multiply negative)
    frequency_penalty: float | None = None  # 0.0: off; OpenAI's (subtract penalty * count)
    presence_penalty: float | None = None   # 0.0: off; OpenAI's (subtract penalty once a token has appeared)
    stop_strings: tuple | None = None       # generation stops after any of these appears in the text
    seed: int | None = None
    return_text: bool | None = None

    def resolved(self, model_dir: Path | None = None) -> "SamplingConfig":
        """Fill unset fields from generation_config.json, then DEFAULTS, and validate."""
        gen = {}
        if model_dir is not None and (Path(model_dir) / "generation_config.json").exists():
            gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
        vals = {}
        for f in fields(self):
            v = getattr(self, f.name)
            vals[f.name] = v if v is not None else gen.get(f.name, DEFAULTS[f.name])
        if isinstance(vals["stop_strings"], str):
            vals["stop_strings"] = (vals["stop_strings"],)
        vals["stop_strings"] = tuple(vals["stop_strings"] or ())
        c = replace(self, **vals)
        c.validate()
        return c

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"SamplingConfig.{name}={getattr(self, name)!r}: {why}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            bad("min_new_tokens", "must be an integer between 0 and max_new_tokens")
        if not self.temperature > 0:
            bad("temperature", "must be > 0 (use do_sample=False for greedy decoding)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1.0 turns it off)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad("stop_strings", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return not self.do_sample and self.repetition_penalty == 1.0 and self.frequency_penalty == 0.0 \
            and self.presence_penalty == 0.0


class Sampler:
    """Per-request state: token counts for the penalties and the random generator."""

    def __init__(self, cfg: SamplingConfig, vocab: int, prompt_ids):
        self.cfg = cfg
        self.counts = torch.zeros(vocab, dtype=torch.float32)
        self.seen = torch.zeros(vocab, dtype=torch.bool)          # repetition penalty covers the prompt too (as HF)
        self.seen[torch.as_tensor(list(prompt_ids), dtype=torch.long)] = True
        self.gen = torch.Generator()
        self.gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        c = self.cfg
        x = logits.float().clone()
        if c.repetition_penalty != 1.0:
            s = x[self.seen]
            x[self.seen] = torch.where(s > 0, s / c.repetition_penalty, s * c.repetition_penalty)
        if c.frequency_penalty != 0.0:
            x -= c.frequency_penalty * self.counts
        if c.presence_penalty != 0.0:                          # as OpenAI: output tokens only, not the prompt
            x -= c.presence_penalty * (self.counts > 0)
        if not c.do_sample:
            return int(torch.argmax(x))
        x /= c.temperature
        if c.top_k > 0 and c.top_k < x.numel():
            kth = torch.topk(x, c.top_k).values[-1]
            x[x < kth] = -float("inf")
        probs = torch.softmax(x, -1)
        if c.top_p < 1.0:
            p, idx = torch.sort(probs, descending=True)
            drop = torch.cumsum(p, 0) - p >= c.top_p          # keep the smallest prefix reaching top_p
            probs[idx[drop]] = 0
        if c.min_p > 0:
            probs[probs < c.min_p * probs.max()] = 0
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.gen))

    def observe(self, token: int) -> None:
        self.counts[token] += 1
        self.seen[token] = True
