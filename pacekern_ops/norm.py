"""RMSNorm, alone and fused with the residual add that precedes it in a transformer block.

    rmsnorm:      out = x * rsqrt(mean(x^2) + eps) * w
    add_rmsnorm:  res += x (in place), then out = rmsnorm(res)

Numerics follow Hugging Face's LlamaRMSNorm in fp32: the sum of squares is accumulated in fp32
(two 16-lane accumulators, then a tree sum), divided by H, `1 / sqrt(var + eps)` is computed once
per row and applied as (x * r) * w. Results differ from torch by summation order only (~1 ulp).

`res` is both read and written by add_rmsnorm: it is an Out parameter, and the reference returns
the updated residual as its first output (pk.check computes the reference before the kernel runs,
so it sees the residual the kernel started from). `eps` is a one-element array, so that `prepare`d
calls carry no Python scalars.

Rows are independent. At decode (a few rows of a few hundred floats) a parallel region costs more
than the whole op (~10 us to wake the threads against ~0.1 us of work), so rows run on one thread
unless R * H >= PAR. PAR = 2^16 parallelizes a 128-token prefill of a 576-wide model (SmolLM2: the
61 add_rmsnorm calls of a prefill 4.3 ms -> ~1 ms on 2 threads) and no decode step up to 113 rows.
"""
import torch

import pacekern as pk

R, H = pk.dims("R H")


def _ref_norm(h, w, eps):
    var = h.pow(2).mean(-1, keepdim=True)
    return w * (h * torch.rsqrt(var + eps[0]))


def ref_rmsnorm(x, w, eps, out):
    return _ref_norm(x, w, eps)


def ref_add_rmsnorm(x, res, w, eps, out):
    h = res + x
    return h, _ref_norm(h, w, eps)


SPACE = pk.Space(PAR=pk.choice(1 << 16, 1 << 18, 1 << 62), default=dict(PAR=1 << 16))


@pk.func
def _add_sumsq(x, res, r):
    """res[r] += x[r]; returns sum(res[r]^2)."""
    s0 = pk.f32x16.zeros()
    s1 = pk.f32x16.zeros()
    for i in range(0, H - 31, 32):
        a = pk.f32x16.load(res[r, i]) + pk.f32x16.load(x[r, i])
        b = pk.f32x16.load(res[r, i + 16]) + pk.f32x16.load(x[r, i + 16])
        pk.store(res[r, i], a)
        pk.store(res[r, i + 16], b)
        s0 = pk.fma(a, a, s0)
        s1 = pk.fma(b, b, s1)
    for i in range(H - H % 32, H, 16):                      # masked tail: lanes past H read as 0
        a = pk.f32x16.load(res[r, i], n=H - i) + pk.f32x16.load(x[r, i], n=H - i)
        pk.store(res[r, i], a, n=H - i)
        s0 = pk.fma(a, a, s0)
    return pk.hsum(s0 + s1)


@pk.func
def _sumsq(x, r):
    s0 = pk.f32x16.zeros()
    s1 = pk.f32x16.zeros()
    for i in range(0, H - 31, 32):
        a = pk.f32x16.load(x[r, i])
        b = pk.f32x16.load(x[r, i + 16])
        s0 = pk.fma(a, a, s0)
        s1 = pk.fma(b, b, s1)
    for i in range(H - H % 32, H, 16):
        a = pk.f32x16.load(x[r, i], n=H - i)
        s0 = pk.fma(a, a, s0)
    return pk.hsum(s0 + s1)


@pk.func
def _scale_row(h, w, eps, out, r, ss):
    """out[r] = (h[r] * rsqrt(ss / H + eps)) * w"""
    inv = 1.0 / pk.sqrt(pk.f32x16.bcast(ss / H + eps[0]))
    for i in range(0, H, 16):
        pk.store(out[r, i], pk.f32x16.load(h[r, i], n=H - i) * inv * pk.f32x16.load(w[i], n=H - i), n=H - i)


@pk.kernel(space=SPACE, ref=ref_rmsnorm, key={"R": "pow2"})
def rmsnorm(x: pk.f32[R, H], w: pk.f32[H], eps: pk.f32[1], out: pk.Out[pk.f32[R, H]], *, PAR):
    if R * H >= PAR:
        for r in pk.prange(R):
            _scale_row(x, w, eps, out, r, _sumsq(x, r))
    else:
        for r in range(R):
            _scale_row(x, w, eps, out, r, _sumsq(x, r))


@pk.kernel(space=SPACE, ref=ref_add_rmsnorm, key={"R": "pow2"})
def add_rmsnorm(x: pk.f32[R, H], res: pk.Out[pk.f32[R, H]], w: pk.f32[H], eps: pk.f32[1], out: pk.Out[pk.f32[R, H]],
                *, PAR):
    if R * H >= PAR:
        for r in pk.prange(R):
            _scale_row(res, w, eps, out, r, _add_sumsq(x, res, r))
    else:
        for r in range(R):
            _scale_row(res, w, eps, out, r, _add_sumsq(x, res, r))
