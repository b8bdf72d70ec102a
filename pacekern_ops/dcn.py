"""DCNv2 low-rank cross layer (DLRMv2's interaction): x_{l+1} = x0 * (W (V x_l) + b) + x_l.

INT8 path, per layer (dlrm.infer): h = requant(x_l,u8 @ V) (u8, gemm_u8s8), z = x_l's W GEMM with
an fp32 output (bias fused, gemm_u8s8), then `dcn_mix` here: the residual stream stays fp32
(it is the accuracy-sensitive part, as in Intel's and PACE's recipes) and is requantized to u8
once per layer for the next V GEMM (or the top MLP):

    xn = x0 * z + xl                    (fp32, one FMA a lane)
    qn = clamp(round(xn * inv_scale[n]) + zp, 0, 255)      (inv_scale = 1 / (s f_n): per-tensor scale s,
                                                          smoothing f_n folded into the consumer's weights)

fp32 path: the same kernel with its u8 output ignored (cost: one store).
"""
import torch

import pacekern as pk

M, N = pk.dims("M N")


def ref_mix(z, x0, xl, inv_scale, zp, xn, qn):
    xf = torch.as_tensor(x0).double() * torch.as_tensor(z).double() + torch.as_tensor(xl).double()
    q = torch.clamp(torch.round(xf.float().double() * torch.as_tensor(inv_scale).double()[None, :]) + int(zp), 0, 255)
    q = q.to(torch.uint8)
    return xf.float(), q


@pk.kernel(ref=ref_mix)
def dcn_mix(z: pk.f32[M, N], x0: pk.f32[M, N], xl: pk.f32[M, N], inv_scale: pk.f32[N], zp: pk.i32,
            xn: pk.Out[pk.f32[M, N]], qn: pk.Out[pk.u8[M, N]]):
    for m in pk.prange(M):
        lo = pk.f32x16.bcast(-512.0)                          # saturate far out-of-range values before
        hi = pk.f32x16.bcast(512.0)                           # the int conversion (it would wrap)
        for k in range(0, N, 16):
            v = pk.fma(pk.f32x16.load(x0[m, k], n=N - k), pk.f32x16.load(z[m, k], n=N - k), pk.f32x16.load(xl[m, k], n=N - k))
            pk.store(xn[m, k], v, n=N - k)
            pk.store(qn[m, k], pk.to_u8(pk.to_i32(pk.min(pk.max(v * pk.f32x16.load(inv_scale[k], n=N - k), lo), hi)) + zp), n=min(N - k, 16))


def cross_layer_ref(x0: torch.Tensor, xl: torch.Tensor, v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 definition (torch Linear layouts: v [rank, width], w [width, rank])."""
    return x0 * torch.nn.functional.linear(torch.nn.functional.linear(xl, v), w, b) + xl
