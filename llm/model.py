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
