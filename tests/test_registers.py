"""Register budgets: a space's tiles fit the register file of the ISA level they are searched and
defaulted at (32 zmm, or 16 ymm on AVX2), and the defaults of the register-tiled kernels do not
spill in their hot loop where the level has only 16 ymm."""
import pytest

import pacekern as pk
from conftest import INTERPRET
from pacekern.lang import REGISTERS
from pacekern_ops import attention, gemm_bf16, gemm_f32, gemm_int4, gemm_s8x16, gemm_u8s8, gemv, paged_attention

TILED = {
    "gemm_f32": (gemm_f32.gemm_f32, gemm_f32.SPACE),
    "gemm_bf16_avx512": (gemm_bf16.gemm_bf16_avx512, gemm_bf16.SPACE_AVX512),
    "gemm_bf16_rows": (gemm_bf16.gemm_bf16_rows, gemm_bf16.SPACE_ROWS),
    "gemm_int4": (gemm_int4.gemm_int4, gemm_int4.SPACE),
    "gemm_s8x16": (gemm_s8x16.gemm_s8x16, gemm_s8x16.SPACE),
    "gemm_u8s8_vnni": (gemm_u8s8.gemm_u8s8_vnni, gemm_u8s8.VNNI_SPACE),
    "attention": (attention.attention, attention.SPACE),
    "paged_attention": (paged_attention.paged_attention, paged_attention.SPACE),
    "gemv_bf16": (gemv.gemv_bf16, gemv.SPACE_MM),
}


def test_space_filters_and_defaults_by_level():
    space = pk.Space(MR=pk.choice(1, 2, 4, 8), regs=lambda c: 3 * c.MR, default=(dict(MR=8), dict(MR=2)))
    assert [c.MR for c in space.configs()] == [1, 2, 4, 8]                     # no level: every config
    assert [c.MR for c in space.configs("avx512")] == [1, 2, 4, 8]              # 24 <= 32
    assert [c.MR for c in space.configs("avx2")] == [1, 2]                      # 6 <= 8 < 12
    assert space.default_config("avx512").MR == 8 and space.default_config("avx2").MR == 2
    assert space.default_config().MR == 8
    assert space.default_config("generic").MR == 2                              # none fits: the last
    one = pk.Space(MR=pk.choice(1, 2), default=dict(MR=2))                      # a single dict still works
    assert one.default_config("avx2").MR == 2 and one.fits(pk.Config.of(MR=2), "generic")


def test_fitted_shrinks_a_hand_made_config_until_it_fits():
    space = pk.Space(MR=pk.choice(1, 2, 4, 8), NV=pk.choice(1, 2), regs=lambda c: c.MR * c.NV + c.NV + 1)
    big = pk.Config.of(MR=8, NV=2)                                              # 19 vectors
    assert space.fitted(big, "avx512", shrink=("MR", "NV")) == big
    assert space.fitted(big, "avx2", shrink=("MR", "NV")) == pk.Config.of(MR=4, NV=1)    # 6 <= 8
    assert space.fitted(big, "avx2", shrink=("NV",)) == pk.Config.of(MR=8, NV=1)         # cannot: 10, as close as it gets


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 12, 16])
def test_rows_configs_fit_the_host(rows):
    """The hand-made few-row configs (decode, verification, batched decode) fit this host's level."""
    import torch
    level = pk.target().level
    x = torch.zeros(rows, 576)
    c = gemv.rows_config(gemv.gemv_bf16, x, torch.zeros(64, 576, dtype=torch.bfloat16).view(torch.int16).numpy(),
                         torch.zeros(rows, 64))
    assert c is None or gemv.SPACE_MM.fits(c, level), c
    c = gemm_bf16.rows_config(rows, 576, 576)
    assert c is None or gemm_bf16.SPACE_ROWS.fits(c, level), c


@pytest.mark.parametrize("name", TILED)
@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_every_default_fits_its_level(name, level):
    kernel, space = TILED[name]
    assert space.regs is not None, f"{name}: its space does not say how many registers a tile needs"
    cfg = space.default_config(level)
    assert space.regs(cfg) <= REGISTERS[level], (name, level, cfg)
    assert cfg in space.configs(level)


# LLVM keeps a few values of the epilogue or of the address arithmetic on the stack in some of
# these loops; a tile that does not fit spills tens to hundreds (gemm_bf16's 6 x 4 at avx2: 201)
MAX_SPILLS = 8


@pytest.mark.parametrize("name", TILED)
def test_avx2_defaults_do_not_spill(name):
    if INTERPRET:
        pytest.skip("interpret mode generates no machine code")
    if pk.target().level != "avx2":
        pytest.skip(f"compiles for 16 ymm only at ISA level avx2 (this run: {pk.target().level})")
    kernel, space = TILED[name]
    rep = kernel.asm(space.default_config("avx2"))
    assert rep.zmm_registers == 0 and rep.inner_spills <= MAX_SPILLS, rep.summary()
