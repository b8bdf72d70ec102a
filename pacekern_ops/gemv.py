"""Decode GEMV/skinny GEMM: y[M, N] = x[M, K] @ W[N, K]^T for a few rows M (1 at batch-1 decode,
K+1 in speculative verification), W in torch's Linear layout [out, in] as bf16 or int8.

At decode the weights are read once per token from DRAM, so the kernel is built to stream: each
thread walks R weight rows side by side (R independent sequential streams), one 64-byte cache
line of each row per step with an optional software prefetch PF elements ahead, widening 16
weights per load to f32 (bf16: shift into the high half; int8: sign-extend) and accumulating in
f32; the few x rows stay in L1. int8 rows carry one f32 scale each
(per-output-channel, symmetric), applied once per row after the reduction.
"""
import torch

import pacekern as pk

M, N, K = pk.dims("M N K")

def ref_bf16(x, w, y):
    return x @ w.float().t()


def ref_s8(x, w, scale, y):
    return (x @ w.float().t()) * scale


def _prune(c, dims, cpu):
    # enough row blocks for every thread to get several, so no thread idles at the end
    return dims["N"] // c.NB >= 4 * cpu.threads or c.NB == 16


SPACE = pk.Space(R=pk.choice(2, 4, 6, 8), NB=pk.choice(16, 32, 64, 128), PF=pk.choice(0, 256, 512, 1024),
                 where=lambda c: c.NB % c.R == 0, prune=_prune, default=dict(R=4, NB=64, PF=0))


@pk.kernel(space=SPACE, ref=ref_bf16, key={"M": "exact"})
def gemv_bf16(x: pk.f32[M, K], w: pk.bf16[N, K], y: pk.Out[pk.f32[M, N]], *, R, NB, PF):
    for n0 in pk.prange(0, N, NB):
        for r0 in range(n0, min(n0 + NB, N), R):
            for m in range(M):
                acc = pk.tile(pk.f32x16, R)
                for k0 in range(0, K - 31, 32):                     # one 64-byte line of each row per step
                    for r in pk.unroll(R):
                        if PF > 0:
                            pk.prefetch(w[min(r0 + r, N - 1), k0 + PF])
                    for v in pk.unroll(2):
                        xv = pk.f32x16.load(x[m, k0 + 16 * v])
                        for r in pk.unroll(R):
                            acc[r] = pk.fma(pk.f32x16.load_bf16(w[min(r0 + r, N - 1), k0 + 16 * v]), xv, acc[r])
                for k in range(K - K % 32, K, 16):                  # the last part line, masked
                    xv = pk.f32x16.load(x[m, k], n=K - k)
                    for r in pk.unroll(R):
                        acc[r] = pk.fma(pk.f32x16.load_bf16(w[min(r0 + r, N - 1), k], n=K - k), xv, acc[r])
                for r in pk.unroll(R):
                    if r0 + r < N:
                        y[m, r0 + r] = pk.hsum(acc[r])


@pk.kernel(space=SPACE, ref=ref_s8, key={"M": "exact"})
def gemv_s8(x: pk.f32[M, K], w: pk.s8[N, K], scale: pk.f32[N], y: pk.Out[pk.f32[M, N]], *, R, NB, PF):
    for n0 in pk.prange(0, N, NB):
        for r0 in range(n0, min(n0 + NB, N), R):
            for m in range(M):
                acc = pk.tile(pk.f32x16, R)
                for k0 in range(0, K - 63, 64):                     # one 64-byte line of each row per step
                    for r in pk.unroll(R):
                        if PF > 0:
                            pk.prefetch(w[min(r0 + r, N - 1), k0 + PF])
                    for v in pk.unroll(4):
                        xv = pk.f32x16.load(x[m, k0 + 16 * v])
                        for r in pk.unroll(R):
                            acc[r] = pk.fma(pk.f32x16.load_s8(w[min(r0 + r, N - 1), k0 + 16 * v]), xv, acc[r])
                for k in range(K - K % 64, K, 16):                  # the last part line, masked
                    xv = pk.f32x16.load(x[m, k], n=K - k)
                    for r in pk.unroll(R):
                        acc[r] = pk.fma(pk.f32x16.load_s8(w[min(r0 + r, N - 1), k], n=K - k), xv, acc[r])
                for r in pk.unroll(R):
                    if r0 + r < N:
                        y[m, r0 + r] = pk.hsum(acc[r]) * scale[r0 + r]


def quantize_rows(w: torch.Tensor):
    """fp weights [N, K] -> (int8 [N, K], f32 scale [N]): symmetric per output channel."""
    amax = w.float().abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / 127.0
    q = torch.clamp(torch.round(w.float() / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()
