"""Each vector op, computed by a tiny pacekern kernel and by NumPy/PyTorch."""
import numpy as np
import pytest
import torch

import pacekern as pk

N = pk.dims("N")


@pk.kernel
def vexp(x: pk.f32[N], y: pk.Out[pk.f32[N]]):
    for i in range(0, N, 16):
        pk.store(y[i], pk.exp(pk.f32x16.load(x[i], n=N - i)), n=N - i)


def test_exp_accuracy_and_specials():
    x = torch.cat([torch.linspace(-87, 88, 4001), torch.tensor([-float("inf"), float("nan"), -200.0, 0.0])])
    y = torch.empty_like(x)
    vexp(x, y)
    ref = torch.exp(x.double())
    finite = torch.isfinite(ref) & (ref > 1e-37)
    rel = ((y.double() - ref).abs() / ref)[finite]
    assert rel.max() < 5e-7                                       # polynomial, not libm, but ~2 ulp
    assert y[-4] == 0 and torch.isnan(y[-3]) and y[-2] == 0 and y[-1] == 1


@pk.kernel
def to_bf16(x: pk.f32[N], y: pk.Out[pk.bf16[N]]):
    for i in range(0, N, 16):
        pk.store_bf16(y[i], pk.f32x16.load(x[i]))


def test_bf16_rounding_matches_torch():
    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    x[:8] = torch.tensor([1.00390625, 1.01171875, -1.00390625, 65504.0, 3.3895314e38, 1e-40, 0.0, -0.0])  # ties, big, denormal
    y = torch.empty(4096, dtype=torch.bfloat16)
    to_bf16(x, y)
    assert torch.equal(y.view(torch.int16), x.bfloat16().view(torch.int16))


@pk.kernel
def dot4(a: pk.u8[N], b: pk.s8[N], y: pk.Out[pk.i32[16]]):
    acc = pk.i32x16.zeros()
    for k in range(0, N, 64):
        acc = pk.dot4_u8s8(acc, pk.u8x64.load(a[k]), pk.s8x64.load(b[k]))
    pk.store(y[0], acc)


@pytest.mark.parametrize("case", ["random", "extremes"])
def test_dot4_u8s8_is_exact(case):
    n = 64 * 9
    if case == "random":
        a = torch.randint(0, 256, (n,), dtype=torch.uint8)
        b = torch.randint(-128, 128, (n,), dtype=torch.int8)
    else:      # 255 * -128 * 4 per lane: would saturate a pmaddubsw emulation; vpdpbusd must not
        a = torch.full((n,), 255, dtype=torch.uint8)
        b = torch.full((n,), -128, dtype=torch.int8)
    y = torch.empty(16, dtype=torch.int32)
    dot4(a, b, y)
    ref = (a.long() * b.long()).view(-1, 16, 4).sum(dim=(0, 2))
    assert torch.equal(y.long(), ref)


@pk.kernel
def dot2(a: pk.bf16[N], b: pk.bf16[N], y: pk.Out[pk.f32[16]]):
    acc = pk.f32x16.zeros()
    for k in range(0, N, 32):
        acc = pk.dot2_bf16(acc, pk.bf16x32.load(a[k]), pk.bf16x32.load(b[k]))
    pk.store(y[0], acc)


def test_dot2_bf16():
    a, b = torch.randn(320).bfloat16(), torch.randn(320).bfloat16()
    y = torch.empty(16)
    dot2(a, b, y)
    ref = (a.double() * b.double()).view(-1, 16, 2).sum(dim=(0, 2))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pk.kernel
def reduce_ops(x: pk.f32[16], y: pk.Out[pk.f32[8]], z: pk.Out[pk.i32[16]]):
    v = pk.f32x16.load(x[0])
    y[0] = pk.hsum(v)
    y[1] = pk.hmax(v)
    y[2] = pk.hmin(v)
    y[3] = pk.hsum(pk.max(v, -v))
    y[4] = pk.hsum(pk.sqrt(v * v))
    y[5] = pk.hsum(v / 2.0 - 1.0)
    pk.store(z[0], pk.to_i32(v * 10.0))


def test_reductions_and_arithmetic():
    x = torch.randn(16)
    y, z = torch.empty(8), torch.empty(16, dtype=torch.int32)
    reduce_ops(x, y, z)
    torch.testing.assert_close(y[:6], torch.stack([x.sum(), x.max(), x.min(), x.abs().sum(), x.abs().sum(), (x / 2 - 1).sum()]))
    assert torch.equal(z, torch.round(x * 10).int())                # round half to even, like torch


@pk.kernel
def masked_copy(x: pk.f32[N], y: pk.Out[pk.f32[N]], n: pk.i64):
    pk.store(y[0], pk.f32x16.load(x[0], n=n), n=n)


@pytest.mark.parametrize("n", [0, 1, 15, 16])
def test_masked_tail_touches_only_n_lanes(n):
    x = torch.arange(16.0)
    y = torch.full((16,), -1.0)
    masked_copy(x, y, n)
    assert torch.equal(y[:n], x[:n]) and torch.all(y[n:] == -1)


@pk.kernel
def bf16_tail(x: pk.f32[N], y: pk.Out[pk.bf16[N]], z: pk.Out[pk.f32[16]]):
    for i in range(0, N, 16):
        pk.store_bf16(y[i], pk.f32x16.load(x[i], n=N - i), n=N - i)
    pk.store(z[0], pk.f32x16.load(x[0], n=min(N, 3)))            # lanes from n on read 0


def test_store_bf16_masked_tail():
    x = torch.randn(64)
    for n in (1, 15, 16, 21):
        buf = torch.full((n + 16,), 7.0).bfloat16()                  # a guard tail that must stay 7
        z = torch.full((16,), -1.0)
        bf16_tail(x[:n], buf[:n], z)
        assert torch.equal(buf[:n], x[:n].bfloat16()) and torch.all(buf[n:] == 7.0)
        m = min(n, 3)
        assert torch.equal(z[:m], x[:m]) and torch.all(z[m:] == 0)


@pk.kernel
def scalar_math(x: pk.f32[16], y: pk.Out[pk.f32[16]], z: pk.Out[pk.f32[4]]):
    pk.store(y[0], pk.exp(pk.f32x16.load(x[0])))
    z[0] = pk.exp(x[3])
    z[1] = pk.sqrt(x[3] * x[3] + 1.0)
    z[2] = 1.0 / pk.sqrt(pk.exp(x[5]))


def test_scalar_exp_and_sqrt():
    """pk.exp / pk.sqrt on scalars; a scalar exp gives the bits of the same vector lane."""
    x = torch.randn(16)
    y, z = torch.empty(16), torch.zeros(4)
    scalar_math(x, y, z)
    assert z[0] == y[3]
    torch.testing.assert_close(z[:3], torch.stack([x[3].exp(), (x[3] ** 2 + 1).sqrt(), (-x[5] / 2).exp()]),
                               rtol=1e-6, atol=0)


@pk.kernel
def widen(wb: pk.bf16[N], ws: pk.s8[N], y: pk.Out[pk.f32[N]], z: pk.Out[pk.f32[N]]):
    for i in range(0, N, 16):
        pk.store(y[i], pk.f32x16.load_bf16(wb[i], n=N - i), n=N - i)
        pk.store(z[i], pk.f32x16.load_s8(ws[i], n=N - i), n=N - i)


def test_widening_loads():
    wb, ws = torch.randn(40).bfloat16(), torch.randint(-128, 128, (40,), dtype=torch.int8)
    y, z = torch.empty(40), torch.empty(40)
    widen(wb, ws, y, z)
    assert torch.equal(y, wb.float()) and torch.equal(z, ws.float())


def test_lowering_table_gates_isa_specific_ops():
    from pacekern.isa import lower
    assert lower("dot4_u8s8", "generic") == "dot4_u8s8_generic"
    assert lower("dot4_u8s8", "avx2") == "dot4_u8s8_avx2"
    assert lower("dot4_u8s8", "avx512") == "dot4_u8s8_avx512"
    assert lower("dot4_u8s8", "avx512_vnni_bf16") == "dot4_u8s8_vnni"
    assert lower("dot4_u8s8", "amx") == "dot4_u8s8_vnni"            # falls back to the highest lower entry
    assert lower("amx_dot_bf16", "avx512_vnni_bf16") is None
    assert "vpdpbusd" not in dot4.source(level="avx2") and "dot4_u8s8_avx2" in dot4.source(level="avx2")
