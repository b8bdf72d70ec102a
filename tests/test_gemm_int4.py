"""4-bit-weight prefill GEMM (int8 activations per group): against PyTorch in float64, against the
decode GEMV on the same codes, the packing, extreme values, bad input and the machine code.

Runs in every mode: PACEKERN_INTERPRET=1 (small shapes), PACEKERN_ISA=avx2 (generic lowering of
vpdpbusd) and natively.
"""
import pytest
import torch

import pacekern as pk
from conftest import INTERPRET, assert_vnni_inner_loop
from pacekern_ops import gemm_int4 as g
from pacekern_ops.gemm_u8s8 import unpack
from pacekern_ops.gemv_int4 import activation_buffers, dequantize_int4, gemv_int4_linear, quantize_int4, quantize_x8

SHAPES = [(17, 20, 64), (3, 37, 72)] if INTERPRET else [(17, 20, 64), (40, 100, 576), (129, 48, 1536), (5, 33, 600)]


def make(m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen), quantize_int4(torch.randn(n, k, generator=gen))


def test_pack_layout():
    _, (w, ws, wm) = make(1, 20, 600)
    qp, wst, wmt = g.pack(w, ws, wm)
    q = unpack(qp.view(torch.int8), 20).view(torch.uint8)                  # [KP, N]
    assert torch.equal(q[:600].t().float() * ws.float().repeat_interleave(32, 1)[:, :600]
                       + wm.float().repeat_interleave(32, 1)[:, :600], dequantize_int4(w, ws, wm, 600))
    assert wst.shape == (ws.shape[1], 20) and torch.equal(wmt, wm.float().t())


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_torch_and_the_decode_gemv(m, n, k):
    x, (w, ws, wm) = make(m, n, k, seed=m + n + k)
    y = torch.empty(m, n)
    g.prepare(x, g.pack(w, ws, wm), y)()
    want = x.double() @ dequantize_int4(w, ws, wm, k).double().t()
    # int8 activations per 32 values: error ~1e-2 of the output's scale (as gemv_int4's)
    torch.testing.assert_close(y.double(), want, rtol=0.02, atol=0.01 * float(want.abs().max()))
    # the decode GEMV on the same activations: equal up to f32 summation order
    y2 = gemv_int4_linear(x, w, ws, wm, torch.empty(m, n))
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5 * float(y2.abs().max()))


@pytest.mark.parametrize("m,n,k", SHAPES[:2])
def test_kernel_against_its_reference(m, n, k):
    x, (w, ws, wm) = make(m, n, k, seed=1)
    xq, xs, xm = activation_buffers(m, k)
    quantize_x8(x, xq, xs, xm)
    args = (xq.view(torch.int32), xs, xm, *g.pack(w, ws, wm), -(-k // 32), torch.empty(m, n))
    pk.check(g.gemm_int4, *args)
    for cfg in [pk.Config.of(MR=1, NV=1, MC=32, NS=1), pk.Config.of(MR=3, NV=3, MC=32, NS=4)]:
        pk.check(g.gemm_int4, *args, config=cfg)


def test_extremes_are_exact_before_scaling():
    """Codes 15 against activations +-127 over long K: group sums at their largest; with unit scales
    and zero mins the result is an exact integer (below 2**24) on both sides."""
    m, n, k = (4, 16, 256) if INTERPRET else (8, 32, 4096)
    x = torch.full((m, k), 127.0)
    x[1] = -127.0
    x[2, ::2] = -127.0
    w = torch.full((n, k), 15.0)
    w[1::2, ::3] = 0.0
    codes = quantize_int4(w)
    assert torch.equal(dequantize_int4(*codes, k), w)                     # the grid is kept exactly
    y = torch.empty(m, n)
    g.prepare(x, g.pack(*codes), y)()
    assert torch.equal(y.double(), x.double() @ w.double().t())


def test_mismatched_weights_are_an_error():
    x, codes = make(20, 16, 600)
    with pytest.raises(ValueError, match="packed weights hold K"):
        g.prepare(torch.randn(20, 1100), g.pack(*codes), torch.empty(20, 16))


def test_asm_inner_loop_vpdpbusd_zmm_no_spills():
    cfg = g.SPACE.default_config()
    assert_vnni_inner_loop(g.gemm_int4, cfg.MR * cfg.NV)
