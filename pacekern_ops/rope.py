"""Rotary position embedding on the fused QKV projection, writing the KV cache.

qkv[b, t] holds NH query heads, then KVH key heads, then KVH value heads (the [B*T, (NH+2KVH)*D]
output of the fused projection viewed as [B, T, NH+2KVH, D]). Token t of row b goes to cache row
c = start[b] + t and sits at position p = start[b] + offs[b, t]: offs[b, t] = t for a sequence;
tree verification gives each node its depth, so siblings share a position but not a row. The
kernel writes
    q[b, t, h]      = rope(query head h, p)
    kc[b, kvh, c]   = rope(key head kvh, p)
    vc[b, kvh, c]   = value head kvh            (a copy)
and leaves every other row of kc/vc untouched. rope is Hugging Face's rotate-half form (Llama,
Qwen2): with x = (x1, x2) split in halves and c, s = cos[p], sin[p] (D/2 frequencies),
    out = (x1 * c - x2 * s,  x2 * c + x1 * s)
which is x * cat(c, c) + rotate_half(x) * cat(s, s). The tables come from `rope_tables`, computed
in fp32 exactly as HF computes them, so they match bit for bit; the kernel may fuse a multiply
and an add into one FMA where torch rounds twice (<= 1 ulp).

Rows c >= S (cache capacity) or positions p >= P (table length) would be out of bounds: such tokens
are skipped (nothing written), so the caller must size the cache and tables for the sequence.
Tokens are independent; they run on one thread unless B*T*(NH+2KVH)*D >= PAR.
"""
import torch

import pacekern as pk

B, T, NH, KVH, D, S, P = pk.dims("B T NH KVH D S P")


def rope_tables(max_pos: int, head_dim: int, theta: float):
    """(cos, sin), each float32 [max_pos, head_dim // 2], as transformers' default rotary
    embedding computes them (inv_freq in fp32, freqs = positions x inv_freq, attention_scaling 1)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.int64).float(), inv_freq)
    return freqs.cos().contiguous(), freqs.sin().contiguous()


def _rotate_half_ref(x, cos, sin):
    """x [..., D] and cos/sin [..., D/2] broadcastable: HF's apply_rotary_pos_emb on one tensor."""
    c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * c + torch.cat((-x2, x1), -1) * s


def ref(qkv, start, offs, cos, sin, q, kc, vc):
    nh, kvh = q.shape[2], kc.shape[1]
    row = start.long()[:, None] + torch.arange(qkv.shape[1])            # [B, T] cache rows
    pos = start.long()[:, None] + offs.long()                             # [B, T] positions
    c, s = cos[pos][:, :, None], sin[pos][:, :, None]                     # [B, T, 1, D/2]
    q_out = _rotate_half_ref(qkv[:, :, :nh], c, s)
    k_rot = _rotate_half_ref(qkv[:, :, nh: nh + kvh], c, s)
    kc_out, vc_out = kc.clone(), vc.clone()
    for b in range(qkv.shape[0]):
        kc_out[b][:, row[b]] = k_rot[b].transpose(0, 1)
        vc_out[b][:, row[b]] = qkv[b, :, nh + kvh:].transpose(0, 1)
    return q_out, kc_out, vc_out


SPACE = pk.Space(PAR=pk.choice(1 << 16, 1 << 18, 1 << 62), default=dict(PAR=1 << 16))   # 2^16: a 128-token prefill on all threads


@pk.func
def _rope_head(qkv, cos, sin, b, t, h, p, dst, i0, i1, i2):
    """dst[i0, i1, i2, :] = rope(qkv[b, t, h, :], position p)"""
    for i in range(0, D // 2, 16):
        n = D // 2 - i
        c = pk.f32x16.load(cos[p, i], n=n)
        s = pk.f32x16.load(sin[p, i], n=n)
        x1 = pk.f32x16.load(qkv[b, t, h, i], n=n)
        x2 = pk.f32x16.load(qkv[b, t, h, D // 2 + i], n=n)
        pk.store(dst[i0, i1, i2, i], x1 * c - x2 * s, n=n)
        pk.store(dst[i0, i1, i2, D // 2 + i], x2 * c + x1 * s, n=n)


@pk.func
def _rope_token(qkv, start, offs, cos, sin, q, kc, vc, bt):
    b = bt // T
    t = bt % T
    c = start[b] + t
    p = start[b] + offs[b, t]
    if c < S and p < P:
        for h in range(NH):
            _rope_head(qkv, cos, sin, b, t, h, p, q, b, t, h)
        for h in range(KVH):
            _rope_head(qkv, cos, sin, b, t, NH + h, p, kc, b, h, c)
            for i in range(0, D, 16):
                pk.store(vc[b, h, c, i], pk.f32x16.load(qkv[b, t, NH + KVH + h, i], n=D - i), n=D - i)


@pk.kernel(space=SPACE, ref=ref, key={"B": "pow2", "T": "pow2"})
def rope_qkv(qkv: pk.f32[B, T, NH + 2 * KVH, D], start: pk.i32[B], offs: pk.i32[B, T], cos: pk.f32[P, D // 2], sin: pk.f32[P, D // 2],
             q: pk.Out[pk.f32[B, T, NH, D]], kc: pk.Out[pk.f32[B, KVH, S, D]], vc: pk.Out[pk.f32[B, KVH, S, D]],
             *, PAR):
    if B * T * (NH + 2 * KVH) * D >= PAR:
        for bt in pk.prange(B * T):
            _rope_token(qkv, start, offs, cos, sin, q, kc, vc, bt)
    else:
        for bt in range(B * T):
            _rope_token(qkv, start, offs, cos, sin, q, kc, vc, bt)


# ---- paged KV cache (llm/engine.py) ----------------------------------------------------------------
# The engine runs one flat list of R tokens per step (decode rows of some sequences, prompt chunks of
# others). Token r sits at position pos[r] and its key/value go to flat cache slot slot[r] = block *
# BS + offset of the block pool kp/vp [NB, KVH, BS, D]; slot -1 marks a padding token (nothing
# written). qkv and q are [R, 1, ...] views so that the rows are rope_qkv's (b, t = 0) rows.
R, NB, BS = pk.dims("R NB BS")


def ref_paged(qkv, pos, slot, cos, sin, q, kp, vp):
    nh, kvh = q.shape[2], kp.shape[1]
    x = qkv[:, 0]
    c, s = cos[pos.long()][:, None], sin[pos.long()][:, None]            # [R, 1, D/2]
    q_out = _rotate_half_ref(x[:, :nh], c, s)[:, None]
    k_rot = _rotate_half_ref(x[:, nh: nh + kvh], c, s)
    kp_out, vp_out = kp.clone(), vp.clone()
    ok = slot >= 0
    blk, off = slot[ok].long() // kp.shape[2], slot[ok].long() % kp.shape[2]
    kp_out[blk, :, off] = k_rot[ok]
    vp_out[blk, :, off] = x[ok, nh + kvh:]
    return q_out, kp_out, vp_out


@pk.func
def _rope_paged_token(qkv, pos, slot, cos, sin, q, kp, vp, r):
    p = pos[r]
    if p < P:
        for h in range(NH):
            _rope_head(qkv, cos, sin, r, 0, h, p, q, r, 0, h)
        c = slot[r]
        if c >= 0:
            for h in range(KVH):
                _rope_head(qkv, cos, sin, r, 0, NH + h, p, kp, c // BS, h, c % BS)
                for i in range(0, D, 16):
                    pk.store(vp[c // BS, h, c % BS, i], pk.f32x16.load(qkv[r, 0, NH + KVH + h, i], n=D - i), n=D - i)


@pk.kernel(space=SPACE, ref=ref_paged, key={"R": "pow2"})
def rope_paged(qkv: pk.f32[R, 1, NH + 2 * KVH, D], pos: pk.i32[R], slot: pk.i32[R], cos: pk.f32[P, D // 2],
               sin: pk.f32[P, D // 2], q: pk.Out[pk.f32[R, 1, NH, D]], kp: pk.Out[pk.f32[NB, KVH, BS, D]],
               vp: pk.Out[pk.f32[NB, KVH, BS, D]], *, PAR):
    if R * (NH + 2 * KVH) * D >= PAR:
        for r in pk.prange(R):
            _rope_paged_token(qkv, pos, slot, cos, sin, q, kp, vp, r)
    else:
        for r in range(R):
            _rope_paged_token(qkv, pos, slot, cos, sin, q, kp, vp, r)
