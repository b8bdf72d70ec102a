"""bf16 GEMM: y[M, N] (f32) = x[M, K] (bf16) @ w[K, N] (bf16), weights packed once.

Layout (one for both kernels): per 16-column panel p, cdiv(K, 2) rows of 16 (k, k+1) pairs,
    wp[p, k2, 2 l + e] = w[2 k2 + e, 16 p + l]        (zero padded to even K and to 16 p columns)
so one panel row is 64 bytes = one zmm for vdpbf16ps and one row of an AMX B tile; 16 rows of a
panel (32 k values) are one 1 KB B tile with a 64-byte stride. The layout does not depend on any
tile parameter.

Two kernels:
  gemm_bf16_avx512  vdpbf16ps register tiles (MR x NV zmm accumulators), BLIS-style KC/MC blocking
                    like gemm_f32. A pair (x[i, 2 k2], x[i, 2 k2 + 1]) is broadcast as one int32, so
                    the kernel reads x as int32 pairs: x2 = x.view(torch.int32), shape [M, K2].
                    On levels without AVX512-BF16, dot2_bf16 lowers to generic widening FMAs.
  gemm_bf16_amx     AMX tdpbf16ps on 32 x 32 blocks of C: four 16 x 16 f32 C tiles (0-3), two A
                    tiles (4, 5) loaded straight from row-major x (row stride 2 K bytes) and two B
                    tiles (6, 7) from wp. Needs K % 32 == 0. M and N tails are handled in the kernel
                    by tile configs with fewer rows / column bytes (amx_configs builds the 4 configs
                    in Python); a tail block computes its missing half twice and does not store it, so
                    the K loop has no branches. The prange runs over MB x NB blocks of y (both threads
                    get work for small M too); in a block, for each KC slice of K, the 32-row A slices
                    sweep under the B block (NB x KC, kept in L2) and the K loop is software pipelined.
                    A K slice after the first reloads C from y, a bubble per 32 x 32 block, so KC is
                    best >= K unless B would outgrow L2.
                    Tried and dropped (no gain on this machine): packing A into tile order on the fly
                    (tilestored into a scratch copy on the first column block), software prefetch of
                    the next A rows, and n-outer / m-inner orders.

`gemm_bf16(x, wp, y)` picks AMX at ISA level "amx" when K % 32 == 0 and M >= AMX_MIN_M, the AVX512
kernel otherwise.

For 1-16 rows (LLM decode and speculative verification) the threads split N, not M, and each
panel streams once: `gemm_bf16_amx_rows` (one A tile of all the rows: 5 rows cost what 1 does) at
ISA level amx, `gemm_bf16_rows` (vdpbf16ps) elsewhere, each in its prefill kernel's k order;
`rows_call` picks by shape only. `round_bf16` rounds f32 activations to the kernels' bf16 input.

SmolLM2-135M bf16 forward on an AMX VM (2 threads, tuned, interleaved): 1 / 3 / 5 / 8 rows 9.5 /
9.8 / 10.1 / 11.0 ms with gemm_bf16_amx_rows against 10.7 / 12.8 / 15.5 / 24.0 ms with
gemm_bf16_rows.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

import pacekern as pk

M, N, K, K2 = pk.dims("M N K K2")


# ---------------------------------------------------------------------------------------------
# packing

def pack(w: torch.Tensor) -> torch.Tensor:
    """[K, N] bf16 (or float, rounded to bf16) -> wp [cdiv(N, 16), cdiv(K, 2), 32] bf16, zero padded."""
    k, n = w.shape
    k2, np_ = -(-k // 2), -(-n // 16)
    wz = torch.zeros(2 * k2, 16 * np_, dtype=torch.bfloat16)
    wz[:k, :n] = w
    # [K2, 2, NP, 16] -> [NP, K2, 16, 2]: pairs (k, k+1) of one column side by side
    return wz.view(k2, 2, np_, 16).permute(2, 0, 3, 1).contiguous().view(np_, k2, 32)


def unpack(wp: torch.Tensor, n: int, k: int | None = None) -> torch.Tensor:
    """Inverse of pack: [cdiv(N, 16), cdiv(K, 2), 32] -> [K, N] (K = 2 cdiv(K, 2) if k is None)."""
    if isinstance(wp, np.ndarray):
        wp = torch.from_numpy(wp).view(torch.bfloat16)
    np_, k2, _ = wp.shape
    w = wp.reshape(np_, k2, 16, 2).permute(1, 3, 0, 2).reshape(2 * k2, 16 * np_)
    return w[: (2 * k2 if k is None else k), :n]


def _bf16(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t.view(torch.bfloat16) if t.dtype == torch.int16 else t


# The references take the kernels' own arguments. Accumulating in float64 gives the exact sum of the
# bf16 products; the kernels round to f32 along the way (vdpbf16ps also flushes denormals).
def ref_avx512(x2, wp, y):
    x = _bf16(torch.as_tensor(x2).view(torch.int16))                     # [M, 2 K2]
    return (x.double() @ unpack(_bf16(wp), y.shape[1]).double()).float()


def ref_amx(cfg, x, wp, y):
    return (_bf16(x).double() @ unpack(_bf16(wp), y.shape[1]).double()).float()


# ---------------------------------------------------------------------------------------------
# AVX512-BF16 register-tiled kernel

SPACE_AVX512 = pk.Space(
    MR=pk.choice(4, 5, 6, 7, 8, 12), NV=pk.choice(1, 2, 3, 4), KC=pk.choice(64, 128, 256), MC=pk.choice(32, 48, 64, 96, 128, 192),
    # unlike gemm_f32's, the pair broadcasts (vbroadcastss through a bitcast) stay one row at a time
    # in LLVM's schedule, one register for all of them (see the asm test): MR NV accumulators + NV B
    # vectors + 1. The B micro-panel is KC pair rows x 64 NV bytes: up to 64 KB, beyond L1 (32-48 KB),
    # measured faster at KC=256 than 128 all the same (B streams from L2 while A is broadcast)
    where=lambda c: c.KC * 64 * c.NV <= 64 * 1024,
    regs=lambda c: c.MR * c.NV + c.NV + 1,
    # MC: rows per parallel task. 64 splits a 128-token prefill evenly over 2 threads; 96 left one
    # thread 96 rows and the other 32. SmolLM2's 120 prefill GEMMs (Zen 4, 2 threads, interleaved):
    # MC=96 KC=128 97 ms; MC=64 KC=128 73-76 ms (~370 GFLOP/s); MC=64 KC=256 70-72 ms (~385)
    default=(dict(MR=6, NV=4, KC=256, MC=64), dict(MR=4, NV=1, KC=256, MC=64)))


@pk.kernel(space=SPACE_AVX512, ref=ref_avx512, key={"M": "pow2"})
def gemm_bf16_avx512(x2: pk.i32[M, K2], wp: pk.bf16[pk.cdiv(N, 16), K2, 32], y: pk.Out[pk.f32[M, N]], *, MR, NV, KC, MC):
    for m0 in pk.prange(0, M, MC):
        m1 = min(m0 + MC, M)                                  # this thread's rows: [m0, m1)
        for k0 in range(0, K2, KC):                           # KC pair rows = 2 KC k values
            k1 = min(k0 + KC, K2)
            for j0 in range(0, N, 16 * NV):
                for i0 in range(m0, m1, MR):
                    acc = pk.tile(pk.f32x16, MR, NV)
                    if k0 > 0:                                # accumulate onto the previous K slice
                        for i in pk.unroll(MR):
                            for j in pk.unroll(NV):
                                acc[i, j] = pk.f32x16.load(y[min(i0 + i, m1 - 1), min(j0 + 16 * j, N - 1)], n=N - j0 - 16 * j)
                    b = pk.tile(pk.bf16x32, NV)
                    for k in range(k0, k1):
                        for j in pk.unroll(NV):
                            b[j] = pk.bf16x32.load(wp[min(j0 // 16 + j, (N - 1) // 16), k, 0])
                        for i in pk.unroll(MR):
                            # (x[r, 2k], x[r, 2k+1]) in all 16 lanes; rows past m1 repeat row m1-1 (not stored)
                            a = pk.bitcast(pk.i32x16.bcast(x2[min(i0 + i, m1 - 1), k]), pk.bf16x32)
                            for j in pk.unroll(NV):
                                acc[i, j] = pk.dot2_bf16(acc[i, j], a, b[j])
                    for i in pk.unroll(MR):
                        if i0 + i < m1:
                            for j in pk.unroll(NV):
                                pk.store(y[i0 + i, min(j0 + 16 * j, N - 1)], acc[i, j], n=N - j0 - 16 * j)


# ---------------------------------------------------------------------------------------------
# x rounded to bf16 (the kernels' input), as torch's .to(torch.bfloat16): nearest even

def ref_round_bf16(x, xb):
    return torch.as_tensor(x).to(torch.bfloat16)


@pk.func
def _round_row(x, xb, m):
    for k in range(0, K, 16):
        pk.store_bf16(xb[m, k], pk.f32x16.load(x[m, k]))


@pk.kernel(space=pk.Space(PAR=pk.choice(1 << 14, 1 << 16, 1 << 62), default=dict(PAR=1 << 16)), ref=ref_round_bf16)
def round_bf16(x: pk.f32[M, K], xb: pk.Out[pk.bf16[M, K]], *, PAR):
    """K a multiple of 16 (round_bf16_call falls back to torch otherwise). Rows run in parallel
    when M K >= PAR (a decode row stays on one thread: no wake-up)."""
    if M * K >= PAR:
        for m in pk.prange(M):
            _round_row(x, xb, m)
    else:
        for m in range(M):
            _round_row(x, xb, m)


def round_bf16_call(x: torch.Tensor, xb: torch.Tensor):
    """A zero-argument call that writes x (f32) rounded to bf16 into xb: the pacekern kernel,
    prepared once, where K % 16 == 0; else torch's copy."""
    if x.shape[-1] % 16 or not (x.is_contiguous() and xb.is_contiguous()):
        return lambda: xb.copy_(x)
    return round_bf16.prepare(x, xb)


# ---------------------------------------------------------------------------------------------
# few rows: decode and speculative verification

def _rows_prune(c, d, cpu):
    # enough strips for every thread to get several; no taller tile than the rows
    return (-(-d["N"] // (16 * c.NV * c.NS)) >= 4 * cpu.threads or c.NS == 1) and c.MR <= max(d["M"], 1)


# NV = 2 panels, NS = 4 of them a strip: Qwen2.5-1.5B's four linear shapes, weights from DRAM (~31
# GB/s then), 1 row: 30-31.5 GB/s against gemv_bf16's 26-31; 5 rows: 23-34 GB/s against 9-15
SPACE_ROWS = pk.Space(MR=pk.choice(1, 2, 3, 4, 5, 6, 7, 8), NV=pk.choice(1, 2, 3, 4), NS=pk.choice(1, 2, 4, 8, 16),
                      regs=lambda c: c.MR * c.NV + c.NV + 1, prune=_rows_prune, default=dict(MR=1, NV=2, NS=4))


@pk.kernel(space=SPACE_ROWS, ref=ref_avx512, key={"M": "exact"})
def gemm_bf16_rows(x2: pk.i32[M, K2], wp: pk.bf16[pk.cdiv(N, 16), K2, 32], y: pk.Out[pk.f32[M, N]], *, MR, NV, NS):
    """The packed GEMM for a few rows: threads split N (not M) in strips of NS x NV panels, and each
    MR x NV tile reads its panels once, front to back (one sequential stream per panel; with M <=
    MR the weights leave DRAM once). A row's k order is gemm_bf16_avx512's: the same bits as prefill."""
    nn = pk.cdiv(N, 16 * NV * NS)
    for t in pk.prange(0, nn):
        n0 = t * (16 * NV * NS)
        n1 = min(n0 + 16 * NV * NS, N)
        for j0 in range(n0, n1, 16 * NV):
            for i0 in range(0, M, MR):
                acc = pk.tile(pk.f32x16, MR, NV)
                b = pk.tile(pk.bf16x32, NV)
                for k in range(K2):
                    for j in pk.unroll(NV):
                        b[j] = pk.bf16x32.load(wp[min(j0 // 16 + j, (N - 1) // 16), k, 0])
                    for i in pk.unroll(MR):
                        a = pk.bitcast(pk.i32x16.bcast(x2[min(i0 + i, M - 1), k]), pk.bf16x32)
                        for j in pk.unroll(NV):
                            acc[i, j] = pk.dot2_bf16(acc[i, j], a, b[j])
                for i in pk.unroll(MR):
                    if i0 + i < M:
                        for j in pk.unroll(NV):
                            if j0 + 16 * j < n1:
                                pk.store(y[i0 + i, j0 + 16 * j], acc[i, j], n=n1 - j0 - 16 * j)


def rows_config(m: int, n: int, k: int):
    """Unless a tuned config for this shape is cached (then None): MR = the rows (up to 8), NV = 2,
    and the NS (4, 2 or 1) that shares the panels most evenly among the threads (SmolLM2's N = 576
    is 36 panels: in strips of 8, one of two threads would get 24 of them)."""
    from pacekern import tuner
    if tuner.cached_best(gemm_bf16_rows, gemm_bf16_rows.bucket({"M": m, "N": n, "K2": -(-k // 2)})) is not None:
        return None
    panels, threads = -(-n // 16), pk.target().threads

    def most_panels_a_thread(ns):
        strips = -(-panels // (2 * ns))
        return -(-strips // threads) * 2 * ns
    cfg = pk.Config.of(MR=min(m, 8), NV=2, NS=min((4, 2, 1), key=lambda ns: (most_panels_a_thread(ns), -ns)))
    return SPACE_ROWS.fitted(cfg, pk.target().level, shrink=("MR", "NV"))       # 16 ymm: fewer rows a tile


# ---------------------------------------------------------------------------------------------
# AMX kernel

# tile numbers: C00 C01 C10 C11 = 0 1 2 3 (C[r][c]: rows 16 r.., columns 16 c..), A0 A1 = 4 5, B0 B1 = 6 7
@lru_cache(maxsize=256)
def _amx_configs(m: int, n: int) -> bytes:
    out = np.zeros((4, 64), np.uint8)
    mr, nr = m % 32, n % 32
    for ci in range(4):
        rows_a = rows_b = cols_a = cols_b = 16
        if ci & 2 and mr:                   # M tail block: mr rows (row half 1 repeats half 0 if mr <= 16)
            rows_a = min(mr, 16)
            rows_b = mr - 16 if mr > 16 else rows_a
        if ci & 1 and nr:                   # N tail block: nr columns, same for the column halves
            cols_a = min(nr, 16)
            cols_b = nr - 16 if nr > 16 else cols_a
        cfg = out[ci]
        cfg[0] = 1                          # palette 1
        colsb, rows = cfg[16:48].view(np.uint16), cfg[48:64]
        for t, r, c in ((0, rows_a, cols_a), (1, rows_a, cols_b), (2, rows_b, cols_a), (3, rows_b, cols_b)):
            colsb[t], rows[t] = 4 * c, r    # f32 C tiles
        colsb[4], rows[4] = 64, rows_a      # A: rows x 32 bf16
        colsb[5], rows[5] = 64, rows_b
        colsb[6], rows[6] = 4 * cols_a, 16  # B: 16 pair rows x cols (k, k+1) pairs
        colsb[7], rows[7] = 4 * cols_b, 16
    return out.tobytes()


def amx_configs(m: int, n: int) -> np.ndarray:
    """The 4 tile configs [4, 64] (u8) gemm_bf16_amx needs for an M x N output: index 2 * (M tail
    block) + (N tail block). Built in Python (ldtilecfg reads them from memory); cached per shape."""
    return np.frombuffer(_amx_configs(m, n), np.uint8).reshape(4, 64)


def _amx_prune(c, d, cpu) -> bool:
    m, n, k = d["M"], d["N"], d["K"]
    if k % 32:
        return False                     # the kernel needs whole 32-element k steps
    # blocks well past the problem's size behave like the smallest one that covers it: keep that one
    if (c.MB > 64 and c.MB // 2 >= m) or (c.NB > 64 and c.NB // 2 >= n) or (c.KC > 256 and c.KC // 2 >= k):
        return False
    # every thread gets a block when the problem has enough 64 x 64 blocks for that
    blocks = -(-m // c.MB) * -(-n // c.NB)
    return blocks >= min(cpu.threads, -(-m // 64) * -(-n // 64))


SPACE_AMX = pk.Space(
    MB=pk.choice(64, 128, 256, 512), NB=pk.choice(64, 128, 256, 512), KC=pk.choice(256, 512, 1024, 2048, 4096),
    where=lambda c: c.MB % 32 == 0 and c.NB % 32 == 0,     # tails are detected per 32 x 32 block
    prune=_amx_prune,
    # KC >= K keeps C in tiles for the whole K loop: every K slice after the first reloads C from y
    # (a pipeline bubble per block), so slices pay off only once B (NB x KC) would outgrow L2
    default=dict(MB=256, NB=256, KC=1024))


@pk.kernel(space=SPACE_AMX, ref=ref_amx, key={"M": "pow2"})
def gemm_bf16_amx(cfg: pk.u8[4, 64], x: pk.bf16[M, K], wp: pk.bf16[pk.cdiv(N, 16), K // 2, 32], y: pk.Out[pk.f32[M, N]],
                  *, MB, NB, KC):
    """cfg = amx_configs(M, N). K must be a multiple of 32 (not checked here: a K tail would read
    past the rows of x and into the next panel of wp; gemm_bf16 sends such K to the AVX512 kernel)."""
    nn = pk.cdiv(N, NB)
    for t in pk.prange(0, pk.cdiv(M, MB) * nn):
        mb = (t // nn) * MB
        me = min(mb + MB, M)                                  # this block of y: rows [mb, me), columns [nb, ne)
        nb = (t % nn) * NB
        ne = min(nb + NB, N)
        cur = -1                                              # tile config loaded by this thread (per block)
        for k0 in range(0, K, KC):                            # B[k0:k1, nb:ne] stays in L2 while ...
            k1 = min(k0 + KC, K)
            for m0 in range(mb, me, 32):                      # ... the 32-row A slices stream under it
                r1 = m0 + 16                                  # A1 rows; a tail of <= 16 rows repeats A0 (C1* not stored)
                mtail = 0
                if me - m0 < 32:
                    mtail = 2
                    if me - m0 <= 16:
                        r1 = m0
                for n0 in range(nb, ne, 32):
                    p0 = n0 // 16
                    p1 = p0 + 1                               # B1 panel; a tail of <= 16 columns repeats B0 (C*1 not stored)
                    ci = mtail
                    if ne - n0 < 32:
                        ci = mtail + 1
                        if ne - n0 <= 16:
                            p1 = p0
                    c1 = 16 * p1
                    if ci != cur:
                        pk.amx_config(cfg[ci, 0])
                        cur = ci
                    if k0 == 0:
                        pk.amx_zero(0)
                        pk.amx_zero(1)
                        pk.amx_zero(2)
                        pk.amx_zero(3)
                    else:                                     # accumulate onto the previous K slice
                        pk.amx_load(0, y[m0, n0], N * 4)
                        pk.amx_load(1, y[m0, c1], N * 4)
                        pk.amx_load(2, y[r1, n0], N * 4)
                        pk.amx_load(3, y[r1, c1], N * 4)
                    # software pipelined: each tile is reloaded for step k right after its last use at
                    # step k - 32, so the loads overlap the remaining products
                    pk.amx_load(4, x[m0, k0], K * 2)
                    pk.amx_load(6, wp[p0, k0 // 2, 0], 64)
                    pk.amx_load(7, wp[p1, k0 // 2, 0], 64)
                    pk.amx_load(5, x[r1, k0], K * 2)
                    for k in range(k0 + 32, k1, 32):
                        pk.amx_dot_bf16(0, 4, 6)
                        pk.amx_dot_bf16(1, 4, 7)
                        pk.amx_load(4, x[m0, k], K * 2)
                        pk.amx_dot_bf16(2, 5, 6)
                        pk.amx_load(6, wp[p0, k // 2, 0], 64)
                        pk.amx_dot_bf16(3, 5, 7)
                        pk.amx_load(7, wp[p1, k // 2, 0], 64)
                        pk.amx_load(5, x[r1, k], K * 2)
                    pk.amx_dot_bf16(0, 4, 6)
                    pk.amx_dot_bf16(1, 4, 7)
                    pk.amx_dot_bf16(2, 5, 6)
                    pk.amx_dot_bf16(3, 5, 7)
                    pk.amx_store(0, y[m0, n0], N * 4)
                    if p1 > p0:
                        pk.amx_store(1, y[m0, c1], N * 4)
                    if r1 > m0:
                        pk.amx_store(2, y[r1, n0], N * 4)
                        if p1 > p0:
                            pk.amx_store(3, y[r1, c1], N * 4)
        pk.amx_release()


# ---------------------------------------------------------------------------------------------
# AMX for a few rows: decode and speculative verification

@lru_cache(maxsize=32)
def _amx_rows_config(m: int) -> bytes:
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1                                              # palette 1
    colsb, rows = cfg[16:48].view(np.uint16), cfg[48:64]
    for t in range(8):                                      # C 0-2 (m x 16 f32), A 4 (m x 32 bf16), B 5-7
        colsb[t], rows[t] = 64, (16 if t >= 5 else m)
    colsb[3] = rows[3] = 0                                  # tile 3 unused
    return cfg.tobytes()


def amx_rows_config(m: int) -> np.ndarray:
    """ldtilecfg bytes [64] for gemm_bf16_amx_rows with m (1-16) rows."""
    if not 1 <= m <= 16:
        raise ValueError(f"gemm_bf16_amx_rows: {m} rows (1 to 16)")
    return np.frombuffer(_amx_rows_config(m), np.uint8)


SPACE_AMX_ROWS = pk.Space(NV=pk.choice(1, 2, 3), default=dict(NV=3))


@pk.kernel(space=SPACE_AMX_ROWS, ref=ref_amx, key={"M": "exact"})
def gemm_bf16_amx_rows(cfg: pk.u8[64], x: pk.bf16[M, K], wp: pk.bf16[pk.cdiv(N, 16), K // 2, 32], y: pk.Out[pk.f32[M, N]], *, NV):
    """cfg = amx_rows_config(M); M <= 16, K % 32 == 0, N % 16 == 0 (not checked here: rows_call
    sends other shapes to gemm_bf16_rows). Threads split N in groups of NV panels, each streamed
    once, front to back, under one A tile of all M rows: tdpbf16ps does the arithmetic of M rows
    for the price of one, so 5 rows cost about what 1 does. Per C tile the k order is
    gemm_bf16_amx's: a row gets the AMX prefill kernel's bits."""
    npn = N // 16
    for t in pk.prange(0, pk.cdiv(npn, NV)):
        p0 = t * NV
        pk.amx_config(cfg[0])
        for j in pk.unroll(NV):
            pk.amx_zero(j)
        for k in range(0, K, 32):
            pk.amx_load(4, x[0, k], K * 2)
            for j in pk.unroll(NV):                           # past the last panel: repeat it (not stored)
                pk.amx_load(5 + j, wp[min(p0 + j, npn - 1), k // 2, 0], 64)
            for j in pk.unroll(NV):
                pk.amx_dot_bf16(j, 4, 5 + j)
        for j in pk.unroll(NV):
            if p0 + j < npn:
                pk.amx_store(j, y[0, 16 * (p0 + j)], N * 4)
        pk.amx_release()


def use_amx_rows(n: int, k: int) -> bool:
    """Whether 1-16 rows of an [*, k] x [k, n] product run on AMX (gemm_bf16_amx_rows)."""
    return pk.target().level == "amx" and k % 32 == 0 and n % 16 == 0


def rows_call(xb: torch.Tensor, wp: torch.Tensor, y: torch.Tensor) -> tuple:
    """(kernel, args, config) for 1-16 rows of bf16 x [M, K] (even K): AMX where use_amx_rows, else
    gemm_bf16_rows. The choice depends on N and K only, never on M: decode, verification and
    batched decode give a row the same bits."""
    m, k = xb.shape
    n = y.shape[1]
    if use_amx_rows(n, k):
        return gemm_bf16_amx_rows, (amx_rows_config(m), xb, wp, y), None
    return gemm_bf16_rows, (xb.view(torch.int32), wp, y), rows_config(m, n, k)


# ---------------------------------------------------------------------------------------------
# public op

AMX_MIN_M = 8           # below this, both kernels stream the weights; the AVX512 one wastes less on padding rows


def use_amx(m: int, k: int) -> bool:
    """Whether gemm_bf16 runs the AMX kernel for an [m, k] input on this machine."""
    return pk.target().level == "amx" and k % 32 == 0 and m >= AMX_MIN_M


def gemm_bf16(x: torch.Tensor, wp: torch.Tensor, y: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ w[K, N] with wp = pack(w). x: bf16 [M, K] (contiguous); y: f32 [M, N]
    output (allocated if None, then n= gives N, default 16 * wp.shape[0]); a bf16 y receives the
    f32 result rounded (through a temporary: not fused)."""
    m, k = x.shape
    if wp.shape[1] != -(-k // 2):
        raise ValueError(f"gemm_bf16: wp has {wp.shape[1]} pair rows, x has K={k} (needs cdiv(K, 2) = {-(-k // 2)})")
    if y is None:
        y = torch.empty(m, n if n is not None else 16 * wp.shape[0], dtype=torch.float32)
    out = y
    if y.dtype != torch.float32:
        y = torch.empty(y.shape, dtype=torch.float32)
    if not x.is_contiguous():
        x = x.contiguous()
    if use_amx(m, k):
        gemm_bf16_amx(amx_configs(m, y.shape[1]), x, wp, y)
    else:
        if k % 2:                                             # odd K: pad one zero column to form pairs
            x = torch.nn.functional.pad(x, (0, 1))
        gemm_bf16_avx512(x.view(torch.int32), wp, y)
    if out is not y:
        out.copy_(y)
    return out


def prepare(x: torch.Tensor, wp: torch.Tensor, y: torch.Tensor):
    """gemm_bf16(x, wp, y) with its arguments bound once: a zero-argument call for fixed buffers
    (LLM prefill plans), without the ~40 us of checking and binding per call. Where gemm_bf16
    would pad or copy (odd K, non-contiguous x, a bf16 y) it is the plain call."""
    m, k = x.shape
    if k % 2 or not x.is_contiguous() or y.dtype != torch.float32 or wp.shape[1] != k // 2:
        return lambda: gemm_bf16(x, wp, y)
    if use_amx(m, k):
        return gemm_bf16_amx.prepare(amx_configs(m, y.shape[1]), x, wp, y)
    return gemm_bf16_avx512.prepare(x.view(torch.int32), wp, y)


def build_problem(M: int, N: int, K: int):
    """A pacekern_ops.registry.Problem for `pacekern bench` / tests/bench (register it with
    Op("gemm_bf16", dict(M=1024, N=1024, K=1024), gemm_bf16.build_problem, "...")): bf16 GEMM with
    packed weights vs torch.matmul on bf16 tensors (oneDNN, AMX where the CPU has it)."""
    from .registry import Problem
    x, w = torch.randn(M, K).bfloat16(), torch.randn(K, N).bfloat16()
    wp, y = pack(w), torch.empty(M, N)
    if use_amx(M, K):
        tune = ((gemm_bf16_amx, (amx_configs(M, N), x, wp, y)),)
    else:
        tune = ((gemm_bf16_avx512, (torch.nn.functional.pad(x, (0, K % 2)).view(torch.int32), wp, y)),)
    return Problem(lambda: gemm_bf16(x, wp, y), lambda: torch.matmul(x, w), 2.0 * M * N * K, "GFLOP/s", tune=tune,
                   check=lambda: torch.testing.assert_close(gemm_bf16(x, wp, y), x.float() @ w.float(), rtol=1e-4,
                                                            atol=1e-4 * K ** 0.5))
