"""`pacekern bench llm`: our engine beside HF transformers and llama.cpp on the same model and the
same prompt tokens, interleaved round by round (the machine is shared: medians over rounds, and
ratios against baselines measured in the same rounds), with the DRAM roofline measured now.

Rows: engine x batch, with TTFT, TPOT, decode and prefill tokens/s (all rows of a batch together),
decode as a fraction of the roofline (weight bytes per token / DRAM read rate), and decode speed
as a ratio to HF transformers bf16 at the same batch.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LLMBenchRow:
    engine: str
    batch: int
    ttft_ms: float
    tpot_ms: float
    decode_tok_s: float
    prefill_tok_s: float
    weight_mb: float | None      # weight bytes read per decoded token (None: not ours to count)


def prompt_rows(tokenizer, n_tokens: int, batch: int) -> list:
    """`batch` different real-text prompts of exactly n_tokens tokens (Botchan, consecutive windows)."""
    from .textdata import botchan_text
    ids = tokenizer(botchan_text(), add_special_tokens=False).input_ids
    if len(ids) < n_tokens * batch:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {n_tokens} x {batch}")
    return [ids[i * n_tokens:(i + 1) * n_tokens] for i in range(batch)]


def _ours(model, rows, new_tokens) -> tuple:
    from .sampling import SamplingConfig
    cfg = SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, return_text=False)
    # as the baselines do (hf_generate_bench: gen(2) before its timed calls): a short run first, so
    # every engine is timed just after touching its own weights, not after the others evicted them
    model.generate(rows, SamplingConfig(max_new_tokens=2, return_text=False))
    t0 = time.perf_counter()
    outs = model.generate(rows, cfg)
    total = time.perf_counter() - t0
    b = len(rows)
    ttft = max(o.metrics.ttft_s for o in outs)                      # every row prefilled
    tpot = (total - ttft) / (new_tokens - 1)
    prefill = sum(o.metrics.prompt_tokens for o in outs) / sum(o.metrics.prompt_tokens / o.metrics.prefill_tokens_per_s
                                                                 for o in outs)
    return ttft, tpot, b / tpot, prefill


def bench_llm(model_name=None, prompt_tokens: int = 128, new_tokens: int = 128, batches=(1, 8), rounds: int = 3,
              engines=("pacekern bf16", "pacekern int8", "pacekern int4", "hf bf16", "llama.cpp"),
              progress=print) -> tuple:
    """(rows, DRAM GB/s measured now). Every engine runs once per round; figures are medians."""
    from pacekern.limits import stream_probe
    from . import models
    from .baselines import hf_generate_bench, llamacpp_bench
    from .generate import LLMModel
    from .sampling import SamplingConfig

    known = ("pacekern bf16", "pacekern int8", "pacekern int4", "hf bf16", "hf fp32", "llama.cpp")
    if not engines or any(e not in known for e in engines):
        raise ValueError(f"engines={engines!r}: choose from {', '.join(known)}")
    ours = {}
    for e in engines:
        if e.startswith("pacekern"):
            w = e.split()[1]
            ours[e] = LLMModel(model_name, dtype="bfloat16", weights=w if w in ("int8", "int4") else "native")
    any_model = next(iter(ours.values())) if ours else LLMModel(model_name)
    path, spec = any_model.path, any_model.spec
    gguf = None
    if "llama.cpp" in engines:
        name = model_name or models.DEFAULT_MODEL
        if name in models.MODELS:
            gguf = models.fetch_gguf(models.MODELS[name])
        elif str(name).endswith(".gguf"):
            gguf = name
    rows_by_b = {b: prompt_rows(any_model.tokenizer, prompt_tokens, b) for b in batches}
    runs: dict = {}
    for m in ours.values():                                           # warm-up: compile / load kernels
        m.generate(rows_by_b[batches[0]][:1], SamplingConfig(max_new_tokens=2))
    probe, nbytes = stream_probe(spec.weight_bytes("bf16"))
    bw = []
    for r in range(rounds):
        for b in batches:
            rows = rows_by_b[b]
            for e in engines:
                if e == "llama.cpp" and (b != 1 or gguf is None):
                    continue
                progress(f"round {r + 1}/{rounds}: {e} batch {b}")
                if e in ours:
                    res = _ours(ours[e], rows, new_tokens)
                elif e.startswith("hf"):
                    x = hf_generate_bench(path, e.split()[1], rows[0], new_tokens, batch=b)
                    res = (x.ttft_s, x.tpot_s, x.decode_tok_s, x.prefill_tok_s)
                else:
                    x = llamacpp_bench(gguf, rows[0], new_tokens)
                    res = (x.ttft_s, x.tpot_s, x.decode_tok_s, x.prefill_tok_s)
                runs.setdefault((e, b), []).append(res)
        probe()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            probe()
            ts.append(time.perf_counter() - t)
        bw.append(nbytes / statistics.median(ts) / 1e9)
    out = []
    for (e, b), rs in runs.items():
        med = [statistics.median(x[i] for x in rs) for i in range(4)]
        out.append(LLMBenchRow(e, b, med[0] * 1e3, med[1] * 1e3, med[2], med[3],
                               ours[e].weights.decode_bytes() / 1e6 if e in ours else None))
    return out, statistics.median(bw)


def table(rows, gbs: float) -> str:
    """Markdown table with ratios to HF bf16 at the same batch and the roofline of each weight format."""
    hf = {r.batch: r for r in rows if r.engine == "hf bf16"}
    lines = [f"DRAM read rate measured in the same run: {gbs:.1f} GB/s",
             "| engine | batch | TTFT ms | TPOT ms | decode tok/s | prefill tok/s | decode vs HF bf16 | "
             "prefill vs HF bf16 | roofline tok/s | % of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = hf.get(r.batch)
        roof = gbs * 1e3 / r.weight_mb if r.weight_mb else None
        lines.append(f"| {r.engine} | {r.batch} | {r.ttft_ms:.0f} | {r.tpot_ms:.1f} | {r.decode_tok_s:.1f} | "
                     f"{r.prefill_tok_s:.0f} | {f'{r.decode_tok_s / h.decode_tok_s:.2f}x' if h else '-'} | "
                     f"{f'{r.prefill_tok_s / h.prefill_tok_s:.2f}x' if h else '-'} | "
                     f"{f'{roof * r.batch:.0f}' if roof else '-'} | "
                     f"{f'{100 * r.decode_tok_s / (roof * r.batch):.0f}%' if roof else '-'} |")
    return "\n".join(lines)
