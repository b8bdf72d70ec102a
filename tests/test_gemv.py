"""Decode GEMV with bf16 and int8 weights against torch, and its machine code."""
import pytest
import torch

import pacekern as pk
from conftest import INTERPRET, needs_compiled_avx512
from pacekern_ops.gemv import gemv_bf16, gemv_s8, gemv_s8_linear, quantize_rows, quantize_x16

SHAPES = [(1, 1, 16), (1, 37, 50), (3, 100, 576), (8, 45, 1536)] if not INTERPRET else [(1, 1, 16), (2, 9, 40)]
CONFIGS = [pk.Config.of(R=4, NB=64, PF=0), pk.Config.of(R=6, NB=16, PF=256), pk.Config.of(R=8, NB=128, PF=1024)]
CONFIGS_MM = [pk.Config.of(R=4, NB=64, PF=0, MM=1), pk.Config.of(R=6, NB=16, PF=256, MM=2),
              pk.Config.of(R=1, NB=128, PF=1024, MM=8)]


@pytest.mark.parametrize("cfg", CONFIGS_MM, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_bf16(m, n, k, cfg):
    x, w, y = torch.randn(m, k), torch.randn(n, k).bfloat16(), torch.empty(m, n)
    pk.check(gemv_bf16, x, w, y, config=cfg)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w.float()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mm", [2, 3, 5, 8])
def test_gemv_bf16_batch_invariant(mm):
    """A row's result is bit-identical whether it is computed alone or in a batch (batched decode
    must equal unbatched decode)."""
    x, w = torch.randn(5, 200), torch.randn(70, 200).bfloat16()
    y = torch.empty(5, 70)
    gemv_bf16(x, w, y, config=pk.Config.of(R=2 if mm < 8 else 1, NB=16, PF=0, MM=mm))
    for i in range(5):
        yi = torch.empty(1, 70)
        gemv_bf16(x[i:i + 1].contiguous(), w, yi, config=pk.Config.of(R=4, NB=16, PF=0, MM=1))
        assert torch.equal(yi[0], y[i])


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_s8(m, n, k, cfg):
    x, y = torch.randn(m, k), torch.empty(m, n)
    q, s, wsum = quantize_rows(torch.randn(n, k))
    xh, xl, xs = torch.empty(m, k, dtype=torch.uint8), torch.empty(m, k, dtype=torch.uint8), torch.empty(m)
    quantize_x16(x, xh, xl, xs)
    pk.check(gemv_s8, xh, xl, xs, q, s, wsum, y, config=cfg)     # exact for the quantized x it is given
    # against unquantized x: 16-bit activations (error <= max|x| / 65534 per element)
    ref = (x.double() @ (q.double() * s.double()[:, None]).t()).float()
    bound = k * x.abs().max() / 65534 * (q.abs().max() * s.max()) + 1e-5
    assert (y - ref).abs().max() <= bound


def test_quantize_x16_round_trip():
    x = torch.randn(3, 100) * 10
    x[1] = 0.0                                                  # an all-zero row
    xh, xl, xs = torch.empty(3, 100, dtype=torch.uint8), torch.empty(3, 100, dtype=torch.uint8), torch.empty(3)
    quantize_x16(x, xh, xl, xs)
    back = (xh.double() * 256 + xl.double() - 32768) * xs.double()[:, None]
    assert ((back - x.double()).abs() <= xs.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(back[1], torch.zeros(100, dtype=torch.float64))


def test_gemv_s8_linear_matches_float_math():
    x, y = torch.randn(2, 300), torch.empty(2, 50)
    w = torch.randn(50, 300)
    q, s, wsum = quantize_rows(w)
    gemv_s8_linear(x, q, s, wsum, y)
    torch.testing.assert_close(y, x @ (q.float() * s[:, None]).t(), rtol=1e-3, atol=1e-3)


def test_quantize_rows_error_is_bounded():
    w = torch.randn(64, 128)
    q, s, wsum = quantize_rows(w)
    assert torch.equal(wsum, q.sum(dim=1, dtype=torch.int32))
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()     # half a step per element


@pytest.mark.parametrize("kernel", [gemv_bf16, gemv_s8], ids=lambda k: k.name)
def test_inner_loop_streams_in_zmm_without_spills(kernel):
    reason = needs_compiled_avx512()
    if reason:
        pytest.skip(reason)
    r = kernel.asm(pk.Config.of(NB=64, PF=256, **({"MM": 4, "R": 2} if kernel is gemv_bf16 else {"R": 4})))
    dots = r.counts.get("vfmadd", 0) + r.counts.get("vpdpbusd", 0)
    assert r.inner_spills == 0 and r.zmm_registers >= 5 and dots >= 4, r.summary()
