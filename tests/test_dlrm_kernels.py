"""DLRM kernels against their references and against PyTorch's own ops: embedding bags over fp32,
int8 row-wise and 4-bit row-wise tables (pacekern_ops/embedding_bag.py), the id range check, the
u8 activation quantizer, and the DCN residual mix (pacekern_ops/dcn.py).

Runs in every mode (PACEKERN_INTERPRET=1 with the same small shapes, PACEKERN_ISA=avx2).
"""
import warnings

import pytest
import torch

import pacekern as pk
from pacekern_ops import dcn
from pacekern_ops import embedding_bag as eb

D_ALL = [128, 32, 48, 80]       # 48, 80: masked column tails (fp32 / int8 only: 4-bit needs multiples of 32)


def jagged(rows, batch, max_len, seed=0):
    """Table-major random bags (lengths 0..max_len, so some bags are empty)."""
    g = torch.Generator().manual_seed(seed)
    idx, off = [], [0]
    for r in rows:
        for _ in range(batch):
            n = int(torch.randint(0, max_len + 1, (1,), generator=g))
            idx.append(torch.randint(0, r, (n,), generator=g))
            off.append(off[-1] + n)
    return torch.cat(idx).to(torch.int32), torch.tensor(off, dtype=torch.int32)


def tables(rows, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(r, d, generator=g) * (0.1 + t) for t, r in enumerate(rows)]


ROWS = (37, 3, 100, 1)


@pytest.mark.parametrize("d", D_ALL)
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_embedding_bag_vs_ref(d, bits):
    if bits == 4 and d % 32:
        with pytest.raises(ValueError, match="multiple of 32"):
            eb.pack_u4(torch.zeros(3, d, dtype=torch.uint8), torch.ones(3), torch.zeros(3), (3,))
        return
    b = 5
    ts = tables(ROWS, d, seed=d)
    idx, off = jagged(ROWS, b, 6, seed=d + bits)
    w = torch.cat(ts)
    p = {32: lambda: eb.pack_f32(ts), 8: lambda: eb.pack_s8(*eb.quantize_rows_u8(w), ROWS),
         4: lambda: eb.pack_u4(*eb.quantize_rows_u4(w), ROWS)}[bits]()
    col0 = 16
    y = torch.empty(b, col0 + len(ROWS) * d + 8)                # slots start at col0; other columns untouched
    k, args = ((eb.embedding_bag_f32, (p.w, p.base, idx, off, col0, y)) if bits == 32 else
               (eb.embedding_bag_s8 if bits == 8 else eb.embedding_bag_u4, (p.w, p.sb, p.base, idx, off, col0, y)))
    pk.check(k, *args)                       # y poisoned first: every slot column must be written
    y.fill_(7.0)
    k(*args)
    assert (y[:, :col0] == 7).all() and (y[:, col0 + len(ROWS) * d:] == 7).all()
    # written twice: a plain torch statement of the pooled sums of the dequantized rows
    rows = eb.dequantized(p)
    for t in range(len(ROWS)):
        for s in range(b):
            lo, hi = int(off[t * b + s]), int(off[t * b + s + 1])
            want = rows[int(p.base[t]) + idx[lo:hi].long()].sum(0)
            got = y[s, col0 + t * d: col0 + (t + 1) * d]
            assert torch.allclose(got, want, atol=1e-5 * (1 + float(want.abs().max()))), (t, s)


def test_quantized_rows_error():
    """Row-wise quantization error: int8 <= scale / 2 a value, 4-bit <= its scale / 2 (+ fp16 rounding)."""
    w = torch.randn(50, 64) * 3
    q, s, b = eb.quantize_rows_u8(w)
    assert float(((q.float() * s[:, None] + b[:, None]) - w).abs().max()) <= float(s.max()) * 0.5 + 1e-5
    p4 = eb.pack_u4(*eb.quantize_rows_u4(w), (50,))
    assert float((eb.dequantized(p4) - w).abs().max() / p4.scale.max()) <= 0.51 + 0.01
    assert torch.equal(eb.unpack_u4(p4.w), eb.quantize_rows_u4(w)[0].to(torch.int16))


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_bag_vs_torch_quantized_ops(bits):
    """The same codes in torch's packed formats through torch.ops.quantized.embedding_bag_*."""
    from dlrm.torch_int8 import torch_tables
    d, b = 64, 6
    ts = tables(ROWS, d, seed=3)
    w = torch.cat(ts)
    p = eb.pack_s8(*eb.quantize_rows_u8(w), ROWS) if bits == 8 else eb.pack_u4(*eb.quantize_rows_u4(w), ROWS)
    tt = torch_tables(p)
    if bits == 8:                                     # torch's own prepack gives the very same bytes
        assert torch.equal(tt[0][:, :d], torch.ops.quantized.embedding_bag_byte_prepack(ts[0])[:, :d])
    idx, off = jagged(ROWS, b, 5, seed=bits)
    y = torch.zeros(b, len(ROWS) * d)
    eb.embedding_bag(p, idx, off, y)
    op = torch.ops.quantized.embedding_bag_byte_rowwise_offsets if bits == 8 else \
        torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
    for t in range(len(ROWS)):
        o = off[t * b:(t + 1) * b + 1]
        want = op(tt[t], idx[int(o[0]):int(o[-1])], o - o[0], False, 0, False, None, None, True)
        torch.testing.assert_close(y[:, t * d:(t + 1) * d], want, rtol=1e-5, atol=1e-5)


def test_batch_problems():
    """dlrm.data.validate's one pass (non-finite dense values, malformed offsets, ids outside their
    table), against its reference and a plain torch count."""
    idx, off = jagged(ROWS, 5, 40, seed=3)
    dense = torch.randn(5, 13)
    rows = torch.tensor(ROWS, dtype=torch.int64)
    flags = torch.empty(3, dtype=torch.int32)
    pk.check(eb.batch_problems, dense, idx, off, 5, rows, flags)
    assert flags.tolist() == [0, 0, 0]
    dense[2, 5], dense[4, 0], dense[0, 12] = float("nan"), float("inf"), float("-inf")
    idx[int(off[5])] = -7                                          # table 1's first id: negative
    idx[-1] = 1 << 30                                              # the last table's last id: far out
    idx[int(off[5 * 2])] = ROWS[2]                                 # table 2: one past its last row
    pk.check(eb.batch_problems, dense, idx, off, 5, rows, flags)
    limit = torch.repeat_interleave(rows, (off[1:] - off[:-1]).view(len(ROWS), 5).sum(1))
    assert flags.tolist() == [3, 0, int(((idx < 0) | (idx >= limit)).sum())] == [3, 0, 3]
    down = off.clone()
    down[3], down[4] = down[4], down[3] - 1                        # goes down (ids are then not read)
    end = off.clone()
    end[-1] -= 1                                                   # does not end at len(indices)
    empty = off[:1].expand(len(ROWS) * 5 + 1).contiguous()         # every bag empty, but ends at 0
    for o in (down, end, empty):
        pk.check(eb.batch_problems, dense, idx, o, 5, rows, flags)
        assert flags.tolist()[1:] == [1, 0]


def test_quantize_u8():
    x = torch.randn(9, 37) * 4
    x[0, :4] = torch.tensor([1e9, -1e9, 0.125, 0.375])            # saturation, and exact ties at scale 0.25
    q = torch.empty(9, 37, dtype=torch.uint8)
    pk.check(eb.quantize_u8, x, torch.full((37,), 4.0), 100, q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = torch.quantize_per_tensor(x, 0.25, 100, torch.quint8).int_repr()
    assert torch.equal(q, want)                                    # round half to even, as torch
    assert q[0, :4].tolist() == [255, 0, 100, 102]
    inv = torch.rand(37) * 10                                       # per-column scales (smoothing)
    pk.check(eb.quantize_u8, x, inv, 7, q)
    assert torch.equal(q, torch.clamp(torch.round(x * inv) + 7, 0, 255).to(torch.uint8))


@pytest.mark.parametrize("m,n", [(3, 16), (5, 100), (2, 864)])
def test_dcn_mix(m, n):
    g = torch.Generator().manual_seed(n)
    z, x0, xl = (torch.randn(m, n, generator=g) for _ in range(3))
    xn, qn = torch.empty(m, n), torch.empty(m, n, dtype=torch.uint8)
    z[0, :2] = torch.tensor([1e12, -1e12])                         # saturates at 255 and 0
    x0[0, :2] = 1.0
    pk.check(dcn.dcn_mix, z, x0, xl, torch.rand(n, generator=g) * 100, 128, xn, qn)
    assert qn[0, :2].tolist() == [255, 0]
    torch.testing.assert_close(xn, x0 * z + xl)


def test_dcn_cross_layer_ref():
    """The fp32 cross layer definition equals the model's module (written twice)."""
    from dlrm.model import LowRankCross
    m = LowRankCross(48, 8, 1)
    x0 = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(m(x0), dcn.cross_layer_ref(x0, x0, m.V[0].weight, m.W[0].weight, m.W[0].bias))
