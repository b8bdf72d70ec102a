"""Causal GQA attention over a paged KV cache, for the engine's flat steps (llm/engine.py).

A step holds NS sequences; sequence s has the query tokens q[qstart[s] : qstart[s + 1]] (one for a
decoding sequence, a chunk of its prompt for a prefilling one), the first at position ctx[s] (the
tokens already cached before this step), and its keys/values at positions 0 .. in the pool blocks
bt[s, 0], bt[s, 1], ... (BS tokens per block: position j is kp[bt[s, j // BS], :, j % BS]). This
step's keys are already written (rope_paged). Then, for every query token t of sequence s,

    out[qstart[s] + t, h] = softmax_j(q . kp[.., g, j] / sqrt(D)) @ vp[.., g, j],  j = 0 .. ctx[s] + t

with g = h // (NH // KVH). Rows of out outside every sequence (a step's padding tokens) are left
alone.

It is attention.py's kernel (the same score and P @ V helpers) with the key loop walking blocks: work items are (sequence, first query
token, number of tokens) triples, listed by the caller in items[0 : nitems[0]] (`work_items` cuts
the sequences into blocks of up to 16 tokens, ordered so that a static split of the list gives
each thread a similar share), times the KVH kv heads. The numerics are attention.py's (same helpers, strict_fp, keys in order, the exact maximum,
no online rescaling): a row's bits depend only on the keys it sees, so they do not depend on the
block size, on where the blocks sit in the pool, or on the other sequences in the step -- the
engine's outputs are batch-invariant in attention (test_paged_attention_is_the_contiguous_kernel).
"""
import torch

import pacekern as pk

from .attention import _pv, _scores, _softmax

R, NH, KVH, D, NB, BS, NS, MB, NI = pk.dims("R NH KVH D NB BS NS MB NI")


def ref(q, kp, vp, bt, qstart, ctx, items, nitems, out):
    res = out.clone()
    g = q.shape[1] // kp.shape[1]
    bs = kp.shape[2]
    for s in range(bt.shape[0]):
        a, b = int(qstart[s]), int(qstart[s + 1])
        if b <= a:
            continue
        n = int(ctx[s]) + b - a
        blocks = bt[s, : (n + bs - 1) // bs].long()
        k = kp[blocks].permute(1, 0, 2, 3).reshape(kp.shape[1], -1, kp.shape[3])[:, :n].repeat_interleave(g, 0)
        v = vp[blocks].permute(1, 0, 2, 3).reshape(vp.shape[1], -1, vp.shape[3])[:, :n].repeat_interleave(g, 0)
        mask = torch.arange(n)[None, :] <= (int(ctx[s]) + torch.arange(b - a))[:, None]
        res[a:b] = torch.nn.functional.scaled_dot_product_attention(q[a:b].transpose(0, 1), k, v,
                                                                    attn_mask=mask).transpose(0, 1)
    return res


def work_items(nq: list, ctx: list, out: torch.Tensor, block: int = 16) -> int:
    """Fill out[i] = (sequence, first query token, tokens) for every block of up to `block` query
    tokens of every sequence (nq[s] tokens after ctx[s] cached ones), the costliest and the
    cheapest alternating, so a thread's contiguous share of the list holds both; returns how many.
    (16 tokens x G heads is attention.py's default QB: tiles of rows that share the keys.)"""
    items = [(s, t, min(block, n - t)) for s, n in enumerate(nq) for t in range(0, n, block)]
    if len(items) > out.shape[0]:
        raise ValueError(f"{len(items)} attention work items do not fit a table of {out.shape[0]}")
    items.sort(key=lambda it: it[2] * (ctx[it[0]] + it[1] + it[2]))     # its query-key pairs
    order = [items[i // 2] if i % 2 == 0 else items[-1 - i // 2] for i in range(len(items))]
    if order:
        out[: len(order)] = torch.tensor(order, dtype=torch.int32)
    return len(order)


SPACE = pk.Space(MR=pk.choice(2, 3, 4, 6), NK=pk.choice(2, 4), NV=pk.choice(2, 4),
                 PAR=pk.choice(1 << 16, 1 << 20, 1 << 62),
                 where=lambda c: c.MR * c.NK + c.NK + 1 <= 28 and c.MR * c.NV + c.NV + 1 <= 28,
                 regs=lambda c: max(c.MR * c.NK + c.NK + 1, c.MR * c.NV + c.NV + 1),
                 default=(dict(MR=3, NK=4, NV=4, PAR=1 << 16), dict(MR=2, NK=2, NV=2, PAR=1 << 16)))


@pk.func
def _attend(q, kp, vp, bt, qstart, ctx, items, out, it):
    """Work item it // KVH of the table, kv head it % KVH."""
    G = NH // KVH
    s = items[it // KVH, 0]
    kvh = it % KVH
    t0 = items[it // KVH, 1]
    row0 = qstart[s] + t0                    # flat token row of the item's first query
    rows = items[it // KVH, 2] * G           # row r: token row0 + r // G, head kvh * G + r % G
    p0 = ctx[s] + t0                         # position of row r: p0 + r // G
    nk = p0 + (rows - 1) // G + 1            # keys the item's last row sees
    qs = pk.scratch(pk.f32, rows, D)
    acc = pk.scratch(pk.f32, rows, D)
    sc = pk.scratch(pk.f32, rows, (nk + 15) // 16 * 16)
    ls = pk.scratch(pk.f32, rows, 16)
    scale = 1.0 / pk.sqrt(pk.f32x16.bcast(D))
    for r in range(rows):
        for d in range(0, D, 16):
            pk.store(qs[r, d], pk.f32x16.load(q[row0 + r // G, kvh * G + r % G, d], n=D - d) * scale, n=D - d)
            pk.store(acc[r, d], pk.f32x16.zeros(), n=D - d)
        pk.store(ls[r, 0], pk.f32x16.zeros())
    for s0 in range(0, nk, BS):
        _scores(qs, kp, sc, bt[s, s0 // BS], kvh, 0, s0, BS, rows, p0, G)     # block j // BS, row j % BS
    for r in range(rows):
        _softmax(sc, r, p0 + r // G + 1, nk)
    for s0 in range(0, nk, BS):
        _pv(vp, sc, acc, ls, bt[s, s0 // BS], kvh, 0, s0, BS, rows, p0, G)
    for r in range(rows):
        inv = 1.0 / pk.hmax(pk.f32x16.load(ls[r, 0]))
        for d in range(0, D, 16):
            pk.store(out[row0 + r // G, kvh * G + r % G, d], pk.f32x16.load(acc[r, d], n=D - d) * inv, n=D - d)


@pk.kernel(space=SPACE, ref=ref, key={"R": "pow2", "NS": "pow2"}, strict_fp=True)
def paged_attention(q: pk.f32[R, NH, D], kp: pk.f32[NB, KVH, BS, D], vp: pk.f32[NB, KVH, BS, D], bt: pk.i32[NS, MB],
                    qstart: pk.i32[NS + 1], ctx: pk.i32[NS], items: pk.i32[NI, 3], nitems: pk.i32[1],
                    out: pk.Out[pk.f32[R, NH, D]], *, MR, NK, NV, PAR):
    work = 0                                 # query-key pairs
    for s in range(NS):
        n = qstart[s + 1] - qstart[s]
        work += n * (ctx[s] + n)
    if work * NH * D >= PAR:
        for it in pk.prange(nitems[0] * KVH):
            _attend(q, kp, vp, bt, qstart, ctx, items, out, it)
    else:
        for it in range(nitems[0] * KVH):
            _attend(q, kp, vp, bt, qstart, ctx, items, out, it)
