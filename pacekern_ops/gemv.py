"""Decode GEMV/skinny GEMM: y[M, N] = x[M, K] @ W[N, K]^T for a few rows M (1 at batch-1 decode,
K+1 in speculative verification), W in torch's Linear layout [out, in] as bf16, int8 or fp32.

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


def _prune(c, dims, cpu):
    # enough row blocks for every thread to get several, so no thread idles at the end
    return dims["N"] // c.NB >= 4 * cpu.threads or c.NB == 16


# R = 1 (one purely sequential stream per thread) is fastest from DRAM on some CPUs (Zen 4: 75-92%
# of the read rate against 55-70% at R >= 2); R > 1 shares the x loads among rows when x is large
SPACE = pk.Space(R=pk.choice(1, 2, 4, 6, 8), NB=pk.choice(16, 32, 64, 128, 256), PF=pk.choice(0, 256, 512, 1024),
                 where=lambda c: c.NB % c.R == 0, prune=_prune, default=dict(R=1, NB=64, PF=0))


def _prune_mm(c, dims, cpu):
    # MM rows of x share each weight load; more than M rows would only compute padding
    return _prune(c, dims, cpu) and (c.MM == 1 or c.MM < 2 * dims["M"])


# 2 x MM x R accumulators + MM x vectors + 1 weight vector stay within the 32 zmm registers. MM takes
# every value up to 8 so that verification's K + 1 rows run with no padding rows
SPACE_MM = pk.Space(R=pk.choice(1, 2, 4, 6, 8), NB=pk.choice(16, 32, 64, 128, 256), PF=pk.choice(0, 256, 512, 1024),
                    MM=pk.choice(1, 2, 3, 4, 5, 6, 7, 8),
                    where=lambda c: c.NB % c.R == 0, regs=lambda c: 2 * c.MM * c.R + c.MM + 1,
                    prune=_prune_mm, default=dict(R=1, NB=64, PF=0, MM=1))


@pk.kernel(space=SPACE_MM, ref=ref_bf16, key={"M": "exact"})
def gemv_bf16(x: pk.f32[M, K], w: pk.bf16[N, K], y: pk.Out[pk.f32[M, N]], *, R, NB, PF, MM):
    """Rows of x are taken MM at a time, so each weight vector loaded (and widened) once serves MM
    rows (batched decode, speculative verification). Each (row, output) has two accumulators (the
    even and odd 16 of every 32 k): with few rows the FMA latency, not the FMA rate, would bound
    the kernel. Every (row, output) accumulates over k in the same order whatever MM and R are, so
    the result does not depend on the batch (speculative verification stays exact)."""
    for n0 in pk.prange(0, N, NB):
        for r0 in range(n0, min(n0 + NB, N), R):
            for m0 in range(0, M, MM):
                acc = pk.tile(pk.f32x16, MM, 2 * R)                 # [i, 2r + v]: two chains per output
                xv = pk.tile(pk.f32x16, MM)
                for k0 in range(0, K - 31, 32):                     # one 64-byte line of each row per step
                    for r in pk.unroll(R):
                        if PF > 0:
                            pk.prefetch(w[min(r0 + r, N - 1), k0 + PF])
                    for v in pk.unroll(2):
                        for i in pk.unroll(MM):
                            xv[i] = pk.f32x16.load(x[min(m0 + i, M - 1), k0 + 16 * v])
                        for r in pk.unroll(R):
                            wv = pk.f32x16.load_bf16(w[min(r0 + r, N - 1), k0 + 16 * v])
                            for i in pk.unroll(MM):
                                acc[i, 2 * r + v] = pk.fma(wv, xv[i], acc[i, 2 * r + v])
                for k in range(K - K % 32, K, 16):                  # the last part line, masked
                    for i in pk.unroll(MM):
                        xv[i] = pk.f32x16.load(x[min(m0 + i, M - 1), k], n=K - k)
                    for r in pk.unroll(R):
                        wv = pk.f32x16.load_bf16(w[min(r0 + r, N - 1), k], n=K - k)
                        for i in pk.unroll(MM):
                            acc[i, 2 * r] = pk.fma(wv, xv[i], acc[i, 2 * r])
                for i in pk.unroll(MM):
                    for r in pk.unroll(R):
                        if m0 + i < M and r0 + r < N:
                            y[m0 + i, r0 + r] = pk.hsum(acc[i, 2 * r] + acc[i, 2 * r + 1])


@pk.kernel
def quantize_x16(x: pk.f32[M, K], xh: pk.Out[pk.u8[M, K]], xl: pk.Out[pk.u8[M, K]], xs: pk.Out[pk.f32[M]]):
    """Each row of x as 16-bit fixed point u = round(x / s) + 32768 (s = max|x| / 32767), split in
    its high and low bytes: two u8 operands for vpdpbusd. |x - s (u - 32768)| <= s / 2.
    The byte split runs in f32, exact for integers below 2**24: hi = round((u - 127.5) / 256)."""
    for m in range(M):
        mv = pk.f32x16.zeros()
        for k in range(0, K, 16):
            v = pk.f32x16.load(x[m, k], n=K - k)                 # masked lanes read as 0
            mv = pk.max(mv, pk.max(v, -v))
        s = max(pk.hmax(mv), 1e-30) / 32767.0                   # an all-zero row gets a tiny scale
        inv = 1.0 / s
        for k in range(0, K, 16):
            u = pk.to_f32(pk.to_i32(pk.f32x16.load(x[m, k], n=K - k) * inv)) + 32768.0
            h = pk.to_f32(pk.to_i32((u - 127.5) * (1.0 / 256.0)))
            pk.store(xh[m, k], pk.to_u8(pk.to_i32(h)), n=min(K - k, 16))
            pk.store(xl[m, k], pk.to_u8(pk.to_i32(u - h * 256.0)), n=min(K - k, 16))
        xs[m] = s


def ref_s8(xh, xl, xs, w, scale, wsum, y):
    """The exact result for the 16-bit activations the kernel is given (float64)."""
    u = torch.as_tensor(xh).double() * 256 + torch.as_tensor(xl).double() - 32768
    return (u * torch.as_tensor(xs).double()[:, None]) @ (w.double() * scale.double()[:, None]).t()


@pk.kernel(space=SPACE, ref=ref_s8, key={"M": "exact"})
def gemv_s8(xh: pk.u8[M, K], xl: pk.u8[M, K], xs: pk.f32[M], w: pk.s8[N, K], scale: pk.f32[N], wsum: pk.i32[N],
            y: pk.Out[pk.f32[M, N]], *, R, NB, PF):
    """y = (x @ w^T) * scale with x as 16-bit fixed point (quantize_x16): per row and 64 weights,
    two vpdpbusd (high and low bytes of x against the same int8 weights), exact i32 sums;
    x.w = 256 hi.w + lo.w - 32768 sum(w)."""
    for n0 in pk.prange(0, N, NB):
        for r0 in range(n0, min(n0 + NB, N), R):
            for m in range(M):
                hi = pk.tile(pk.i32x16, R)
                lo = pk.tile(pk.i32x16, R)
                for k0 in range(0, K - 63, 64):                     # one 64-byte line of each row per step
                    ah = pk.u8x64.load(xh[m, k0])
                    al = pk.u8x64.load(xl[m, k0])
                    for r in pk.unroll(R):
                        if PF > 0:
                            pk.prefetch(w[min(r0 + r, N - 1), k0 + PF])
                        wv = pk.s8x64.load(w[min(r0 + r, N - 1), k0])
                        hi[r] = pk.dot4_u8s8(hi[r], ah, wv)
                        lo[r] = pk.dot4_u8s8(lo[r], al, wv)
                if K % 64 != 0:                                      # the last part line, masked (zeros add nothing)
                    k0 = K - K % 64
                    ah = pk.u8x64.load(xh[m, k0], n=K - k0)
                    al = pk.u8x64.load(xl[m, k0], n=K - k0)
                    for r in pk.unroll(R):
                        wv = pk.s8x64.load(w[min(r0 + r, N - 1), k0], n=K - k0)
                        hi[r] = pk.dot4_u8s8(hi[r], ah, wv)
                        lo[r] = pk.dot4_u8s8(lo[r], al, wv)
                for r in pk.unroll(R):
                    if r0 + r < N:
                        acc = pk.hsum(hi[r]) * 256 + pk.hsum(lo[r]) - 32768 * wsum[r0 + r]     # exact integers
                        y[m, r0 + r] = acc * xs[m] * scale[r0 + r]


def gemv_s8_linear(x, w, scale, wsum, y, scratch=None):
    """y[M, N] = x[M, K] @ (w * scale[:, None])^T for int8 weights (quantize_rows): quantizes x to
    16-bit fixed point, then gemv_s8. `scratch` = (xh, xl, xs) buffers to reuse across calls."""
    m, k = x.shape
    xh, xl, xs = scratch or (torch.empty(m, k, dtype=torch.uint8), torch.empty(m, k, dtype=torch.uint8), torch.empty(m))
    quantize_x16(x, xh, xl, xs)
    return gemv_s8(xh, xl, xs, w, scale, wsum, y)


def prepare_s8_linear(x, w, scale, wsum, y):
    """gemv_s8_linear bound once: the zero-argument call quantizes x and runs gemv_s8 on these
    buffers (decode plans; their contents may change between calls)."""
    m, k = x.shape
    xh, xl, xs = torch.empty(m, k, dtype=torch.uint8), torch.empty(m, k, dtype=torch.uint8), torch.empty(m)
    quant, mm = quantize_x16.prepare(x, xh, xl, xs), gemv_s8.prepare(xh, xl, xs, w, scale, wsum, y)

    def call():
        quant()
        mm()
    return call


def quantize_rows(w: torch.Tensor):
    """fp weights [N, K] -> (int8 [N, K], f32 scale [N], i32 row sums [N]): symmetric per output
    channel; the row sums undo the +32768 offset of gemv_s8's unsigned activations."""
    amax = w.float().abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / 127.0
    q = torch.clamp(torch.round(w.float() / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous(), q.sum(dim=1, dtype=torch.int32).contiguous()


def ref_f32(x, w, y):
    return x @ w.t()


@pk.kernel(space=SPACE_MM, ref=ref_f32, key={"M": "exact"})
def gemv_f32(x: pk.f32[M, K], w: pk.f32[N, K], y: pk.Out[pk.f32[M, N]], *, R, NB, PF, MM):
    """gemv_bf16 for fp32 weights (fp32 decode): each step reads two 64-byte lines of each of
    the R rows (32 floats), prefetching both PF elements ahead; MM rows of x per weight load."""
    for n0 in pk.prange(0, N, NB):
        for r0 in range(n0, min(n0 + NB, N), R):
            for m0 in range(0, M, MM):
                acc = pk.tile(pk.f32x16, MM, 2 * R)                 # [i, 2r + v]: two chains per output
                xv = pk.tile(pk.f32x16, MM)
                for k0 in range(0, K - 31, 32):
                    for r in pk.unroll(R):
                        if PF > 0:
                            pk.prefetch(w[min(r0 + r, N - 1), k0 + PF])
                            pk.prefetch(w[min(r0 + r, N - 1), k0 + PF + 16])
                    for v in pk.unroll(2):
                        for i in pk.unroll(MM):
                            xv[i] = pk.f32x16.load(x[min(m0 + i, M - 1), k0 + 16 * v])
                        for r in pk.unroll(R):
                            wv = pk.f32x16.load(w[min(r0 + r, N - 1), k0 + 16 * v])
                            for i in pk.unroll(MM):
                                acc[i, 2 * r + v] = pk.fma(wv, xv[i], acc[i, 2 * r + v])
                for k in range(K - K % 32, K, 16):                  # the last part lines, masked
                    for i in pk.unroll(MM):
                        xv[i] = pk.f32x16.load(x[min(m0 + i, M - 1), k], n=K - k)
                    for r in pk.unroll(R):
                        wv = pk.f32x16.load(w[min(r0 + r, N - 1), k], n=K - k)
                        for i in pk.unroll(MM):
                            acc[i, 2 * r] = pk.fma(wv, xv[i], acc[i, 2 * r])
                for i in pk.unroll(MM):
                    for r in pk.unroll(R):
                        if m0 + i < M and r0 + r < N:
                            y[m0 + i, r0 + r] = pk.hsum(acc[i, 2 * r] + acc[i, 2 * r + 1])


def rows_config(kern, x, w, y):
    """The config of gemv_bf16 / gemv_f32 for several rows of x (batched decode, speculative
    verification) when the tuning cache has none for this shape; None: the cached or default one.
    Measured on SmolLM2's shapes (Zen 4, 2 threads, all 121 GEMVs of a step, interleaved): for a few
    rows one weight stream re-read from L1 for each row (MM=1) is best (bf16 up to 3 rows, fp32 up
    to 5: 1.2x one row's time). bf16 at 4-8 rows (verification at K = 3-7, batch-8 decode): all rows
    per weight load (MM=rows) with a software prefetch 512 weights ahead, 1.5x one row at 5 rows (no
    prefetch: 2.3x), 1.7x at 8 (R=2 MM=3: 2.15x); beyond, R=2 MM=3 (bf16 with the prefetch 2.4x at
    9 rows, 3.3x at 12, 4.2x at 16, where MM=8 took 4.8x). fp32 at 6-12 rows: R=1, MM up to 8 rows
    per block, prefetch 512 (6 rows 1.7x, 8 rows 1.5x, 9 rows 1.65x, 12 rows 2.7x, against 2.2x,
    1.8x, 1.9x, 3.1x at R=2 MM=3); at 16, R=2 MM=3 (2.7x; MM=8 2.8x)."""
    from pacekern import tuner
    rows = x.shape[0]
    if rows == 1 or tuner.cached_best(kern, kern.bucket(kern.bind((x, w, y)).dims)) is not None:
        return None
    if rows <= (5 if kern is gemv_f32 else 3):
        cfg = pk.Config.of(R=1, NB=64, PF=0, MM=1)
    elif rows <= (12 if kern is gemv_f32 else 8):
        cfg = pk.Config.of(R=1, NB=64, PF=512, MM=-(-rows // -(-rows // 8)))        # equal blocks of <= 8 rows
    else:
        cfg = pk.Config.of(R=2, NB=64, PF=512 if kern is gemv_bf16 else 0, MM=3)
    return kern.spec.space.fitted(cfg, pk.target().level, shrink=("MM", "R"))     # 16 ymm: fewer rows a load
