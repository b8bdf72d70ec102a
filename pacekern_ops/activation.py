"""The MLP activation (SwiGLU) and greedy sampling (argmax over the vocabulary).

silu_mul: gu is the fused gate/up projection [R, 2F] (gate columns first); out = silu(gate) * up
with silu(a) = a / (1 + exp(-a)) in fp32. exp is pacekern's polynomial (~2e-7 relative); for
a << 0, exp(-a) overflows to +inf and a / inf = -0 (torch: a denormal or -0), for a >> 0 it is 0
and the result is a: no inf or nan for any finite input. Work is split in (row, CH-column chunk)
items, so one long decode row can use several threads; small shapes (R*F < PAR) stay on one.

argmax: out[r] = index of the maximum of x[r] (int64, like torch.argmax), the first one on ties.
NaN counts as larger than everything, as in torch: a row holding NaN returns its first NaN. Each
256-element block is reduced to its maximum with vector max (plus a NaN probe: x * 0 is NaN only
for NaN or inf); only the block that holds the winner is scanned again for its first occurrence.
Rows run in parallel when R*V >= PAR.
"""
import torch

import pacekern as pk

R, F, V = pk.dims("R F V")


def ref_silu_mul(gu, out):
    f = out.shape[1]
    return torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]


SILU_SPACE = pk.Space(CH=pk.choice(256, 512, 1024), PAR=pk.choice(1 << 15, 1 << 17, 1 << 62),
                      default=dict(CH=512, PAR=1 << 17))


@pk.func
def _silu_cols(gu, out, r, c0, c1):
    for c in range(c0, c1, 16):
        a = pk.f32x16.load(gu[r, c], n=c1 - c)
        u = pk.f32x16.load(gu[r, F + c], n=c1 - c)
        pk.store(out[r, c], a / (1.0 + pk.exp(-a)) * u, n=c1 - c)


@pk.kernel(space=SILU_SPACE, ref=ref_silu_mul, key={"R": "pow2"})
def silu_mul(gu: pk.f32[R, 2 * F], out: pk.Out[pk.f32[R, F]], *, CH, PAR):
    nc = (F + CH - 1) // CH
    if R * F >= PAR:
        for it in pk.prange(R * nc):
            _silu_cols(gu, out, it // nc, it % nc * CH, min(it % nc * CH + CH, F))
    else:
        for it in range(R * nc):
            _silu_cols(gu, out, it // nc, it % nc * CH, min(it % nc * CH + CH, F))


def ref_argmax(x, out):
    return torch.argmax(x, dim=-1)


ARGMAX_SPACE = pk.Space(PAR=pk.choice(1 << 17, 1 << 19, 1 << 62), default=dict(PAR=1 << 19))


@pk.func
def _argmax_row(x, out, r):
    nb = V - V % 256                            # whole 256-element blocks; the rest is scanned scalar
    best = -float("inf")
    blk = 0                                     # start of the first block whose maximum is `best`
    nan_at = -1
    i = 0
    while i < nb and nan_at < 0:
        m0 = pk.f32x16.load(x[r, i])
        m1 = pk.f32x16.load(x[r, i + 16])
        m2 = pk.f32x16.load(x[r, i + 32])
        m3 = pk.f32x16.load(x[r, i + 48])
        zero = pk.f32x16.zeros()
        probe = pk.fma(m0, zero, pk.fma(m1, zero, pk.fma(m2, zero, m3 * zero)))
        for j in range(i + 64, i + 256, 64):
            a0 = pk.f32x16.load(x[r, j])
            a1 = pk.f32x16.load(x[r, j + 16])
            a2 = pk.f32x16.load(x[r, j + 32])
            a3 = pk.f32x16.load(x[r, j + 48])
            m0 = pk.max(m0, a0)
            m1 = pk.max(m1, a1)
            m2 = pk.max(m2, a2)
            m3 = pk.max(m3, a3)
            probe = pk.fma(a0, zero, pk.fma(a1, zero, pk.fma(a2, zero, pk.fma(a3, zero, probe))))
        pr = pk.hsum(probe)
        if pr != pr:                            # a NaN or an inf in this block: look for a NaN
            j = i
            while j < i + 256 and nan_at < 0:
                if x[r, j] != x[r, j]:
                    nan_at = j
                j += 1
        m = pk.hmax(pk.max(pk.max(m0, m1), pk.max(m2, m3)))
        if m > best:
            best = m
            blk = i
        i += 256
    idx = 0
    if nb > 0 and nan_at < 0:
        idx = blk
        while x[r, idx] != best:                # the first occurrence inside the winning block
            idx += 1
    for j in range(nb, V):
        if nan_at < 0:
            v = x[r, j]
            if v != v:
                nan_at = j
            elif v > best:
                best = v
                idx = j
    if nan_at >= 0:
        idx = nan_at
    out[r] = idx


@pk.kernel(space=ARGMAX_SPACE, ref=ref_argmax, key={"R": "pow2"})
def argmax(x: pk.f32[R, V], out: pk.Out[pk.i64[R]], *, PAR):
    if R * V >= PAR:
        for r in pk.prange(R):
            _argmax_row(x, out, r)
    else:
        for r in range(R):
            _argmax_row(x, out, r)
