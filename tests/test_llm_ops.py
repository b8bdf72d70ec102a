"""The LLM inference ops against PyTorch written a second time here: RMSNorm (+ residual), RoPE with
the KV cache write, causal GQA attention, SiLU * up, argmax and the fp32 GEMV.

Shapes: the real models' (SmolLM2-135M: H=576, NH=9, KVH=3, D=64, F=1536, V=49152;
Qwen2.5-0.5B: H=896, NH=14, KVH=2, D=64, F=4864, V=151936; Qwen2.5-1.5B: NH=12, KVH=2, D=128),
odd sizes with masked tails, decode with a different start per row, verification (T=5 at start>0),
tree verification (positions = depths, attention to ancestors only) and prefill. Every kernel runs with its default config and one that forces the parallel path
(PAR=1) with other tile sizes. Tolerances: fp32, relative to the output's largest value.
"""
import pytest
import torch
import torch.nn.functional as F

import pacekern as pk
from conftest import INTERPRET
from pacekern_ops.activation import argmax, silu_mul
from pacekern_ops.attention import attention
from pacekern_ops.gemv import gemv_f32
from pacekern_ops.norm import add_rmsnorm, rmsnorm
from pacekern_ops.rope import rope_qkv, rope_tables

SERIAL, PARALLEL = "serial", "parallel"


def seq_offs(b, t, depths=None):
    """offs [B, T]: token t at position start + t, or start + depths[b][t] (a tree)"""
    return torch.tensor(depths if depths is not None else [list(range(t))] * b, dtype=torch.int32)


def close(got, want, rtol=1e-5, atol=1e-5):
    """|got - want| <= rtol |want| + atol max|want| (fp32 sums in another order)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * float(want.abs().max()))


# ---- RMSNorm -------------------------------------------------------------------------------------

def rmsnorm_torch(h, w, eps):                    # HF LlamaRMSNorm in fp32
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


NORM_SHAPES = [(1, 576), (8, 576), (5, 896), (3, 50), (2, 16), (1, 1)] + ([] if INTERPRET else [(512, 576)])


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
@pytest.mark.parametrize("r,h", NORM_SHAPES)
def test_add_rmsnorm(r, h, mode):
    cfg = pk.Config.of(PAR=1 if mode == PARALLEL else 1 << 62)
    x, res, w, eps = torch.randn(r, h), torch.randn(r, h) * 3, torch.randn(h), torch.tensor([1e-5])
    out, res0 = torch.empty(r, h), res.clone()
    add_rmsnorm(x, res, w, eps, out, config=cfg)
    assert torch.equal(res, res0 + x)                     # one fp32 add per element: exact
    close(out, rmsnorm_torch(res0 + x, w, 1e-5))
    rmsnorm(x, w, eps, out, config=cfg)
    close(out, rmsnorm_torch(x, w, 1e-5))


def test_add_rmsnorm_check_sees_the_residual_before_the_update():
    x, res, w, eps, out = torch.randn(4, 100), torch.randn(4, 100), torch.randn(100), torch.tensor([1e-6]), torch.empty(4, 100)
    pk.check(add_rmsnorm, x, res, w, eps, out)            # the ref returns (res + x, rmsnorm(res + x))
    pk.check(add_rmsnorm, x, res, w, eps, out)            # and again from the updated residual


# ---- RoPE + KV cache write -----------------------------------------------------------------------

def rope_torch(x, pos, theta):
    """HF's rotary embedding from scratch: x [..., T, D] at positions pos [T] (float64 tables)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos.double()[:, None] * inv[None]
    c, s = torch.cat((ang.cos(), ang.cos()), -1).float(), torch.cat((ang.sin(), ang.sin()), -1).float()
    return x * c + torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1) * s


ROPE_CASES = [  # B, T, NH, KVH, D, S, starts
    (1, 1, 9, 3, 64, 256, [128]),                # SmolLM2 decode
    (4, 1, 14, 2, 64, 300, [0, 7, 150, 299]),    # Qwen2.5-0.5B batched decode, a start per row
    (2, 5, 9, 3, 64, 200, [3, 120]),             # verification of 4 draft tokens
    (1, 128, 14, 2, 64, 160, [0]),               # prefill
    (2, 3, 12, 2, 128, 64, [1, 60]),             # Qwen2.5-1.5B head dim
    (3, 2, 4, 2, 40, 32, [0, 9, 30]),            # D/2 = 20: masked tails
    (1, 3, 3, 1, 24, 8, [2]),                    # D/2 = 12 < 16 lanes
]
if INTERPRET:
    ROPE_CASES = [c for c in ROPE_CASES if c[1] * c[2] <= 40]


@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
@pytest.mark.parametrize("b,t,nh,kvh,d,s,starts", ROPE_CASES)
def test_rope_qkv(b, t, nh, kvh, d, s, starts, mode, tree):
    theta = 1e6 if nh == 14 else 1e5
    cos, sin = rope_tables(s, d, theta)
    qkv, start = torch.randn(b, t, nh + 2 * kvh, d), torch.tensor(starts, dtype=torch.int32)
    q, kc, vc = torch.empty(b, t, nh, d), torch.randn(b, kvh, s, d), torch.randn(b, kvh, s, d)
    kc0, vc0 = kc.clone(), vc.clone()
    g = torch.Generator().manual_seed(t)                     # a tree: token t at a depth <= t
    depths = [[0] + [int(torch.randint(1, j + 1, (1,), generator=g)) for j in range(1, t)] for _ in range(b)] if tree else None
    offs = seq_offs(b, t, depths)
    rope_qkv(qkv, start, offs, cos, sin, q, kc, vc, config=pk.Config.of(PAR=1 if mode == PARALLEL else 1 << 62))
    want_k, want_v = kc0.clone(), vc0.clone()
    for i in range(b):
        rows, pos = starts[i] + torch.arange(t), starts[i] + offs[i].long()
        x = qkv[i].transpose(0, 1)                           # [heads, T, D]
        # float64 angles vs HF's fp32 ones: positions x inv_freq rounds to ~1e-7 relative, i.e.
        # ~3e-5 rad at position 300; compare against fp64 tables with that slack
        close(q[i].transpose(0, 1), rope_torch(x[:nh], pos, theta), atol=1e-4)
        want_k[i][:, rows] = rope_torch(x[nh: nh + kvh], pos, theta)
        want_v[i][:, rows] = x[nh + kvh:]
    close(kc, want_k, atol=1e-4)
    assert torch.equal(vc, want_v)                          # values copied, other rows untouched
    written = torch.zeros(b, kvh, s, dtype=torch.bool)
    for i in range(b):
        written[i, :, starts[i]: starts[i] + t] = True
    assert torch.equal(kc[~written], kc0[~written])
    pk.check(rope_qkv, qkv, start, offs, cos, sin, q, kc0, vc0, rtol=1e-6, atol=1e-6)   # against HF's fp32 tables: ~1 ulp


def test_rope_tables_match_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    emb = LlamaRotaryEmbedding(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                           rope_theta=100000.0, max_position_embeddings=2048))
    cos, sin = emb(torch.zeros(1, 300, 576), torch.arange(300)[None])
    c, s = rope_tables(300, 64, 100000.0)
    assert torch.equal(cos[0], torch.cat((c, c), -1)) and torch.equal(sin[0], torch.cat((s, s), -1))


def test_rope_skips_positions_past_the_cache():
    cos, sin = rope_tables(8, 16, 1e4)
    qkv, start = torch.randn(1, 3, 4, 16), torch.tensor([6], dtype=torch.int32)   # positions 6, 7, 8; S = 8
    q, kc, vc = torch.zeros(1, 3, 2, 16), torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16)
    rope_qkv(qkv, start, seq_offs(1, 3), cos, sin, q, kc, vc)
    assert torch.equal(vc[0, 0, 6:], qkv[0, :2, 3]) and q[0, 2].abs().sum() == 0


# ---- attention -----------------------------------------------------------------------------------

def attention_torch(q, kc, vc, start, parents=None):
    """Softmax attention written out (no SDPA): query t of row b sees keys 0 .. start[b] + t; with
    parents [B][T] (a tree; -1 at the root), of the new keys only its ancestors and itself."""
    b_, t_, nh, d = q.shape
    g = nh // kc.shape[1]
    out = torch.empty_like(q)
    for b in range(b_):
        n = int(start[b]) + t_
        k, v = kc[b, :, :n].repeat_interleave(g, 0).double(), vc[b, :, :n].repeat_interleave(g, 0).double()
        s = q[b].transpose(0, 1).double() @ k.transpose(1, 2) / d ** 0.5                     # [NH, T, n]
        hide = torch.arange(n)[None, :] > (int(start[b]) + torch.arange(t_))[:, None]
        for t in range(t_ if parents is not None else 0):
            u, seen = t, set()
            while u >= 0:
                seen.add(u)
                u = parents[b][u]
            hide[t, int(start[b]):] |= torch.tensor([u not in seen for u in range(t_)])
        s = s.masked_fill(hide, float("-inf"))
        out[b] = (torch.softmax(s, -1) @ v).transpose(0, 1).float()
    return out


ATT_CASES = [  # B, T, NH, KVH, D, S, starts
    (1, 1, 9, 3, 64, 256, [128]),                # SmolLM2 decode
    (8, 1, 9, 3, 64, 300, [0, 1, 15, 16, 63, 64, 200, 299]),     # batched decode, block edges
    (4, 1, 14, 2, 64, 300, [0, 5, 77, 250]),     # Qwen2.5-0.5B (7 query heads per kv head)
    (2, 5, 9, 3, 64, 300, [10, 130]),            # verification: T = K + 1 at start > 0
    (1, 5, 14, 2, 64, 64, [59]),                 # verification ending at the cache's last row
    (1, 128, 9, 3, 64, 128, [0]),                # prefill
    (3, 1, 12, 2, 128, 600, [511, 0, 300]),      # Qwen2.5-1.5B head dim
    (2, 3, 6, 2, 40, 100, [3, 60]),              # D = 40: masked tails
    (1, 37, 4, 4, 24, 64, [20]),                 # D = 24, plain multi-head (G = 1)
]
if INTERPRET:
    ATT_CASES = [c for c in ATT_CASES if c[0] * c[1] * c[2] * (max(c[6]) + c[1]) <= 3000]
ATT_CONFIGS = {SERIAL: pk.Config.of(QB=16, KB=128, MR=3, NK=4, NV=4, PAR=1 << 62),
               PARALLEL: pk.Config.of(QB=8, KB=64, MR=4, NK=2, NV=2, PAR=1)}


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
@pytest.mark.parametrize("b,t,nh,kvh,d,s,starts", ATT_CASES)
def test_attention(b, t, nh, kvh, d, s, starts, mode):
    q, start = torch.randn(b, t, nh, d), torch.tensor(starts, dtype=torch.int32)
    kc, vc = torch.randn(b, kvh, s, d) * 2, torch.randn(b, kvh, s, d)
    for i in range(b):                                    # rows past the last position: never read
        kc[i, :, starts[i] + t:] = float("nan")
        vc[i, :, starts[i] + t:] = float("nan")
    out, anc = torch.empty(b, t, nh, d), torch.zeros(b, 1, 1, dtype=torch.int32)
    attention(q, kc, vc, start, anc, out, config=ATT_CONFIGS[mode])
    close(out, attention_torch(q, kc, vc, start), rtol=1e-5, atol=2e-6)
    pk.check(attention, q, kc, vc, start, anc, out, config=ATT_CONFIGS[mode], rtol=1e-5, atol=2e-6)   # vs torch SDPA


TREE_CASES = [  # B, T, NH, KVH, D, S, starts: tree verification (T = nodes + 1)
    (1, 9, 9, 3, 64, 300, [120]),                # SmolLM2, 8 nodes
    (2, 16, 9, 3, 64, 300, [60, 250]),           # 15 nodes, rows across a 64/128-key block edge
    (1, 5, 14, 2, 64, 40, [0]),                  # the root at cache row 0
    (3, 4, 6, 2, 40, 100, [3, 61, 90]),          # D = 40: masked tails
]


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
@pytest.mark.parametrize("b,t,nh,kvh,d,s,starts", TREE_CASES)
def test_attention_tree(b, t, nh, kvh, d, s, starts, mode):
    from llm.speculative import tree_inputs
    g = torch.Generator().manual_seed(b * t)
    parents = [[-1] + [int(torch.randint(0, j, (1,), generator=g)) for j in range(1, t)] for _ in range(b)]
    anc = torch.tensor([tree_inputs(p[1:], [0] * (t - 1))[1] for p in parents], dtype=torch.int32)
    q, start = torch.randn(b, t, nh, d), torch.tensor(starts, dtype=torch.int32)
    kc, vc = torch.randn(b, kvh, s, d) * 2, torch.randn(b, kvh, s, d)
    for i in range(b):
        kc[i, :, starts[i] + t:] = float("nan")
        vc[i, :, starts[i] + t:] = float("nan")
    out = torch.empty(b, t, nh, d)
    attention(q, kc, vc, start, anc, out, config=ATT_CONFIGS[mode])
    close(out, attention_torch(q, kc, vc, start, parents), rtol=1e-5, atol=2e-6)
    pk.check(attention, q, kc, vc, start, anc, out, config=ATT_CONFIGS[mode], rtol=1e-5, atol=2e-6)   # vs SDPA + mask


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
@pytest.mark.parametrize("start", [120, 61, 5])
def test_attention_tree_rows_are_decode_rows(start, mode):
    """A row's bits depend only on the keys it sees, not on their cache rows or on the rows beside
    it: a tree path's nodes (scattered, across key-block edges) give exactly what the same tokens
    give as a chain in one call and one at a time (decode), so a greedy tree walk is lossless."""
    from llm.speculative import tree_inputs
    nh, kvh, d, t = 9, 3, 64, 12
    parents = [-1, 0, 0, 1, 2, 2, 3, 5, 6, 7, 4, 9]                  # path 0 -> 2 -> 5 -> 7 -> 9 -> 11
    path = [0, 2, 5, 7, 9, 11]
    anc = torch.tensor([tree_inputs(parents[1:], [0] * (t - 1))[1]], dtype=torch.int32)
    q, kc, vc = torch.randn(1, t, nh, d), torch.randn(1, kvh, 200, d), torch.randn(1, kvh, 200, d)
    out = torch.empty(1, t, nh, d)
    attention(q, kc, vc, torch.tensor([start], dtype=torch.int32), anc, out, config=ATT_CONFIGS[mode])
    rows = start + torch.tensor(path)
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[:, :, start:start + len(path)], vc2[:, :, start:start + len(path)] = kc[:, :, rows], vc[:, :, rows]
    causal = torch.zeros(1, 1, 1, dtype=torch.int32)
    chain = torch.empty(1, len(path), nh, d)
    attention(q[:, path], kc2, vc2, torch.tensor([start], dtype=torch.int32), causal, chain, config=ATT_CONFIGS[mode])
    assert torch.equal(out[:, path], chain)
    for i in range(len(path)):
        one = torch.empty(1, 1, nh, d)
        attention(q[:, path[i]:path[i] + 1], kc2, vc2, torch.tensor([start + i], dtype=torch.int32), causal, one,
                  config=ATT_CONFIGS[mode])
        assert torch.equal(one[0, 0], chain[0, i]), f"decode of path token {i}"


def test_attention_large_scores_stay_finite():
    """Scores of +-1e4 (a peaked softmax): the running max keeps every exp argument <= 0."""
    q, kc, vc = torch.randn(1, 4, 2, 32) * 100, torch.randn(1, 1, 200, 32) * 100, torch.randn(1, 1, 200, 32)
    start, out = torch.tensor([190], dtype=torch.int32), torch.empty(1, 4, 2, 32)
    attention(q, kc, vc, start, torch.zeros(1, 1, 1, dtype=torch.int32), out)
    assert torch.isfinite(out).all()
    close(out, attention_torch(q, kc, vc, start), rtol=1e-4, atol=1e-5)


# ---- SiLU * up, argmax ---------------------------------------------------------------------------

SILU_SHAPES = [(1, 1536), (8, 4864), (5, 1536), (3, 37), (2, 8)] + ([] if INTERPRET else [(128, 1536)])


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
@pytest.mark.parametrize("r,f", SILU_SHAPES)
def test_silu_mul(r, f, mode):
    gu = torch.randn(r, 2 * f) * 4
    out = torch.empty(r, f)
    silu_mul(gu, out, config=pk.Config.of(CH=256, PAR=1) if mode == PARALLEL else None)
    a, u = gu[:, :f].double(), gu[:, f:].double()
    close(out, (a * torch.sigmoid(a) * u).float(), rtol=1e-5, atol=1e-6)
    pk.check(silu_mul, gu, out, rtol=1e-5, atol=1e-6)           # against F.silu(gate) * up


def test_silu_mul_extreme_gates_stay_finite():
    gate = torch.tensor([[-100.0, 100.0, -1e30, 1e30, -88.0, 88.0, -90.0, 90.0, 0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 5.0, -5.0, 1.0]])
    gu = torch.cat((gate, torch.full_like(gate, 3.0)), 1)
    out = torch.empty_like(gate)
    silu_mul(gu, out)
    assert torch.isfinite(out).all()
    want = (gate.double() * torch.sigmoid(gate.double()) * 3).float()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-30)


ARGMAX_SHAPES = [(1, 49152), (8, 49152), (2, 151936), (3, 1000), (2, 7), (1, 256), (1, 257)]
if INTERPRET:
    ARGMAX_SHAPES = [(3, 1000), (2, 7), (1, 257)]


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
@pytest.mark.parametrize("r,v", ARGMAX_SHAPES)
def test_argmax(r, v, mode):
    x = torch.randn(r, v)
    x[0, v // 3] = x[0, v // 2] = 10.0                          # a tie: the first one wins
    out = torch.empty(r, dtype=torch.int64)
    argmax(x, out, config=pk.Config.of(PAR=1 if mode == PARALLEL else 1 << 62))
    assert torch.equal(out, torch.argmax(x, -1)) and out[0] == v // 3


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # inf * 0 in the interpreter's NaN probe
def test_argmax_special_values_match_torch():
    x = torch.randn(7, 1000)
    x[0, 500] = x[0, 700] = float("nan")        # NaN is the maximum: the first NaN
    x[1, 990] = float("nan")                    # a NaN in the scalar tail
    x[2] = -float("inf")                        # all -inf: index 0
    x[3, 10] = x[3, 800] = float("inf")
    x[4, 3] = x[4, 300] = x[4, 999] = 100.0
    x[5] = 0.0
    x[5, 5] = -0.0                              # -0 == 0: the first zero
    x[6] = float("nan")
    out = torch.empty(7, dtype=torch.int64)
    argmax(x, out)
    assert torch.equal(out, torch.argmax(x, -1)), (out, torch.argmax(x, -1))


# ---- fp32 GEMV -----------------------------------------------------------------------------------

GEMV_SHAPES = [(1, 1, 16), (1, 37, 50), (3, 100, 576), (8, 45, 1536)] + ([] if INTERPRET else [(1, 960, 576), (5, 300, 4864)])
GEMV_CONFIGS = [None, pk.Config.of(R=6, NB=16, PF=256, MM=2), pk.Config.of(R=1, NB=128, PF=1024, MM=8)]


@pytest.mark.parametrize("cfg", GEMV_CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", GEMV_SHAPES)
def test_gemv_f32(m, n, k, cfg):
    x, w, y = torch.randn(m, k), torch.randn(n, k), torch.empty(m, n)
    gemv_f32(x, w, y, config=cfg)
    close(y, (x.double() @ w.double().t()).float(), rtol=1e-4, atol=1e-5)
    pk.check(gemv_f32, x, w, y, config=cfg)


# ---- paged KV cache (the engine) -------------------------------------------------------------------

from pacekern_ops.paged_attention import paged_attention, work_items  # noqa: E402
from pacekern_ops.rope import rope_paged  # noqa: E402

PAGED_CASES = [  # NH, KVH, D, BS, [(cached tokens, new tokens) per sequence]: a step of the engine
    (9, 3, 64, 16, [(0, 37), (50, 1), (3, 1), (17, 20)]),     # SmolLM2: a prompt, decodes, a chunk
    (14, 2, 64, 32, [(100, 1)] * 5),                          # Qwen2.5-0.5B, batched decode
    (6, 2, 40, 8, [(9, 2), (0, 13)]),                         # D = 40 tails, blocks of 8
]
if not INTERPRET:
    PAGED_CASES.append((9, 3, 64, 16, [(0, 200), (300, 1), (31, 33)]))
PAGED_CONFIGS = {SERIAL: pk.Config(MR=3, NK=4, NV=4, PAR=1 << 62), PARALLEL: pk.Config(MR=4, NK=2, NV=2, PAR=1)}


def paged_step(nh, kvh, d, bs, seqs, pad=3, nseq=None, seed=0):
    """Random q, pools and block tables for one step: each sequence's blocks scattered over the
    pool; pool rows past every sequence's last position and padding rows of q hold NaN."""
    g = torch.Generator().manual_seed(seed)
    nseq = nseq or len(seqs) + 2
    nb = sum(-(-(c + n) // bs) for c, n in seqs) + 4
    kp, vp = torch.full((nb, kvh, bs, d), float("nan")), torch.full((nb, kvh, bs, d), float("nan"))
    perm = torch.randperm(nb, generator=g)
    mb = max(-(-(c + n) // bs) for c, n in seqs)
    bt = torch.zeros(nseq, mb, dtype=torch.int32)
    qstart, ctx = torch.zeros(nseq + 1, dtype=torch.int32), torch.zeros(nseq, dtype=torch.int32)
    i = r = 0
    for s, (c, n) in enumerate(seqs):
        k = -(-(c + n) // bs)
        bt[s, :k] = perm[i:i + k].int()
        for j in range(c + n):                                 # only the rows a sequence has are finite
            kp[bt[s, j // bs], :, j % bs] = torch.randn(kvh, d, generator=g) * 2
            vp[bt[s, j // bs], :, j % bs] = torch.randn(kvh, d, generator=g)
        i, ctx[s], qstart[s] = i + k, c, r
        r += n
    qstart[len(seqs):] = r
    q = torch.randn(r + pad, nh, d, generator=g)
    q[r:] = float("nan")
    items = torch.zeros(64, 3, dtype=torch.int32)
    nitems = torch.tensor([work_items([n for _, n in seqs] + [0] * (nseq - len(seqs)),
                                      [c for c, _ in seqs] + [0] * (nseq - len(seqs)), items)], dtype=torch.int32)
    return q, kp, vp, bt, qstart, ctx, items, nitems


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
@pytest.mark.parametrize("nh,kvh,d,bs,seqs", PAGED_CASES)
def test_paged_attention(nh, kvh, d, bs, seqs, mode):
    args = paged_step(nh, kvh, d, bs, seqs)
    out = torch.empty_like(args[0])
    pk.check(paged_attention, *args, out, config=PAGED_CONFIGS[mode], rtol=1e-5, atol=2e-6)   # vs torch SDPA
    assert torch.isfinite(out[: int(args[4][len(seqs)])]).all()


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
def test_paged_attention_is_the_contiguous_kernel(mode):
    """A sequence's rows are attention.py's rows bit for bit, whatever its block layout and the
    other sequences in the step: the engine's attention is batch-invariant."""
    nh, kvh, d, bs = 9, 3, 64, 16
    seqs = [(0, 37), (50, 1), (3, 1), (17, 20)] if not INTERPRET else [(0, 9), (20, 1)]
    q, kp, vp, bt, qstart, ctx, items, nitems = paged_step(nh, kvh, d, bs, seqs)
    out = torch.empty_like(q)
    paged_attention(q, kp, vp, bt, qstart, ctx, items, nitems, out, config=PAGED_CONFIGS[mode])
    for s, (c, n) in enumerate(seqs):
        blocks = bt[s, : -(-(c + n) // bs)].long()
        kc = kp[blocks].permute(1, 0, 2, 3).reshape(1, kvh, -1, d).contiguous()
        vc = vp[blocks].permute(1, 0, 2, 3).reshape(1, kvh, -1, d).contiguous()
        one = torch.empty(1, n, nh, d)
        a = int(qstart[s])
        attention(q[a:a + n][None].contiguous(), kc, vc, torch.tensor([c], dtype=torch.int32),
                  torch.zeros(1, 1, 1, dtype=torch.int32), one)
        assert torch.equal(one[0], out[a:a + n]), s
        alone = paged_step(nh, kvh, d, bs, [(c, n)], seed=s + 1)   # the same sequence alone, other blocks
        alone[0][:n] = q[a:a + n]
        for j in range(c + n):
            alone[1][alone[3][0, j // bs], :, j % bs] = kp[bt[s, j // bs], :, j % bs]
            alone[2][alone[3][0, j // bs], :, j % bs] = vp[bt[s, j // bs], :, j % bs]
        solo = torch.empty_like(alone[0])
        paged_attention(*alone, solo, config=PAGED_CONFIGS[SERIAL])
        assert torch.equal(solo[:n], out[a:a + n]), s


def test_work_items_cover_every_token_once():
    items = torch.zeros(40, 3, dtype=torch.int32)
    n = work_items([37, 1, 0, 20], [0, 50, 0, 17], items)
    got = sorted((int(s), int(t)) for s, t0, k in items[:n].tolist() for t in range(t0, t0 + k))
    assert got == [(0, t) for t in range(37)] + [(1, 0)] + [(3, t) for t in range(20)]
    with pytest.raises(ValueError, match="do not fit"):
        work_items([1000], [0], items)


@pytest.mark.parametrize("mode", [SERIAL, PARALLEL])
def test_rope_paged(mode):
    nh, kvh, d, bs, nb, r = 9, 3, 64, 16, 12, 20
    qkv = torch.randn(r, 1, nh + 2 * kvh, d)
    pos = torch.randint(0, 100, (r,), dtype=torch.int32)
    slot = torch.randperm(nb * bs)[:r].int()
    slot[-3:] = -1                                             # padding tokens write no KV
    cos, sin = rope_tables(128, d, 1e4)
    kp, vp = torch.randn(nb, kvh, bs, d), torch.randn(nb, kvh, bs, d)
    before = kp.clone()
    cfg = pk.Config(PAR=1 << 62 if mode == SERIAL else 1)
    q = torch.empty(r, 1, nh, d)
    rope_paged(qkv, pos, slot, cos, sin, q, kp, vp, config=cfg)
    # written twice: the contiguous kernel on each token as its own one-token sequence
    for i in range(r):
        kc, vc = torch.zeros(1, kvh, 128, d), torch.zeros(1, kvh, 128, d)
        qi = torch.empty(1, 1, nh, d)
        rope_qkv(qkv[i][None], pos[i:i + 1], torch.zeros(1, 1, dtype=torch.int32), cos, sin, qi, kc, vc)
        assert torch.equal(qi[0, 0], q[i, 0])
        if slot[i] >= 0:
            assert torch.equal(kp[slot[i] // bs, :, slot[i] % bs], kc[0, :, pos[i]])
            assert torch.equal(vp[slot[i] // bs, :, slot[i] % bs], vc[0, :, pos[i]])
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slot[slot >= 0].long()] = False
    assert torch.equal(kp.permute(0, 2, 1, 3).reshape(nb * bs, kvh, d)[untouched],
                       before.permute(0, 2, 1, 3).reshape(nb * bs, kvh, d)[untouched])
    pk.check(rope_paged, qkv, pos, slot, cos, sin, q, kp, vp, config=cfg)
