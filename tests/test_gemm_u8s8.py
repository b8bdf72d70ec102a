"""Quantized linear (u8 x s8 -> i32 -> requantized u8 / f32): VNNI and AMX kernels, packing, the
public quantized_linear, cross-checks against PyTorch's own quantized ops, and the machine code.

Runs in every mode: PACEKERN_INTERPRET=1 (tiny shapes), PACEKERN_ISA=avx2 (the VNNI kernel through
its generic lowering; AMX tests skip), and natively (AMX tests only at ISA level amx).
"""
import re

import pytest
import torch

import pacekern as pk
from pacekern import env
from pacekern.isa import LEVELS
from conftest import assert_vnni_inner_loop
from pacekern_ops import gemm_u8s8 as g

INTERP = env.flag("PACEKERN_INTERPRET")
LEVEL = pk.target().level
HAS_AMX = LEVEL == "amx"
needs_amx = pytest.mark.skipif(not HAS_AMX, reason=f"AMX kernels compile only at ISA level amx (this run: {LEVEL})")

SHAPES = [(1, 16, 64), (7, 37, 64), (33, 100, 128), (64, 64, 256)]          # (M, N, K)
SHAPES_INTERP = [(1, 16, 64), (7, 37, 64), (17, 20, 72)]
SHAPES_USED = SHAPES_INTERP if INTERP else SHAPES

# torch warns that its quantized tensor types are deprecated (the ops cross-checked here still work)
pytestmark = pytest.mark.filterwarnings("ignore:.*quantize.*deprecated:UserWarning")


# ---------------------------------------------------------------------------------------------
# problem generation

def exact_acc(x_u8, w_s8, zp_x):
    """int64 reference accumulator: x @ w - zp_x * colsum(w)."""
    return x_u8.long() @ w_s8.long() - int(zp_x) * w_s8.long().sum(0)


def make_case(m, n, k, seed=0, x_max=255):
    """Random quantized problem whose requantized output spans [0, 255] (not all saturated);
    activations in [0, x_max]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, x_max + 1, (m, k), dtype=torch.uint8, generator=gen)
    w = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
    scale_x, zp_x = 0.02, int(torch.randint(0, 256, (1,), generator=gen))
    scale_w = torch.rand(n, generator=gen) * 0.01 + 0.002
    bias = torch.randn(n, generator=gen)
    yf = exact_acc(x, w, zp_x).double() * (scale_x * scale_w.double()) + bias.double()
    lo, hi = float(yf.min()), float(yf.max())
    scale_y = max(hi - min(lo, 0.0), 1e-3) / 230.0
    zp_y = int(round(-min(lo, 0.0) / scale_y)) + 10
    return dict(x=x, w=w, scale_x=scale_x, zp_x=zp_x, scale_w=scale_w, bias=bias, scale_y=scale_y, zp_y=min(zp_y, 255))


def kernel_args(c, relu=False, out_u8=True):
    """The kernels' positional arguments before the scratch/output."""
    p = g.pack(c["w"], c["scale_w"])
    factors = g.epilogue_factors(c["scale_w"], c["bias"], c["scale_x"], c["scale_y"] if out_u8 else None)
    return p, (c["x"].view(torch.int32), p.wp, p.colsum, *factors, c["zp_x"], c["zp_y"], int(relu))


def torch_requant(yf, scale_y, zp_y, relu):
    """PyTorch's definition: clamp(round(y_f / scale_y) + zp_y, 0, 255) (relu on y_f first)."""
    if relu:
        yf = yf.clamp_min(0)
    return torch.clamp(torch.round(yf / scale_y) + zp_y, 0, 255).to(torch.uint8)


def assert_u8_close(got, want, tol=1):
    d = (got.int() - want.int()).abs()
    assert int(d.max()) <= tol, f"max |diff| {int(d.max())} at {tuple(int(i) for i in (d == d.max()).nonzero()[0])}"


# ---------------------------------------------------------------------------------------------
# packing

def test_pack_layout():
    gen = torch.Generator().manual_seed(1)
    k, n = 37, 21
    w = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
    p = g.pack(w, 0.5)
    assert p.wp.shape == (2, 10, 64) and p.wp.dtype == torch.int8
    for (kk, nn) in [(0, 0), (5, 17), (36, 20), (12, 3)]:                    # wp[p, k4, 4 l + j] = w[4 k4 + j, 16 p + l]
        assert int(p.wp[nn // 16, kk // 4, 4 * (nn % 16) + kk % 4]) == int(w[kk, nn])
    assert torch.equal(g.unpack(p.wp, n)[:k], w) and not g.unpack(p.wp, n)[k:].any()
    assert not p.wp[1, :, 4 * 5:].any()                                      # columns 21..31 are padding
    assert torch.equal(p.colsum, w.int().sum(0)) and torch.equal(p.scale_w, torch.full((n,), 0.5))


# ---------------------------------------------------------------------------------------------
# kernels against their references (pk.check: u8 +-1, f32 rtol 1e-4)

@pytest.mark.parametrize("m,n,k", SHAPES_USED)
@pytest.mark.parametrize("relu", [False, True])
def test_vnni_u8(m, n, k, relu):
    c = make_case(m, n, k, seed=m + n + k)
    _, a = kernel_args(c, relu)
    y = torch.empty(m, n, dtype=torch.uint8)
    pk.check(g.gemm_u8s8_vnni, *a, y)
    assert int(y.max()) < 255 and len(torch.unique(y)) > min(m * n // 4, 20)          # not all saturated


@pytest.mark.parametrize("m,n,k", SHAPES_USED)
@pytest.mark.parametrize("relu", [False, True])
def test_vnni_f32(m, n, k, relu):
    c = make_case(m, n, k, seed=3 * m + n + k)
    _, a = kernel_args(c, relu, out_u8=False)
    pk.check(g.gemm_u8s8_vnni_f32, *a, torch.empty(m, n))


@pytest.mark.parametrize("cfg", [dict(MR=1, NV=4, MC=32, NS=1), dict(MR=5, NV=2, MC=32, NS=2), dict(MR=10, NV=2, MC=64, NS=1)])
def test_vnni_configs(cfg):
    m, n, k = (9, 40, 68) if INTERP else (45, 100, 132)
    c = make_case(m, n, k, seed=7)
    _, a = kernel_args(c)
    pk.check(g.gemm_u8s8_vnni, *a, torch.empty(m, n, dtype=torch.uint8), config=pk.Config.of(**cfg))


AMX_SHAPES = [(1, 16, 64), (7, 37, 64), (17, 20, 72)] if INTERP else \
    SHAPES + [(16, 32, 64), (40, 100, 1000), (150, 70, 520), (5, 33, 200)]


@needs_amx
@pytest.mark.parametrize("m,n,k", AMX_SHAPES)
@pytest.mark.parametrize("out_u8", [True, False])
def test_amx(m, n, k, out_u8):
    c = make_case(m, n, k, seed=m * n + k)
    p, a = kernel_args(c, relu=(m % 2 == 1), out_u8=out_u8)
    y = torch.empty(m, n, dtype=torch.uint8 if out_u8 else torch.float32)
    pk.check(g.gemm_u8s8_amx if out_u8 else g.gemm_u8s8_amx_f32, g.amx_config_bytes(m), *a, p.scratch(m), y)


@needs_amx
@pytest.mark.parametrize("cfg", [dict(NC=32, MC=32, KC=16), dict(NC=64, MC=64, KC=32), dict(NC=1024, MC=128, KC=256)])
def test_amx_configs(cfg):
    # several K slices through the C scratch, several row blocks, shifted last row tiles, K tail
    m, n, k = (20, 40, 136) if INTERP else (150, 100, 1000)
    c = make_case(m, n, k, seed=11)
    p, a = kernel_args(c, relu=True)
    pk.check(g.gemm_u8s8_amx, g.amx_config_bytes(m), *a, p.scratch(m), torch.empty(m, n, dtype=torch.uint8),
             config=pk.Config.of(**cfg))


# ---------------------------------------------------------------------------------------------
# adversarial extremes: nothing saturates in the i32 accumulation (x = 255, w = +-127/-128, zero points)

@pytest.mark.parametrize("backend", ["vnni", "amx"])
@pytest.mark.parametrize("zp_x", [0, 128, 255])
def test_extremes_exact_accumulator(backend, zp_x):
    if backend == "amx" and not HAS_AMX:
        pytest.skip(f"AMX kernels compile only at ISA level amx (this run: {LEVEL})")
    m, n, k = (16, 48, 64) if INTERP else (32, 64, 1024)
    x = torch.full((m, k), 255, dtype=torch.uint8)
    x[1::3] = 0                                                              # some rows all zero (pure compensation)
    x[2::5, ::2] = 254
    w = torch.empty(k, n, dtype=torch.int8)
    w[:, 0::4] = 127
    w[:, 1::4] = -128
    w[:, 2::4] = torch.tensor([127, -128], dtype=torch.int8).repeat(k // 2)[:, None]
    w[:, 3::4] = torch.tensor([-128, -128, 127, 127], dtype=torch.int8).repeat(k // 4)[:, None]
    p = g.pack(w, 1.0)
    # f32 output with unit scales is the accumulator itself: up to 255 * 128 * 1024 in magnitude, but
    # with at most 16 significant bits here, so exact in f32
    y = g.quantized_linear(x, 1.0, zp_x, p, backend=backend)
    want = exact_acc(x, w, zp_x)
    assert int(want.abs().max()) > 2 ** 16                                   # far beyond int16 partial sums
    assert torch.equal(y.double(), want.double()), (y.double() - want.double()).abs().max()
    # requantized: saturates at both ends of u8, exactly
    sy = float(want.abs().max()) / 300
    yq = g.quantized_linear(x, 1.0, zp_x, p, scale_y=sy, zp_y=128, backend=backend)
    assert_u8_close(yq, torch_requant(want.double(), sy, 128, False))
    assert (yq == 0).any() and (yq == 255).any()
    yq = g.quantized_linear(x, 1.0, zp_x, p, scale_y=1.0, zp_y=7, relu=True, backend=backend)
    assert torch.equal(yq, torch_requant(want.double(), 1.0, 7, True))


# ---------------------------------------------------------------------------------------------
# public entry point against an exact int64 reference with PyTorch's rounding (division by scale_y)

@pytest.mark.parametrize("m,n,k", SHAPES_USED)
@pytest.mark.parametrize("relu", [False, True])
def test_quantized_linear(m, n, k, relu):
    c = make_case(m, n, k, seed=5 * m + k)
    p = g.pack(c["w"], c["scale_w"])
    yf_ref = exact_acc(c["x"], c["w"], c["zp_x"]).double() * (c["scale_x"] * c["scale_w"].double()) + c["bias"].double()
    yf = g.quantized_linear(c["x"], c["scale_x"], c["zp_x"], p, c["bias"], relu=relu)
    assert yf.dtype == torch.float32 and yf.shape == (m, n)
    want = yf_ref.clamp_min(0) if relu else yf_ref
    assert float((yf.double() - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-6
    yq = g.quantized_linear(c["x"], c["scale_x"], c["zp_x"], p, c["bias"], scale_y=c["scale_y"], zp_y=c["zp_y"], relu=relu)
    assert yq.dtype == torch.uint8
    assert_u8_close(yq, torch_requant(yf_ref, c["scale_y"], c["zp_y"], relu))


@pytest.mark.parametrize("m", [2, 3, 5, 6])
def test_quantized_linear_small_m(m):
    # decode-like M below the default register tile: quantized_linear picks a config with MR <= M
    n, k = 40, 68
    c = make_case(m, n, k, seed=m)
    p = g.pack(c["w"], c["scale_w"])
    cfg = g.small_m_config(g.gemm_u8s8_vnni, m, n, k // 4)
    assert cfg is None or cfg.MR <= m
    yq = g.quantized_linear(c["x"], c["scale_x"], c["zp_x"], p, c["bias"], scale_y=c["scale_y"], zp_y=c["zp_y"])
    yf_ref = exact_acc(c["x"], c["w"], c["zp_x"]).double() * (c["scale_x"] * c["scale_w"].double()) + c["bias"].double()
    assert_u8_close(yq, torch_requant(yf_ref, c["scale_y"], c["zp_y"], False))


def test_quantized_linear_api():
    m, k, n = (3, 37, 20)                                                    # K not a multiple of 4: padded
    c = make_case(m, n, k, seed=2)
    p = g.pack(c["w"], c["scale_w"])
    x3 = c["x"].view(1, m, k)
    y = g.quantized_linear(x3, c["scale_x"], c["zp_x"], p)                   # no bias, 3-D input
    want = exact_acc(c["x"], c["w"], c["zp_x"]).double() * (c["scale_x"] * c["scale_w"].double())
    assert y.shape == (1, m, n)
    assert float((y[0].double() - want).abs().max()) <= 1e-4 * float(want.abs().max())
    out = torch.empty(m, n, dtype=torch.uint8)
    r = g.quantized_linear(c["x"], c["scale_x"], c["zp_x"], p, scale_y=0.1, zp_y=3, out=out)
    assert r.data_ptr() == out.data_ptr()
    with pytest.raises(ValueError):
        g.quantized_linear(c["x"][:, :8], c["scale_x"], c["zp_x"], p)
    with pytest.raises(TypeError):
        g.quantized_linear(c["x"].to(torch.int8), c["scale_x"], c["zp_x"], p)
    assert not g.use_amx(15, 1024) and not g.use_amx(64, 32)
    assert g.use_amx(64, 1024) == HAS_AMX


@needs_amx
def test_backends_agree():
    m, n, k = (17, 20, 128) if INTERP else (96, 200, 640)
    c = make_case(m, n, k, seed=4)
    p = g.pack(c["w"], c["scale_w"])
    kw = dict(scale_y=c["scale_y"], zp_y=c["zp_y"], relu=True)
    a = g.quantized_linear(c["x"], c["scale_x"], c["zp_x"], p, c["bias"], backend="amx", **kw)
    b = g.quantized_linear(c["x"], c["scale_x"], c["zp_x"], p, c["bias"], backend="vnni", **kw)
    assert torch.equal(a, b)                                                 # same epilogue, same rounding


# ---------------------------------------------------------------------------------------------
# cross-checks against PyTorch's quantized ops (fbgemm/onednn), same quantized inputs. Without VNNI
# PyTorch's pair sums saturate at int16 (g.torch_int8_saturates), so there it is a reference only
# for 7-bit activations, the range its own recipe (reduce_range) uses on such CPUs.

TORCH_X_MAX = 127 if g.torch_int8_saturates() else 255

def _torch_packed(c):
    n = c["w"].shape[1]
    qw = torch._make_per_channel_quantized_tensor(c["w"].t().contiguous(), c["scale_w"].double(),
                                                  torch.zeros(n, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, c["bias"])


@pytest.mark.parametrize("m,n,k", [(7, 37, 64), (33, 100, 128), (300, 256, 512)])
@pytest.mark.parametrize("relu", [False, True])
def test_vs_torch_static_quantized_linear(m, n, k, relu):
    """torch.ops.quantized.linear(_relu) (static, u8 out): the same codes, bit for bit (the
    epilogue does fbgemm's float operations in fbgemm's order), on the VNNI and AMX paths."""
    c = make_case(m, n, k, seed=21, x_max=TORCH_X_MAX)
    c["zp_x"] = min(c["zp_x"], TORCH_X_MAX)
    qx = torch._make_per_tensor_quantized_tensor(c["x"], c["scale_x"], c["zp_x"])
    op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
    want = op(qx, _torch_packed(c), c["scale_y"], c["zp_y"]).int_repr()
    for backend in ["vnni", "amx"] if pk.target().level == "amx" else ["vnni"]:
        got = g.quantized_linear(c["x"], c["scale_x"], c["zp_x"], g.pack(c["w"], c["scale_w"]), c["bias"],
                                 scale_y=c["scale_y"], zp_y=c["zp_y"], relu=relu, backend=backend)
        assert torch.equal(got, want), f"{backend}: {int((got != want).sum())} codes differ"


@pytest.mark.parametrize("m,n,k", [(7, 37, 64), (33, 100, 128)])
def test_vs_torch_dynamic_quantized_linear(m, n, k):
    """torch.ops.quantized.linear_dynamic (f32 out) on x_f = (x_u8 - zp_x) scale_x: with 0 and
    x_max present in x_u8 (255, or 127 with reduce_range where PyTorch saturates), torch's dynamic
    min/max quantization recovers exactly scale_x, zp_x and x_u8, so the outputs differ only by
    float rounding: rtol 1e-5 of max |y|."""
    c = make_case(m, n, k, seed=22, x_max=TORCH_X_MAX)
    c["x"][0, 0], c["x"][0, 1] = 0, TORCH_X_MAX
    c["zp_x"] = 97
    xf = (c["x"].float() - c["zp_x"]) * c["scale_x"]
    want = torch.ops.quantized.linear_dynamic(xf, _torch_packed(c), TORCH_X_MAX == 127)
    got = g.quantized_linear(c["x"], c["scale_x"], c["zp_x"], g.pack(c["w"], c["scale_w"]), c["bias"])
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_torch_saturation_probe():
    """Full-range activations: pacekern equals the exact int64 result at every ISA level; PyTorch
    does exactly when the probe says it does not saturate."""
    m, n, k = 7, 37, 64
    c = make_case(m, n, k, seed=23)
    c.update(scale_x=1.0, zp_x=0, scale_w=torch.ones(n), bias=torch.zeros(n))   # codes = round(acc / 1024) + 128 (exact in f32)
    c["x"][:, :2], c["w"][:2, :] = 255, 127                                     # pair sums of 64770 everywhere
    want = torch_requant(exact_acc(c["x"], c["w"], 0).double(), 1024.0, 128, False)
    got = g.quantized_linear(c["x"], 1.0, 0, g.pack(c["w"], c["scale_w"]), c["bias"], scale_y=1024.0, zp_y=128)
    qx = torch._make_per_tensor_quantized_tensor(c["x"], 1.0, 0)
    theirs = torch.ops.quantized.linear(qx, _torch_packed(c), 1024.0, 128).int_repr()
    assert torch.equal(got, want)
    assert torch.equal(theirs, want) != g.torch_int8_saturates()


# ---------------------------------------------------------------------------------------------
# machine code

def _loop_with(report, mnemonic):
    loops = [l for l in report.inner_loops if mnemonic in l]
    assert loops, f"no inner loop contains {mnemonic}: {report.summary()}"
    return loops[0]


def test_asm():
    if INTERP:
        pytest.skip("interpret mode generates no machine code")
    if LEVELS.index(LEVEL) < LEVELS.index("avx512"):
        pytest.skip(f"no zmm registers below avx512 (this run: {LEVEL})")
    rep = g.gemm_u8s8_vnni.asm()
    if LEVELS.index(LEVEL) < LEVELS.index("avx512_vnni_bf16"):
        assert "vpdpbusd" not in rep.text                                    # generic lowering: no VNNI instruction
        return
    cfg = g.VNNI_SPACE.default_config()
    assert_vnni_inner_loop(g.gemm_u8s8_vnni, cfg.MR * cfg.NV)
    if HAS_AMX:
        rep = g.gemm_u8s8_amx.asm()
        loop = _loop_with(rep, "tdpbusd")
        assert len(re.findall(r"\btdpbusd\b", loop)) % 4 == 0 and "tileloadd" in loop
