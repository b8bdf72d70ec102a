"""4-bit-weight GEMM for LLM prefill: y[M, N] = x[M, K] @ W^T with W in gemv_int4's format (q in
0..15, a scale and a min per group of 32 weights of a row), x as int8 per row and group
(gemv_int4.quantize_x8: the same activations decode's gemv_int4 takes). Per group g of row m and
output n, with d the exact i32 dot product of q and xq over the group:

    y[m, n] = sum_g  f32(d) * (ws[n, g] xs[m, g])  +  wm[n, g] xm[m, g]        (xm = xs sum(xq))

The decode layout (two 4-bit codes a byte, groups interleaved in lanes) serves one row; a GEMM
wants 16 output columns in the lanes, so prefill uses its own copy, built once by `pack` (like the
bf16 GEMM's panels): q unpacked to one byte per weight in gemm_u8s8's layout (per 16 columns,
KP/4 rows of 64 bytes: one vpdpbusd operand, lanes = columns) and the scales and mins transposed
to [KG, N] f32 rows, so one vector load gives 16 columns' factors. Twice the decode bytes, held
only once a prompt is long enough to need it.

x stays in quantize_x8's chunk order: 4 consecutive k (one i32 broadcast) are contiguous there
too, at i32 index 128 (g // 16) + 16 c + g % 16 for chunk c of group g. The register tile is
MR x NV i32 group sums (vpdpbusd, weights as the unsigned operand) and MR x NV f32 accumulators;
threads split blocks of MC rows x NS strips of 16 NV columns as in gemm_u8s8_vnni.
"""
import torch

import pacekern as pk

from .gemm_u8s8 import pack_weight, prune_blocks, unpack
from .gemv_int4 import G, activation_buffers, from_chunk_order, quantize_x8, unpack_int4

M, N, K4, KG = pk.dims("M N K4 KG")


def pack(w: torch.Tensor, ws: torch.Tensor, wm: torch.Tensor):
    """quantize_int4's (w, ws, wm) -> (qp u8 [cdiv(N, 16), KP/4, 64], ws^T f32 [KG, N], wm^T f32 [KG, N])."""
    qp = pack_weight(unpack_int4(w).t().view(torch.int8)).view(torch.uint8)      # codes 0..15: same bytes
    return qp, ws.float().t().contiguous(), wm.float().t().contiguous()


def ref(xq4, xs, xm, qp, wst, wmt, groups, y):
    """float64 of the exact result for the int8 activations the kernel is given (the groups past
    `groups` are K padding: zero activations, zero weights)."""
    xq = from_chunk_order(torch.as_tensor(xq4).contiguous().view(torch.int8).double())
    x = xq * torch.as_tensor(xs).double().repeat_interleave(G, 1)
    q = unpack(torch.as_tensor(qp).view(torch.int8), y.shape[1]).view(torch.uint8).double()   # [KP, N]
    w = q * torch.as_tensor(wst).double().repeat_interleave(G, 0) + torch.as_tensor(wmt).double().repeat_interleave(G, 0)
    return (x @ w).float()


SPACE = pk.Space(
    MR=pk.choice(1, 2, 3, 4, 5, 6), NV=pk.choice(1, 2, 3), MC=pk.choice(32, 64, 128), NS=pk.choice(1, 2, 4, 8),
    # group sums + accumulators (2 MR NV), NV weight vectors, MR broadcasts, a scale and a min vector
    regs=lambda c: 2 * c.MR * c.NV + c.NV + c.MR + 2,
    prune=prune_blocks,
    default=(dict(MR=4, NV=2, MC=64, NS=2), dict(MR=1, NV=1, MC=64, NS=2)))


@pk.kernel(space=SPACE, ref=ref, key={"M": "pow2"})
def gemm_int4(xq4: pk.i32[M, K4], xs: pk.f32[M, KG], xm: pk.f32[M, KG], qp: pk.u8[pk.cdiv(N, 16), K4, 64],
              wst: pk.f32[KG, N], wmt: pk.f32[KG, N], groups: pk.i32, y: pk.Out[pk.f32[M, N]], *, MR, NV, MC, NS):
    """groups = cdiv(K, 32): the groups of K padding (up to 15 of them, KP is whole blocks of 512
    for the GEMV) add nothing and are skipped."""
    npn = pk.cdiv(N, 16)
    nn = pk.cdiv(N, 16 * NV * NS)
    for t in pk.prange(0, pk.cdiv(M, MC) * nn):               # blocks of MC rows x NS strips of 16 NV columns
        m0 = (t // nn) * MC
        m1 = min(m0 + MC, M)
        n0 = (t % nn) * (16 * NV * NS)
        n1 = min(n0 + 16 * NV * NS, N)
        for j0 in range(n0, n1, 16 * NV):
            for i0 in range(m0, m1, MR):
                acc = pk.tile(pk.f32x16, MR, NV)
                b = pk.tile(pk.u8x64, NV)
                for g in range(groups):
                    d = pk.tile(pk.i32x16, MR, NV)                # this group's exact sums
                    xg = 128 * (g // 16) + g % 16                 # the group's first i32 in chunk order
                    for c in pk.unroll(8):
                        for j in pk.unroll(NV):
                            b[j] = pk.u8x64.load(qp[min(j0 // 16 + j, npn - 1), 8 * g + c, 0])
                        for i in pk.unroll(MR):
                            # 4 int8 activations of row i in every lane; rows past m1 repeat m1 - 1 (not stored)
                            a = pk.bitcast(pk.i32x16.bcast(xq4[min(i0 + i, m1 - 1), xg + 16 * c]), pk.s8x64)
                            for j in pk.unroll(NV):
                                d[i, j] = pk.dot4_u8s8(d[i, j], b[j], a)
                    for j in pk.unroll(NV):
                        jc = min(j0 + 16 * j, N - 1)
                        nv = n1 - j0 - 16 * j                 # valid lanes (<= 0: strip past the block)
                        sv = pk.f32x16.load(wst[g, jc], n=nv)
                        mv = pk.f32x16.load(wmt[g, jc], n=nv)
                        for i in pk.unroll(MR):
                            r = min(i0 + i, m1 - 1)
                            acc[i, j] = pk.fma(pk.to_f32(d[i, j]), sv * xs[r, g], acc[i, j])
                            acc[i, j] = pk.fma(mv, pk.f32x16.bcast(xm[r, g]), acc[i, j])
                for j in pk.unroll(NV):
                    jc = min(j0 + 16 * j, N - 1)
                    for i in pk.unroll(MR):
                        if i0 + i < m1:
                            pk.store(y[i0 + i, jc], acc[i, j], n=n1 - j0 - 16 * j)


def prepare(x: torch.Tensor, packed, y: torch.Tensor):
    """The zero-argument call y = x @ dequantize_int4(w, ws, wm)^T on fixed buffers (LLM prefill
    plans), packed = pack(w, ws, wm): quantize x per group to int8, then gemm_int4."""
    m, k = x.shape
    qp, wst, wmt = packed
    xq, xs, xm = activation_buffers(m, k)
    if qp.shape[1] * 4 != xq.shape[1]:
        raise ValueError(f"gemm_int4: packed weights hold K={qp.shape[1] * 4} (padded), x has K={k} "
                         f"(padded {xq.shape[1]})")
    quant = quantize_x8.prepare(x, xq, xs, xm)
    mm = gemm_int4.prepare(xq.view(torch.int32), xs, xm, qp, wst, wmt, -(-k // G), y)

    def call():
        quant()
        mm()
    return call
