"""Decode GEMV with 4-bit weights: y[M, N] = x[M, K] @ W[N, K]^T, W at 5 bits per weight.

Weights (quantize_int4), like llama.cpp's Q4_1: groups of G = 32 consecutive weights of a row, each
w = q * scale + min with q in 0..15 and scale, min stored as bf16. A GGUF model whose tensors were
Q4_1 or Q4_K (both: 32-weight groups with a scale and a min) is reproduced almost exactly, instead of
being rounded a second time onto another grid.

Layout, chosen so that one vpdpbusd lane accumulates one group: K is padded with zeros to KP, a
multiple of a block of 512 weights = 16 groups. Group j of block b holds k = 512 b + 32 j + 4 c + t
(chunk c = 0..7, t = 0..3); chunk c of all 16 groups forms one 64-byte vector (bytes 4 j + t), so the
16 i32 lanes of a vpdpbusd sum are the 16 groups' dot products. Two chunks share a byte (low nibble:
chunk 2 l, high nibble: chunk 2 l + 1), so a block is 4 lines of 64 bytes:
  w   u8   [N, KP/2]   line l of block b at bytes 256 b + 64 l
  ws  bf16 [N, KP/32]  scale of each group     wm  bf16 [N, KP/32]  min of each group
Activations (quantize_x8) are int8 per row and group (scale xs = max|x| / 127), stored in the same
chunk order: xq[m, 512 b + 64 c + 4 j + t] = round(x[m, 512 b + 32 j + 4 c + t] / xs), and
xm = xs * sum(xq) per group. Then per block of a row, with d the 16 exact group sums of q * xq:
  y += sum over lanes of  f32(d) * ws * xs  +  wm * xm
"""
import torch

import pacekern as pk

G, BLOCK = 32, 512

M, N, KP, KG, KH, K = pk.dims("M N KP KG KH K")


@pk.kernel
def quantize_x8(x: pk.f32[M, K], xq: pk.Out[pk.s8[M, KP]], xs: pk.Out[pk.f32[M, KG]], xm: pk.Out[pk.f32[M, KG]]):
    """Each group of 32 values of a row -> int8 with its own scale, written in the chunk order of
    the module docstring (a byte copy: 4-byte runs 64 bytes apart); the padding past K reads as 0."""
    qs = pk.scratch(pk.s8, 64)                                # one group in natural order (16 spare bytes)
    for m in range(M):
        for g in range(KG):
            k0 = g * 32
            a0 = pk.f32x16.load(x[m, k0], n=K - k0)                              # masked lanes read as 0
            a1 = pk.f32x16.load(x[m, k0 + 16], n=K - k0 - 16)
            s = max(pk.hmax(pk.max(pk.max(a0, -a0), pk.max(a1, -a1))), 1e-30) / 127.0
            inv = 1.0 / s
            q0 = pk.to_i32(a0 * inv)
            q1 = pk.to_i32(a1 * inv)
            pk.store(qs[0], pk.to_s8(q0), n=16)
            pk.store(qs[16], pk.to_s8(q1), n=16)
            xs[m, g] = s
            xm[m, g] = s * pk.hsum(q0 + q1)
            base = (g // 16) * 512 + (g % 16) * 4
            for c in range(8):
                for t in range(4):
                    xq[m, base + 64 * c + t] = qs[4 * c + t]


def ref_int4(xq, xs, xm, w, ws, wm, y):
    """The exact result for the quantized activations the kernel is given (float64)."""
    x = from_chunk_order(xq.double()) * torch.as_tensor(xs).double().repeat_interleave(G, 1)
    return x @ dequantize_int4(w, ws, wm).double().t()


def _prune(c, dims, cpu):
    # enough row blocks for every thread to get several, so no thread idles at the end
    return dims["N"] // c.NB >= 4 * cpu.threads or c.NB == 16


SPACE = pk.Space(R=pk.choice(1, 2, 4, 6), NB=pk.choice(16, 32, 64, 128, 256), PF=pk.choice(0, 512, 1024, 2048),
                 where=lambda c: c.NB % c.R == 0, prune=_prune, default=dict(R=1, NB=64, PF=0))


@pk.kernel(space=SPACE, ref=ref_int4, key={"M": "exact"})
def gemv_int4(xq: pk.s8[M, KP], xs: pk.f32[M, KG], xm: pk.f32[M, KG], w: pk.u8[N, KH], ws: pk.bf16[N, KG],
              wm: pk.bf16[N, KG], y: pk.Out[pk.f32[M, N]], *, R, NB, PF):
    """Each thread streams R weight rows side by side, one block (4 lines) of each per step; the
    block's 8 activation vectors are loaded once for the R rows."""
    for n0 in pk.prange(0, N, NB):
        for r0 in range(n0, min(n0 + NB, N), R):
            for m in range(M):
                acc = pk.tile(pk.f32x16, R)
                xv = pk.tile(pk.s8x64, 8)
                for b in range(0, KH, 256):                       # b: the block's first byte in a row of w
                    g = b // 16                                     # the block's first group
                    for c in pk.unroll(8):
                        xv[c] = pk.s8x64.load(xq[m, 2 * b + 64 * c])
                    xs16 = pk.f32x16.load(xs[m, g])
                    xm16 = pk.f32x16.load(xm[m, g])
                    for r in pk.unroll(R):
                        row = min(r0 + r, N - 1)
                        d = pk.i32x16.zeros()
                        for l in pk.unroll(4):
                            if PF > 0:
                                pk.prefetch(w[row, b + 64 * l + PF])
                            wv = pk.u8x64.load(w[row, b + 64 * l])
                            d = pk.dot4_u8s8(d, pk.low_nibbles(wv), xv[2 * l])
                            d = pk.dot4_u8s8(d, pk.high_nibbles(wv), xv[2 * l + 1])
                        acc[r] = pk.fma(pk.to_f32(d), pk.f32x16.load_bf16(ws[row, g]) * xs16, acc[r])
                        acc[r] = pk.fma(pk.f32x16.load_bf16(wm[row, g]), xm16, acc[r])
                for r in pk.unroll(R):
                    if r0 + r < N:
                        y[m, r0 + r] = pk.hsum(acc[r])


def padded(k: int) -> int:
    """K rounded up to whole blocks of 512 weights."""
    return -(-k // BLOCK) * BLOCK


def activation_buffers(m: int, k: int):
    """(xq, xs, xm) for quantize_x8 / gemv_int4 with m rows of k values."""
    kp = padded(k)
    return torch.empty(m, kp, dtype=torch.int8), torch.empty(m, kp // G), torch.empty(m, kp // G)


def gemv_int4_linear(x, w, ws, wm, y, scratch=None):
    """y[M, N] = x[M, K] @ dequantize_int4(w, ws, wm, K)^T: quantizes x per group to int8, then
    gemv_int4. `scratch` = activation_buffers(M, K) to reuse across calls."""
    m, k = x.shape
    if w.shape[1] * 2 != padded(k) or ws.shape != (w.shape[0], padded(k) // G) or wm.shape != ws.shape:
        raise ValueError(f"int4 weights {tuple(w.shape)} / scales {tuple(ws.shape)} / mins {tuple(wm.shape)} do not "
                         f"fit x with K={k} (want [N, {padded(k) // 2}] and [N, {padded(k) // G}] twice: "
                         f"quantize_int4 of an [N, {k}] weight)")
    xq, xs, xm = scratch or activation_buffers(m, k)
    quantize_x8(x, xq, xs, xm)
    return gemv_int4(xq, xs, xm, w, ws, wm, y)


def prepare_int4_linear(x, w, ws, wm, y):
    """gemv_int4_linear bound once: the zero-argument call quantizes x and runs gemv_int4 on these
    buffers (decode plans; their contents may change between calls)."""
    xq, xs, xm = activation_buffers(*x.shape)
    quant, mm = quantize_x8.prepare(x, xq, xs, xm), gemv_int4.prepare(xq, xs, xm, w, ws, wm, y)

    def call():
        quant()
        mm()
    return call


def to_chunk_order(q: torch.Tensor) -> torch.Tensor:
    """[..., KP] natural k order -> the chunk order of the module docstring."""
    lead, kp = q.shape[:-1], q.shape[-1]
    return q.reshape(*lead, kp // BLOCK, 16, 8, 4).transpose(-3, -2).reshape(*lead, kp)


def from_chunk_order(q: torch.Tensor) -> torch.Tensor:
    lead, kp = q.shape[:-1], q.shape[-1]
    return q.reshape(*lead, kp // BLOCK, 8, 16, 4).transpose(-3, -2).reshape(*lead, kp)


def quantize_int4(w: torch.Tensor, chunk_rows: int = 8192):
    """fp weights [N, K] -> (u8 [N, KP/2] packed, bf16 [N, KP/32] scales, bf16 [N, KP/32] mins).
    Per group, the range [min, max] shrunk by 0..20% about its middle, or the grid of the group's
    smallest gap between values when that spans at most 16 levels (a Q4_1 / Q4_K source, kept as it
    is but for the bf16 rounding of scale and min), whichever rounds with the least squared error."""
    n, k = w.shape
    kp = padded(k)
    packed = torch.empty(n, kp // 2, dtype=torch.uint8)
    scales, mins = torch.empty(n, kp // G, dtype=torch.bfloat16), torch.empty(n, kp // G, dtype=torch.bfloat16)
    for r0 in range(0, n, chunk_rows):                      # bounded temporaries for 100M-weight matrices
        wf = torch.zeros(min(chunk_rows, n - r0), kp)
        wf[:, :k] = w[r0:r0 + chunk_rows].float()
        grp = wf.view(wf.shape[0], kp // G, G)
        lo, hi = grp.amin(-1, keepdim=True), grp.amax(-1, keepdim=True)
        gaps = grp.sort(-1).values.diff(dim=-1)
        gap = torch.where(gaps > 1e-6 * (hi - lo), gaps, torch.inf).amin(-1, keepdim=True)   # a source grid's step
        best = None
        for shrink in (1.0, 0.95, 0.9, 0.85, 0.8, None):
            half = (hi - lo) / 2 * shrink if shrink else torch.where((hi - lo) <= 15.01 * gap, 7.5 * gap, (hi - lo) / 2)
            s = (2 * half / 15).clamp(min=1e-12).bfloat16().float()          # what the kernel will read
            mn = (lo if shrink is None else (lo + hi) / 2 - half).bfloat16().float()
            q = torch.clamp(torch.round((grp - mn) / s), 0, 15)
            err = ((q * s + mn - grp) ** 2).sum(-1, keepdim=True)
            if best is None:
                best = [err, q, s, mn]
            else:
                better = err < best[0]
                best = [torch.where(better, a, b) for a, b in zip((err, q, s, mn), best)]
        q = to_chunk_order(best[1].view(-1, kp).to(torch.uint8)).view(-1, kp // BLOCK, 4, 2, 64)
        packed[r0:r0 + chunk_rows] = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).view(-1, kp // 2)
        scales[r0:r0 + chunk_rows] = best[2].view(-1, kp // G).bfloat16()
        mins[r0:r0 + chunk_rows] = best[3].view(-1, kp // G).bfloat16()
    return packed, scales, mins


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    """Packed weights -> q (u8 0..15) [N, KP] in natural k order."""
    n, kp = w.shape[0], w.shape[1] * 2
    lines = w.view(n, kp // BLOCK, 4, 1, 64)
    return from_chunk_order(torch.cat([lines & 15, lines >> 4], dim=3).view(n, kp))


def dequantize_int4(w: torch.Tensor, ws: torch.Tensor, wm: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Packed int4 weights -> fp32 [N, k] (k: the unpadded K; default all KP columns)."""
    q = unpack_int4(w).float()
    deq = q * ws.float().repeat_interleave(G, 1) + wm.float().repeat_interleave(G, 1)
    return deq[:, :q.shape[1] if k is None else k].contiguous()


def torch_int4_pack(w: torch.Tensor, ws: torch.Tensor, wm: torch.Tensor, k: int):
    """Our int4 weights in the layout of torch's own CPU int4 matmul (aten._weight_int4pack_mm_for_cpu,
    the torch baseline), which computes (q - 8) * scale + zero: zero = min + 8 * scale.
    torch needs K to be a multiple of the group and N of 16, so this exists only for such shapes."""
    if k % G or w.shape[0] % 16:
        raise ValueError(f"torch's int4 matmul needs K a multiple of {G} and N of 16, got N={w.shape[0]}, K={k}")
    q = unpack_int4(w)[:, :k].int().contiguous()
    s, mn = ws[:, :k // G].float().t(), wm[:, :k // G].float().t()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), torch.stack([s, mn + 8 * s], -1).contiguous()
