"""The op registry for benchmarks and tuning: op name -> how to build a problem, our implementation,
PyTorch's baseline, and the work it does (FLOPs or bytes), so `pacekern bench`, `pacekern tune`
and the pytest-benchmark suites all measure the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pacekern.bench import rotating


@dataclass(frozen=True)
class Problem:
    ours: Callable[[], object]        # runs our kernel once (arguments bound)
    torch: Callable[[], object]       # runs the PyTorch baseline once
    work: float                       # FLOPs (unit 'GFLOP/s') or bytes (unit 'GB/s') per call
    unit: str                         # 'GFLOP/s' | 'GB/s'
    tune: tuple = ()                  # (kernel, args) pairs to tune for this problem
    check: Callable[[], object] | None = None   # raises if ours disagrees with torch
    limit: str | None = None          # machine limit to compare with: 'fma' (fp32 peak), 'dram' (read bandwidth)


@dataclass(frozen=True)
class Op:
    name: str
    sizes: dict                       # default problem sizes
    build: Callable[..., Problem]     # build(**sizes) -> Problem
    doc: str = ""
    variants: tuple = field(default=())   # extra size dicts benchmarked by default


def _cold_copies(nbytes):
    from pacekern.bench import cold_copies
    from pacekern.target import cpu
    return cold_copies(nbytes, cpu().l3, max_bytes=2 << 30)


def build_gemm_f32(M, N, K):
    from .gemm_f32 import gemm_f32, pack
    x, w = torch.randn(M, K), torch.randn(K, N)
    wp, y = pack(w), torch.empty(M, N)
    return Problem(lambda: gemm_f32(x, wp, y), lambda: torch.matmul(x, w), 2.0 * M * N * K, "GFLOP/s",
                   tune=((gemm_f32, (x, wp, y)),), limit="fma",
                   check=lambda: torch.testing.assert_close(gemm_f32(x, wp, y), x @ w, rtol=1e-4, atol=1e-3))


def build_gemv_bf16(M, N, K):
    from .gemv import gemv_bf16
    nbytes = N * K * 2
    nxt = rotating(lambda: torch.randn(N, K).bfloat16(), _cold_copies(nbytes))
    x, y = torch.randn(M, K), torch.empty(M, N)
    xb = x.bfloat16()
    w0 = nxt()
    return Problem(lambda: gemv_bf16(x, nxt(), y), lambda: torch.nn.functional.linear(xb, nxt()), float(nbytes), "GB/s",
                   tune=((gemv_bf16, (x, w0, y)),), limit="dram",
                   check=lambda: torch.testing.assert_close(gemv_bf16(x, w0, y), x @ w0.float().t(), rtol=1e-4, atol=1e-3))


def build_gemv_s8(M, N, K):
    from .gemv import gemv_s8, gemv_s8_linear, quantize_rows
    nbytes = N * K
    nxt = rotating(lambda: quantize_rows(torch.randn(N, K)), _cold_copies(nbytes))
    x, y = torch.randn(M, K), torch.empty(M, N)
    xb = x.bfloat16()
    q0, s0, ws0 = nxt()
    scratch = (torch.empty(M, K, dtype=torch.uint8), torch.empty(M, K, dtype=torch.uint8), torch.empty(M))

    def ours():                       # quantize x to 16 bits + the VNNI GEMV, as the LLM calls it
        q, s, ws = nxt()
        return gemv_s8_linear(x, q, s, ws, y, scratch)

    def base():                       # torch's weight-only int8 CPU path: bf16 activations
        q, s, _ = nxt()
        return torch.ops.aten._weight_int8pack_mm(xb, q, s.bfloat16())
    gemv_s8_linear(x, q0, s0, ws0, y, scratch)
    def check():                      # 16-bit activations: error ~1e-4 of the output's scale
        want = x @ (q0.float() * s0[:, None]).t()
        torch.testing.assert_close(gemv_s8_linear(x, q0, s0, ws0, y, scratch), want, rtol=1e-3,
                                   atol=2e-4 * want.abs().max().item())
    return Problem(ours, base, float(nbytes), "GB/s", tune=((gemv_s8, (*scratch, q0, s0, ws0, y)),), limit="dram",
                   check=check)


def build_gemm_bf16(M, N, K):
    from .gemm_bf16 import build_problem
    return build_problem(M, N, K)


def build_gemm_u8s8(M, N, K):
    from .gemm_u8s8 import build_problem
    return build_problem(M, N, K)


OPS = {op.name: op for op in [
    Op("gemm_f32", dict(M=1024, N=1024, K=1024), build_gemm_f32, "fp32 GEMM, packed weights vs torch.matmul"),
    Op("gemm_bf16", dict(M=1024, N=1024, K=1024), build_gemm_bf16,
       "bf16 GEMM (AMX tiles where present, else AVX512-BF16) vs torch bf16 matmul (oneDNN)"),
    Op("gemm_u8s8", dict(M=256, N=1024, K=1024), build_gemm_u8s8,
       "u8 x s8 quantized linear with requantization to u8 (AMX/VNNI) vs torch dynamic-quantized Linear"),
    Op("gemv_bf16", dict(M=1, N=49152, K=576), build_gemv_bf16, "decode GEMV, bf16 weights streamed from DRAM vs torch bf16 linear",
       variants=(dict(M=1, N=8960, K=1536),)),
    Op("gemv_s8", dict(M=1, N=8960, K=1536), build_gemv_s8, "decode GEMV, int8 weights + per-row scales vs torch _weight_int8pack_mm"),
]}
