"""DLRMv2 inference on pacekern kernels: INT8 (int8 or 4-bit embeddings) and fp32.

INT8 forward of a batch of B rows (buffers are allocated once per batch size):

    dense  --quantize_u8--> u8 [B, 13] --qlinear+ReLU (u8)--> 512 --(u8)--> 256 --(f32, ReLU)--> x0[:, :128]
    bags   --embedding_bag_s8 / _u4--> x0[:, 128:]   (written in place: no cat)
    x0     --quantize_u8--> u8
    per DCN layer l:  h = qlinear(x_l,u8, V_l) (u8);  z = qlinear(h, W_l) + b_l (f32);
                      x_{l+1} = x0 * z + x_l (f32) and its u8 copy (dcn_mix)
    top    qlinear+ReLU (u8) x 4 -> qlinear (f32) -> sigmoid

qlinear is pacekern_ops.gemm_u8s8.quantized_linear (AMX at ISA level amx for M >= 16, VNNI
otherwise, with exact generic lowerings below VNNI); bias, ReLU and requantization run in its
epilogue. The fp32 path (`PacekernDlrmFp32`) runs the same structure on gemm_f32,
embedding_bag_f32 and dcn_mix.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from pacekern_ops import embedding_bag as eb
from pacekern_ops.dcn import dcn_mix
from pacekern_ops.gemm_f32 import gemm_f32, pack as pack_f32
from pacekern_ops.gemm_u8s8 import prepare_quantized_linear

from .data import Batch, validate
from .model import DLRMv2
from .quantize import QuantizedDlrm


class PacekernDlrm:
    """INT8 DLRMv2 on pacekern kernels. `emb_bits`: 8 (int8 row-wise) or 4."""

    def __init__(self, q: QuantizedDlrm, emb_bits: int = 8, check: bool = True):
        if emb_bits not in q.tables:
            raise ValueError(f"this quantized model has {sorted(q.tables)}-bit tables, not {emb_bits}-bit")
        self.q, self.spec, self.tables, self.check = q, q.spec, q.tables[emb_bits], check
        self.emb_bits = emb_bits
        for ql in q.linears.values():
            ql.packed()
        w = q.spec.width
        self.inv_dense = q.linears["bottom.0"].inp.inv_scale(q.spec.num_dense)
        self.inv_x = [a.inv_scale(w) for a in q.x_q]            # x_0 .. x_L: 1 / (scale f) per column
        self._plans: dict = {}

    def _plan(self, b: int) -> dict:
        """Buffers for batch size b, and every kernel call but the embedding bags (whose ids are
        new each batch) prepared once on them (checked and bound: a call then costs the bare
        kernel call). One batch size at a time: bounded memory."""
        plan = self._plans.get(b)
        if plan is not None:
            return plan
        s, q, lin, w = self.spec, self.q, self.q.linears, self.spec.width
        u8 = dict(dtype=torch.uint8)
        bf = dict(x0=torch.empty(b, w), x1=torch.empty(b, w), xq=torch.empty(b, w, **u8), z=torch.empty(b, w),
                  h=torch.empty(b, s.dcn_rank, **u8), bot=torch.empty(b, s.dim),
                  hidden=[torch.empty(b, n, **u8) for n in tuple(s.bottom[:-1]) + tuple(s.top[:-1])],
                  logit=torch.empty(b, 1))
        hid = iter(bf["hidden"])

        def linear(name, x, out, last, packed=None):
            ql = lin[name]
            return prepare_quantized_linear(x, ql.inp.scale, ql.inp.zp, packed or ql.packed(), ql.bias,
                                            scale_y=None if last else ql.out.scale, zp_y=0 if last else ql.out.zp,
                                            relu=ql.relu, out=out)

        # bottom MLP. Layer 0's K = 13 is padded to whole i32 words once: the dense features are
        # copied into zero-padded columns, which quantize to zp and meet zero weight rows (the
        # packed weight is already zero padded), so they add nothing.
        k0 = -(-s.num_dense // 4) * 4
        l0 = lin["bottom.0"]
        bf["dense_f"], bf["dense"] = torch.zeros(b, k0), torch.empty(b, k0, **u8)
        inv0 = torch.cat([self.inv_dense, torch.zeros(k0 - s.num_dense)])
        x = next(hid)
        bottom = [eb.quantize_u8.prepare(bf["dense_f"], inv0, l0.inp.zp, bf["dense"]),
                  linear("bottom.0", bf["dense"], x, False, replace(l0.packed(), k=k0))[0]]
        nb = len(s.bottom)
        for i in range(1, nb):
            last = i == nb - 1
            f, x = linear(f"bottom.{i}", x, bf["bot"] if last else next(hid), last)
            bottom.append(f)
        # x0 quantization, DCN (the residual stream in fp32, requantized once per layer), top MLP
        # (x_1, x_2, ... live in one buffer, updated in place by dcn_mix: each element is read, then
        # written)
        x0, xq, xl = bf["x0"], bf["xq"], bf["x0"]
        rest = [eb.quantize_u8.prepare(x0, self.inv_x[0], q.x_q[0].zp, xq)]
        for l in range(s.dcn_layers):
            fv, h = linear(f"cross.V.{l}", xq, bf["h"], False)
            fw, z = linear(f"cross.W.{l}", h, bf["z"], True)
            rest += [fv, fw, dcn_mix.prepare(z, x0, xl, self.inv_x[l + 1], q.x_q[l + 1].zp, bf["x1"], xq)]
            xl = bf["x1"]
        y, nt = xq, len(s.top)
        for i in range(nt):
            last = i == nt - 1
            f, y = linear(f"top.{i}", y, bf["logit"] if last else next(hid), last)
            rest.append(f)
        plan = dict(bufs=bf, bottom=bottom, rest=rest)
        self._plans = {b: plan}
        return plan

    def logits(self, batch: Batch) -> torch.Tensor:
        if self.check:
            validate(batch, self.spec)
        s = self.spec
        plan = self._plan(batch.size)
        bf = plan["bufs"]
        bf["dense_f"][:, : s.num_dense].copy_(batch.dense)
        for f in plan["bottom"]:
            f()
        bf["x0"][:, : s.dim].copy_(bf["bot"])
        eb.embedding_bag(self.tables, batch.indices, batch.offsets, bf["x0"], s.dim)
        for f in plan["rest"]:
            f()
        return bf["logit"][:, 0].clone()

    def __call__(self, batch: Batch) -> torch.Tensor:
        """Click probabilities [B] (a new tensor)."""
        return torch.sigmoid(self.logits(batch))


class PacekernDlrmFp32:
    """fp32 DLRMv2 on pacekern kernels (gemm_f32, embedding_bag_f32, dcn_mix): the comparison
    point for the INT8 path on the same kernels. Bias and ReLU are torch element-wise ops."""

    def __init__(self, model: DLRMv2, check: bool = True):
        self.spec, self.check = model.spec, check
        self.tables = eb.pack_f32([e.weight for e in model.embs])
        self.layers = {k: (pack_f32(m.weight.detach().float().t().contiguous()), None if m.bias is None else
                           m.bias.detach().float().clone(), m.out_features) for k, m in model.linears().items()}
        self._bufs: dict = {}

    def _linear(self, name, x, relu, out=None):
        wp, bias, n = self.layers[name]
        y = gemm_f32(x.contiguous(), wp, out if out is not None else torch.empty(x.shape[0], n))
        if bias is not None:
            y += bias
        return y.clamp_min_(0) if relu else y

    def logits(self, batch: Batch) -> torch.Tensor:
        if self.check:
            validate(batch, self.spec)
        s, b = self.spec, batch.size
        if b not in self._bufs:
            self._bufs = {b: dict(x0=torch.empty(b, s.width), xa=torch.empty(b, s.width), xb=torch.empty(b, s.width),
                                  z=torch.empty(b, s.width), q=torch.empty(b, s.width, dtype=torch.uint8),
                                  ones=torch.ones(s.width))}
        bf = self._bufs[b]
        x = batch.dense
        for i in range(len(s.bottom)):
            x = self._linear(f"bottom.{i}", x, True)
        x0 = bf["x0"]
        x0[:, : s.dim].copy_(x)
        eb.embedding_bag(self.tables, batch.indices, batch.offsets, x0, s.dim)
        xl = x0
        for l in range(s.dcn_layers):
            h = self._linear(f"cross.V.{l}", xl, False)
            z = self._linear(f"cross.W.{l}", h, False, out=bf["z"])
            xn = (bf["xa"], bf["xb"])[l % 2]
            dcn_mix(z, x0, xl, bf["ones"], 0, xn, bf["q"])     # the u8 copy is unused here
            xl = xn
        y = xl
        for i in range(len(s.top)):
            y = self._linear(f"top.{i}", y, i < len(s.top) - 1)
        return y[:, 0]

    def __call__(self, batch: Batch) -> torch.Tensor:
        return torch.sigmoid(self.logits(batch))
