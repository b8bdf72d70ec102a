"""int8-weight GEMM (16-bit activations; LLM prefill, decode and verification): against PyTorch in
float64, against the row-major GEMV on the same quantized weights, rows independent of M and the
config (bit for bit), extreme values, bad input and the machine code.

Runs in every mode: PACEKERN_INTERPRET=1 (small shapes), PACEKERN_ISA=avx2 (generic lowering of
vpdpbusd) and natively.
"""
import pytest
import torch

import pacekern as pk
from conftest import INTERPRET, assert_vnni_inner_loop
from pacekern_ops import gemm_s8x16 as g
from pacekern_ops.gemv import gemv_s8_linear, quantize_rows, quantize_x16

SHAPES = [(17, 20, 64), (3, 37, 72)] if INTERPRET else [(17, 20, 64), (40, 100, 576), (129, 48, 1536), (5, 33, 68)]


def torch_linear(x, q, scale):
    """The weight-only int8 linear in float64 from the fp32 activations (no activation rounding)."""
    return x.double() @ (q.double() * scale.double()[:, None]).t()


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_torch_and_the_decode_gemv(m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    q, scale, wsum = quantize_rows(w)
    y = torch.empty(m, n)
    g.prepare(x, g.pack_weight(q.t()), scale, wsum, y)()
    want = torch_linear(x, q, scale)
    # 16-bit activations: |x - x16| <= max|x| / 65534 per row, so ~1e-4 of the output's scale
    torch.testing.assert_close(y.double(), want, rtol=1e-3, atol=2e-4 * float(want.abs().max()))
    # the decode GEMV on the same activations: equal up to the final f32 rounding (it combines in f64)
    y2 = gemv_s8_linear(x, q, scale, wsum, torch.empty(m, n))
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6 * float(y2.abs().max()))


@pytest.mark.parametrize("m,n,k", SHAPES[:2])
def test_kernel_against_its_reference(m, n, k):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen)
    q, scale, wsum = quantize_rows(torch.randn(n, k, generator=gen))
    xh, xl, xs = torch.empty(m, k, dtype=torch.uint8), torch.empty(m, k, dtype=torch.uint8), torch.empty(m)
    quantize_x16(x, xh, xl, xs)
    args = (xh.view(torch.int32), xl.view(torch.int32), xs, g.pack_weight(q.t()), scale, wsum, torch.empty(m, n))
    pk.check(g.gemm_s8x16, *args)
    for cfg in [pk.Config.of(MR=1, NV=1, MC=32, NS=1), pk.Config.of(MR=3, NV=3, MC=32, NS=4)]:
        pk.check(g.gemm_s8x16, *args, config=cfg)


def test_a_row_does_not_depend_on_the_rows_beside_it():
    """Speculative verification runs K + 1 rows where decode ran one: each row's output must be the
    same bits whatever M and the config (rows_config's choice for 1-16 rows, the prefill default)."""
    n, k = (40, 72) if INTERPRET else (200, 576)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, k, generator=gen) * torch.logspace(-3, 3, 16)[:, None]
    q, scale, wsum = quantize_rows(torch.randn(n, k, generator=gen))
    wp = g.pack_weight(q.t())
    one = torch.cat([_run(x[i:i + 1], wp, scale, wsum) for i in range(16)])
    for m in (2, 3, 5, 8, 9, 16):
        assert torch.equal(_run(x[:m], wp, scale, wsum), one[:m]), f"M={m}"
        assert torch.equal(_run(x[:m], wp, scale, wsum, g.SPACE.default_config()), one[:m]), f"M={m}, default config"


def _run(x, wp, scale, wsum, config=None):
    m, k = x.shape
    xh, xl, xs = torch.empty(m, k, dtype=torch.uint8), torch.empty(m, k, dtype=torch.uint8), torch.empty(m)
    quantize_x16(x, xh, xl, xs)
    args = (xh.view(torch.int32), xl.view(torch.int32), xs, wp, scale, wsum, torch.empty(m, scale.numel()))
    g.gemm_s8x16.prepare(*args, config=config or g.rows_config(args))()
    return args[-1]


def test_extremes_do_not_overflow():
    """Full-scale activations (high bytes 0 and 255) against +-127 weights over a long K: h.w reaches
    255 * 127 * K, beyond 16-bit and 2**24 partial sums; still exact before the final scaling."""
    m, n, k = (4, 16, 256) if INTERPRET else (8, 32, 4096)
    x = torch.full((m, k), 1.0)
    x[1] = -1.0
    x[2, ::2] = -1.0
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[1::2] = -127
    scale, wsum = torch.ones(n), w.sum(1, dtype=torch.int32)
    y = torch.empty(m, n)
    g.prepare(x, g.pack_weight(w.t()), scale, wsum, y)()
    want = torch_linear(x, w, scale)
    assert float(want.abs().max()) == 127 * k
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6 * 127 * k)


def test_bad_k_is_an_error():
    with pytest.raises(ValueError, match="multiple of 4"):
        g.prepare(torch.randn(20, 6), torch.zeros(1, 2, 64, dtype=torch.int8), torch.ones(3), torch.zeros(3, dtype=torch.int32),
                  torch.empty(20, 3))


def test_asm_inner_loop_vpdpbusd_zmm_no_spills():
    cfg = g.SPACE.default_config()
    assert_vnni_inner_loop(g.gemm_s8x16, 2 * cfg.MR * cfg.NV)


# ---------------------------------------------------------------------------------------------
# AMX (tdpbusd): exact integer sums, so every row gets the VNNI kernel's bits

needs_amx = pytest.mark.skipif(pk.target().level != "amx", reason="AMX kernels compile only at ISA level amx")


def _amx_args(x, q, scale, wsum):
    from pacekern_ops.gemm_u8s8 import amx_config_bytes
    m, k = x.shape
    n = q.shape[0]
    xh, xl, xs = torch.empty(m, k, dtype=torch.uint8), torch.empty(m, k, dtype=torch.uint8), torch.empty(m)
    quantize_x16(x, xh, xl, xs)
    return (amx_config_bytes(m), xh.view(torch.int32), xl.view(torch.int32), xs, g.pack_weight(q.t()), scale, wsum,
            torch.empty(-(-n // 32), 4, 16, 16, dtype=torch.int32), torch.full((m, n), float("nan")))


@needs_amx
@pytest.mark.parametrize("cfg", [pk.Config.of(NP=1), pk.Config.of(NP=4)], ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 16, 64), (5, 40, 128), (17, 20, 64)] + ([] if INTERPRET else [(40, 100, 576), (129, 48, 1536)]))
def test_amx_kernel_against_its_reference_and_the_vnni_bits(m, n, k, cfg):
    gen = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]
    q, scale, wsum = quantize_rows(torch.randn(n, k, generator=gen))
    args = _amx_args(x, q, scale, wsum)
    pk.check(g.gemm_s8x16_amx, *args, config=cfg)
    assert torch.equal(args[-1], _run(x, args[4], scale, wsum)), "AMX and VNNI disagree"


def test_prepare_picks_amx_by_level_rows_and_k():
    assert g.use_amx(128, 576) == (pk.target().level == "amx")
    assert not g.use_amx(128, 68)                             # K % 64 != 0: whole tiles only
    assert not g.use_amx(16, 576)                             # decode / verification rows: VNNI
