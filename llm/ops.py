"""The model's hot ops, each with a pacekern kernel and a torch implementation; `OpConfig` picks one
per op, so a researcher can swap a single kernel inside the whole model and measure end to end.

Every implementation is a *preparer*: given the fixed buffers of one forward shape it returns a
zero-argument callable that runs the op on them. A forward pass is then a flat list of such calls
(llm/model.py), and the per-call Python overhead is the bare kernel call (~3-5 us), which matters at
batch-1 decode where ~250 ops run per token.

Buffers (all fp32 unless noted; R = B * T rows):
  x, res, h [R, H]   qkv [B, T, NH + 2 KVH, D]   q, attn [B, T, NH, D]   gu [R, 2F]   act [R, F]
  kc, vc [B, KVH, S, D] (KV cache rows of this batch)   start i32 [B]   logits [R', V]   next i64 [R']
  offs i32 [B, T]: token t's position is start + offs (t, or its depth in a verification tree)
  anc i32 [B, TA, TA]: TA = 1, causal; TA = T, a tree (query t sees this call's rows u with anc[t, u])
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

IMPLS = ("pacekern", "torch")
GEMV_MAX_ROWS = 16          # up to this many rows (decode, speculative verification) bf16 / fp32 / int4 weights stream through a GEMV


@dataclass(frozen=True)
class OpConfig:
    """Which implementation runs each op: "pacekern" (our kernels) or "torch"."""
    linear: str = "pacekern"        # every projection and the LM head
    add_rmsnorm: str = "pacekern"   # residual add fused with RMSNorm
    rope_qkv: str = "pacekern"      # RoPE on q/k, k/v written into the cache
    attention: str = "pacekern"     # causal GQA attention over the cache (prefill, decode, verification)
    silu_mul: str = "pacekern"      # SiLU(gate) * up
    argmax: str = "pacekern"        # greedy next token

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) not in PREPARE[f.name]:
                raise ValueError(f"OpConfig.{f.name}={getattr(self, f.name)!r}: choose one of {tuple(PREPARE[f.name])} "
                                 f"(add your own with llm.ops.register)")

    @classmethod
    def all(cls, impl: str) -> "OpConfig":
        return cls(**{f.name: impl for f in fields(cls)})

    def with_(self, **kw) -> "OpConfig":
        return replace(self, **kw)


# ---- linear --------------------------------------------------------------------------------------

def _bias(call, y, lin):
    if lin.bias is None:
        return call
    b = lin.bias

    def run():
        call()
        y.add_(b)
    return run


def linear_torch(lin, x, y):
    if lin.fmt == "f32":
        wt = lin.w.t()
        call = lambda: torch.mm(x, wt, out=y)
    elif lin.fmt == "bf16":
        wt = lin.w.t()
        call = lambda: y.copy_(torch.mm(x.to(torch.bfloat16), wt))
    elif lin.fmt == "int8":                                      # torch's own weight-only int8 matmul
        call = lambda: y.copy_(torch.ops.aten._weight_int8pack_mm(x, lin.w, lin.scale))
    else:                                                        # torch's own int4 matmul on the same codes
        if lin.torch_packed is None:
            from pacekern_ops.gemv_int4 import torch_int4_pack
            lin.torch_packed = torch_int4_pack(lin.w, lin.scale, lin.mins, lin.k)
        wp, scales_zeros = lin.torch_packed
        call = lambda: y.copy_(torch.ops.aten._weight_int4pack_mm_for_cpu(x, wp, 32, scales_zeros))
    return _bias(call, y, lin)


def packed(lin):
    """lin's weights in its GEMM's layout (int8: for every row count), built on first use and kept
    on lin (beside the row-major weights, which the GEMVs and torch's ops read)."""
    if lin.packed is None:
        from pacekern_ops import gemm_bf16, gemm_f32, gemm_int4, gemm_s8x16
        pack = {"int8": lambda: gemm_s8x16.pack_weight(lin.w.t()), "int4": lambda: gemm_int4.pack(lin.w, lin.scale, lin.mins),
                "f32": lambda: gemm_f32.pack(lin.w.t()), "bf16": lambda: gemm_bf16.pack(lin.w.t())}
        lin.packed = pack[lin.fmt]()
    return lin.packed


def linear_pacekern(lin, x, y):
    rows = x.shape[0]
    if lin.fmt == "int8" and lin.k % 4 == 0:                    # 16-bit activations x packed int8 weights on VNNI
        from pacekern_ops import gemm_s8x16
        call = gemm_s8x16.prepare(x, packed(lin), lin.scale, lin.wsum, y)
    elif lin.fmt == "int8":                                      # the same, row-major weights (K % 4 != 0)
        from pacekern_ops.gemv import prepare_s8_linear
        call = prepare_s8_linear(x, lin.w, lin.scale, lin.wsum, y)
    elif lin.fmt == "int4" and rows > GEMV_MAX_ROWS:             # prefill: the same activations, a GEMM
        from pacekern_ops import gemm_int4
        call = gemm_int4.prepare(x, packed(lin), y)
    elif lin.fmt == "int4":                                      # int8 activations x 4-bit weights on VNNI
        from pacekern_ops.gemv_int4 import prepare_int4_linear
        call = prepare_int4_linear(x, lin.w, lin.scale, lin.mins, y)
    elif lin.fmt == "f32" and rows <= GEMV_MAX_ROWS:
        from pacekern_ops import gemv
        call = gemv.gemv_f32.prepare(x, lin.w, y, config=gemv.rows_config(gemv.gemv_f32, x, lin.w, y))
    elif lin.fmt == "f32":
        from pacekern_ops import gemm_f32
        call = gemm_f32.gemm_f32.prepare(x, packed(lin), y)
    else:                                                        # bf16: x rounded to bf16 (RNE), packed weights
        from pacekern_ops import gemm_bf16
        xb = torch.empty(x.shape, dtype=torch.bfloat16)
        to_bf16 = gemm_bf16.round_bf16_call(x, xb)
        if rows <= GEMV_MAX_ROWS and lin.k % 2 == 0:             # decode / verification: split N among threads
            kernel, args, config = gemm_bf16.rows_call(xb, packed(lin), y)
            mm = kernel.prepare(*args, config=config)
        else:                                                    # prefill: AMX where present
            mm = gemm_bf16.prepare(xb, packed(lin), y)

        def call():
            to_bf16()
            mm()
    return _bias(call, y, lin)


# ---- normalization -------------------------------------------------------------------------------

def add_rmsnorm_torch(x, res, w, eps, out):
    """res += x; out = res / sqrt(mean(res^2) + eps) * w, in HF LlamaRMSNorm's order of operations."""
    def call():
        res.add_(x)
        var = res.pow(2).mean(-1, keepdim=True)
        torch.mul(res, torch.rsqrt(var + eps), out=out)
        out.mul_(w)
    return call


def add_rmsnorm_pacekern(x, res, w, eps, out):
    from pacekern_ops.norm import add_rmsnorm
    return add_rmsnorm.prepare(x, res, w, torch.tensor([eps], dtype=torch.float32), out)


# ---- RoPE + KV cache write -----------------------------------------------------------------------

def rope_qkv_torch(qkv, start, offs, cos, sin, q, kc, vc):
    b_, t_, _, d = qkv.shape
    nh, kvh = q.shape[2], kc.shape[1]
    ar = torch.arange(t_)

    def rot(x, c, s):                                            # HF rotate_half RoPE
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    def call():
        row = start.long()[:, None] + ar                         # [B, T] cache rows
        pos = start.long()[:, None] + offs.long()                # [B, T] positions
        c = torch.cat((cos[pos], cos[pos]), -1)[:, :, None]      # [B, T, 1, D]
        s = torch.cat((sin[pos], sin[pos]), -1)[:, :, None]
        q.copy_(rot(qkv[:, :, :nh], c, s))
        k = rot(qkv[:, :, nh:nh + kvh], c, s)
        for b in range(b_):
            kc[b, :, row[b]] = k[b].transpose(0, 1)
            vc[b, :, row[b]] = qkv[b, :, nh + kvh:].transpose(0, 1)
    return call


def rope_qkv_pacekern(qkv, start, offs, cos, sin, q, kc, vc):
    from pacekern_ops.rope import rope_qkv
    return rope_qkv.prepare(qkv, start, offs, cos, sin, q, kc, vc)


# ---- attention -----------------------------------------------------------------------------------

def attention_torch(q, kc, vc, start, anc, out):
    from pacekern_ops.attention import visible
    b_, t_, nh, d = q.shape
    group = nh // kc.shape[1]

    def call():
        for b in range(b_):
            n = int(start[b]) + t_
            k = kc[b, :, :n].repeat_interleave(group, 0)         # [NH, n, D]
            v = vc[b, :, :n].repeat_interleave(group, 0)
            o = F.scaled_dot_product_attention(q[b].transpose(0, 1), k, v, attn_mask=visible(n - t_, t_, anc[b]))
            out[b] = o.transpose(0, 1)
    return call


def attention_pacekern(q, kc, vc, start, anc, out):
    from pacekern_ops.attention import attention
    return attention.prepare(q, kc, vc, start, anc, out)


# ---- MLP activation, argmax ----------------------------------------------------------------------

def silu_mul_torch(gu, act):
    f = act.shape[1]
    return lambda: torch.mul(F.silu(gu[:, :f]), gu[:, f:], out=act)


def silu_mul_pacekern(gu, act):
    from pacekern_ops.activation import silu_mul
    return silu_mul.prepare(gu, act)


def argmax_torch(logits, nxt):
    return lambda: torch.argmax(logits, dim=-1, out=nxt)


def argmax_pacekern(logits, nxt):
    from pacekern_ops.activation import argmax
    return argmax.prepare(logits, nxt)


PREPARE = {
    "linear": {"pacekern": linear_pacekern, "torch": linear_torch},
    "add_rmsnorm": {"pacekern": add_rmsnorm_pacekern, "torch": add_rmsnorm_torch},
    "rope_qkv": {"pacekern": rope_qkv_pacekern, "torch": rope_qkv_torch},
    "attention": {"pacekern": attention_pacekern, "torch": attention_torch},
    "silu_mul": {"pacekern": silu_mul_pacekern, "torch": silu_mul_torch},
    "argmax": {"pacekern": argmax_pacekern, "torch": argmax_torch},
}


def register(op: str, name: str, prepare) -> None:
    """Add an implementation of `op` (a preparer with the same buffers as the built-in ones), then
    select it with OpConfig(**{op: name}): how an experiment swaps one kernel inside the model."""
    if op not in PREPARE:
        raise ValueError(f"unknown op '{op}': one of {', '.join(PREPARE)}")
    PREPARE[op][name] = prepare


def preparer(opconfig: OpConfig, op: str):
    return PREPARE[op][getattr(opconfig, op)]
