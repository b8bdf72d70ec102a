"""Decode GEMV with bf16 and int8 weights against torch, and its machine code."""
import pytest
import torch

import pacekern as pk
from conftest import INTERPRET, needs_compiled_avx512
from pacekern_ops.gemv import gemv_bf16, gemv_s8, quantize_rows

SHAPES = [(1, 1, 16), (1, 37, 50), (3, 100, 576), (8, 45, 1536)] if not INTERPRET else [(1, 1, 16), (2, 9, 40)]
CONFIGS = [pk.Config.of(R=4, NB=64, PF=0), pk.Config.of(R=6, NB=16, PF=256), pk.Config.of(R=8, NB=128, PF=1024)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_bf16(m, n, k, cfg):
    x, w, y = torch.randn(m, k), torch.randn(n, k).bfloat16(), torch.empty(m, n)
    pk.check(gemv_bf16, x, w, y, config=cfg)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w.float()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_s8(m, n, k, cfg):
    x, y = torch.randn(m, k), torch.empty(m, n)
    q, s = quantize_rows(torch.randn(n, k))
    pk.check(gemv_s8, x, q, s, y, config=cfg)


def test_quantize_rows_error_is_bounded():
    w = torch.randn(64, 128)
    q, s = quantize_rows(w)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()     # half a step per element


@pytest.mark.parametrize("kernel", [gemv_bf16, gemv_s8], ids=lambda k: k.name)
def test_inner_loop_streams_in_zmm_without_spills(kernel):
    reason = needs_compiled_avx512()
    if reason:
        pytest.skip(reason)
    r = kernel.asm(pk.Config.of(R=4, NB=64, PF=256))
    assert r.inner_spills == 0 and r.zmm_registers >= 5 and r.counts.get("vfmadd", 0) >= 4, r.summary()
