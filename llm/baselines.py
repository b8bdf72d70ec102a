"""Timing baselines the LLM benchmark puts beside our engine in the same run, on the same tokens.

  - `hf_generate_bench`: Hugging Face transformers `generate`, greedy, on the converted HF
    directory (fp32 or bf16). The length is forced (min_new_tokens = max_new_tokens); TTFT is a
    1-new-token generate (prefill + first token), TPOT = (total - TTFT) / (new_tokens - 1).
  - `llamacpp_bench`: llama.cpp (the prebuilt `xllamacpp` wheel, a generic CPU build) on the same
    GGUF the HF directory was converted from, given the prompt as token ids so both engines see
    exactly the same tokens; TTFT and speeds are llama.cpp's own timings (prompt_ms,
    prompt_per_second, predicted_per_second) with ignore_eos so the length is fixed.
Both use 2 threads by default (the benchmark machine has 2 cores), warm up once, and report the
median of `repeats` runs; the machine is shared, so callers should repeat and keep medians.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch


@dataclass
class BaselineResult:
    name: str
    ttft_s: float                 # time to first token: prefill of the prompt + first token
    tpot_s: float                 # time per output token after the first
    decode_tok_s: float           # tokens/s of all rows during decode (batch / tpot)
    prefill_tok_s: float          # prompt tokens/s of all rows during prefill
    tokens: list = field(default_factory=list)   # generated ids of row 0

    def __post_init__(self):
        for k in ("ttft_s", "tpot_s", "decode_tok_s", "prefill_tok_s"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{self.name}: {k} must be a positive number, got {v!r}")

    def summary(self) -> str:
        return (f"{self.name}: TTFT {self.ttft_s * 1e3:.1f} ms ({self.prefill_tok_s:.0f} tok/s prefill), "
                f"TPOT {self.tpot_s * 1e3:.1f} ms ({self.decode_tok_s:.1f} tok/s decode)")


def _check_args(prompt_ids, new_tokens: int, batch: int = 1, repeats: int = 1) -> list:
    ids = torch.as_tensor(prompt_ids).flatten().tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"prompt_ids must be a non-empty sequence of token ids (ints >= 0), got {prompt_ids!r:.80}")
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an int >= 2 (TPOT needs a token after the first), got {new_tokens!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    return ids


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
    return names[dtype]


@torch.inference_mode()
def hf_generate_bench(model_dir, dtype, prompt_ids: Sequence[int], new_tokens: int, batch: int = 1,
                      threads: int = 2, repeats: int = 1) -> BaselineResult:
    """transformers greedy `generate` on `batch` copies of the prompt; load time is not counted."""
    ids = _check_args(prompt_ids, new_tokens, batch, repeats)
    dt = _dtype(dtype)
    if not (Path(model_dir) / "config.json").exists():
        raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
    x = torch.tensor([ids] * batch)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else model.generation_config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]

    def gen(n):
        t = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, num_beams=1, pad_token_id=pad)
        return time.perf_counter() - t, out

    gen(2)                                                 # warm-up: oneDNN primitives, allocator
    ttft = statistics.median(gen(1)[0] for _ in range(repeats))
    runs = [gen(new_tokens) for _ in range(repeats)]
    total = statistics.median(t for t, _ in runs)
    out = runs[0][1]
    if out.shape != (batch, len(ids) + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(batch, len(ids) + new_tokens)}")
    tpot = (total - ttft) / (new_tokens - 1)
    name = f"hf-transformers {str(dt).replace('torch.', '')} batch {batch}"
    return BaselineResult(name, ttft, tpot, batch / tpot, batch * len(ids) / ttft, out[0, len(ids):].tolist())


def llamacpp_bench(gguf_path, prompt_ids: Sequence[int], new_tokens: int, threads: int = 2,
                   repeats: int = 1) -> BaselineResult:
    """llama.cpp (xllamacpp) greedy completion of the token-id prompt; load time is not counted."""
    ids = _check_args(prompt_ids, new_tokens, 1, repeats)
    if not Path(gguf_path).is_file():
        raise ValueError(f"GGUF file {gguf_path} does not exist")
    import xllamacpp as xlc
    p = xlc.CommonParams()
    p.model.path = str(gguf_path)
    p.n_ctx = max(512, len(ids) + new_tokens + 16)
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.n_parallel = 1
    p.verbosity = -1                                       # no per-request log lines
    srv = xlc.Server(p)
    req = {"prompt": ids, "max_tokens": new_tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
           "cache_prompt": False}                          # re-run the prefill every time

    def complete(**extra):
        r = srv.handle_completions({**req, **extra})
        r = json.loads(r) if isinstance(r, str) else r
        if "error" in r or "timings" not in r:
            raise RuntimeError(f"llama.cpp completion failed: {str(r)[:500]}")
        t = r["timings"]
        if t["prompt_n"] != len(ids) or r["usage"]["completion_tokens"] != new_tokens:
            raise RuntimeError(f"llama.cpp processed {t['prompt_n']} prompt tokens and generated "
                               f"{r['usage']['completion_tokens']}; expected {len(ids)} and {new_tokens}")
        return r

    try:
        # warm-up, and the generated ids (logprobs adds a softmax per token, so the timed runs go without)
        first = complete(logprobs=1)
        tokens = [c["id"] for c in first["choices"][0]["logprobs"]["content"]]
        timings = [complete()["timings"] for _ in range(repeats)]
    finally:
        del srv                                            # stops the server's threads
    med = lambda k: statistics.median(t[k] for t in timings)   # noqa: E731
    decode = med("predicted_per_second")
    return BaselineResult(f"llama.cpp (xllamacpp {xlc.__version__}) {Path(gguf_path).name}",
                          med("prompt_ms") / 1e3, 1 / decode, decode, med("prompt_per_second"), tokens)
