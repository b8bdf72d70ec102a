"""fp32 GEMM against torch.matmul, over tails and configs, and its machine code."""
import pytest
import torch

import pacekern as pk
from conftest import INTERPRET, needs_compiled_avx512
from pacekern_ops.gemm_f32 import gemm_f32, pack, unpack

SHAPES = [(1, 16, 1), (7, 37, 19), (33, 100, 300), (64, 48, 257)] if not INTERPRET else [(1, 16, 1), (5, 19, 7)]
CONFIGS = [pk.Config.of(MR=4, NV=4, KC=128, MT=12), pk.Config.of(MR=7, NV=3, KC=256, MT=8),
           pk.Config.of(MR=12, NV=1, KC=128, MT=12)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_f32_matches_torch(m, n, k, cfg):
    x, w = torch.randn(m, k), torch.randn(k, n)
    y = torch.full((m, n), float("nan"))
    pk.check(gemm_f32, x, pack(w), y, config=cfg)
    torch.testing.assert_close(y, x @ w, rtol=1e-4, atol=1e-4 * k ** 0.5)


def test_pack_roundtrip():
    w = torch.randn(19, 37)
    assert torch.equal(unpack(pack(w), 37), w)


@pytest.mark.parametrize("cfg", CONFIGS[:2] + [pk.Config.of(MR=12, NV=2, KC=256, MT=4), pk.Config.of(MR=14, NV=2, KC=256, MT=4)],
                         ids=str)
def test_inner_loop_uses_zmm_without_spills(cfg):
    reason = needs_compiled_avx512()
    if reason:
        pytest.skip(reason)
    r = gemm_f32.asm(cfg)
    assert r.inner_spills == 0, r.summary()
    assert r.zmm_registers >= cfg.MR * cfg.NV + cfg.NV, r.summary()          # accumulators + B vectors
    assert r.counts.get("vfmadd", 0) >= cfg.MR * cfg.NV, r.summary()
