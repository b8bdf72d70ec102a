"""Llama / Qwen2 forward pass as a flat list of prepared op calls over fixed buffers.

`Transformer.forward(ids [B, T], slot0)` runs T new tokens for each of B consecutive KV-cache
slots, starting at each slot's current length, and returns the logits (and greedy ids) of the last
token of each row, or of every token (speculative verification needs them all). A `Plan` is built
once per (B, T, slot0, logits mode) and reused: decode runs the same plan every token, with only
the ids and start positions rewritten in place. Tree verification (llm/speculative.py) passes
`tree=(offs [B, T], anc [B, T, T])`: token t is rotated at position start + offs[t] and attends to
the cached rows and its ancestors among the T new ones (anc[t, u] != 0); its KV row is still
start + t (the caller moves the accepted path's rows into place afterwards, `KVCache.move`).

Per layer (R = B * T rows):
    res += o; h = rmsnorm(res) * ln1            add_rmsnorm (res = embeddings before layer 0)
    qkv = h @ Wqkv^T (+ b)                      linear (fused q, k, v)
    q, cache[k, v] = rope(qkv)                  rope_qkv (k, v written at start .. start + T - 1)
    attn = softmax(q k^T / sqrt(D)) v           attention (causal from each row's start; GQA)
    o = attn @ Wo^T                             linear
    res += o; h = rmsnorm(res) * ln2            add_rmsnorm
    gu = h @ [Wgate; Wup]^T                     linear (fused gate/up)
    act = silu(gu[:F]) * gu[F:]                 silu_mul
    o = act @ Wdown^T                           linear
then  res += o; h = rmsnorm(res) * norm; logits = h @ Wlm^T; next = argmax(logits).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .ops import OpConfig, preparer
from .weights import Weights


def rope_tables(max_pos: int, head_dim: int, theta: float):
    """cos, sin [max_pos, D/2] in fp32, computed as HF's default rotary embedding does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


@dataclass
class Plan:
    ids: torch.Tensor        # i64 [B * T], rewritten per call
    start: torch.Tensor      # i32 [B], rewritten per call
    offs: torch.Tensor       # i32 [B, T]: positions past start (0 .. T-1; tree: depths), rewritten per tree call
    anc: torch.Tensor        # i32 [B, TA, TA]: TA = 1 causal; TA = T a tree's ancestor matrix, rewritten per call
    logits: torch.Tensor     # f32 [B or B * T, V]
    next: torch.Tensor       # i64 [B or B * T] greedy ids
    calls: list              # zero-argument callables, run in order
    version: int             # KV cache storage version the calls are bound to


class Transformer:
    def __init__(self, weights: Weights, cache: KVCache, opconfig: OpConfig = OpConfig(), max_plans: int = 64):
        self.w, self.spec, self.cache, self.opconfig = weights, weights.spec, cache, opconfig
        self.cos, self.sin = rope_tables(cache.max_tokens, self.spec.head_dim, self.spec.rope_theta)
        self.plans: OrderedDict = OrderedDict()
        self.max_plans = max_plans

    def set_opconfig(self, opconfig: OpConfig) -> None:
        self.opconfig = opconfig
        self.plans.clear()

    def plan(self, b: int, t: int, slot0: int, all_logits: bool, tree: bool = False) -> Plan:
        key = (b, t, slot0, all_logits, tree)
        p = self.plans.get(key)
        if p is not None and p.version == self.cache.version:
            self.plans.move_to_end(key)
            return p
        p = self._build(b, t, slot0, all_logits, tree)
        self.plans[key] = p
        if len(self.plans) > self.max_plans:
            self.plans.popitem(last=False)
        return p

    def _build(self, b: int, t: int, slot0: int, all_logits: bool, tree: bool) -> Plan:
        s, w, op = self.spec, self.w, lambda name: preparer(self.opconfig, name)
        r, h, d, nh, kvh, f = b * t, s.hidden, s.head_dim, s.n_heads, s.n_kv_heads, s.ffn
        ids, start = torch.zeros(r, dtype=torch.int64), torch.zeros(b, dtype=torch.int32)
        offs = torch.arange(t, dtype=torch.int32).repeat(b, 1)
        anc = torch.zeros((b, t, t) if tree else (b, 1, 1), dtype=torch.int32)
        x, res, hn = torch.empty(r, h), torch.empty(r, h), torch.empty(r, h)
        qkv, q, attn = torch.empty(b, t, s.qkv_heads, d), torch.empty(b, t, nh, d), torch.empty(b, t, nh, d)
        gu, act = torch.empty(r, 2 * f), torch.empty(r, f)
        rl = r if all_logits else b
        logits, nxt = torch.empty(rl, w.lm_head.n), torch.empty(rl, dtype=torch.int64)
        emb = w.embed

        def embed():
            torch.index_select(emb, 0, ids, out=x)
            res.zero_()
        calls = [embed]
        for layer, (kc, vc) in zip(w.layers, self.cache.views(slot0, b)):
            calls += [op("add_rmsnorm")(x, res, layer.ln1, s.rms_eps, hn),
                      op("linear")(layer.qkv, hn, qkv.view(r, -1)),
                      op("rope_qkv")(qkv, start, offs, self.cos, self.sin, q, kc, vc),
                      op("attention")(q, kc, vc, start, anc, attn),
                      op("linear")(layer.o, attn.view(r, -1), x),
                      op("add_rmsnorm")(x, res, layer.ln2, s.rms_eps, hn),
                      op("linear")(layer.gate_up, hn, gu),
                      op("silu_mul")(gu, act),
                      op("linear")(layer.down, act, x)]
        calls.append(op("add_rmsnorm")(x, res, w.norm, s.rms_eps, hn))
        last = hn if all_logits else hn.view(b, t, h)[:, -1]
        if not all_logits and t > 1:                                # LM head on the last token of each row only
            last_buf = torch.empty(b, h)
            calls.append(lambda: last_buf.copy_(hn.view(b, t, h)[:, -1]))
            last = last_buf
        calls.append(op("linear")(w.lm_head, last, logits))
        if w.head_ids is None:
            calls.append(op("argmax")(logits, nxt))
        else:                                                       # a draft's reduced head: row -> token id
            row = torch.empty(rl, dtype=torch.int64)
            calls += [op("argmax")(logits, row), lambda: torch.index_select(w.head_ids, 0, row, out=nxt)]
        return Plan(ids, start, offs, anc, logits, nxt, calls, self.cache.version)

    def forward(self, ids: torch.Tensor, slot0: int = 0, all_logits: bool = False, tree=None) -> Plan:
        """Run ids [B, T] at the current lengths of slots slot0 .. slot0 + B - 1 and advance them;
        tree = (offs [B, T], anc [B, T, T]) for tree verification (module docstring)."""
        b, t = ids.shape
        c = self.cache
        starts = c.lengths[slot0:slot0 + b]
        if max(starts) + t > c.capacity:
            c.reserve(c.slots, max(starts) + t)
        p = self.plan(b, t, slot0, all_logits, tree is not None)
        p.ids.copy_(ids.reshape(-1))
        if tree is not None:
            p.offs.copy_(tree[0])
            p.anc.copy_(tree[1])
        for i, n in enumerate(starts):
            p.start[i] = n
        for fn in p.calls:
            fn()
        for i in range(b):
            c.lengths[slot0 + i] += t
        return p


# ---- the engine's flat steps over a paged KV cache (llm/engine.py) ---------------------------------

@dataclass(frozen=True)
class FlatBatch:
    """One engine step as the model runner sees it: sequence s contributes tokens[s] (its next
    uncached tokens), starting at position starts[s], its KV in pool blocks blocks[s]; logits are
    wanted for the last token of the sequences with sample[s]."""
    tokens: tuple             # tuple of token-id tuples
    starts: tuple             # int per sequence
    blocks: tuple             # tuple of block-id tuples (covering starts[s] + len(tokens[s]) positions)
    sample: tuple             # bool per sequence


def buckets(limit: int, step: int = 16) -> list:
    """Row counts a flat step is padded to: powers of two up to `step`, then multiples of `step`,
    then `limit` itself, so padding costs at most step - 1 rows (a 129-token prompt runs 144 rows,
    not 256: with power-of-two buckets its TTFT was 1.9x a 128-token one's)."""
    out = [1]
    while out[-1] < limit:
        out.append(min(out[-1] * 2 if out[-1] < step else out[-1] + step, limit))
    return out


class FlatRunner:
    """Runs FlatBatch steps: every row-wise op (projections, norms, MLP) over the step's flat token
    rows, rope and attention through the block tables (pacekern_ops/paged_attention.py), the LM
    head on the sampled rows only. Steps are padded to a fixed set of row counts (`buckets`) whose
    plans are built once, over views of one set of activation buffers sized by the token budget,
    so no step builds, compiles or allocates anything, whatever its mix of lengths. Padding rows
    read token 0 at position 0 and write no KV (slot -1)."""

    def __init__(self, weights: Weights, pool, max_tokens: int, max_seqs: int, max_pos: int, opconfig: OpConfig):
        from pacekern_ops.paged_attention import paged_attention
        from pacekern_ops.rope import rope_paged
        s, w, op = weights.spec, weights, lambda name: preparer(opconfig, name)
        self.spec, self.pool, self.max_tokens, self.max_seqs = s, pool, max_tokens, max_seqs
        r, h, d, nh, f, v = max_tokens, s.hidden, s.head_dim, s.n_heads, s.ffn, w.lm_head.n
        self.cos, self.sin = rope_tables(max_pos, d, s.rope_theta)
        mb = -(-max_pos // pool.block_size)
        self.ids, self.pos, self.slot = (torch.zeros(r, dtype=torch.int64), torch.zeros(r, dtype=torch.int32),
                                         torch.full((r,), -1, dtype=torch.int32))
        self.bt = torch.zeros(max_seqs, mb, dtype=torch.int32)
        self.qstart, self.ctx = torch.zeros(max_seqs + 1, dtype=torch.int32), torch.zeros(max_seqs, dtype=torch.int32)
        self.items, self.nitems = torch.zeros(-(-r // 16) + max_seqs, 3, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        x, res, hn = torch.empty(r, h), torch.empty(r, h), torch.empty(r, h)
        qkv, q, attn = torch.empty(r, 1, s.qkv_heads, d), torch.empty(r, 1, nh, d), torch.zeros(r, nh, d)
        gu, act = torch.empty(r, 2 * f), torch.empty(r, f)
        self.hn, self.last = hn, torch.zeros(max_seqs, h)
        self.last_rows = torch.zeros(max_seqs, dtype=torch.int64)
        self.logits, self.next = torch.empty(max_seqs, v), torch.empty(max_seqs, dtype=torch.int64)
        self.body, self.head = {}, {}
        for n in buckets(max_tokens):
            ids, xn, resn, hnn = self.ids[:n], x[:n], res[:n], hn[:n]

            def embed(ids=ids, xn=xn, resn=resn):
                torch.index_select(w.embed, 0, ids, out=xn)
                resn.zero_()
            calls = [embed]
            for layer, kp, vp in zip(w.layers, pool.k, pool.v):
                calls += [op("add_rmsnorm")(xn, resn, layer.ln1, s.rms_eps, hnn),
                          op("linear")(layer.qkv, hnn, qkv[:n].view(n, -1)),
                          rope_paged.prepare(qkv[:n], self.pos[:n], self.slot[:n], self.cos, self.sin, q[:n], kp, vp),
                          paged_attention.prepare(q[:n].view(n, nh, d), kp, vp, self.bt, self.qstart, self.ctx,
                                                  self.items, self.nitems, attn[:n]),
                          op("linear")(layer.o, attn[:n].view(n, -1), xn),
                          op("add_rmsnorm")(xn, resn, layer.ln2, s.rms_eps, hnn),
                          op("linear")(layer.gate_up, hnn, gu[:n]),
                          op("silu_mul")(gu[:n], act[:n]),
                          op("linear")(layer.down, act[:n], xn)]
            calls.append(op("add_rmsnorm")(xn, resn, w.norm, s.rms_eps, hnn))
            self.body[n] = calls
        for n in buckets(max_seqs):
            rows, last, logits, nxt = self.last_rows[:n], self.last[:n], self.logits[:n], self.next[:n]
            calls = [lambda rows=rows, last=last: torch.index_select(hn, 0, rows, out=last),
                     op("linear")(w.lm_head, last, logits)]
            if w.head_ids is None:
                calls.append(op("argmax")(logits, nxt))
            else:
                hrow = torch.empty(n, dtype=torch.int64)
                calls += [op("argmax")(logits, hrow), lambda hrow=hrow, nxt=nxt: torch.index_select(w.head_ids, 0, hrow, out=nxt)]
            self.head[n] = calls

    def warm_up(self) -> None:
        """Run every plan once on padding only (loads or compiles every kernel the steps call)."""
        self.slot.fill_(-1)
        self.qstart.zero_()
        self.nitems.zero_()
        for calls in list(self.body.values()) + list(self.head.values()):
            for fn in calls:
                fn()

    def run(self, batch: FlatBatch):
        """One step; returns (logits, greedy ids) of the sampled sequences, in their order."""
        from pacekern_ops.paged_attention import work_items
        bs, ns = self.pool.block_size, len(batch.tokens)
        nq = [len(t) for t in batch.tokens]
        n = sum(nq)
        if not 0 < n <= self.max_tokens or ns > self.max_seqs:
            raise ValueError(f"a step of {n} tokens in {ns} sequences exceeds the runner's {self.max_tokens} / {self.max_seqs}")
        rb = next(b for b in self.body if b >= n)
        ids, pos, slot, last = [], [], [], []
        for s, (toks, p0, blocks) in enumerate(zip(batch.tokens, batch.starts, batch.blocks)):
            ps = range(p0, p0 + len(toks))
            ids += toks
            pos += ps
            slot += [blocks[p // bs] * bs + p % bs for p in ps]
            self.bt[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            if batch.sample[s]:
                last.append(len(ids) - 1)
        pad = rb - n
        self.ids[:rb] = torch.tensor(ids + [0] * pad)
        self.pos[:rb] = torch.tensor(pos + [0] * pad, dtype=torch.int32)
        self.slot[:rb] = torch.tensor(slot + [-1] * pad, dtype=torch.int32)
        self.qstart[: ns + 1] = torch.tensor([0] + list(itertools.accumulate(nq)), dtype=torch.int32)
        self.qstart[ns + 1:] = n
        self.ctx[:ns] = torch.tensor(batch.starts, dtype=torch.int32)
        self.ctx[ns:] = 0
        self.nitems[0] = work_items(nq, list(batch.starts), self.items)
        for fn in self.body[rb]:
            fn()
        if not last:
            return self.logits[:0], self.next[:0]
        hb = next(b for b in self.head if b >= len(last))
        self.last_rows[:hb] = torch.tensor(last + [last[-1]] * (hb - len(last)))
        for fn in self.head[hb]:
            fn()
        return self.logits[: len(last)], self.next[: len(last)]
