"""Calling kernels: torch and NumPy inputs without copies, and errors that name the argument."""
import numpy as np
import pytest
import torch

import pacekern as pk
from pacekern_ops.gemm_f32 import gemm_f32, pack
from pacekern_ops.gemv import gemv_bf16

CFG = pk.Config.of(MR=4, NV=4, KC=128, MT=12)


def test_outputs_are_written_in_place_and_returned():
    x, w = torch.randn(5, 8), torch.randn(8, 20)
    y = torch.zeros(5, 20)
    ptr = y.data_ptr()
    out = gemm_f32(x, pack(w), y, config=CFG)
    assert out is y and y.data_ptr() == ptr
    torch.testing.assert_close(y, x @ w)


def test_numpy_arrays_and_bf16_views():
    x = np.random.rand(3, 32).astype(np.float32)
    w = torch.randn(10, 32).bfloat16()
    y = np.zeros((3, 10), np.float32)
    gemv_bf16(x, w.view(torch.int16).numpy(), y)             # bf16 as int16 bits in NumPy
    np.testing.assert_allclose(y, x @ w.float().numpy().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (lambda x, wp, y: (x.double(), wp, y), "argument 'x' must have dtype f32 \\(float32\\), got torch.float64"),
    (lambda x, wp, y: (x.t().contiguous().t(), wp, y), "argument 'x' is not contiguous"),
    (lambda x, wp, y: (x, wp, y[:, :-16].contiguous()), "argument 'wp' has shape \\(3, 8, 16\\); dimension 0 should be"),
    (lambda x, wp, y: (x[:, :-1].contiguous(), wp, y), "K=7 from argument 'x'"),
    (lambda x, wp, y: (x[0], wp, y), "argument 'x' must have 2 dimensions"),
    (lambda x, wp, y: (x, wp), "takes 3 arguments"),
    (lambda x, wp, y: (x.tolist(), wp, y), "argument 'x' must be a torch.Tensor or numpy.ndarray, got list"),
])
def test_bad_arguments_are_named(bad, match):
    x, wp, y = torch.randn(4, 8), pack(torch.randn(8, 40)), torch.empty(4, 40)
    with pytest.raises(pk.PkArgError, match=match):
        gemm_f32(*bad(x, wp, y), config=CFG)


def test_bad_config_is_a_compile_error():
    with pytest.raises(pk.CompileError, match="does not match its tile parameters"):
        gemm_f32(torch.randn(4, 8), pack(torch.randn(8, 16)), torch.empty(4, 16), config=pk.Config.of(MR=4))


def test_check_reports_first_mismatch():
    from pacekern.check import compare
    got, want = torch.zeros(3, 4), torch.zeros(3, 4)
    want[1, 2] = 1.0
    r = compare("k.y", got, want, "f32")
    assert not r.ok and "first at (1, 2): got 0, want 1" in r.message


def test_prepared_call_reuses_buffers():
    x, w, y = torch.randn(2, 32), torch.randn(24, 32).bfloat16(), torch.empty(2, 24)
    call = gemv_bf16.prepare(x, w, y)
    call()
    torch.testing.assert_close(y, x @ w.float().t(), rtol=1e-5, atol=1e-5)
    x.mul_(-2)                                                  # new contents, same buffer
    call()
    torch.testing.assert_close(y, x @ w.float().t(), rtol=1e-5, atol=1e-5)
