"""Sum-pooled embedding bags over fp32, int8 row-wise and 4-bit row-wise tables (DLRM's sparse
arch), plus the per-tensor u8 quantization of activations that feeds the u8s8 GEMMs.

All tables of a model live in one array (table t's rows start at base[t]). A batch is
KeyedJaggedTensor-like and table-major: the bag of sample b in table t is
indices[offsets[t B + b] : offsets[t B + b + 1]] (ids local to the table). The pooled D-vector of
(b, t) is written to y[b, col0 + t D : col0 + (t + 1) D], so the kernels write straight into
DLRMv2's [B, 27 D] interaction buffer (slot 0 holds the bottom MLP output): no cat.

Row formats (dequantized value of element j of row r):
  f32   w[r, j]
  int8  (q[r, j] + 128) s[r] + b[r]: q is stored as s8 (the u8 code minus 128) so that one
        widening load (vpmovsxbd + vcvtdq2ps) reads 16 of them; scale and bias are torch's, kept
        side by side in sb[r] = (s[r], b[r]): one cache line more per gathered row, not two.
  4-bit u[r, j] s[r] + b[r], u in 0..15, two codes a byte. Byte k of 32-element group g holds
        element 32 g + k (low nibble) and 32 g + 16 + k (high nibble), stored minus 128 as s8:
        one 16-byte load gives two f32x16 vectors. The DSL has no vector shifts or masks, so the
        nibbles are split in f32 (exact for integers): v = byte, hi = round((v - 7.5) / 16)
        (= floor(v / 16): the fraction (lo - 7.5) / 16 is within +-0.47), lo = v - 16 hi.
        s and b are fp16 values (as in torch's 4-bit format) held as f32, in sb as for int8.

Per (b, t) bag the int8 and 4-bit kernels walk the ids once per 128-element column chunk (two
cache lines of an int8 row, one of a 4-bit row: a whole DLRMv2 row in one pass), 8 f32x16
accumulators; the fp32 kernel once per 64-element chunk (4 lines), 4 accumulators. Each prefetches
the rows (and sb) PF ids ahead in the bag, and, before a bag starts, the first PF + 1 rows of the
bag PB bags later (most bags hold 1-3 ids, so in-bag prefetch alone leaves them to DRAM latency).
The gathers are latency-bound: what counts is the cache lines in flight per id. Each row is added
as acc = fma(code, s, acc + b), the
very float operations of fbgemm's (PyTorch's) quantized embedding bags, so the pooled sums are
bit-identical to torch's and a quantized model gives the same u8 codes downstream. Threads split
the B x T bags sample-major, so each thread gets whole samples (table 20's 100-id bags spread
evenly). Ids are not bounds-checked here: callers validate them (dlrm.data.validate, with the
`batch_problems` kernel below).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import pacekern as pk

R, D, D2, NNZ, NO, T, B, YW, ND = pk.dims("R D D2 NNZ NO T B YW ND")


# ---------------------------------------------------------------------------------------------
# references (float64 sums over the dequantized rows)

def _bags(base, indices, offsets, nb: int):
    """(rows, bag id) of every gathered id; bag id = b T + t (sample-major)."""
    base, idx, off = (torch.as_tensor(a).long() for a in (base, indices, offsets))
    nt = base.shape[0]
    lengths = off[1:] - off[:-1]                                   # table-major bags: t B + b
    tb = torch.repeat_interleave(torch.arange(nt * nb), lengths)
    t, b = tb // nb, tb % nb
    return base[t] + idx[off[0]:off[-1]], b * nt + t


def _pool(vals, base, indices, offsets, y, col0):
    """Sum rows `vals` (float64 [R, D]) into the slots of a copy of y."""
    y = torch.as_tensor(y)
    nb, nt, d = y.shape[0], torch.as_tensor(base).shape[0], vals.shape[1]
    rows, bag = _bags(base, indices, offsets, nb)
    pooled = torch.zeros(nb * nt, d, dtype=torch.float64).index_add_(0, bag, vals[rows])
    out = y.clone().to(torch.float64)
    out[:, int(col0): int(col0) + nt * d] = pooled.view(nb, nt * d)
    return out.to(torch.float32)


def dequant_s8(w, scale, bias):
    return (torch.as_tensor(w).double() + 128) * torch.as_tensor(scale).double()[:, None] + torch.as_tensor(bias).double()[:, None]


def unpack_u4(w4) -> torch.Tensor:
    """[R, D/2] s8 (the layout above) -> [R, D] codes 0..15."""
    v = torch.as_tensor(w4).to(torch.int16) + 128
    r, d2 = v.shape
    g = v.view(r, d2 // 16, 16)
    return torch.cat([g % 16, g // 16], dim=2).view(r, 2 * d2)


def dequant_u4(w4, scale, bias):
    return unpack_u4(w4).double() * torch.as_tensor(scale).double()[:, None] + torch.as_tensor(bias).double()[:, None]


def ref_f32(w, base, indices, offsets, col0, y):
    return _pool(torch.as_tensor(w).double(), base, indices, offsets, y, col0)


def ref_s8(w, sb, base, indices, offsets, col0, y):
    sb = torch.as_tensor(sb)
    return _pool(dequant_s8(w, sb[:, 0], sb[:, 1]), base, indices, offsets, y, col0)


def ref_u4(w4, sb, base, indices, offsets, col0, y):
    sb = torch.as_tensor(sb)
    return _pool(dequant_u4(w4, sb[:, 0], sb[:, 1]), base, indices, offsets, y, col0)


# ---------------------------------------------------------------------------------------------
# kernels

# PB: bags looked ahead. Deep look-ahead pays when the rows come from DRAM (other batches, or this
# batch's rows evicted by the GEMMs between calls): dev-preset tables (234 MB int8), batch 256,
# 8 different batches: PB 1 / 8 / 32 took 0.99 / 0.84 / 0.65 ms (int8), 0.75 / 0.57 / 0.49 (4-bit),
# 1.61 / 1.52 / 1.51 (fp32) at PF 8; with one batch repeated (rows in L3) all ~0.58 ms.
# Scale and bias side by side (sb) and whole 128-element rows a pass: batch 256, rows from DRAM,
# 0.75-0.86x the time of separate scale/bias arrays and 64-element passes (int8), 0.77x (4-bit).
SPACE = pk.Space(PF=pk.choice(0, 4, 8, 16), PB=pk.choice(0, 1, 4, 8, 16, 32), default=dict(PF=8, PB=32))


@pk.func
def _prefetch_bag(w, sb, base, indices, offsets, i, n, width, step):
    """Prefetch the first n rows of bag i (sample-major, as the kernels walk them), every `step`
    elements of a row of `width`, and their scale/bias line sb[r] (fp32 tables pass w as sb: its
    first line is prefetched anyway). Most bags hold 1-3 ids, so the in-bag prefetch PF ids ahead
    never reaches them."""
    b = i // T
    t = i % T
    s = offsets[t * B + b]
    for j in range(s, min(offsets[t * B + b + 1], s + n)):
        r = base[t] + indices[j]
        pk.prefetch(sb[r, 0])
        for c in range(0, width, step):
            pk.prefetch(w[r, c])


@pk.kernel(space=SPACE, ref=ref_f32)
def embedding_bag_f32(w: pk.f32[R, D], base: pk.i64[T], indices: pk.i32[NNZ], offsets: pk.i32[NO], col0: pk.i32,
                      y: pk.Out[pk.f32[B, YW]], *, PF, PB):
    for i in pk.prange(0, B * T):                              # bag (b, t), sample-major
        b = i // T
        t = i % T
        s = offsets[t * B + b]
        e = offsets[t * B + b + 1]
        r0 = base[t]
        if PB > 0 and i + PB < B * T:
            _prefetch_bag(w, w, base, indices, offsets, i + PB, PF + 1, D, 16)
        for c in range(0, D, 64):                              # 64-element column chunks
            acc = pk.tile(pk.f32x16, 4)
            for j in range(s, e):
                if PF > 0:
                    pk.prefetch(w[r0 + indices[min(j + PF, e - 1)], c])
                r = r0 + indices[j]
                for u in pk.unroll(4):
                    acc[u] = acc[u] + pk.f32x16.load(w[r, min(c + 16 * u, D - 1)], n=D - c - 16 * u)
            for u in pk.unroll(4):
                if c + 16 * u < D:
                    pk.store(y[b, col0 + t * D + c + 16 * u], acc[u], n=D - c - 16 * u)


@pk.kernel(space=SPACE, ref=ref_s8)
def embedding_bag_s8(w: pk.s8[R, D], sb: pk.f32[R, 2], base: pk.i64[T], indices: pk.i32[NNZ], offsets: pk.i32[NO],
                     col0: pk.i32, y: pk.Out[pk.f32[B, YW]], *, PF, PB):
    for i in pk.prange(0, B * T):
        b = i // T
        t = i % T
        s = offsets[t * B + b]
        e = offsets[t * B + b + 1]
        r0 = base[t]
        if PB > 0 and i + PB < B * T:
            _prefetch_bag(w, sb, base, indices, offsets, i + PB, PF + 1, D, 64)
        for c in range(0, D, 128):                             # two cache lines of an int8 row
            acc = pk.tile(pk.f32x16, 8)
            for j in range(s, e):
                if PF > 0:
                    rp = r0 + indices[min(j + PF, e - 1)]
                    pk.prefetch(w[rp, c])
                    pk.prefetch(w[rp, min(c + 64, D - 1)])
                    pk.prefetch(sb[rp, 0])
                r = r0 + indices[j]
                sc = pk.f32x16.bcast(sb[r, 0])
                bs = pk.f32x16.bcast(sb[r, 1])
                for u in pk.unroll(8):
                    code = pk.f32x16.load_s8(w[r, min(c + 16 * u, D - 1)], n=D - c - 16 * u) + 128.0
                    acc[u] = pk.fma(code, sc, acc[u] + bs)
            for u in pk.unroll(8):
                if c + 16 * u < D:
                    pk.store(y[b, col0 + t * D + c + 16 * u], acc[u], n=D - c - 16 * u)


@pk.kernel(space=SPACE, ref=ref_u4)
def embedding_bag_u4(w4: pk.s8[R, D2], sb: pk.f32[R, 2], base: pk.i64[T], indices: pk.i32[NNZ], offsets: pk.i32[NO],
                     col0: pk.i32, y: pk.Out[pk.f32[B, YW]], *, PF, PB):
    # D = 2 D2 elements a row, D a multiple of 32 (pack_u4 checks)
    for i in pk.prange(0, B * T):
        b = i // T
        t = i % T
        s = offsets[t * B + b]
        e = offsets[t * B + b + 1]
        r0 = base[t]
        if PB > 0 and i + PB < B * T:
            _prefetch_bag(w4, sb, base, indices, offsets, i + PB, PF + 1, D2, 64)
        for c in range(0, 2 * D2, 128):                        # 128 elements = 64 bytes
            acc = pk.tile(pk.f32x16, 8)
            for j in range(s, e):
                if PF > 0:
                    rp = r0 + indices[min(j + PF, e - 1)]
                    pk.prefetch(w4[rp, c // 2])
                    pk.prefetch(sb[rp, 0])
                r = r0 + indices[j]
                sc = pk.f32x16.bcast(sb[r, 0])
                bs = pk.f32x16.bcast(sb[r, 1])
                for g in pk.unroll(4):
                    if c + 32 * g < 2 * D2:
                        v = pk.f32x16.load_s8(w4[r, min(c // 2 + 16 * g, D2 - 16)]) + 128.0
                        hi = pk.to_f32(pk.to_i32((v - 7.5) * 0.0625))
                        acc[2 * g] = pk.fma(v - hi * 16.0, sc, acc[2 * g] + bs)
                        acc[2 * g + 1] = pk.fma(hi, sc, acc[2 * g + 1] + bs)
            for u in pk.unroll(8):
                if c + 16 * u < 2 * D2:
                    pk.store(y[b, col0 + t * 2 * D2 + c + 16 * u], acc[u])


# ---------------------------------------------------------------------------------------------
# batch checks, for dlrm.data.validate (the bag kernels do not bounds-check ids)

def ref_batch_problems(dense, indices, offsets, nb, rows, flags):
    d, idx, off = torch.as_tensor(dense), torch.as_tensor(indices).long(), torch.as_tensor(offsets).long()
    nonfinite = int((~torch.isfinite(d)).sum())
    bad_off = int(off[0] != 0 or off[-1] != idx.shape[0] or bool((off[1:] < off[:-1]).any()))
    bad_ids = 0
    if not bad_off:
        for t, r in enumerate(torch.as_tensor(rows).tolist()):
            ids = idx[off[t * nb]:off[(t + 1) * nb]]
            bad_ids += int(((ids < 0) | (ids >= r)).sum())
    return torch.tensor([nonfinite, bad_off, bad_ids], dtype=torch.int32)


@pk.kernel(ref=ref_batch_problems)
def batch_problems(dense: pk.f32[B, ND], indices: pk.i32[NNZ], offsets: pk.i32[NO], nb: pk.i32, rows: pk.i64[T],
                   flags: pk.Out[pk.i32[3]]):
    """flags = (non-finite dense values, 1 if the offsets do not run from 0 to NNZ without going
    down, ids outside their table's rows (counted only when the offsets are sound)) of a
    table-major batch of nb samples with NO = T nb + 1 offsets: one serial pass over the batch."""
    nonfinite = 0
    for b in range(B):
        for k in range(ND):
            if dense[b, k] * 0.0 != 0.0:                     # inf * 0 and NaN * 0 are NaN
                nonfinite = nonfinite + 1
    bad_off = 0
    if offsets[0] != 0 or offsets[NO - 1] != NNZ:
        bad_off = 1
    for i in range(NO - 1):
        if offsets[i + 1] < offsets[i]:
            bad_off = 1
    bad_ids = 0
    if bad_off == 0:
        for t in range(T):
            r = rows[t]
            for j in range(offsets[t * nb], offsets[(t + 1) * nb]):
                if indices[j] < 0 or indices[j] >= r:
                    bad_ids = bad_ids + 1
    flags[0] = nonfinite
    flags[1] = bad_off
    flags[2] = bad_ids


# ---------------------------------------------------------------------------------------------
# activation quantization (u8, affine, per tensor with optional per-column smoothing):
# q[m, k] = clamp(round(x[m, k] * inv_scale[k]) + zp, 0, 255); inv_scale[k] = 1 / (s f_k) where s
# is the tensor's scale and f_k a per-column smoothing factor folded into the consumer's weights
# (all f_k = 1: plain per-tensor quantization)

def ref_quantize(x, inv_scale, zp, q):
    t = torch.as_tensor(x).double() * torch.as_tensor(inv_scale).float().double()[None, :]
    return torch.clamp(torch.round(t) + int(zp), 0, 255).to(torch.uint8)


M, K = pk.dims("M K")


@pk.kernel(ref=ref_quantize)
def quantize_u8(x: pk.f32[M, K], inv_scale: pk.f32[K], zp: pk.i32, q: pk.Out[pk.u8[M, K]]):
    """Round half to even (as torch.quantize_per_tensor) after multiplying by 1/scale."""
    for m in pk.prange(M):
        lo = pk.f32x16.bcast(-512.0)                          # clamp before the int conversion: far
        hi = pk.f32x16.bcast(512.0)                           # out-of-range values must saturate, not wrap
        for k in range(0, K, 16):
            v = pk.f32x16.load(x[m, k], n=K - k) * pk.f32x16.load(inv_scale[k], n=K - k)
            pk.store(q[m, k], pk.to_u8(pk.to_i32(pk.min(pk.max(v, lo), hi)) + zp), n=min(K - k, 16))


# ---------------------------------------------------------------------------------------------
# packing

@dataclass
class PackedTables:
    """All tables of a model, quantized row-wise, in one array (see the module docstring)."""
    bits: int                  # 32, 8 or 4
    w: torch.Tensor            # f32 [R, D] | s8 [R, D] | s8 [R, D/2]
    sb: torch.Tensor | None    # f32 [R, 2] (8/4-bit): row scale, and torch's row bias (the value of code 0)
    base: torch.Tensor         # i64 [T]: first row of each table
    rows: tuple                # rows of each table
    dim: int

    @property
    def scale(self) -> torch.Tensor | None:
        return None if self.sb is None else self.sb[:, 0]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.sb is None else self.sb[:, 1]

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in (self.w, self.sb) if t is not None)


def scale_bias(scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """f32 [R, 2]: each row's scale beside its bias (one cache line per gathered row)."""
    return torch.stack([torch.as_tensor(scale).float(), torch.as_tensor(bias).float()], 1).contiguous()


def _bases(rows) -> torch.Tensor:
    return torch.tensor([0] + list(np.cumsum(rows)[:-1]), dtype=torch.int64)


def quantize_rows_u8(w: torch.Tensor):
    """Row-wise asymmetric 8-bit, torch's byte format (scale = (max - min) / 255, bias = min):
    (codes u8 [R, D], scale f32 [R], bias f32 [R])."""
    w = w.float()
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    scale = (hi - lo) / 255.0
    inv = 255.0 / (hi - lo + 1e-8)                       # as fbgemm: a constant row gets codes 0
    q = torch.clamp(torch.round((w - lo[:, None]) * inv[:, None]), 0, 255).to(torch.uint8)
    return q, scale.contiguous(), lo.contiguous()


def quantize_rows_u4(w: torch.Tensor):
    """Row-wise asymmetric 4-bit with fp16 scale and bias (torch's 4-bit format):
    (codes u8 0..15 [R, D], scale f32 [R], bias f32 [R]) with scale and bias fp16-representable."""
    w = w.float()
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    bias = lo.half().float()
    scale = ((hi - bias) / 15.0).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))       # constant row: codes 0
    q = torch.clamp(torch.round((w - bias[:, None]) / scale[:, None]), 0, 15).to(torch.uint8)
    return q, scale.contiguous(), bias.contiguous()


def pack_f32(tables) -> PackedTables:
    rows = tuple(int(t.shape[0]) for t in tables)
    w = torch.cat([t.detach().float() for t in tables]).contiguous()
    return PackedTables(32, w, None, _bases(rows), rows, int(w.shape[1]))


def pack_s8(q_u8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, rows) -> PackedTables:
    """From u8 codes (all tables concatenated) with torch-format scale and bias."""
    w = (q_u8.to(torch.int16) - 128).to(torch.int8).contiguous()
    return PackedTables(8, w, scale_bias(scale, bias), _bases(rows), tuple(rows), int(w.shape[1]))


def pack_u4(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, rows) -> PackedTables:
    """From codes 0..15 [R, D] (D a multiple of 32) into the nibble layout above."""
    r, d = q.shape
    if d % 32:
        raise ValueError(f"4-bit tables need a dimension that is a multiple of 32, got {d}")
    g = q.to(torch.int16).view(r, d // 32, 2, 16)
    byte = g[:, :, 0, :] + 16 * g[:, :, 1, :]
    w4 = (byte - 128).to(torch.int8).reshape(r, d // 2).contiguous()
    return PackedTables(4, w4, scale_bias(scale, bias), _bases(rows), tuple(rows), d)


def dequantized(p: PackedTables) -> torch.Tensor:
    """The fp32 rows a packed table stands for (float64 math, then f32)."""
    if p.bits == 32:
        return p.w
    return (dequant_s8(p.w, p.scale, p.bias) if p.bits == 8 else dequant_u4(p.w, p.scale, p.bias)).float()


def embedding_bag(p: PackedTables, indices: torch.Tensor, offsets: torch.Tensor, y: torch.Tensor, col0: int = 0):
    """Pool every (sample, table) bag of a table-major batch into y[:, col0 + t D: ...]."""
    if p.bits == 32:
        return embedding_bag_f32(p.w, p.base, indices, offsets, col0, y)
    kern = embedding_bag_s8 if p.bits == 8 else embedding_bag_u4
    return kern(p.w, p.sb, p.base, indices, offsets, col0, y)
