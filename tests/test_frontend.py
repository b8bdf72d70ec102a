"""The compiler's contract with the user: what parses, and errors that point at the right line."""
import pytest
import torch

import pacekern as pk

N = pk.dims("N")


def test_syntax_error_points_at_kernel_line():
    with pytest.raises(pk.PkSyntaxError) as e:
        @pk.kernel
        def bad(x: pk.f32[N]):
            with open("f"):
                pass
    msg = str(e.value)
    assert "test_frontend.py" in msg and "'With' statements are not supported" in msg and 'with open("f")' in msg


def test_unsupported_syntax_says_what_to_write_instead():
    import math
    with pytest.raises(pk.PkSyntaxError, match=r"math.sqrt\(\) cannot be called in kernels.*use pk.sqrt"):
        @pk.kernel
        def bad(x: pk.f32[N]):
            x[0] = math.sqrt(x[1])
    with pytest.raises(pk.PkSyntaxError, match=r"sum\(\) cannot be called.*accumulate in a for loop"):
        @pk.kernel
        def bad1(x: pk.f32[N]):
            x[0] = sum(x)
    with pytest.raises(pk.PkSyntaxError, match="'ListComp' expressions are not supported in kernels; write a for loop"):
        @pk.kernel
        def bad2(x: pk.f32[N]):
            v = [x[i] for i in range(4)]
    with pytest.raises(pk.PkSyntaxError, match="'Lambda' expressions .*@pk.func"):
        @pk.kernel
        def bad3(x: pk.f32[N]):
            f = lambda v: v
            x[0] = 1.0


def test_undefined_name_and_bad_global():
    with pytest.raises(pk.PkSyntaxError, match="name 'nope' is not defined"):
        @pk.kernel
        def bad(x: pk.f32[N]):
            x[0] = nope
    with pytest.raises(pk.PkSyntaxError, match="only read numeric globals"):
        @pk.kernel
        def bad2(x: pk.f32[N]):
            x[0] = torch


def test_missing_annotation_and_space_mismatch():
    with pytest.raises(pk.PkSyntaxError, match="needs an annotation"):
        @pk.kernel
        def bad(x):
            pass
    with pytest.raises(pk.PkSyntaxError, match="must match the keyword-only tile parameters"):
        @pk.kernel(space=pk.Space(A=pk.choice(1, 2)))
        def bad2(x: pk.f32[N], *, B):
            pass


def test_kernel_without_source_file_gets_clear_error():
    ns = {"pk": pk, "N": N}
    with pytest.raises(pk.PkSyntaxError, match="defined in a .py file"):
        exec("@pk.kernel\ndef k(x: pk.f32[N]):\n    x[0] = 1.0\n", ns)


def test_tile_index_must_be_constant_and_in_bounds():
    @pk.kernel
    def dyn(x: pk.f32[N]):
        acc = pk.tile(pk.f32x16, 2)
        for i in range(2):
            acc[i] = pk.f32x16.load(x[0])
    with pytest.raises(pk.CompileError, match="must be a constant: loop over it with pk.unroll"):
        dyn.source()

    @pk.kernel
    def oob(x: pk.f32[N]):
        acc = pk.tile(pk.f32x16, 2)
        acc[2] = pk.f32x16.load(x[0])
    with pytest.raises(pk.CompileError, match="out of bounds"):
        oob.source()


def test_op_type_errors_name_the_problem():
    @pk.kernel
    def wrong(a: pk.u8[N], y: pk.Out[pk.f32[N]]):
        pk.store(y[0], pk.f32x16.load(a[0]))
    with pytest.raises(pk.CompileError, match="reads f32 elements but 'a' holds u8"):
        wrong.source()

    @pk.kernel
    def wrong2(y: pk.Out[pk.f32[N]]):
        pk.store(y[0], pk.fma(pk.i32x16.zeros(), pk.f32x16.zeros(), pk.f32x16.zeros()))
    with pytest.raises(pk.CompileError, match=r"pk.fma takes \(f32x16, f32x16, f32x16\)"):
        wrong2.source()


def test_register_budget_is_verified():
    @pk.kernel
    def greedy(x: pk.f32[N], y: pk.Out[pk.f32[N]]):
        acc = pk.tile(pk.f32x16, 40)
        for k in range(0, N, 16):
            for i in pk.unroll(40):
                acc[i] = acc[i] + pk.f32x16.load(x[k])
        for i in pk.unroll(40):
            pk.store(y[0], acc[i])
    with pytest.raises(pk.CompileError, match="uses 40 vector registers but this CPU has 32"):
        greedy.source(level="avx512")            # verify runs at codegen: no AVX512 machine needed


@pk.func
def _axpy(a, x, y):
    """A helper: inlined into the kernel that calls it."""
    t = a * x
    return t + y


@pk.kernel
def _uses_helper(x: pk.f32[N], y: pk.Out[pk.f32[N]], a: pk.f32):
    for i in range(0, N, 16):
        v = pk.f32x16.load(x[i], n=N - i)
        pk.store(y[i], _axpy(a, v, v), n=N - i)


def test_helpers_inline_and_scalars_broadcast():
    x = torch.randn(37)
    y = torch.empty(37)
    _uses_helper(x, y, 3.0)
    torch.testing.assert_close(y, 4 * x)
    assert "_axpy" in _uses_helper.show_ir(lowered=False)      # inlined with renamed locals


def test_ir_printer_shows_structure():
    text = _uses_helper.show_ir(lowered=False)
    assert text.startswith("kernel _uses_helper(x: f32[N], out y: f32[N], a: f32[])")
    assert "for i in range(0, N, 16):" in text


def test_dim_only_inside_an_expression_is_rejected():
    M, K = pk.dims("M K")
    with pytest.raises(pk.PkSyntaxError, match=r"dim K appears only inside the expression cdiv\(K, 2\)"):
        @pk.kernel
        def f(x2: pk.i32[M, pk.cdiv(K, 2)], y: pk.Out[pk.f32[M]]):
            for i in range(M):
                y[i] = 0.0


@pk.func
def _reverse_into(buf, x, r, n):
    """A helper that receives the caller's scratch array by name."""
    for i in range(n):
        buf[1, n - 1 - i] = x[r, i]


@pk.kernel
def _scratch_flip(x: pk.f32[N, N], y: pk.Out[pk.f32[N, N]]):
    for r in pk.prange(N):
        buf = pk.scratch(pk.f32, 2, N)            # per iteration, so per thread
        _reverse_into(buf, x, r, N)
        for i in range(0, N, 16):
            pk.store(y[r, i], pk.f32x16.load(buf[1, i], n=N - i) * 2.0, n=N - i)


def test_scratch_arrays_are_local_to_each_parallel_iteration():
    x = torch.randn(200, 200)
    y = torch.empty(200, 200)
    _scratch_flip(x, y)
    torch.testing.assert_close(y, 2 * x.flip(1))
    assert "scratch buf: f32[2, N]" in _scratch_flip.show_ir(lowered=False)
    assert "buf = np.empty(2 * _buf_s0, np.float32)" in _scratch_flip.source()


def test_scratch_needs_a_dtype_and_a_fresh_name():
    with pytest.raises(pk.PkSyntaxError, match="needs an element type"):
        @pk.kernel
        def bad(x: pk.f32[N]):
            buf = pk.scratch(16)
    with pytest.raises(pk.PkSyntaxError, match="must be assigned to a new plain name"):
        @pk.kernel
        def bad2(x: pk.f32[N]):
            x = pk.scratch(pk.f32, N)
