"""`pacekern bench llm`: our engine beside HF transformers and llama.cpp on the same model and the
same prompt tokens, interleaved round by round (the machine is shared: medians over rounds, and
ratios against baselines measured in the same rounds), with the DRAM roofline measured now.

Rows: engine x batch, with TTFT, TPOT, decode and prefill tokens/s (all rows of a batch together),
decode as a fraction of the roofline (weight bytes per token / DRAM read rate), and decode speed
as a ratio to HF transformers bf16 at the same batch.
"""
from __future__ import annotations

import itertools
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
    from pacekern.target import cpu
    lines = [cpu().describe(), "", f"DRAM read rate measured in the same run: {gbs:.1f} GB/s",
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


# ---- `pacekern bench engine`: many requests at once -------------------------------------------------

@dataclass(frozen=True)
class EngineBenchRow:
    engine: str
    requests: int
    concurrency: int              # running requests / parallel slots / batch rows
    wall_s: float
    out_tok_s: float              # generated tokens / wall time
    total_tok_s: float            # (prompt + generated tokens) / wall time
    ttft_p50_ms: float | None     # from submission (all at once) to a request's first token
    ttft_p90_ms: float | None
    tpot_p50_ms: float | None
    tpot_p90_ms: float | None


def engine_prompts(tokenizer, n: int, lo: int = 32, hi: int = 1024, seed: int = 0) -> list:
    """n prompts of real text (consecutive Botchan windows) with lengths drawn uniformly in [lo, hi]."""
    import random
    from .textdata import botchan_text
    ids = tokenizer(botchan_text(), add_special_tokens=False).input_ids
    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(n)]
    if sum(lens) > len(ids):
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {sum(lens)} the prompts need")
    starts = list(itertools.accumulate([0] + lens))
    return [ids[a:a + n_] for a, n_ in zip(starts, lens)]


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def _engine_row(name, n, conc, wall, prompts, new, ttft=(), tpot=()):
    ms = lambda v: None if v is None else v * 1e3          # noqa: E731
    return EngineBenchRow(name, n, conc, wall, n * new / wall, (n * new + sum(map(len, prompts))) / wall,
                          ms(_pct(ttft, 0.5)), ms(_pct(ttft, 0.9)), ms(_pct(tpot, 0.5)), ms(_pct(tpot, 0.9)))


def _bench_ours(llm, prompts, new, concurrency, step_tokens):
    from .engine import Engine, EngineConfig, Request
    from .sampling import SamplingConfig
    engine = Engine(llm, EngineConfig(max_running=concurrency, max_tokens_per_step=step_tokens, kv_budget_mb=4096))
    cfg = SamplingConfig(max_new_tokens=new, min_new_tokens=new, return_text=False)
    engine.run([Request(prompts[0][:16], SamplingConfig(max_new_tokens=2, return_text=False))])   # warm
    t0 = time.perf_counter()
    outs = engine.run([Request(p, cfg, arrival_s=t0) for p in prompts])
    wall = time.perf_counter() - t0
    return wall, [o.metrics.ttft_s for o in outs], [o.metrics.tpot_s for o in outs], engine.startup_s


@torch.inference_mode()
def _bench_hf(path, prompts, new, batch):
    """transformers' padded batched generate, `batch` prompts at a time (left padding), greedy."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def gen(rows, n):
        width = max(map(len, rows))
        x = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             num_beams=1, pad_token_id=pad)
        if out.shape[1] != width + n:
            raise RuntimeError(f"generate returned {tuple(out.shape)}, expected width {width + n}")
    gen([prompts[0][:16]], 2)                                # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        gen(prompts[i:i + batch], new)
    return time.perf_counter() - t0


def _bench_llamacpp(gguf, prompts, new, slots):
    """llama.cpp's server (xllamacpp) with `slots` parallel slots, every request submitted at once
    from its own thread; TTFT from submission to llama.cpp's first token (its queue + prompt_ms)."""
    import json
    from concurrent.futures import ThreadPoolExecutor
    import xllamacpp as xlc
    p = xlc.CommonParams()
    p.model.path = str(gguf)
    p.n_ctx = slots * (max(map(len, prompts)) + new + 16)     # split evenly among the slots
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
    p.n_parallel = slots
    p.verbosity = -1
    srv = xlc.Server(p)
    base = {"max_tokens": new, "temperature": 0.0, "top_k": 1, "ignore_eos": True, "cache_prompt": False}
    try:
        srv.handle_completions({**base, "prompt": prompts[0][:16], "max_tokens": 2})
        t0 = time.perf_counter()

        def one(ids):
            r = srv.handle_completions({**base, "prompt": ids})
            r = json.loads(r) if isinstance(r, str) else r
            if "error" in r or r["usage"]["completion_tokens"] != new:
                raise RuntimeError(f"llama.cpp completion failed: {str(r)[:300]}")
            done = time.perf_counter() - t0
            t = r["timings"]
            return done - t["predicted_ms"] / 1e3, t["predicted_ms"] / 1e3 / max(new - 1, 1)
        with ThreadPoolExecutor(len(prompts)) as ex:
            res = list(ex.map(one, prompts))
        wall = time.perf_counter() - t0
    finally:
        del srv
    return wall, [a for a, _ in res], [b for _, b in res], xlc.__version__


def bench_engine(model_name=None, requests: int = 64, new_tokens: int = 128, concurrency: int = 16,
                 step_tokens: int = 256, lo: int = 32, hi: int = 1024,
                 engines=("pacekern bf16", "hf bf16", "llama.cpp"), progress=print) -> list:
    """`requests` real-text prompts of lo..hi tokens, all submitted at once, `new_tokens` each:
    our engine (max_running = concurrency), HF transformers' padded batched generate (batches of
    `concurrency`) and llama.cpp's server (`concurrency` slots) on the same token ids, one after
    the other in this run."""
    from . import models
    from .generate import LLMModel
    known = ("pacekern bf16", "pacekern int8", "pacekern int4", "hf bf16", "llama.cpp")
    if not engines or any(e not in known for e in engines):
        raise ValueError(f"engines={engines!r}: choose from {', '.join(known)}")
    first = LLMModel(model_name)
    prompts = engine_prompts(first.tokenizer, requests, lo, hi)
    rows = []
    for e in engines:
        progress(f"{e}: {requests} requests, {sum(map(len, prompts))} prompt tokens, {new_tokens} new tokens each")
        if e.startswith("pacekern"):
            w = e.split()[1]
            llm = first if w == "bf16" else LLMModel(model_name, weights=w)
            wall, ttft, tpot, startup = _bench_ours(llm, prompts, new_tokens, concurrency, step_tokens)
            progress(f"{e}: engine start {startup:.1f} s (not counted)")
            rows.append(_engine_row(e, requests, concurrency, wall, prompts, new_tokens, ttft, tpot))
        elif e == "hf bf16":
            rows.append(_engine_row(e, requests, concurrency, _bench_hf(first.path, prompts, new_tokens, concurrency),
                                    prompts, new_tokens))
        else:
            src = models.MODELS.get(model_name or models.DEFAULT_MODEL)
            if src is None:
                progress("llama.cpp: skipped (the model is not from the catalogue, so there is no GGUF)")
                continue
            wall, ttft, tpot, ver = _bench_llamacpp(models.fetch_gguf(src), prompts, new_tokens, concurrency)
            rows.append(_engine_row(f"llama.cpp {ver} ({src.name} GGUF)", requests, concurrency, wall, prompts,
                                    new_tokens, ttft, tpot))
        progress(engine_table(rows[-1:]))
    return rows


def engine_table(rows) -> str:
    f = lambda v: "-" if v is None else f"{v:.0f}"          # noqa: E731
    base = {r.engine.split()[0]: r for r in rows}
    lines = ["| engine | requests | concurrency | wall s | output tok/s | total tok/s | TTFT p50/p90 ms | TPOT p50/p90 ms | "
             "output vs HF | output vs llama.cpp |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf, lc = base.get("hf"), base.get("llama.cpp")
        lines.append(f"| {r.engine} | {r.requests} | {r.concurrency} | {r.wall_s:.1f} | {r.out_tok_s:.1f} | "
                     f"{r.total_tok_s:.0f} | {f(r.ttft_p50_ms)} / {f(r.ttft_p90_ms)} | {f(r.tpot_p50_ms)} / {f(r.tpot_p90_ms)} | "
                     f"{f'{r.out_tok_s / hf.out_tok_s:.2f}x' if hf else '-'} | "
                     f"{f'{r.out_tok_s / lc.out_tok_s:.2f}x' if lc else '-'} |")
    return "\n".join(lines)
