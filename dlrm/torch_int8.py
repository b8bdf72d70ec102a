"""The same quantized DLRMv2 on PyTorch's own quantized CPU ops (fbgemm / the x86 engine): the
reference the pacekern INT8 path must match, and the "PyTorch int8" benchmark baseline.

  * embeddings: torch.ops.quantized.embedding_bag_byte_rowwise_offsets / _4bit_ (torch's packed
    row formats, built from the very codes, scales and biases of the pacekern tables)
  * linears: quantized::linear / linear_relu (static, u8 in, u8 out) and
    quantized::linear_with_input_q_dq_qweight_dq_output_fp32 where the pacekern path keeps an
    fp32 output, on the same int8 weights, per-channel scales, biases and activation qparams
  * DCN residual x0 * z + x_l rounded once to fp32 (the fused multiply-add of pacekern's dcn_mix;
    float64 holds the product exactly), and the final sigmoid in fp32 torch ops

With the same codes, scales and biases, the two paths then agree bit for bit but where a float
rounding difference moves a value across a u8 rounding tie (rare: see tests/test_dlrm.py).

PyTorch warns that its quantized tensor types are deprecated; they still run in torch 2.13 and are
used here only as a reference and a baseline.
"""
from __future__ import annotations

import warnings

import torch

from .data import Batch, validate
from .quantize import ActQ, QLinear, QuantizedDlrm


def torch_tables(p) -> list:
    """Per-table packed tensors in torch's row formats from pacekern PackedTables (8 or 4 bits)."""
    from pacekern_ops.embedding_bag import unpack_u4
    out = []
    for t, rows in enumerate(p.rows):
        r0 = int(p.base[t])
        sl = slice(r0, r0 + rows)
        if p.bits == 8:
            codes = (p.w[sl].to(torch.int16) + 128).to(torch.uint8)
            tail = torch.stack([p.scale[sl], p.bias[sl]], 1).contiguous().view(torch.uint8)     # fp32 scale, fp32 bias
            out.append(torch.cat([codes, tail], 1).contiguous())
        elif p.bits == 4:
            codes = unpack_u4(p.w[sl]).to(torch.uint8)                # [rows, D] 0..15
            packed = codes[:, 0::2] | (codes[:, 1::2] << 4)            # element 2k low nibble, 2k + 1 high
            tail = torch.stack([p.scale[sl].half(), p.bias[sl].half()], 1).contiguous().view(torch.uint8)
            out.append(torch.cat([packed, tail], 1).contiguous())
        else:
            raise ValueError(f"torch's quantized embedding bags take 8 or 4-bit tables, not {p.bits}")
    return out


def _prepack(ql: QLinear):
    n = ql.w.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(ql.w.t().contiguous(), ql.scale_w.double(),
                                                      torch.zeros(n, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, ql.bias)


class TorchInt8Dlrm:
    """PyTorch's quantized ops on a QuantizedDlrm (see the module docstring)."""

    def __init__(self, q: QuantizedDlrm, emb_bits: int = 8, check: bool = True):
        self.q, self.spec, self.check = q, q.spec, check
        p = q.tables[emb_bits]
        self.tables = torch_tables(p)
        self.emb_op = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if emb_bits == 8
                       else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
        self.packed = {k: _prepack(v) for k, v in q.linears.items()}

    @staticmethod
    def _qx(x: torch.Tensor, a: ActQ):
        """quint8 tensor of x: per tensor (torch.quantize_per_tensor), or with per-column
        smoothing: codes round(x / (scale f)) + zp (torch ops) carrying scale and zp."""
        if a.f is None:
            return torch.quantize_per_tensor(x, a.scale, a.zp, torch.quint8)
        return torch._make_per_tensor_quantized_tensor(a.quantize(x), a.scale, a.zp)

    def _linear(self, name: str, qx):
        """qx: a quint8 tensor; returns quint8 (requantized) or f32, as the QLinear says."""
        ql = self.q.linears[name]
        p = self.packed[name]
        if ql.out is not None:
            op = torch.ops.quantized.linear_relu if ql.relu else torch.ops.quantized.linear
            return op(qx, p, ql.out.scale, ql.out.zp)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(qx.dequantize(), ql.inp.scale, ql.inp.zp, p)
        return torch.relu(y) if ql.relu else y

    def logits(self, batch: Batch) -> torch.Tensor:
        if self.check:
            validate(batch, self.spec)
        s, q = self.spec, self.q
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = self._qx(batch.dense, q.linears["bottom.0"].inp)
            for i in range(len(s.bottom)):
                x = self._linear(f"bottom.{i}", x)
            b = batch.size
            bounds = batch.offsets[::b].tolist()
            pooled = [x]
            for t, w in enumerate(self.tables):
                o = batch.offsets[t * b:(t + 1) * b + 1]
                pooled.append(self.emb_op(w, batch.indices[bounds[t]:bounds[t + 1]], o - o[0], False, 0, False, None,
                                          None, True))
            x0 = torch.cat(pooled, 1)
            xl = x0
            xq = self._qx(x0, q.x_q[0])
            for l in range(s.dcn_layers):
                h = self._linear(f"cross.V.{l}", xq)
                z = self._linear(f"cross.W.{l}", h)
                xl = (x0.double() * z.double() + xl.double()).float()   # one rounding, as the fused kernel (fma)
                xq = self._qx(xl, q.x_q[l + 1])
            y = xq
            for i in range(len(s.top)):
                y = self._linear(f"top.{i}", y)
        return y[:, 0]

    def __call__(self, batch: Batch) -> torch.Tensor:
        return torch.sigmoid(self.logits(batch))


class FakeQuantDlrm:
    """The quantized model's arithmetic written plainly in float64 torch (dequantized weights and
    tables, explicit round/clamp at every quantization point): a third, op-independent
    statement of the same computation, for tests."""

    def __init__(self, q: QuantizedDlrm, emb_bits: int = 8):
        from pacekern_ops.embedding_bag import dequantized
        self.q, self.spec = q, q.spec
        self.rows = dequantized(q.tables[emb_bits]).double()
        self.base = q.tables[emb_bits].base

    def _lin(self, name, x):
        ql = self.q.linears[name]
        xq = ql.inp.dequantize(ql.inp.quantize(x)).double()
        y = xq @ (ql.w.double() * ql.scale_w.double()[None, :]) + ql.bias.double()
        if ql.relu:
            y = y.clamp_min(0)
        return y if ql.out is None else ql.out.dequantize(ql.out.quantize(y)).double()

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        s, b = self.spec, batch.size
        x = batch.dense.double()
        for i in range(len(s.bottom)):
            x = self._lin(f"bottom.{i}", x)
        pooled = [x]
        for t in range(s.num_sparse):
            idx, off = batch.table(t)
            rows = self.rows[self.base[t] + idx.long()]
            bag = torch.repeat_interleave(torch.arange(b), (off[1:] - off[:-1]).long())
            pooled.append(torch.zeros(b, s.dim, dtype=torch.float64).index_add_(0, bag, rows))
        x0 = torch.cat(pooled, 1)
        xl = x0
        for l in range(s.dcn_layers):
            xl = x0 * self._lin(f"cross.W.{l}", self._lin(f"cross.V.{l}", xl)) + xl
        y = xl
        for i in range(len(s.top)):
            y = self._lin(f"top.{i}", y)
        return y[:, 0]
