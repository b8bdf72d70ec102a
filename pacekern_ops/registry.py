"""The op registry for benchmarks and tuning: op name -> how to build a problem, our implementation,
PyTorch's baseline, and the work it does (FLOPs or bytes), so `pacekern bench`, `pacekern tune`
and the pytest-benchmark suites all measure the same thing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch



@dataclass(frozen=True)
class Problem:
    ours: Callable[[], object]        # runs our kernel once (arguments bound)
    torch: Callable[[], object]       # runs the PyTorch baseline once
    work: float                       # FLOPs (unit 'GFLOP/s'), integer ops ('GOP/s') or bytes ('GB/s') per call
    unit: str                         # 'GFLOP/s' | 'GOP/s' | 'GB/s'
    tune: tuple = ()                  # (kernel, args) pairs to tune for this problem
    check: Callable[[], object] | None = None   # raises if ours disagrees with torch
    limit: str | None = None          # machine limit to compare with: 'fma' (fp32 peak), 'vnni' (vpdpbusd peak), 'dram' (read bandwidth)


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


def prepared_rotation(prepare, sets):
    """Cycle through argument sets (weights out of cache; one set `[()]`: a single bound call), each
    bound once by `prepare` at the first call, i.e. after tuning: the kernels as the LLM calls
    them, without the ~25 us a call spends checking and binding its arguments."""
    calls, state = [], [0]

    def run():
        if not calls:
            calls.extend(prepare(*a) for a in sets)
        state[0] = (state[0] + 1) % len(calls)
        calls[state[0]]()
    return run


def build_gemv_bf16(M, N, K):
    """The kernel bf16 LLM decode runs (gemm_bf16.rows_call: AMX tiles where present, else
    vdpbf16ps; packed weights), on bf16 x as the LLM rounds it."""
    from . import gemm_bf16
    nbytes = N * K * 2
    ws = [torch.randn(N, K).bfloat16() for _ in range(_cold_copies(nbytes))]
    wps = [gemm_bf16.pack(w.t()) for w in ws]
    xb, y = torch.randn(M, K).bfloat16(), torch.empty(M, N)
    nxt = itertools.cycle(ws).__next__
    kernel, args, config = gemm_bf16.rows_call(xb, wps[0], y)

    def prepare(wp):
        return kernel.prepare(*args[:-2], wp, y, config=config)
    return Problem(prepared_rotation(prepare, [(wp,) for wp in wps]),
                   lambda: torch.nn.functional.linear(xb, nxt()), float(nbytes), "GB/s",
                   tune=((kernel, args),), limit="dram",
                   check=lambda: pk_check(kernel, args))


def build_gemv_s8(M, N, K):
    """int8 decode as the LLM runs it (llm/ops.py): x quantized to 16 bits, then gemm_s8x16 on packed
    weights (the row-major gemv_s8 when K % 4 != 0)."""
    from . import gemm_s8x16
    from .gemv import gemv_s8, prepare_s8_linear, quantize_rows, quantize_x16
    nbytes = N * K
    sets = [quantize_rows(torch.randn(N, K)) for _ in range(_cold_copies(nbytes))]
    x, y = torch.randn(M, K), torch.empty(M, N)
    xb, nxt = x.bfloat16(), itertools.cycle(sets).__next__
    q0, s0, ws0 = sets[0]
    scratch = (torch.empty(M, K, dtype=torch.uint8), torch.empty(M, K, dtype=torch.uint8), torch.empty(M))
    quantize_x16(x, *scratch)
    if K % 4 == 0:
        wsets = [(gemm_s8x16.pack_weight(q.t()), s, ws) for q, s, ws in sets]
        ours = prepared_rotation(lambda wp, s, ws: gemm_s8x16.prepare(x, wp, s, ws, y), wsets)
        once = lambda: gemm_s8x16.prepare(x, wsets[0][0], s0, ws0, y)()
        kernel, args, _ = gemm_s8x16.kernel_call(scratch[0].view(torch.int32), scratch[1].view(torch.int32), scratch[2],
                                                 wsets[0][0], s0, ws0, y)
        tune = ((kernel, args),)
    else:
        ours = prepared_rotation(lambda q, s, ws: prepare_s8_linear(x, q, s, ws, y), sets)
        once = lambda: prepare_s8_linear(x, q0, s0, ws0, y)()
        tune = ((gemv_s8, (*scratch, q0, s0, ws0, y)),)

    def base():                       # torch's weight-only int8 CPU path: bf16 activations
        q, s, _ = nxt()
        return torch.ops.aten._weight_int8pack_mm(xb, q, s.bfloat16())

    def check():                      # 16-bit activations: error ~1e-4 of the output's scale
        once()
        want = x @ (q0.float() * s0[:, None]).t()
        torch.testing.assert_close(y, want, rtol=1e-3, atol=2e-4 * want.abs().max().item())
    return Problem(ours, base, float(nbytes), "GB/s", tune=tune, limit="dram", check=check)


def build_gemv_int4(M, N, K):
    from .gemv_int4 import (activation_buffers, dequantize_int4, gemv_int4, gemv_int4_linear, prepare_int4_linear,
                            quantize_int4, torch_int4_pack)
    sets = [quantize_int4(torch.randn(N, K)) for _ in range(_cold_copies(N * K * 5 // 8))]
    x, y = torch.randn(M, K), torch.empty(M, N)
    w0, s0, m0 = sets[0]
    nbytes = w0.numel() + 2 * s0.numel() * 2
    scratch = activation_buffers(M, K)
    packs = [torch_int4_pack(*s, K) for s in sets]                  # the same tensors, in torch's layout
    xb, nxt_pack = x.bfloat16(), itertools.cycle(packs).__next__
    # ours: quantize x to int8 per group + the VNNI GEMV, as the LLM calls it
    ours = prepared_rotation(lambda w, ws, wm: prepare_int4_linear(x, w, ws, wm, y), sets)

    def base():                       # torch's CPU int4 matmul on the same 4-bit codes, bf16 activations
        wp, sz = nxt_pack()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wp, 32, sz.bfloat16())

    def check():                      # int8 activations per 32 values: error ~1e-2 of the output's scale
        want = x @ dequantize_int4(w0, s0, m0, K).t()
        torch.testing.assert_close(gemv_int4_linear(x, w0, s0, m0, y, scratch), want, rtol=0.02,
                                   atol=0.01 * want.abs().max().item())
    xq, xs, xm = scratch
    gemv_int4_linear(x, w0, s0, m0, y, scratch)
    return Problem(ours, base, float(nbytes), "GB/s", tune=((gemv_int4, (xq, xs, xm, w0, s0, m0, y)),), limit="dram",
                   check=check)


def build_gemm_bf16(M, N, K):
    from .gemm_bf16 import build_problem
    return build_problem(M, N, K)


def build_gemm_u8s8(M, N, K):
    from .gemm_u8s8 import build_problem
    return build_problem(M, N, K)


def build_gemm_s8x16(M, N, K):
    from .gemm_s8x16 import gemm_s8x16, pack_weight, prepare
    from .gemv import quantize_rows
    x = torch.randn(M, K)
    q, scale, wsum = quantize_rows(torch.randn(N, K))
    y, xb = torch.empty(M, N), x.bfloat16()
    ours = prepare(x, pack_weight(q.t()), scale, wsum, y)      # quantize x to 16 bits + the GEMM, as prefill runs it

    def check():                      # 16-bit activations: error ~1e-4 of the output's scale
        ours()
        want = x @ (q.float() * scale[:, None]).t()
        torch.testing.assert_close(y, want, rtol=1e-3, atol=2e-4 * want.abs().max().item())
    return Problem(ours, lambda: torch.ops.aten._weight_int8pack_mm(xb, q, scale.bfloat16()), 2.0 * M * N * K, "GFLOP/s",
                   check=check)


def build_gemm_int4(M, N, K):
    from .gemm_int4 import pack, prepare
    from .gemv_int4 import dequantize_int4, quantize_int4, torch_int4_pack
    x = torch.randn(M, K)
    w, ws, wm = quantize_int4(torch.randn(N, K))
    y, xb = torch.empty(M, N), x.bfloat16()
    ours = prepare(x, pack(w, ws, wm), y)                      # quantize x per group to int8 + the GEMM
    wp, sz = torch_int4_pack(w, ws, wm, K)

    def check():                      # int8 activations per 32 values: error ~1e-2 of the output's scale
        ours()
        want = x @ dequantize_int4(w, ws, wm, K).t()
        torch.testing.assert_close(y, want, rtol=0.02, atol=0.01 * want.abs().max().item())
    return Problem(ours, lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wp, 32, sz.bfloat16()), 2.0 * M * N * K,
                   "GFLOP/s", check=check)


def build_gemv_f32(M, N, K):
    from .gemv import gemv_f32
    nbytes = N * K * 4
    ws = [torch.randn(N, K) for _ in range(_cold_copies(nbytes))]
    x, y = torch.randn(M, K), torch.empty(M, N)
    nxt = itertools.cycle(ws).__next__
    return Problem(prepared_rotation(lambda w: gemv_f32.prepare(x, w, y), [(w,) for w in ws]),
                   lambda: torch.nn.functional.linear(x, nxt()), float(nbytes), "GB/s",
                   tune=((gemv_f32, (x, ws[0], y)),), limit="dram",
                   check=lambda: torch.testing.assert_close(gemv_f32(x, ws[0], y), x @ ws[0].t(), rtol=1e-4, atol=1e-3))


# LLM ops at decode shapes. Ours is the prepared call (bound once, as the LLM runs it): these ops
# take 1-20 us at decode, less than binding the arguments of an ordinary call (~25 us).

def build_add_rmsnorm(R, H):
    from .norm import add_rmsnorm, ref_add_rmsnorm
    x, res, w, eps, out = torch.randn(R, H), torch.randn(R, H), torch.randn(H), torch.tensor([1e-5]), torch.empty(R, H)

    def base():
        res.add_(x)
        torch.mul(res, torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + 1e-5), out=out)
        return out.mul_(w)

    def check():
        want = ref_add_rmsnorm(x, res, w, eps, out)[1]
        torch.testing.assert_close(add_rmsnorm(x, res, w, eps, out)[1], want, rtol=1e-5, atol=1e-5)
    return Problem(add_rmsnorm.prepare(x, res, w, eps, out), base, 4.0 * R * H * 4, "GB/s",
                   tune=((add_rmsnorm, (x, res, w, eps, out)),), check=check)


def _kv_problem(B, T, NH, KVH, D, start):
    q = torch.randn(B, T, NH, D)
    kc, vc = torch.randn(B, KVH, start + T, D), torch.randn(B, KVH, start + T, D)
    return q, kc, vc, torch.full((B,), start, dtype=torch.int32)


def build_rope_qkv(B, T, NH, KVH, D, start):
    from .rope import ref, rope_qkv, rope_tables
    _, kc, vc, st = _kv_problem(B, T, NH, KVH, D, start)
    qkv, q = torch.randn(B, T, NH + 2 * KVH, D), torch.empty(B, T, NH, D)
    cos, sin = rope_tables(start + T, D, 1e4)
    args = (qkv, st, torch.arange(T, dtype=torch.int32).repeat(B, 1), cos, sin, q, kc, vc)
    pos = torch.arange(start, start + T)
    c, s = torch.cat((cos[pos], cos[pos]), -1)[None, :, None], torch.cat((sin[pos], sin[pos]), -1)[None, :, None]

    def base():                       # HF rotate_half on q and k, cache writes by slicing
        x = qkv[:, :, : NH + KVH]
        r = x * c + torch.cat((-x[..., D // 2:], x[..., : D // 2]), -1) * s
        q.copy_(r[:, :, :NH])
        kc[:, :, start: start + T] = r[:, :, NH:].transpose(1, 2)
        vc[:, :, start: start + T] = qkv[:, :, NH + KVH:].transpose(1, 2)
    return Problem(rope_qkv.prepare(*args), base, 4.0 * B * T * (2 * NH + 4 * KVH) * D, "GB/s",
                   tune=((rope_qkv, args),), check=lambda: pk_check(rope_qkv, args))


def build_attention(B, T, NH, KVH, D, start):
    from .attention import attention
    q, kc, vc, st = _kv_problem(B, T, NH, KVH, D, start)
    out, qt = torch.empty_like(q), q.transpose(1, 2)
    mask = torch.arange(start + T)[None, :] <= torch.arange(start, start + T)[:, None]
    args = (q, kc, vc, st, torch.zeros(B, 1, 1, dtype=torch.int32), out)    # causal (no tree)
    return Problem(attention.prepare(*args),
                   lambda: torch.nn.functional.scaled_dot_product_attention(qt, kc, vc, attn_mask=mask, enable_gqa=True),
                   4.0 * B * NH * D * (T * start + T * (T + 1) // 2), "GFLOP/s", tune=((attention, args),),
                   check=lambda: pk_check(attention, args, rtol=1e-5, atol=2e-6))


def build_silu_mul(R, F):
    from .activation import silu_mul
    gu, out = torch.randn(R, 2 * F), torch.empty(R, F)
    return Problem(silu_mul.prepare(gu, out), lambda: torch.mul(torch.nn.functional.silu(gu[:, :F]), gu[:, F:], out=out),
                   3.0 * R * F * 4, "GB/s", tune=((silu_mul, (gu, out)),), check=lambda: pk_check(silu_mul, (gu, out)))


def build_argmax(R, V):
    from .activation import argmax
    x, out = torch.randn(R, V), torch.empty(R, dtype=torch.int64)
    return Problem(argmax.prepare(x, out), lambda: torch.argmax(x, -1, out=out), 4.0 * R * V, "GB/s",
                   tune=((argmax, (x, out)),), check=lambda: pk_check(argmax, (x, out)))


def pk_check(kernel, args, **tol):
    import pacekern as pk
    pk.check(kernel, *args, **tol)


SMOL = dict(NH=9, KVH=3, D=64)        # SmolLM2-135M attention shape

OPS = {op.name: op for op in [
    Op("gemm_f32", dict(M=1024, N=1024, K=1024), build_gemm_f32, "fp32 GEMM, packed weights vs torch.matmul"),
    Op("gemm_bf16", dict(M=1024, N=1024, K=1024), build_gemm_bf16,
       "bf16 GEMM (AMX tiles where present, else AVX512-BF16) vs torch bf16 matmul (oneDNN)"),
    Op("gemm_u8s8", dict(M=256, N=1024, K=1024), build_gemm_u8s8,
       "u8 x s8 quantized linear with requantization to u8 (AMX/VNNI) vs torch dynamic-quantized Linear"),
    Op("gemv_bf16", dict(M=1, N=49152, K=576), build_gemv_bf16,
       "decode GEMV, bf16 weights streamed from DRAM (the LLM's kernel: gemm_bf16_amx_rows on AMX, else gemm_bf16_rows) vs torch bf16 linear",
       variants=(dict(M=1, N=8960, K=1536),)),
    Op("gemv_s8", dict(M=1, N=8960, K=1536), build_gemv_s8,
       "decode GEMV, int8 weights + per-row scales (the LLM's kernel: gemm_s8x16, packed) vs torch _weight_int8pack_mm"),
    Op("gemv_int4", dict(M=1, N=8960, K=1536), build_gemv_int4,
       "decode GEMV, 4-bit weights (scale + min per 32) vs torch _weight_int4pack_mm_for_cpu on the same codes"),
    Op("gemm_s8x16", dict(M=128, N=3072, K=576), build_gemm_s8x16,
       "int8-weight prefill GEMM (16-bit activations, VNNI) vs torch _weight_int8pack_mm"),
    Op("gemm_int4", dict(M=128, N=3072, K=576), build_gemm_int4,
       "4-bit-weight prefill GEMM (int8 activations per 32, VNNI) vs torch _weight_int4pack_mm_for_cpu on the same codes"),
    Op("gemv_f32", dict(M=1, N=1536, K=576), build_gemv_f32, "decode GEMV, fp32 weights streamed from DRAM vs torch linear"),
    Op("add_rmsnorm", dict(R=1, H=576), build_add_rmsnorm, "residual add + RMSNorm at decode vs torch (HF order of ops)"),
    Op("rope_qkv", dict(B=1, T=1, **SMOL, start=128), build_rope_qkv, "RoPE on q/k + KV cache write at decode vs torch"),
    Op("attention", dict(B=1, T=1, **SMOL, start=128), build_attention, "causal GQA attention over the KV cache vs torch SDPA",
       variants=(dict(B=8, T=1, **SMOL, start=512), dict(B=1, T=512, **SMOL, start=0))),
    Op("silu_mul", dict(R=1, F=1536), build_silu_mul, "SiLU(gate) * up at decode vs torch"),
    Op("argmax", dict(R=1, V=49152), build_argmax, "greedy next token over the vocabulary vs torch.argmax"),
]}
