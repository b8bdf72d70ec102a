"""fp32 GEMM: y[M, N] = x[M, K] @ w[K, N], weights packed once into 16-column panels.

Layout: wp[p, k, l] = w[k, 16 p + l] (zero padded to a multiple of 16 columns), so one panel row
is one zmm load and the layout does not depend on the tile config. Blocking (BLIS-style):
threads split M in blocks of MT micro-tiles (MT * MR rows); K is cut in KC slices so that the B micro-panel (KC x 16 NV
floats) stays in L1 while the MR x NV register tile sweeps the MT * MR rows under it.
"""
import torch

import pacekern as pk

M, N, K = pk.dims("M N K")


def pack(w: torch.Tensor) -> torch.Tensor:
    """[K, N] fp32 -> [cdiv(N, 16), K, 16] panels, zero padded."""
    k, n = w.shape
    np_ = -(-n // 16)
    wp = torch.zeros(np_ * 16, k, dtype=torch.float32)
    wp[:n] = w.t()
    return wp.view(np_, 16, k).transpose(1, 2).contiguous()


def unpack(wp: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack: [cdiv(N, 16), K, 16] -> [K, N]."""
    return wp.transpose(1, 2).reshape(-1, wp.shape[1])[:n].t()


def ref(x, wp, y):
    return x @ unpack(wp, y.shape[1])


SPACE = pk.Space(
    # MT micro-tiles of MR rows per thread block (MC = MT * MR rows: no partial tiles inside a block)
    MR=pk.choice(4, 5, 6, 7, 8, 12, 14), NV=pk.choice(1, 2, 3, 4), KC=pk.choice(64, 128, 192, 256), MT=pk.choice(4, 6, 8, 12, 16),
    # MR NV accumulators + NV B vectors + a broadcast: LLVM 20 keeps only a few of a k step's
    # broadcasts live (asm of 12x2, 8x3, 14x2: 28-32 zmm, no spills), and the B micro-panel (KC x 16
    # NV floats) must fit in L1 beside the A rows. 1024^3 on the AMX VM (2 threads, interleaved):
    # MR=12 NV=2 KC=256 MT=4 5.50 ms, the old space's best (5 x 4) 5.88, torch 5.04-5.15
    where=lambda c: c.KC * 64 * c.NV <= 48 * 1024,
    regs=lambda c: c.MR * c.NV + c.NV + 1,
    # default: 12 x 2 in blocks of 72 rows, which also splits a 128-token prefill between 2 threads;
    # with 16 ymm, 6 x 1 (the classic 6 x 16 AVX2 tile) in blocks of 72 rows
    default=(dict(MR=12, NV=2, KC=256, MT=6), dict(MR=6, NV=1, KC=256, MT=12)))


@pk.kernel(space=SPACE, ref=ref, key={"M": "pow2"})
def gemm_f32(x: pk.f32[M, K], wp: pk.f32[pk.cdiv(N, 16), K, 16], y: pk.Out[pk.f32[M, N]], *, MR, NV, KC, MT):
    for m0 in pk.prange(0, M, MT * MR):
        m1 = min(m0 + MT * MR, M)                                  # this thread's rows: [m0, m1)
        for k0 in range(0, K, KC):
            k1 = min(k0 + KC, K)
            for j0 in range(0, N, 16 * NV):
                for i0 in range(m0, m1, MR):
                    acc = pk.tile(pk.f32x16, MR, NV)
                    if k0 > 0:                                # accumulate onto the previous K slice
                        for i in pk.unroll(MR):
                            for j in pk.unroll(NV):
                                acc[i, j] = pk.f32x16.load(y[min(i0 + i, m1 - 1), min(j0 + 16 * j, N - 1)], n=N - j0 - 16 * j)
                    b = pk.tile(pk.f32x16, NV)
                    for k in range(k0, k1):
                        for j in pk.unroll(NV):
                            b[j] = pk.f32x16.load(wp[min(j0 // 16 + j, (N - 1) // 16), k, 0])
                        for i in pk.unroll(MR):
                            a = pk.f32x16.bcast(x[min(i0 + i, m1 - 1), k])   # rows past m1 repeat row m1-1 (not stored)
                            for j in pk.unroll(NV):
                                acc[i, j] = pk.fma(a, b[j], acc[i, j])
                    for i in pk.unroll(MR):
                        if i0 + i < m1:
                            for j in pk.unroll(NV):
                                pk.store(y[i0 + i, min(j0 + 16 * j, N - 1)], acc[i, j], n=N - j0 - 16 * j)
