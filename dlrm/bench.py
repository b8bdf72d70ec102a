"""Throughput and tail latency of DLRMv2 inference, pacekern beside PyTorch, in one run.

Implementations (same model weights, same batches):
  pacekern-int8   PacekernDlrm, int8 row-wise tables
  pacekern-int4   PacekernDlrm, 4-bit row-wise tables
  pacekern-fp32   PacekernDlrmFp32 (gemm_f32, embedding_bag_f32)
  torch-fp32      the nn.Module in eager mode (nn.EmbeddingBag, nn.Linear)
  torch-int8      TorchInt8Dlrm (quantized embedding bags + fbgemm quantized linear)

For each batch size the implementations run in interleaved rounds (A B C A B C ...) so load
changes on a shared machine hit all alike; every call is timed, samples/s = B / median call
time, p99 from the per-call times. Weights are seeded random (throughput does not depend on
training; `model=` takes a trained one), quantized with ranges calibrated on synthetic rows.
Input validation is included in every timing (each path validates its batch).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

import pacekern as pk

from .data import SyntheticCTR
from .model import DLRMv2, DlrmSpec
from .quantize import QuantizedDlrm, quantize

IMPLS = ("pacekern-int8", "pacekern-int4", "pacekern-fp32", "torch-fp32", "torch-int8")
DEFAULT_IMPLS = ("pacekern-int8", "torch-fp32", "torch-int8")


@dataclass
class BenchRow:
    impl: str
    batch: int
    threads: int
    samples_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    vs_torch_fp32: float | None = None        # samples/s ratio
    vs_torch_int8: float | None = None


def build(spec: DlrmSpec, impls, model: DLRMv2 | None = None, q: QuantizedDlrm | None = None, seed: int = 0,
          progress: bool = False) -> dict:
    """impl name -> callable(batch)."""
    from .infer import PacekernDlrm, PacekernDlrmFp32
    from .torch_int8 import TorchInt8Dlrm
    model = model or DLRMv2(spec, seed=seed).eval()
    if q is None and any("int" in i for i in impls):
        src = SyntheticCTR(spec, seed=seed)
        bits = tuple(b for b, i in ((8, "int8"), (4, "int4")) if any(x.endswith(i) for x in impls))
        q = quantize(model, src.stream("calib", 4096, 1024), emb_bits=bits, progress=progress)
    out = {}
    for i in impls:
        if i == "pacekern-int8":
            out[i] = PacekernDlrm(q, 8)
        elif i == "pacekern-int4":
            out[i] = PacekernDlrm(q, 4)
        elif i == "pacekern-fp32":
            out[i] = PacekernDlrmFp32(model)
        elif i == "torch-fp32":
            out[i] = torch.no_grad()(model.predict)
        elif i == "torch-int8":
            out[i] = TorchInt8Dlrm(q, 8)
        else:
            raise ValueError(f"unknown implementation {i!r}; choose from {', '.join(IMPLS)}")
    return out


def _time_calls(f, batch, n: int) -> list:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        f(batch)
        out.append(time.perf_counter() - t0)
    return out


def bench(spec: DlrmSpec | str = "dev", batches=(1, 64, 256, 2048), impls=DEFAULT_IMPLS, threads: int | None = 2,
          rounds: int = 5, budget_s: float = 4.0, model: DLRMv2 | None = None, q: QuantizedDlrm | None = None,
          seed: int = 0, progress: bool = True, tune: bool = False) -> list:
    """Rows of the benchmark table (BenchRow), batches x implementations. `budget_s`: rough
    seconds per (implementation, batch) after one warm-up call. `tune`: the pacekern paths'
    warm-up call runs with PACEKERN_TUNE=1, so every kernel shape bucket not yet in the tuning
    cache is tuned (up to PACEKERN_TUNE_BUDGET_S each, once per machine; later runs reuse it)."""
    import os
    from tqdm import tqdm
    spec = DlrmSpec.preset(spec) if isinstance(spec, str) else spec
    if threads:
        pk.set_num_threads(threads)
    nthreads = torch.get_num_threads()
    fns = build(spec, impls, model, q, seed)
    src = SyntheticCTR(spec, seed=seed)
    rows = []
    for bsz in tqdm(batches, desc="bench", unit="batch size", disable=not progress):
        batch = src.batch("eval", 0, bsz)
        per_call = {}
        for k, f in fns.items():                         # warm-up (compiles, packs, allocates buffers)
            if tune and k.startswith("pacekern"):
                old = os.environ.get("PACEKERN_TUNE")
                os.environ["PACEKERN_TUNE"] = "1"
                try:
                    f(batch)
                finally:
                    os.environ.pop("PACEKERN_TUNE") if old is None else os.environ.__setitem__("PACEKERN_TUNE", old)
            f(batch)
            t0 = time.perf_counter()
            f(batch)
            per_call[k] = max(time.perf_counter() - t0, 1e-6)
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                n = max(1, int(budget_s / rounds / per_call[k]))
                times[k] += _time_calls(f, batch, min(n, 2000))
        for k, ts in times.items():
            ts = sorted(ts)
            med = statistics.median(ts)
            p99 = ts[min(len(ts) - 1, int(round(0.99 * (len(ts) - 1))))]
            rows.append(BenchRow(k, bsz, nthreads, bsz / med, med * 1e3, p99 * 1e3, len(ts)))
        by = {r.impl: r for r in rows if r.batch == bsz}
        for r in by.values():
            if "torch-fp32" in by:
                r.vs_torch_fp32 = r.samples_per_s / by["torch-fp32"].samples_per_s
            if "torch-int8" in by:
                r.vs_torch_int8 = r.samples_per_s / by["torch-int8"].samples_per_s
    return rows


def format_table(rows) -> str:
    """Markdown table of BenchRows."""
    from pacekern.target import cpu
    head = "| impl | batch | threads | samples/s | p50 ms | p99 ms | vs torch fp32 | vs torch int8 | calls |"
    out = [cpu().describe(), "", head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda x: "-" if x is None else f"{x:.2f}x"
    for r in rows:
        out.append(f"| {r.impl} | {r.batch} | {r.threads} | {r.samples_per_s:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | "
                   f"{f(r.vs_torch_fp32)} | {f(r.vs_torch_int8)} | {r.calls} |")
    return "\n".join(out)
