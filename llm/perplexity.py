"""Perplexity over fixed, non-overlapping token windows: the quality signal for quantization,
pruning and kernel changes (tiny-MMLU is at chance for models this small).

`perplexity(logits_fn, token_ids)` scores the text's tokens from the second one on, in
non-overlapping windows of `window` targets from the start (the first `n_windows` windows; the
last may be shorter). Window k runs `ids[k*window : (k+1)*window + 1]` through `logits_fn` with no
cache and scores its `window` next-token predictions, so every scored token has at least one
token of context and 8 windows of 512 score exactly 4096 tokens. With `bos_id` the window is
prefixed with BOS as an attention sink (Gemma needs it; SmolLM2 does not care) and the same
tokens are scored, so results with and without BOS are comparable. This is the convention the
reference numbers were measured with (SmolLM2 fp32: Botchan 29.41, Lee news 33.03).
Log-softmax is taken in float64 so bf16/fp32 logits lose nothing in the reduction. The engine
under test only has to supply `logits_fn(ids[1, T]) -> logits[T, V]`; `hf_logits_fn` adapts a
Hugging Face causal LM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float                       # natural-log negative log-likelihood over all scored tokens
    n_tokens: int                        # scored predictions
    windows: list = field(default_factory=list)   # per window: (n_tokens, nll_sum)


def _nll(logits: torch.Tensor, targets: torch.Tensor, rows: int = 128) -> float:
    """Sum of -log softmax(logits)[target] in float64, `rows` rows at a time to bound memory."""
    total = 0.0
    for i in range(0, targets.numel(), rows):
        x = logits[i:i + rows].to(torch.float64)
        t = targets[i:i + rows]
        total += (torch.logsumexp(x, -1) - x.gather(-1, t[:, None])[:, 0]).sum().item()
    return total


@torch.inference_mode()
def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], token_ids: Sequence[int] | torch.Tensor,
               window: int = 512, n_windows: int | None = 8, bos_id: int | None = None) -> PerplexityResult:
    """exp(mean NLL) over the first `n_windows` windows of `window` targets each (None: all)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if window < 1 or (n_windows is not None and n_windows < 1):
        raise ValueError(f"window ({window}) and n_windows ({n_windows}) must be >= 1")
    n_tok, nll_sum, windows = 0, 0.0, []
    for start in range(0, ids.numel() - 1, window):
        if n_windows is not None and len(windows) == n_windows:
            break
        chunk = ids[start:start + window + 1]           # one context token + up to `window` targets
        inp = chunk if bos_id is None else torch.cat([torch.tensor([bos_id]), chunk])
        logits = logits_fn(inp[None])
        if logits.dim() == 3 and logits.shape[0] == 1:
            logits = logits[0]
        if logits.shape[0] != inp.numel():
            raise ValueError(f"logits_fn returned {tuple(logits.shape)} for {inp.numel()} tokens; want [T, V]")
        skip = 0 if bos_id is None else 1               # the prediction made from BOS alone is not scored
        nll = _nll(logits[skip:-1], chunk[1:])
        windows.append((chunk.numel() - 1, nll))
        n_tok += chunk.numel() - 1
        nll_sum += nll
    if n_tok == 0:
        raise ValueError(f"no tokens to score: {ids.numel()} token ids")
    return PerplexityResult(math.exp(nll_sum / n_tok), nll_sum, n_tok, windows)


def hf_logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits_fn for a transformers AutoModelForCausalLM: one full forward pass, no KV cache."""
    def fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits[0]
    return fn
