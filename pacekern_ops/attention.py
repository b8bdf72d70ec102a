"""Causal grouped-query attention over a KV cache, for prefill, decode and speculative verification.

    out[b, t, h] = softmax_s(q[b, t, h] . kc[b, g, s] / sqrt(D)) @ vc[b, g, s],  s = 0 .. start[b] + t

with g = h // (NH // KVH). Tree verification (TA = T > 1) narrows that: a query t sees the
cache rows before start[b] and, of this call's rows, only those u with anc[b, t, u] != 0 (its
ancestors and itself; they come before it, so the causal bound still holds; anc[b, t, 0], the
root, must be set). Plain calls pass anc of shape [B, 1, 1]. The caller has already written this
step's keys and values into the cache (rope_qkv), so prefill (start 0, T up to the prompt),
decode (T = 1, a different start per row) and verification (T = K + 1 at start > 0) are one code
path.

Work items are (b, kv head, block of QB query tokens); an item's query rows are its tokens x the
G = NH / KVH query heads that share the kv head, so each K/V row is read once per group (at
decode an item is one (b, kv head): G rows). Per-thread buffers (pk.scratch) hold the scaled
queries, every score of the item's rows and the output accumulators; keys stream in blocks of KB:
  1. scores: MR rows x NK keys register tiles, FMAs along D, one horizontal sum per score (the
     cache layout [S, D] puts D, not keys, in the lanes)
  2. softmax per row over all its keys at once: the exact maximum m, then exp(score - m) in place
  3. accumulator += P @ V_block: MR rows x 16 NV columns register tiles, V rows shared by the rows,
     and the row sum l += p, both in key order
The result is acc / l. A row's bits depend only on the sequence of keys it sees, never on where
they sit in the cache or which rows share the call: unseen keys contribute exact zeros, the max
is exact and the sums run in key order (no online rescaling at block edges, no lane-wise partial
sums). So a row verified at any place in a tree gets the bits plain decode gives it, and a greedy
tree walk is exactly lossless. "In key order" needs strict_fp: with fastmath's reassoc LLVM may
unroll the key loop and regroup its FMA chains, and which keys fall in the unrolled body then
depends on how many keys the tile sees (1-ulp differences at NV=2 on Zen 4:
test_attention_tree_rows_are_decode_rows). Causality: row (t, g) sees start[b] + t + 1 keys; scores past that
are -inf before exp (so 0 after it) and the tiles never read cache rows past the last row's
position (they may be uninitialized memory). Differences from torch's fp32 SDPA are summation
order and pacekern's exp (~2e-7 relative).

Threads: items run in parallel when the work (query-key pairs x D) reaches PAR; causal items
differ in cost, so item i of a (b, kv head) takes query block 0, n-1, 1, n-2, ... (a thread's
contiguous share then holds cheap and expensive blocks alike). Decode at short contexts stays on
one thread.
"""
import torch

import pacekern as pk

B, T, NH, KVH, S, D, TA = pk.dims("B T NH KVH S D TA")


def visible(start: int, t: int, anc=None) -> torch.Tensor:
    """[t, start + t] bool: which cache rows each of t new queries sees (causal; anc [t, t]: a tree)."""
    mask = torch.arange(start + t)[None, :] <= (start + torch.arange(t))[:, None]
    if anc is not None and anc.shape[-1] > 1:
        mask[:, start:] &= anc != 0
    return mask


def ref(q, kc, vc, start, anc, out):
    nb, nt, nh, _ = q.shape
    g = nh // kc.shape[1]
    res = torch.empty_like(q)
    for b in range(nb):
        n = int(start[b]) + nt
        k, v = kc[b, :, :n].repeat_interleave(g, 0), vc[b, :, :n].repeat_interleave(g, 0)
        mask = visible(int(start[b]), nt, anc[b])
        res[b] = torch.nn.functional.scaled_dot_product_attention(q[b].transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1)
    return res


# PAR = 2**16: decode (one token, G rows per kv head) runs its kv heads in parallel from a context of
# ~110 tokens on (SmolLM2, Zen 4, 2 threads: 8.8 vs 10.0 us per call at 250 tokens, 26 vs 32 us for
# 3 tokens of verification; decode 142 vs 134 tok/s end to end, PARD K=2 218 vs 207)
SPACE = pk.Space(QB=pk.choice(8, 16, 32), KB=pk.choice(64, 128, 256), MR=pk.choice(2, 3, 4, 6), NK=pk.choice(2, 4),
                 NV=pk.choice(2, 4), PAR=pk.choice(1 << 16, 1 << 20, 1 << 22, 1 << 62),
                 where=lambda c: c.MR * c.NK + c.NK + 1 <= 28 and c.MR * c.NV + c.NV + 1 <= 28,
                 regs=lambda c: max(c.MR * c.NK + c.NK + 1, c.MR * c.NV + c.NV + 1),
                 default=(dict(QB=16, KB=128, MR=3, NK=4, NV=4, PAR=1 << 16),
                          dict(QB=16, KB=128, MR=2, NK=2, NV=2, PAR=1 << 16)))


@pk.func
def _qk_step(qs, kc, a, b, kvh, ko, r0, j0, rows, nhi, d, n):
    """a[i, k] += qs[r0 + i, d:d+n] * kc[b, kvh, ko + j0 + k, d:d+n] (lanes past n are 0)"""
    kv = pk.tile(pk.f32x16, NK)
    for k in pk.unroll(NK):
        kv[k] = pk.f32x16.load(kc[b, kvh, ko + min(j0 + k, nhi - 1), d], n=n)
    for i in pk.unroll(MR):
        qv = pk.f32x16.load(qs[min(r0 + i, rows - 1), d], n=n)
        for k in pk.unroll(NK):
            a[i, k] = pk.fma(qv, kv[k], a[i, k])


@pk.func
def _scores(qs, kc, sc, b, kvh, ko, s0, kb, rows, p0, G):
    """sc[r, s0 + j] = qs[r] . kc[b, kvh, ko + j] for every key j < kb of the block starting at key
    s0 that the tile of rows holding r may see (the paged kernel passes a pool block as b, ko = 0)"""
    for r0 in range(0, rows, MR):
        nhi = min(kb, p0 + (min(r0 + MR, rows) - 1) // G + 1 - s0)       # keys the tile's last row sees
        for j0 in range(0, nhi, NK):
            a = pk.tile(pk.f32x16, MR, NK)
            for d in range(0, D - 15, 16):
                _qk_step(qs, kc, a, b, kvh, ko, r0, j0, rows, nhi, d, 16)
            if D % 16 != 0:
                _qk_step(qs, kc, a, b, kvh, ko, r0, j0, rows, nhi, D - D % 16, D % 16)
            for i in pk.unroll(MR):
                if r0 + i < rows:
                    for k in pk.unroll(NK):
                        if j0 + k < nhi:
                            sc[r0 + i, s0 + j0 + k] = pk.hsum(a[i, k])


@pk.func
def _softmax(sc, r, n, nk):
    """Row r sees keys 0 .. n-1 (n >= 1; tree-hidden ones hold -inf): scores -> exp(score - max)
    in place, zeros from n up to nk (the item's last row's count)."""
    n16 = (n + 15) // 16 * 16
    for j in range(n, n16):
        sc[r, j] = -float("inf")
    mv = pk.f32x16.bcast(-float("inf"))
    for j in range(0, n16, 16):
        mv = pk.max(mv, pk.f32x16.load(sc[r, j]))
    m = pk.f32x16.bcast(pk.hmax(mv))
    for j in range(0, n16, 16):
        pk.store(sc[r, j], pk.exp(pk.f32x16.load(sc[r, j]) - m))
    for j in range(n16, nk):
        sc[r, j] = 0.0


@pk.func
def _tree_mask(anc, sc, b, t, r, j0, n):
    """Row r (token t) keeps the scores of this call's keys j0 .. n-1 (rows u = j - j0) that are its
    ancestors; the others get -inf. Every row sees key 0 (an old row or the root), so its max is
    finite."""
    for j in range(j0, n):
        if anc[b, t, j - j0] == 0:
            sc[r, j] = -float("inf")


@pk.func
def _pv(vc, sc, acc, ls, b, kvh, ko, s0, kb, rows, p0, G):
    """acc[r] += sum_j sc[r, s0 + j] * vc[b, kvh, ko + j] and ls[r] += sum_j sc[r, s0 + j] over the
    keys of the block the tile of rows may see, in key order"""
    for r0 in range(0, rows, MR):
        nhi = min(kb, p0 + (min(r0 + MR, rows) - 1) // G + 1 - s0)
        for d0 in range(0, D, 16 * NV):
            o = pk.tile(pk.f32x16, MR, NV)
            lv = pk.tile(pk.f32x16, MR)
            for i in pk.unroll(MR):
                lv[i] = pk.f32x16.load(ls[min(r0 + i, rows - 1), 0])
                for v in pk.unroll(NV):
                    o[i, v] = pk.f32x16.load(acc[min(r0 + i, rows - 1), min(d0 + 16 * v, D - 1)], n=D - d0 - 16 * v)
            for j in range(nhi):
                vv = pk.tile(pk.f32x16, NV)
                for v in pk.unroll(NV):
                    vv[v] = pk.f32x16.load(vc[b, kvh, ko + j, min(d0 + 16 * v, D - 1)], n=D - d0 - 16 * v)
                for i in pk.unroll(MR):
                    p = pk.f32x16.bcast(sc[min(r0 + i, rows - 1), s0 + j])
                    lv[i] = lv[i] + p
                    for v in pk.unroll(NV):
                        o[i, v] = pk.fma(p, vv[v], o[i, v])
            for i in pk.unroll(MR):
                if r0 + i < rows:
                    if d0 == 0:                       # the row sum once, whatever the D chunks
                        pk.store(ls[r0 + i, 0], lv[i])
                    for v in pk.unroll(NV):
                        pk.store(acc[r0 + i, min(d0 + 16 * v, D - 1)], o[i, v], n=D - d0 - 16 * v)


@pk.func
def _attend(q, kc, vc, start, anc, out, it, nqb):
    """Work item `it`: (b, kv head) = it // nqb, query block zigzagged from it % nqb."""
    G = NH // KVH
    j = it % nqb
    qb = j // 2
    if j % 2 == 1:
        qb = nqb - 1 - j // 2
    b = it // nqb // KVH
    kvh = it // nqb % KVH
    t0 = qb * QB
    rows = min(QB, T - t0) * G               # row r: token t0 + r // G, head kvh * G + r % G
    p0 = start[b] + t0                       # position of row r: p0 + r // G
    plast = p0 + (rows - 1) // G
    nk = plast + 1                           # keys the item's last row sees
    qs = pk.scratch(pk.f32, rows, D)         # queries * 1/sqrt(D)
    acc = pk.scratch(pk.f32, rows, D)        # unnormalized outputs
    sc = pk.scratch(pk.f32, rows, (nk + 15) // 16 * 16)   # scores, then probabilities
    ls = pk.scratch(pk.f32, rows, 16)        # row sums (every lane the same)
    scale = 1.0 / pk.sqrt(pk.f32x16.bcast(D))
    for r in range(rows):
        for d in range(0, D, 16):
            pk.store(qs[r, d], pk.f32x16.load(q[b, t0 + r // G, kvh * G + r % G, d], n=D - d) * scale, n=D - d)
            pk.store(acc[r, d], pk.f32x16.zeros(), n=D - d)
        pk.store(ls[r, 0], pk.f32x16.zeros())
    for s0 in range(0, nk, KB):
        _scores(qs, kc, sc, b, kvh, s0, s0, KB, rows, p0, G)
    for r in range(rows):
        n = p0 + r // G + 1
        if TA > 1:
            _tree_mask(anc, sc, b, t0 + r // G, r, start[b], n)
        _softmax(sc, r, n, nk)
    for s0 in range(0, nk, KB):
        _pv(vc, sc, acc, ls, b, kvh, s0, s0, KB, rows, p0, G)
    for r in range(rows):
        inv = 1.0 / pk.hmax(pk.f32x16.load(ls[r, 0]))
        for d in range(0, D, 16):
            pk.store(out[b, t0 + r // G, kvh * G + r % G, d], pk.f32x16.load(acc[r, d], n=D - d) * inv, n=D - d)


@pk.kernel(space=SPACE, ref=ref, key={"B": "pow2", "T": "pow2"}, strict_fp=True)
def attention(q: pk.f32[B, T, NH, D], kc: pk.f32[B, KVH, S, D], vc: pk.f32[B, KVH, S, D], start: pk.i32[B],
              anc: pk.i32[B, TA, TA], out: pk.Out[pk.f32[B, T, NH, D]], *, QB, KB, MR, NK, NV, PAR):
    nqb = (T + QB - 1) // QB
    work = 0                                 # query-key pairs
    for b in range(B):
        work += T * (start[b] + T)
    if work * NH * D >= PAR:
        for it in pk.prange(B * KVH * nqb):
            _attend(q, kc, vc, start, anc, out, it, nqb)
    else:
        for it in range(B * KVH * nqb):
            _attend(q, kc, vc, start, anc, out, it, nqb)
