"""bf16 GEMM (f32 out): weight packing, the AVX512-BF16 and AMX kernels against torch over M/N/K
tails and configs, the public gemm_bf16 dispatch, and the machine code.

Runs in every mode: PACEKERN_INTERPRET=1 (tiny shapes; AMX emulated), PACEKERN_ISA=avx2 (dot2_bf16
through its generic lowering; AMX tests skip) and natively (AMX tests only at ISA level amx).

Tolerances: both references accumulate the exact bf16 products in float64 (every product of two bf16
is exact in f32), so the only difference from the kernels is f32 rounding of the running sums in a
different order; pk.check's default f32 tolerance (rtol 1e-4, atol 2e-5 x max|want|) covers that
for these K. Comparisons against torch's own f32 matmul (`x.float() @ w.float()`, another summation
order) pass rtol/atol explicitly, scaled with sqrt(K) like test_gemm_f32.
"""
import pytest
import torch

import pacekern as pk
from conftest import INTERPRET, needs_compiled_avx512
from pacekern_ops import gemm_bf16 as g

LEVEL = pk.target().level
HAS_AMX = LEVEL == "amx"
needs_amx = pytest.mark.skipif(not HAS_AMX, reason=f"AMX kernels compile only at ISA level amx (this run: {LEVEL})")

# (M, N, K): M tails of 1 / <=16 / >16 rows past a 32-row block, N tails inside and past a 16-column
# panel, K multiples of 32 (the AMX kernel's requirement)
SHAPES = [(1, 16, 32), (7, 37, 64), (33, 100, 96), (64, 64, 128), (50, 50, 64), (20, 24, 32)]
SHAPES_INTERP = [(1, 16, 32), (7, 37, 64), (20, 24, 32)]
SHAPES_USED = SHAPES_INTERP if INTERPRET else SHAPES

AVX512_CONFIGS = [pk.Config.of(MR=6, NV=4, KC=128, MC=96), pk.Config.of(MR=7, NV=2, KC=16, MC=14),
                  pk.Config.of(MR=12, NV=1, KC=64, MC=48)]
# small blocks so that the test shapes cross block, K-slice (C reloaded from y) and tail boundaries
AMX_CONFIGS = [pk.Config.of(MB=256, NB=256, KC=512), pk.Config.of(MB=32, NB=32, KC=32),
               pk.Config.of(MB=64, NB=64, KC=64)]


def make(m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(k, n, generator=gen).bfloat16()
    return x, w


def torch_ref(x, w):
    return x.float() @ w.float()


def assert_close_f32(got, want, k):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(k, 1) ** 0.5)


# ---------------------------------------------------------------------------------------------
# packing

@pytest.mark.parametrize("k,n", [(32, 16), (37, 21), (1, 1), (64, 100)])
def test_pack_roundtrip_and_layout(k, n):
    _, w = make(1, n, k)
    wp = g.pack(w)
    assert wp.shape == (-(-n // 16), -(-k // 2), 32) and wp.dtype == torch.bfloat16 and wp.is_contiguous()
    assert torch.equal(g.unpack(wp, n, k), w)
    # wp[p, k2, 2 l + e] = w[2 k2 + e, 16 p + l], zero padded
    for kk in range(k):
        for c in range(n):
            assert wp[c // 16, kk // 2, 2 * (c % 16) + kk % 2] == w[kk, c]
    full = g.unpack(wp, 16 * wp.shape[0])
    assert not full[k:].any() and not full[:, n:].any()


def test_amx_configs():
    c = g.amx_configs(50, 37)        # M tail 18 rows (16 + 2), N tail 5 columns
    assert c.shape == (4, 64) and (c[:, 0] == 1).all()
    colsb, rows = c[:, 16:48].view("u2"), c[:, 48:64]
    assert list(rows[0, :8]) == [16] * 8 and list(colsb[0, :8]) == [64] * 8
    assert list(rows[2, :6]) == [16, 16, 2, 2, 16, 2]                 # M tail: C1*, A1 have 2 rows
    assert list(colsb[1, :4]) == [20] * 4 and list(colsb[1, 6:8]) == [20, 20]   # N tail <= 16: both halves 5 columns
    assert list(colsb[3, :4]) == [20] * 4 and list(rows[3, :4]) == [16, 16, 2, 2]


# ---------------------------------------------------------------------------------------------
# the AVX512-BF16 (dot2) kernel: runs at every ISA level

@pytest.mark.parametrize("cfg", AVX512_CONFIGS[:2] if INTERPRET else AVX512_CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES_USED)
def test_avx512_kernel_matches_torch(m, n, k, cfg):
    x, w = make(m, n, k)
    y = torch.full((m, n), float("nan"))
    pk.check(g.gemm_bf16_avx512, x.view(torch.int32), g.pack(w), y, config=cfg)
    assert_close_f32(y, torch_ref(x, w), k)


@pytest.mark.parametrize("m,k", [(1, 576), (3, 64), (20, 160)])
def test_round_bf16_is_torchs_rounding(m, k):
    """x -> bf16 (nearest even; inf stays inf, NaN stays NaN) as torch's .to(torch.bfloat16), on
    one thread and on several (PAR), and through round_bf16_call (torch's copy where K % 16 != 0)."""
    x = torch.randn(m, k) * 10
    x[0, :4] = torch.tensor([float("nan"), float("-inf"), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])   # two ties
    want = x.bfloat16().float()
    for cfg in (pk.Config.of(PAR=1), pk.Config.of(PAR=1 << 62)):
        xb = torch.empty(m, k, dtype=torch.bfloat16)
        pk.check(g.round_bf16, x, xb, config=cfg)
        torch.testing.assert_close(xb.float(), want, rtol=0, atol=0, equal_nan=True)
    for kk in (k, k - 1):
        xs, xb = x[:, :kk].contiguous(), torch.empty(m, kk, dtype=torch.bfloat16)
        g.round_bf16_call(xs, xb)()
        torch.testing.assert_close(xb.float(), want[:, :kk], rtol=0, atol=0, equal_nan=True)


ROWS_CONFIGS = [pk.Config.of(MR=1, NV=2, NS=4), pk.Config.of(MR=3, NV=3, NS=1), pk.Config.of(MR=8, NV=1, NS=2)]


@pytest.mark.parametrize("cfg", ROWS_CONFIGS[:2] if INTERPRET else ROWS_CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (5, 37, 64), (9, 100, 96)] if not INTERPRET else [(1, 16, 32), (5, 37, 64)])
def test_rows_kernel_matches_torch(m, n, k, cfg):
    x, w = make(m, n, k)
    y = torch.full((m, n), float("nan"))
    pk.check(g.gemm_bf16_rows, x.view(torch.int32), g.pack(w), y, config=cfg)
    assert_close_f32(y, torch_ref(x, w), k)


def test_rows_kernel_gives_each_row_the_prefill_kernels_bits():
    """Decode (1 row), verification (several) and prefill (gemm_bf16_avx512) compute a row of y
    with the same operations in the same order: speculative decoding and batching stay exact."""
    x, w = make(12, 40, 64)
    wp = g.pack(w)
    want = torch.empty(12, 40)
    g.gemm_bf16_avx512(x.view(torch.int32), wp, want)
    for cfg in ROWS_CONFIGS:
        y = torch.empty(12, 40)
        g.gemm_bf16_rows(x.view(torch.int32), wp, y, config=cfg)
        assert torch.equal(y, want), cfg
    y1 = torch.empty(1, 40)
    g.gemm_bf16_rows(x[3:4].contiguous().view(torch.int32), wp, y1, config=ROWS_CONFIGS[0])
    assert torch.equal(y1[0], want[3])


def test_avx512_kernel_odd_k_padded():
    x, w = make(5, 20, 37)
    xp = torch.nn.functional.pad(x, (0, 1))         # pairs need an even K: one zero column
    y = torch.empty(5, 20)
    pk.check(g.gemm_bf16_avx512, xp.view(torch.int32), g.pack(w), y)
    assert_close_f32(y, torch_ref(x, w), 37)


# ---------------------------------------------------------------------------------------------
# the AMX kernel

@needs_amx
@pytest.mark.parametrize("cfg", AMX_CONFIGS[:2] if INTERPRET else AMX_CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES_USED)
def test_amx_kernel_matches_torch(m, n, k, cfg):
    x, w = make(m, n, k)
    y = torch.full((m, n), float("nan"))
    pk.check(g.gemm_bf16_amx, g.amx_configs(m, n), x, g.pack(w), y, config=cfg)
    assert_close_f32(y, torch_ref(x, w), k)


AMX_ROWS_CONFIGS = [pk.Config.of(NV=1), pk.Config.of(NV=2), pk.Config.of(NV=3)]


@needs_amx
@pytest.mark.parametrize("cfg", AMX_ROWS_CONFIGS[1:] if INTERPRET else AMX_ROWS_CONFIGS, ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (5, 48, 64)] + ([(16, 80, 576), (3, 576, 1536)] if not INTERPRET else []))
def test_amx_rows_kernel_matches_torch(m, n, k, cfg):
    x, w = make(m, n, k)
    y = torch.full((m, n), float("nan"))
    pk.check(g.gemm_bf16_amx_rows, g.amx_rows_config(m), x, g.pack(w), y, config=cfg)
    assert_close_f32(y, torch_ref(x, w), k)


@needs_amx
def test_amx_rows_kernel_gives_each_row_the_amx_prefill_kernels_bits():
    """On AMX machines decode (1 row), verification and batched decode (several) and prefill
    (gemm_bf16_amx, K sliced or not) compute a row with the same tile products in the same order."""
    x, w = make(12, 96, 128)
    wp = g.pack(w)
    want = torch.empty(12, 96)
    g.gemm_bf16_amx(g.amx_configs(12, 96), x, wp, want, config=pk.Config.of(MB=64, NB=64, KC=64))
    for cfg in AMX_ROWS_CONFIGS:
        y = torch.empty(12, 96)
        g.gemm_bf16_amx_rows(g.amx_rows_config(12), x, wp, y, config=cfg)
        assert torch.equal(y, want), cfg
    y1 = torch.empty(1, 96)
    g.gemm_bf16_amx_rows(g.amx_rows_config(1), x[3:4].contiguous(), wp, y1)
    assert torch.equal(y1[0], want[3])


def test_rows_call_picks_by_shape_not_rows():
    """1-16 rows go to AMX when the CPU has it and the shape allows it, whatever their count."""
    for n, k, amx in [(48, 64, HAS_AMX), (40, 64, False), (48, 48, False)]:
        for m in (1, 5, 16):
            x, w = make(m, n, k)
            kernel, args, _ = g.rows_call(x, g.pack(w), torch.empty(m, n))
            assert kernel is (g.gemm_bf16_amx_rows if amx else g.gemm_bf16_rows), (m, n, k)
    with pytest.raises(ValueError, match="17 rows"):
        g.amx_rows_config(17)


def test_amx_kernel_refuses_lower_levels():
    """Lowering (no compile) for a level without AMX is a CompileError, on any machine."""
    with pytest.raises(pk.CompileError, match="amx"):
        g.gemm_bf16_amx.source(level="avx512_vnni_bf16", interpret=False)


# ---------------------------------------------------------------------------------------------
# the public op

@pytest.mark.parametrize("m,n,k", SHAPES_USED + ([(3, 20, 37), (40, 33, 50)] if not INTERPRET else [(3, 5, 7)]))
def test_gemm_bf16_dispatch(m, n, k):
    x, w = make(m, n, k)
    wp = g.pack(w)
    want = torch_ref(x, w)
    assert_close_f32(g.gemm_bf16(x, wp, n=n), want, k)
    y = torch.empty(m, n)
    assert g.gemm_bf16(x, wp, y) is y
    assert_close_f32(y, want, k)
    yb = torch.empty(m, n, dtype=torch.bfloat16)          # bf16 output: the f32 result rounded
    g.gemm_bf16(x, wp, yb)
    assert torch.equal(yb, y.bfloat16())


@pytest.mark.parametrize("m,n,k", [(40, 33, 64), (3, 20, 37)])
def test_prepared_gemm_bf16_reruns_on_new_values(m, n, k):
    """The bound call (LLM prefill plans) equals the plain one, also after x changes in place;
    odd K takes the plain call's padding path."""
    x, w = make(m, n, k)
    wp, y = g.pack(w), torch.empty(m, n)
    call = g.prepare(x, wp, y)
    call()
    assert_close_f32(y, torch_ref(x, w), k)
    x.copy_(make(m, n, k, seed=1)[0])
    call()
    assert_close_f32(y, torch_ref(x, w), k)


def test_gemm_bf16_picks_kernel_by_level():
    assert g.use_amx(64, 64) == HAS_AMX
    assert not g.use_amx(64, 48)                           # K % 32 != 0: AVX512 kernel at every level
    assert not g.use_amx(1, 64)                            # a 1-row problem is weight-streaming


def test_gemm_bf16_rejects_mismatched_weights():
    x, w = make(4, 16, 64)
    with pytest.raises(ValueError, match="pair rows"):
        g.gemm_bf16(x, g.pack(w[:32]), n=16)


# ---------------------------------------------------------------------------------------------
# machine code

@pytest.mark.parametrize("cfg", AVX512_CONFIGS[:2], ids=str)
def test_avx512_inner_loop_uses_vdpbf16ps_without_spills(cfg):
    reason = needs_compiled_avx512()
    if reason:
        pytest.skip(reason)
    if not pk.target().has("avx512_vnni_bf16"):
        pytest.skip(f"ISA level {LEVEL} has no vdpbf16ps (dot2_bf16 lowers to generic FMAs)")
    r = g.gemm_bf16_avx512.asm(cfg)
    assert r.inner_spills == 0, r.summary()
    assert r.zmm_registers >= cfg.MR * cfg.NV + cfg.NV, r.summary()           # accumulators + B vectors
    assert r.counts.get("vdpbf16ps", 0) >= cfg.MR * cfg.NV, r.summary()


@needs_amx
def test_amx_inner_loop_is_tile_loads_and_tdpbf16ps():
    if INTERPRET:
        pytest.skip("PACEKERN_INTERPRET=1 runs NumPy emulations: there is no machine code to inspect")
    r = g.gemm_bf16_amx.asm(g.SPACE_AMX.default_config())
    assert r.counts.get("tdpb", 0) >= 4, r.summary()
    assert r.counts.get("tileloadd", 0) >= 4, r.summary()
    assert "tdpbf16ps" in r.text
