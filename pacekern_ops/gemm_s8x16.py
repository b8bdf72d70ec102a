"""int8-weight GEMM for LLM prefill, decode and speculative verification:
y[M, N] = x[M, K] @ (w * scale[:, None])^T, weights int8 per output channel (gemv.quantize_rows),
x as 16-bit fixed point per row (gemv.quantize_x16: the activations gemv_s8 takes too).

x = s (u - 32768) with u = 256 h + l (h, l: its high and low bytes), hence per output

    x.w / s = 256 sum_k (h - 128) w + sum_k l w = 256 (h.w - 128 sum(w)) + l.w

Both dot products are exact in i32 (vpdpbusd, u8 x s8; |h.w| <= 255 * 127 * K fits up to
K = 66k) and so is h.w - 128 sum(w) (|.| <= 128 * 127 * K); only the final combination and scaling
round, in f32 (relative error ~1e-7; gemv_s8 combines in float64, so the two agree to that, not
bit for bit).

Layout and blocking are gemm_u8s8_vnni's: weights packed once by gemm_u8s8.pack_weight (per 16
output columns, K/4 rows of 64 bytes: one vpdpbusd operand), an MR x NV register tile for each of
h.w and l.w that shares every weight load between the two, threads split blocks of MC rows x NS
strips of 16 NV columns. x travels as int32 views xh4, xl4 [M, K/4] (one broadcast puts 4 bytes
of a row in every lane), so K must be a multiple of 4 (every LLM here has K % 64 == 0).

At ISA level amx (K % 64 == 0, prefill) `gemm_s8x16_amx` computes the same two i32 sums with tdpbusd on
tiles (16 rows x 2 panels a step, threads splitting N) and runs the same epilogue: every row gets
the same bits from either kernel, at any row count (tested).
"""
import torch

import pacekern as pk

from .gemm_u8s8 import pack_weight, prune_blocks, unpack
from .gemv import quantize_x16

M, N, K4 = pk.dims("M N K4")


def ref(xh4, xl4, xs, wp, scale, wsum, y):
    """float64 of the exact result for the 16-bit activations the kernel is given."""
    h = torch.as_tensor(xh4).contiguous().view(torch.uint8).double()
    lo = torch.as_tensor(xl4).contiguous().view(torch.uint8).double()
    w = unpack(wp, y.shape[1]).double()                                   # [K padded to 4, N]
    x = (h * 256 + lo - 32768) * torch.as_tensor(xs).double()[:, None]
    return ((x @ w) * torch.as_tensor(scale).double()[None, :]).float()


SPACE = pk.Space(
    MR=pk.choice(1, 2, 3, 4, 5, 6), NV=pk.choice(1, 2, 3, 4), MC=pk.choice(32, 64, 128), NS=pk.choice(1, 2, 4, 8),
    # two accumulator tiles (h.w, l.w), NV weight vectors, two broadcasts per row (LLVM hoists all
    # the broadcasts of a k4 step above its vpdpbusd)
    regs=lambda c: 2 * c.MR * c.NV + c.NV + 2 * c.MR,
    prune=prune_blocks,
    default=(dict(MR=5, NV=2, MC=64, NS=2), dict(MR=1, NV=2, MC=64, NS=2)))


# strict_fp: a row's output is the same bits for every M and config (see prepare)
@pk.kernel(space=SPACE, ref=ref, key={"M": "pow2"}, strict_fp=True)
def gemm_s8x16(xh4: pk.i32[M, K4], xl4: pk.i32[M, K4], xs: pk.f32[M], wp: pk.s8[pk.cdiv(N, 16), K4, 64],
               scale: pk.f32[N], wsum: pk.i32[N], y: pk.Out[pk.f32[M, N]], *, MR, NV, MC, NS):
    npn = pk.cdiv(N, 16)                                      # weight panels
    nn = pk.cdiv(N, 16 * NV * NS)
    for t in pk.prange(0, pk.cdiv(M, MC) * nn):               # blocks of MC rows x NS strips of 16 NV columns
        m0 = (t // nn) * MC
        m1 = min(m0 + MC, M)
        n0 = (t % nn) * (16 * NV * NS)
        n1 = min(n0 + 16 * NV * NS, N)
        for j0 in range(n0, n1, 16 * NV):
            for i0 in range(m0, m1, MR):
                hi = pk.tile(pk.i32x16, MR, NV)
                lo = pk.tile(pk.i32x16, MR, NV)
                b = pk.tile(pk.s8x64, NV)
                for k4 in range(K4):
                    for j in pk.unroll(NV):
                        b[j] = pk.s8x64.load(wp[min(j0 // 16 + j, npn - 1), k4, 0])
                    for i in pk.unroll(MR):
                        # 4 high / low bytes of row i in every lane; rows past m1 repeat m1 - 1 (not stored)
                        ah = pk.bitcast(pk.i32x16.bcast(xh4[min(i0 + i, m1 - 1), k4]), pk.u8x64)
                        al = pk.bitcast(pk.i32x16.bcast(xl4[min(i0 + i, m1 - 1), k4]), pk.u8x64)
                        for j in pk.unroll(NV):
                            hi[i, j] = pk.dot4_u8s8(hi[i, j], ah, b[j])
                            lo[i, j] = pk.dot4_u8s8(lo[i, j], al, b[j])
                for j in pk.unroll(NV):
                    jc = min(j0 + 16 * j, N - 1)
                    nv = n1 - j0 - 16 * j                     # valid lanes (<= 0: strip past the block)
                    ws = pk.i32x16.load(wsum[jc], n=nv) * 128
                    sc = pk.f32x16.load(scale[jc], n=nv)
                    for i in pk.unroll(MR):
                        if i0 + i < m1:
                            v = pk.to_f32(hi[i, j] - ws) * 256.0 + pk.to_f32(lo[i, j])      # x.w / s, exact until here
                            pk.store(y[i0 + i, jc], v * (sc * xs[i0 + i]), n=nv)


def rows_config(args) -> pk.Config | None:
    """The config for a few rows (decode, speculative verification, batched decode) when the tuning
    cache has none for this shape bucket; None: the cached or default one. The weights stream from
    DRAM once per call and every row shares each weight load. Measured on SmolLM2's shapes (Zen 4,
    2 threads, weights cold, interleaved against gemv_s8): 1 row: one panel per step (NV = 1,
    0.80-0.96x gemv_s8's time); 2-6 rows: all rows in one tile, NV = 1, NS = 2 (0.6-0.85x); 7-16
    rows: tiles of <= 4 rows x 3 panels (0.53-0.8x at 8 rows)."""
    from pacekern import tuner
    rows = args[0].shape[0]
    if rows > 16 or tuner.cached_best(gemm_s8x16, gemm_s8x16.bucket(gemm_s8x16.bind(args).dims)) is not None:
        return None
    if rows == 1:
        cfg = pk.Config.of(MR=1, NV=1, MC=32, NS=1)
    elif rows <= 6:
        cfg = pk.Config.of(MR=rows, NV=1, MC=32, NS=2)
    else:
        cfg = pk.Config.of(MR=-(-rows // -(-rows // 4)), NV=3, MC=32, NS=1)
    return SPACE.fitted(cfg, pk.target().level, shrink=("MR", "NV"))          # 16 ymm: fewer rows a tile


# ---------------------------------------------------------------------------------------------
# AMX: the same sums on tiles (tdpbusd), the same epilogue

def ref_amx(cfg, xh4, xl4, xs, wp, scale, wsum, c, y):
    return ref(xh4, xl4, xs, wp, scale, wsum, y)


def _amx_prune(c, d, cpu):
    return -(-d["N"] // (32 * c.NP)) >= min(cpu.threads, -(-d["N"] // 32))


AMX_SPACE = pk.Space(NP=pk.choice(1, 2, 4, 8, 16), prune=_amx_prune, default=dict(NP=4))


# strict_fp as gemm_s8x16: the epilogue is its expression, so a row gets its bits
@pk.kernel(space=AMX_SPACE, ref=ref_amx, key={"M": "pow2"}, strict_fp=True)
def gemm_s8x16_amx(cfg: pk.u8[64], xh4: pk.i32[M, K4], xl4: pk.i32[M, K4], xs: pk.f32[M], wp: pk.s8[pk.cdiv(N, 16), K4, 64],
                   scale: pk.f32[N], wsum: pk.i32[N], c: pk.i32[pk.cdiv(N, 32), 4, 16, 16], y: pk.Out[pk.f32[M, N]], *, NP):
    """cfg = gemm_u8s8.amx_config_bytes(M); K4 % 16 == 0 (not checked here: kernel_call sends
    other K to gemm_s8x16). Threads split N in strips of NP panel pairs; per pair, blocks of 16 rows
    (the last one shifted up to end at M) accumulate h.w and l.w in four C tiles (hi, lo x 2 panels)
    over the whole K, which then go through the scratch c (one 4 KB slot per strip) to gemm_s8x16's
    epilogue. The pair (2 x 64 K4 bytes) stays in L2 while the row blocks sweep it."""
    npn = pk.cdiv(N, 16)
    for t in pk.prange(0, pk.cdiv(N, 32 * NP)):
        pk.amx_config(cfg[0])
        for j0 in range(t * 32 * NP, min((t + 1) * 32 * NP, N), 32):
            for i0 in range(0, M, 16):
                r = max(min(i0, M - 16), 0)                   # first row of this block's tiles
                for q in pk.unroll(4):
                    pk.amx_zero(q)
                for k4 in range(0, K4, 16):
                    pk.amx_load(4, xh4[r, k4], K4 * 4)
                    pk.amx_load(5, xl4[r, k4], K4 * 4)
                    for cc in pk.unroll(2):
                        pk.amx_load(6 + cc, wp[min(j0 // 16 + cc, npn - 1), k4, 0], 64)
                    for cc in pk.unroll(2):
                        pk.amx_dot_u8s8(cc, 4, 6 + cc)             # hi: C 0, 1
                        pk.amx_dot_u8s8(2 + cc, 5, 6 + cc)         # lo: C 2, 3
                for q in pk.unroll(4):
                    pk.amx_store(q, c[t, q, 0, 0], 64)
                for cc in pk.unroll(2):
                    jc = min(j0 + 16 * cc, N - 1)
                    nv = N - j0 - 16 * cc                     # valid lanes (<= 0: a panel past N)
                    if nv > 0:
                        ws = pk.i32x16.load(wsum[jc], n=nv) * 128
                        sc = pk.f32x16.load(scale[jc], n=nv)
                        for i in range(i0 - r, min(16, M - r)):    # rows no earlier block stored
                            hi = pk.i32x16.load(c[t, cc, i, 0])
                            lo = pk.i32x16.load(c[t, 2 + cc, i, 0])
                            v = pk.to_f32(hi - ws) * 256.0 + pk.to_f32(lo)         # x.w / s, exact until here
                            pk.store(y[r + i, jc], v * (sc * xs[r + i]), n=nv)
        pk.amx_release()


def use_amx(m: int, k: int) -> bool:
    """Whether gemm_s8x16 runs on AMX tiles here: prefill-sized M (the integer sums are exact either
    way, so a row gets the same bits from both kernels whatever M picks). SmolLM2 int8 on the AMX
    VM, interleaved: a 128-token prefill 34.4 ms against 58.4 on VNNI; 1 / 3 / 5 / 8 rows 8.5 / 7.6
    / 7.8 / 8.3 ms against 6.9 / 7.6 / 8.8 / 8.5, so a few rows stay on VNNI."""
    return pk.target().level == "amx" and k % 64 == 0 and m > 16


def kernel_call(xh4, xl4, xs, wp, scale, wsum, y) -> tuple:
    """(kernel, args, config) for 16-bit activations already split: gemm_s8x16_amx where use_amx
    (with its tile config and scratch), else gemm_s8x16 (rows_config for a few rows)."""
    if use_amx(y.shape[0], 4 * xh4.shape[1]):
        from .gemm_u8s8 import amx_config_bytes
        scratch = torch.empty(-(-y.shape[1] // 32), 4, 16, 16, dtype=torch.int32)
        return gemm_s8x16_amx, (amx_config_bytes(y.shape[0]), xh4, xl4, xs, wp, scale, wsum, scratch, y), None
    args = (xh4, xl4, xs, wp, scale, wsum, y)
    return gemm_s8x16, args, rows_config(args)


def prepare(x: torch.Tensor, wp: torch.Tensor, scale: torch.Tensor, wsum: torch.Tensor, y: torch.Tensor):
    """The zero-argument call y = x @ (w * scale)^T on fixed buffers (LLM plans): quantize x to 16
    bits, then gemm_s8x16. wp = pack_weight(w.t()) for w [N, K] int8; K % 4 == 0. Each output row
    is computed the same way whatever M and the config are (exact i32 sums, then the same f32
    epilogue), so a token's logits do not depend on how many rows share the call: speculative
    verification reproduces decode bit for bit."""
    m, k = x.shape
    if k % 4:
        raise ValueError(f"gemm_s8x16: K={k} must be a multiple of 4 (x is read as 4-byte groups)")
    xh, xl = torch.empty(m, k, dtype=torch.uint8), torch.empty(m, k, dtype=torch.uint8)
    xs = torch.empty(m)
    quant = quantize_x16.prepare(x, xh, xl, xs)
    kernel, args, config = kernel_call(xh.view(torch.int32), xl.view(torch.int32), xs, wp, scale, wsum, y)
    mm = kernel.prepare(*args, config=config)

    def call():
        quant()
        mm()
    return call


__all__ = ["gemm_s8x16", "gemm_s8x16_amx", "pack_weight", "prepare", "ref", "kernel_call", "rows_config", "use_amx"]
