"""Explicit SIMD vector types for Numba, and the intrinsics the DSL lowers to.

Every vector type is a Numba type whose data model is a plain LLVM vector (`<16 x float>` ...),
so a value lives in one zmm register on AVX512 and LLVM legalizes it to two ymm on AVX2.
Generic ops (load, fma, add, shuffles) are valid on every ISA level. The ISA-specific ones
(vpdpbusd, vdpbf16ps, AMX) must only be *referenced* by code generated for a level that has
them: LLVM aborts the whole process when asked to select an instruction the target lacks,
so gating happens in `LOWER` (codegen time), never with try/except.

`LOWER[op][level]` names the intrinsic that implements a DSL op at an ISA level; a level missing
from an op's row falls back to the next lower level that has one (see `lower`).
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic, models, register_model

LEVELS = ("generic", "avx2", "avx512", "avx512_vnni_bf16", "amx")  # low -> high

I1, I8, I16, I32, I64, F32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


class VecType(types.Type):
    """A SIMD vector value: `lanes` elements of `elem` ('f32', 'i32', 'u8', 's8', 'bf16', 'i16')."""

    def __init__(self, name: str, elem: str, lanes: int):
        self.elem, self.lanes = elem, lanes
        super().__init__(name=name)

    @property
    def llvm(self) -> ir.VectorType:
        return ir.VectorType(_LLVM_ELEM[self.elem], self.lanes)


_LLVM_ELEM = {"f32": F32, "i32": I32, "u8": I8, "s8": I8, "bf16": I16, "i16": I16}
_NP_ELEM = {"f32": types.float32, "i32": types.int32, "u8": types.uint8, "s8": types.int8,
            "bf16": types.int16, "i16": types.int16}

f32x16 = VecType("f32x16", "f32", 16)
i32x16 = VecType("i32x16", "i32", 16)
u8x64 = VecType("u8x64", "u8", 64)
s8x64 = VecType("s8x64", "s8", 64)
bf16x32 = VecType("bf16x32", "bf16", 32)
VECTYPES = {t.name: t for t in (f32x16, i32x16, u8x64, s8x64, bf16x32)}


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm)


# ---------------------------------------------------------------------------------------------
# helpers used inside codegen callbacks

def _elem_ptr(ctx, b, arrty, arr, idx, llty):
    """Pointer to arr[idx] (1-D C array) cast to `llty*`."""
    a = ctx.make_array(arrty)(ctx, b, arr)
    return b.bitcast(b.gep(a.data, [idx]), llty.as_pointer())


def _lane_mask(b, n, lanes):
    """<lanes x i1> with lane i set iff i < n (n is an i64 count of valid lanes). n is clamped to
    [0, lanes] so the compare can use the narrowest element type (one vpcmpb for 64 lanes)."""
    n = b.select(b.icmp_signed("<", n, ir.Constant(I64, 0)), ir.Constant(I64, 0), n)
    n = b.select(b.icmp_signed(">", n, ir.Constant(I64, lanes)), ir.Constant(I64, lanes), n)
    et = {64: I8, 32: I16}.get(lanes, I32)
    idx = ir.Constant(ir.VectorType(et, lanes), list(range(lanes)))
    nv = _splat(b, b.trunc(n, et), ir.VectorType(et, lanes))
    return b.icmp_signed("<", idx, nv)


def _splat(b, scalar, vty):
    v = b.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(I32, 0))
    return b.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(I32, vty.count), [0] * vty.count))


def _call(b, name, ret, args):
    fn = b.module.declare_intrinsic(name, fnty=ir.FunctionType(ret, [a.type for a in args]))
    return b.call(fn, args)


def _check_array(arr, elem, opname):
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype != _NP_ELEM[elem]:
        raise TypeError(f"{opname}: expected a 1-D {_NP_ELEM[elem]} array, got {arr}")


def _shuffle(b, v, idx):
    return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(I32, len(idx)), idx))


# ---------------------------------------------------------------------------------------------
# constructors, loads and stores (generic: every level)

def _make_zeros(vt):
    @intrinsic
    def zeros(typingctx):
        return vt(), lambda ctx, b, sig, args: ir.Constant(vt.llvm, None)
    return zeros


def _make_bcast(vt):
    @intrinsic
    def bcast(typingctx, x):
        def cg(ctx, b, sig, args):
            s = ctx.cast(b, args[0], sig.args[0], _NP_ELEM[vt.elem])
            return _splat(b, s, vt.llvm)
        return vt(x), cg
    return bcast


def _make_load(vt):
    @intrinsic
    def load(typingctx, arr, idx):
        _check_array(arr, vt.elem, f"{vt.name}.load")
        def cg(ctx, b, sig, args):
            return b.load(_elem_ptr(ctx, b, sig.args[0], args[0], args[1], vt.llvm), align=1)
        return vt(arr, idx), cg
    return load


def _make_load_masked(vt):
    @intrinsic
    def load_masked(typingctx, arr, idx, n):
        _check_array(arr, vt.elem, f"{vt.name}.load")
        def cg(ctx, b, sig, args):
            p = _elem_ptr(ctx, b, sig.args[0], args[0], args[1], vt.llvm)
            n64 = ctx.cast(b, args[2], sig.args[2], types.int64)
            mask = _lane_mask(b, n64, vt.lanes)
            name = f"llvm.masked.load.v{vt.lanes}{'f32' if vt.elem == 'f32' else 'i' + str(vt.llvm.element.width)}.p0"
            return _call(b, name, vt.llvm, [p, ir.Constant(I32, 1), mask, ir.Constant(vt.llvm, None)])
        return vt(arr, idx, n), cg
    return load_masked


@intrinsic
def store(typingctx, arr, idx, v):
    if not isinstance(v, VecType):
        return None
    _check_array(arr, v.elem, "store")
    def cg(ctx, b, sig, args):
        b.store(args[2], _elem_ptr(ctx, b, sig.args[0], args[0], args[1], sig.args[2].llvm), align=1)
        return ctx.get_dummy_value()
    return types.void(arr, idx, v), cg


@intrinsic
def store_masked(typingctx, arr, idx, v, n):
    if not isinstance(v, VecType):
        return None
    _check_array(arr, v.elem, "store")
    def cg(ctx, b, sig, args):
        vt = sig.args[2]
        p = _elem_ptr(ctx, b, sig.args[0], args[0], args[1], vt.llvm)
        mask = _lane_mask(b, ctx.cast(b, args[3], sig.args[3], types.int64), vt.lanes)
        name = f"llvm.masked.store.v{vt.lanes}{'f32' if vt.elem == 'f32' else 'i' + str(vt.llvm.element.width)}.p0"
        _call(b, name, ir.VoidType(), [args[2], p, ir.Constant(I32, 1), mask])
        return ctx.get_dummy_value()
    return types.void(arr, idx, v, n), cg


# scalar element access without Numba's negative-index wraparound (which costs a sar/and/add per
# access even with boundscheck off); indices in generated code are never negative.
@intrinsic
def ld(typingctx, arr, idx):
    if not isinstance(arr, types.Array):
        return None
    def cg(ctx, b, sig, args):
        a = ctx.make_array(sig.args[0])(ctx, b, args[0])
        return b.load(b.gep(a.data, [args[1]]))
    return arr.dtype(arr, idx), cg


@intrinsic
def st(typingctx, arr, idx, v):
    if not isinstance(arr, types.Array):
        return None
    def cg(ctx, b, sig, args):
        a = ctx.make_array(sig.args[0])(ctx, b, args[0])
        b.store(ctx.cast(b, args[2], sig.args[2], sig.args[0].dtype), b.gep(a.data, [args[1]]))
        return ctx.get_dummy_value()
    return types.void(arr, idx, v), cg


# f32x16 loads that widen narrower storage: 16 bf16 (int16 bits) or 16 int8 -> f32x16.
def _widen_bf16(b, v16):
    return b.bitcast(b.shl(b.zext(v16, ir.VectorType(I32, 16)), ir.Constant(ir.VectorType(I32, 16), [16] * 16)),
                     ir.VectorType(F32, 16))


def _make_widening_load(elem, masked):
    src = ir.VectorType(_LLVM_ELEM[elem], 16)
    def widen(b, v):
        return _widen_bf16(b, v) if elem == "bf16" else b.sitofp(v, f32x16.llvm)
    if not masked:
        @intrinsic
        def load_w(typingctx, arr, idx):
            _check_array(arr, elem, f"f32x16.load_{elem}")
            def cg(ctx, b, sig, args):
                return widen(b, b.load(_elem_ptr(ctx, b, sig.args[0], args[0], args[1], src), align=1))
            return f32x16(arr, idx), cg
        return load_w
    @intrinsic
    def load_w_masked(typingctx, arr, idx, n):
        _check_array(arr, elem, f"f32x16.load_{elem}")
        def cg(ctx, b, sig, args):
            p = _elem_ptr(ctx, b, sig.args[0], args[0], args[1], src)
            mask = _lane_mask(b, ctx.cast(b, args[2], sig.args[2], types.int64), 16)
            v = _call(b, f"llvm.masked.load.v16i{src.element.width}.p0", src, [p, ir.Constant(I32, 1), mask, ir.Constant(src, None)])
            return widen(b, v)
        return f32x16(arr, idx, n), cg
    return load_w_masked


# ---------------------------------------------------------------------------------------------
# arithmetic (generic)

def _binop(fop, iop):
    @intrinsic
    def op(typingctx, a, b_):
        if not (isinstance(a, VecType) and a == b_):
            return None
        def cg(ctx, b, sig, args):
            return getattr(b, fop if sig.args[0].elem == "f32" else iop)(args[0], args[1])
        return a(a, b_), cg
    return op


add, sub, mul = _binop("fadd", "add"), _binop("fsub", "sub"), _binop("fmul", "mul")
div = _binop("fdiv", "sdiv")


@intrinsic
def fma(typingctx, a, b_, c):
    if not (a == b_ == c == f32x16):
        return None
    def cg(ctx, b, sig, args):
        return _call(b, "llvm.fma.v16f32", f32x16.llvm, list(args))
    return f32x16(a, b_, c), cg


def _minmax(fname, iname):
    @intrinsic
    def op(typingctx, a, b_):
        if not (isinstance(a, VecType) and a == b_):
            return None
        def cg(ctx, b, sig, args):
            vt = sig.args[0]
            if vt.elem == "f32":
                return _call(b, f"llvm.{fname}.v16f32", vt.llvm, list(args))
            sign = "u" if vt.elem == "u8" else "s"
            return _call(b, f"llvm.{sign}{iname}.v{vt.lanes}i{vt.llvm.element.width}", vt.llvm, list(args))
        return a(a, b_), cg
    return op


# maxnum/minnum: NaN-ignoring like np.fmax; softmax inputs are finite or -inf, which both handle.
vmax, vmin = _minmax("maxnum", "max"), _minmax("minnum", "min")


@intrinsic
def neg(typingctx, a):
    if a != f32x16:
        return None
    return a(a), lambda ctx, b, sig, args: b.fneg(args[0])


def _reduce(kind):
    @intrinsic
    def red(typingctx, a):
        if a not in (f32x16, i32x16):
            return None
        ret = types.float32 if a == f32x16 else types.int32
        def cg(ctx, b, sig, args):
            v, vt = args[0], sig.args[0]
            # tree reduction by halves: deterministic order, no reassoc flag needed
            n = vt.lanes
            while n > 1:
                n //= 2
                lo, hi = _shuffle(b, v, list(range(n))), _shuffle(b, v, list(range(n, 2 * n)))
                if kind == "sum":
                    v = b.fadd(lo, hi) if vt.elem == "f32" else b.add(lo, hi)
                elif vt.elem == "f32":
                    v = _call(b, f"llvm.{'maxnum' if kind == 'max' else 'minnum'}.v{n}f32", lo.type, [lo, hi])
                else:
                    v = _call(b, f"llvm.s{kind}.v{n}i32", lo.type, [lo, hi])
            return b.extract_element(v, ir.Constant(I32, 0))
        return ret(a), cg
    return red


hsum, hmax, hmin = _reduce("sum"), _reduce("max"), _reduce("min")


@intrinsic
def sqrt(typingctx, a):
    """Square root of an f32x16, or of a scalar float (in its own precision: llvm.sqrt.f32/f64)."""
    if isinstance(a, types.Float):
        name = f"llvm.sqrt.f{a.bitwidth}"
        return a(a), lambda ctx, b, sig, args: _call(b, name, args[0].type, [args[0]])
    if a != f32x16:
        return None
    return a(a), lambda ctx, b, sig, args: _call(b, "llvm.sqrt.v16f32", f32x16.llvm, [args[0]])


@intrinsic
def cast_f32_i32(typingctx, a):
    """f32x16 -> i32x16, round to nearest even (like torch.round then int)."""
    if a != f32x16:
        return None
    def cg(ctx, b, sig, args):
        r = _call(b, "llvm.roundeven.v16f32", f32x16.llvm, [args[0]])
        return b.fptosi(r, i32x16.llvm)
    return i32x16(a), cg


@intrinsic
def cast_i32_f32(typingctx, a):
    if a != i32x16:
        return None
    return f32x16(a), lambda ctx, b, sig, args: b.sitofp(args[0], f32x16.llvm)


@intrinsic
def bitcast(typingctx, a, to):
    """Reinterpret the 64 bytes of a vector as another vector type; `to` is the type's name."""
    from numba.core.errors import RequireLiteralValue
    if not isinstance(a, VecType):
        return None
    if not isinstance(to, types.StringLiteral):
        raise RequireLiteralValue("bitcast target must be a constant type name")
    target = VECTYPES[to.literal_value]
    return target(a, to), lambda ctx, b, sig, args: b.bitcast(args[0], target.llvm)


@intrinsic
def exp(typingctx, a):
    """e**x for f32x16 by range reduction x = n*ln2 + r and a degree-6 polynomial for e**r.

    Max relative error ~2e-7 on [-87, 88]; x < -87.3 (and -inf) gives 0, x > 88.7 gives +inf,
    NaN propagates. No libm/SVML dependency, so it vectorizes on every ISA level. A scalar float
    goes through the same f32 polynomial in lane 0 (so a scalar and a vector lane agree bit for
    bit) and gives an f32.
    """
    if isinstance(a, types.Float):
        def cg_scalar(ctx, b, sig, args):
            x = args[0] if a.bitwidth == 32 else b.fptrunc(args[0], ir.FloatType())
            v = b.insert_element(ir.Constant(f32x16.llvm, None), x, ir.Constant(I32, 0))
            return b.extract_element(_exp_v16(b, v), ir.Constant(I32, 0))
        return types.float32(a), cg_scalar
    if a != f32x16:
        return None
    return f32x16(a), lambda ctx, b, sig, args: _exp_v16(b, args[0])


def _exp_v16(b, arg):
    """The body of `exp` on one <16 x float>."""
    vt = f32x16.llvm
    c = lambda x: ir.Constant(vt, [float(x)] * 16)
    x = _call(b, "llvm.minnum.v16f32", vt, [arg, c(88.7)])
    x = _call(b, "llvm.maxnum.v16f32", vt, [x, c(-87.5)])
    n = _call(b, "llvm.roundeven.v16f32", vt, [b.fmul(x, c(1.4426950408889634))])
    r = _call(b, "llvm.fma.v16f32", vt, [n, c(-0.693145751953125), x])     # ln2 split hi/lo
    r = _call(b, "llvm.fma.v16f32", vt, [n, c(-1.428606765330187e-06), r])
    p = c(1.0 / 720)
    for k in (120, 24, 6, 2, 1, 1):
        p = _call(b, "llvm.fma.v16f32", vt, [p, r, c(1.0 / k)])
    # scale by 2**n through the exponent bits; n in [-127, 128] after clamping
    ni = b.fptosi(n, ir.VectorType(I32, 16))
    e = b.shl(b.add(ni, ir.Constant(ir.VectorType(I32, 16), [127] * 16)), ir.Constant(ir.VectorType(I32, 16), [23] * 16))
    res = b.fmul(p, b.bitcast(e, vt))
    # below -87.3 the result underflows: return exactly 0 (covers -inf); keep NaN as NaN
    under = b.fcmp_ordered("<", arg, c(-87.3))
    res = b.select(under, c(0.0), res)
    over = b.fcmp_ordered(">", arg, c(88.7))
    res = b.select(over, c(float("inf")), res)
    isnan = b.fcmp_unordered("uno", arg, arg)
    return b.select(isnan, arg, res)


# ---------------------------------------------------------------------------------------------
# bf16 conversion

@intrinsic
def f32_to_bf16_bits(typingctx, a):
    """f32x16 -> 16 bf16 values in the low 256 bits of a bf16x32 (upper half zero), round to
    nearest even like torch's .to(torch.bfloat16); NaN stays a quiet NaN."""
    if a != f32x16:
        return None
    def cg(ctx, b, sig, args):
        v32 = ir.VectorType(I32, 16)
        u = b.bitcast(args[0], v32)
        k = lambda x: ir.Constant(v32, [x] * 16)
        lsb = b.and_(b.lshr(u, k(16)), k(1))
        r = b.lshr(b.add(u, b.add(k(0x7FFF), lsb)), k(16))
        isnan = b.fcmp_unordered("uno", args[0], args[0])
        r = b.select(isnan, b.or_(b.lshr(u, k(16)), k(0x40)), r)
        h = b.trunc(r, ir.VectorType(I16, 16))
        return b.shuffle_vector(h, ir.Constant(h.type, None), ir.Constant(ir.VectorType(I32, 32), list(range(32))))
    return bf16x32(a), cg


def _round_bf16_bits(b, a):
    """f32 <16 x float> -> <16 x i16> bf16 bit patterns, nearest even; NaN stays a quiet NaN."""
    v32 = ir.VectorType(I32, 16)
    u = b.bitcast(a, v32)
    k = lambda x: ir.Constant(v32, [x] * 16)
    r = b.lshr(b.add(u, b.add(k(0x7FFF), b.and_(b.lshr(u, k(16)), k(1)))), k(16))
    r = b.select(b.fcmp_unordered("uno", a, a), b.or_(b.lshr(u, k(16)), k(0x40)), r)
    return b.trunc(r, ir.VectorType(I16, 16))


@intrinsic
def store_bf16(typingctx, arr, idx, a):
    """Round f32x16 to bf16 (nearest even) and store 16 int16 bit patterns at arr[idx]."""
    _check_array(arr, "bf16", "store_bf16")
    def cg(ctx, b, sig, args):
        b.store(_round_bf16_bits(b, args[2]), _elem_ptr(ctx, b, sig.args[0], args[0], args[1], ir.VectorType(I16, 16)), align=1)
        return ctx.get_dummy_value()
    return types.void(arr, idx, f32x16), cg


@intrinsic
def store_bf16_masked(typingctx, arr, idx, a, n):
    """store_bf16 of the first n lanes only (n clamped to [0, 16]); memory past them is untouched."""
    _check_array(arr, "bf16", "store_bf16")
    def cg(ctx, b, sig, args):
        p = _elem_ptr(ctx, b, sig.args[0], args[0], args[1], ir.VectorType(I16, 16))
        mask = _lane_mask(b, ctx.cast(b, args[3], sig.args[3], types.int64), 16)
        _call(b, "llvm.masked.store.v16i16.p0", ir.VoidType(), [_round_bf16_bits(b, args[2]), p, ir.Constant(I32, 1), mask])
        return ctx.get_dummy_value()
    return types.void(arr, idx, f32x16, n), cg


# ---------------------------------------------------------------------------------------------
# dot products: VNNI / AVX512-BF16 instructions, with generic versions for lower levels

@intrinsic
def dot4_u8s8_vnni(typingctx, acc, a, b_):
    """acc[i] += sum_{j<4} a[4i+j] * b[4i+j] (u8 x s8 -> i32): vpdpbusd zmm."""
    if not (acc == i32x16 and a == u8x64 and b_ == s8x64):
        return None
    def cg(ctx, b, sig, args):
        v = ir.VectorType(I32, 16)
        return _call(b, "llvm.x86.avx512.vpdpbusd.512", v, [args[0], b.bitcast(args[1], v), b.bitcast(args[2], v)])
    return i32x16(acc, a, b_), cg


@intrinsic
def dot4_u8s8_generic(typingctx, acc, a, b_):
    """Same result as vpdpbusd, from generic IR (widen to i32, multiply, add groups of 4).
    Exact: no intermediate saturation (unlike a pmaddubsw emulation)."""
    if not (acc == i32x16 and a == u8x64 and b_ == s8x64):
        return None
    def cg(ctx, b, sig, args):
        w = ir.VectorType(I32, 64)
        p = b.mul(b.zext(args[1], w), b.sext(args[2], w))
        s = args[0]
        for j in range(4):
            s = b.add(s, _shuffle(b, p, [4 * i + j for i in range(16)]))
        return s
    return i32x16(acc, a, b_), cg


def _make_dot4_u8s8_pmaddwd(width: int):
    """dot4_u8s8 on vpmaddwd (i16 x i16 pairs -> i32, exact), `width` bits a vector (256: AVX2).

    Same result as vpdpbusd, lane for lane. Seen as 16-bit words, a's and b's bytes 2i and 2i+1
    widen in place without any shuffle: a & 0xff and a >> 8 (u8, zero-extended), (b << 8) >>s 8 and
    b >>s 8 (s8, sign-extended). vpmaddwd of the even words gives a[4i] b[4i] + a[4i+2] b[4i+2] in
    i32 lane i, of the odd words a[4i+1] b[4i+1] + a[4i+3] b[4i+3]: the two sums add to lane i of
    vpdpbusd. Each product fits i16 x i16 -> i32 exactly, so nothing saturates (vpmaddubsw, the
    one-instruction u8 x s8 idiom, saturates its pair sums at int16 and is wrong for 255 * 127 * 2).
    Per 32 bytes: 2 vpmaddwd, 5 shifts / ands, 2 adds; the a side is loop-invariant where a is a
    broadcast activation."""
    intr = {256: "llvm.x86.avx2.pmadd.wd", 512: "llvm.x86.avx512.pmaddw.d.512"}[width]
    words = width // 16

    @intrinsic
    def dot4(typingctx, acc, a, b_):
        if not (acc == i32x16 and a == u8x64 and b_ == s8x64):
            return None
        def cg(ctx, b, sig, args):
            w16 = ir.VectorType(I16, 32)
            k = lambda x: ir.Constant(w16, [x] * 32)
            ua, sb = b.bitcast(args[1], w16), b.bitcast(args[2], w16)
            pairs = [(b.and_(ua, k(0xFF)), b.ashr(b.shl(sb, k(8)), k(8))), (b.lshr(ua, k(8)), b.ashr(sb, k(8)))]
            s = args[0]
            for x, y in pairs:
                parts = [_call(b, intr, ir.VectorType(I32, words // 2),
                               [_shuffle(b, x, list(range(j, j + words))), _shuffle(b, y, list(range(j, j + words)))])
                         for j in range(0, 32, words)]
                if len(parts) == 2:
                    parts = [b.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(I32, 16), list(range(16))))]
                s = b.add(s, parts[0])
            return s
        return i32x16(acc, a, b_), cg
    return dot4


dot4_u8s8_avx2 = _make_dot4_u8s8_pmaddwd(256)
dot4_u8s8_avx512 = _make_dot4_u8s8_pmaddwd(512)


@intrinsic
def dot2_bf16_avx512bf16(typingctx, acc, a, b_):
    """acc[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1] (bf16 pairs -> f32): vdpbf16ps zmm."""
    if not (acc == f32x16 and a == bf16x32 and b_ == bf16x32):
        return None
    def cg(ctx, b, sig, args):
        v = ir.VectorType(I32, 16)
        return _call(b, "llvm.x86.avx512bf16.dpbf16ps.512", f32x16.llvm, [args[0], b.bitcast(args[1], v), b.bitcast(args[2], v)])
    return f32x16(acc, a, b_), cg


@intrinsic
def dot2_bf16_generic(typingctx, acc, a, b_):
    if not (acc == f32x16 and a == bf16x32 and b_ == bf16x32):
        return None
    def cg(ctx, b, sig, args):
        even, odd = list(range(0, 32, 2)), list(range(1, 32, 2))
        ae, ao = _widen_bf16(b, _shuffle(b, args[1], even)), _widen_bf16(b, _shuffle(b, args[1], odd))
        be, bo = _widen_bf16(b, _shuffle(b, args[2], even)), _widen_bf16(b, _shuffle(b, args[2], odd))
        s = _call(b, "llvm.fma.v16f32", f32x16.llvm, [ae, be, args[0]])
        return _call(b, "llvm.fma.v16f32", f32x16.llvm, [ao, bo, s])
    return f32x16(acc, a, b_), cg


# ---------------------------------------------------------------------------------------------
# AMX tiles (register-number intrinsics; needs arch_prctl permission, see target.py)

@intrinsic
def amx_config(typingctx, cfg, idx):
    """ldtilecfg from 64 bytes at cfg[idx] (palette, colsb[16], rows[16]); per thread."""
    def cg(ctx, b, sig, args):
        _call(b, "llvm.x86.ldtilecfg", ir.VoidType(), [_elem_ptr(ctx, b, sig.args[0], args[0], args[1], I8)])
        return ctx.get_dummy_value()
    return types.void(cfg, idx), cg


def _tile_no(v):
    return ir.Constant(I8, v)


def _literal_tiles(*ts):
    """AMX tile numbers are encoded in the instruction: ask Numba for literal argument types."""
    from numba.core.errors import RequireLiteralValue
    for t in ts:
        if not isinstance(t, types.IntegerLiteral):
            raise RequireLiteralValue("AMX tile numbers must be integer constants")


@intrinsic
def amx_zero(typingctx, t):
    _literal_tiles(t)
    def cg(ctx, b, sig, args):
        _call(b, "llvm.x86.tilezero", ir.VoidType(), [_tile_no(sig.args[0].literal_value)])
        return ctx.get_dummy_value()
    return types.void(t), cg


@intrinsic
def amx_load(typingctx, t, arr, idx, stride_bytes):
    _literal_tiles(t)
    def cg(ctx, b, sig, args):
        p = _elem_ptr(ctx, b, sig.args[1], args[1], args[2], I8)
        s = ctx.cast(b, args[3], sig.args[3], types.int64)
        _call(b, "llvm.x86.tileloadd64", ir.VoidType(), [_tile_no(sig.args[0].literal_value), p, s])
        return ctx.get_dummy_value()
    return types.void(t, arr, idx, stride_bytes), cg


@intrinsic
def amx_store(typingctx, t, arr, idx, stride_bytes):
    _literal_tiles(t)
    def cg(ctx, b, sig, args):
        p = _elem_ptr(ctx, b, sig.args[1], args[1], args[2], I8)
        s = ctx.cast(b, args[3], sig.args[3], types.int64)
        _call(b, "llvm.x86.tilestored64", ir.VoidType(), [_tile_no(sig.args[0].literal_value), p, s])
        return ctx.get_dummy_value()
    return types.void(t, arr, idx, stride_bytes), cg


def _make_amx_dot(name):
    @intrinsic
    def dot(typingctx, c, a, b_):
        _literal_tiles(c, a, b_)
        def cg(ctx, b, sig, args):
            _call(b, name, ir.VoidType(), [_tile_no(t.literal_value) for t in sig.args])
            return ctx.get_dummy_value()
        return types.void(c, a, b_), cg
    return dot


amx_dot_bf16 = _make_amx_dot("llvm.x86.tdpbf16ps")
amx_dot_u8s8 = _make_amx_dot("llvm.x86.tdpbusd")


@intrinsic
def amx_release(typingctx):
    def cg(ctx, b, sig, args):
        _call(b, "llvm.x86.tilerelease", ir.VoidType(), [])
        return ctx.get_dummy_value()
    return types.void(), cg


# ---------------------------------------------------------------------------------------------
# per-type constructors exported under stable names: f32x16_zeros, f32x16_load, ...

for _vt in VECTYPES.values():
    globals()[f"{_vt.name}_zeros"] = _make_zeros(_vt)
    globals()[f"{_vt.name}_bcast"] = _make_bcast(_vt)
    globals()[f"{_vt.name}_load"] = _make_load(_vt)
    globals()[f"{_vt.name}_load_masked"] = _make_load_masked(_vt)
f32x16_load_bf16 = _make_widening_load("bf16", False)
f32x16_load_bf16_masked = _make_widening_load("bf16", True)
f32x16_load_s8 = _make_widening_load("s8", False)
f32x16_load_s8_masked = _make_widening_load("s8", True)


# ---------------------------------------------------------------------------------------------
# The lowering table: DSL op -> {ISA level: intrinsic name in this module}. An op whose row has
# only "generic" is plain LLVM vector IR, valid everywhere. Levels above the entries fall back.

LOWER: dict[str, dict[str, str]] = {
    "dot4_u8s8": {"generic": "dot4_u8s8_generic", "avx2": "dot4_u8s8_avx2", "avx512": "dot4_u8s8_avx512",
                  "avx512_vnni_bf16": "dot4_u8s8_vnni"},
    "dot2_bf16": {"generic": "dot2_bf16_generic", "avx512_vnni_bf16": "dot2_bf16_avx512bf16"},
    "amx_config": {"amx": "amx_config"},
    "amx_zero": {"amx": "amx_zero"},
    "amx_load": {"amx": "amx_load"},
    "amx_store": {"amx": "amx_store"},
    "amx_dot_bf16": {"amx": "amx_dot_bf16"},
    "amx_dot_u8s8": {"amx": "amx_dot_u8s8"},
    "amx_release": {"amx": "amx_release"},
}
for _op in ("bitcast", "store", "store_masked", "fma", "add", "sub", "mul", "div", "vmax", "vmin", "neg", "hsum",
            "hmax", "hmin", "sqrt", "exp", "cast_f32_i32", "cast_i32_f32", "store_bf16", "store_bf16_masked", "f32_to_bf16_bits",
            "f32x16_load_bf16", "f32x16_load_bf16_masked", "f32x16_load_s8", "f32x16_load_s8_masked"):
    LOWER[_op] = {"generic": _op}
for _vt in VECTYPES.values():
    for _suffix in ("zeros", "bcast", "load", "load_masked"):
        LOWER[f"{_vt.name}_{_suffix}"] = {"generic": f"{_vt.name}_{_suffix}"}


def lower(op: str, level: str) -> str | None:
    """Intrinsic implementing `op` at `level`: the row's entry for the highest level <= `level`."""
    row = LOWER.get(op, {})
    for lv in reversed(LEVELS[: LEVELS.index(level) + 1]):
        if lv in row:
            return row[lv]
    return None


# ---------------------------------------------------------------------------------------------
# software prefetch: a hint, never faults (even past the end of the array), valid on every level

@intrinsic
def prefetch(typingctx, arr, idx):
    """prefetcht0 of the cache line holding arr[idx]."""
    if not isinstance(arr, types.Array):
        return None
    def cg(ctx, b, sig, args):
        p = _elem_ptr(ctx, b, sig.args[0], args[0], ctx.cast(b, args[1], sig.args[1], types.int64), I8)
        _call(b, "llvm.prefetch.p0", ir.VoidType(), [p, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])
        return ctx.get_dummy_value()
    return types.void(arr, idx), cg


LOWER["prefetch"] = {"generic": "prefetch"}


# ---------------------------------------------------------------------------------------------
# narrowing to u8 (requantization epilogues)

@intrinsic
def cast_i32_u8(typingctx, a):
    """i32x16 -> u8x64: each lane clamped to [0, 255] (signed saturation, like vpmaxsd/vpminsd then
    vpmovdb) into bytes 0..15; bytes 16..63 are zero. Store it with pk.store(y[i, j], v, n=16)."""
    if a != i32x16:
        return None
    def cg(ctx, b, sig, args):
        v16 = ir.VectorType(I32, 16)
        v = _call(b, "llvm.smax.v16i32", v16, [args[0], ir.Constant(v16, [0] * 16)])
        v = _call(b, "llvm.smin.v16i32", v16, [v, ir.Constant(v16, [255] * 16)])
        t = b.trunc(v, ir.VectorType(I8, 16))
        return b.shuffle_vector(t, ir.Constant(t.type, None), ir.Constant(ir.VectorType(I32, 64), list(range(16)) + [16] * 48))
    return u8x64(a), cg


@intrinsic
def cast_i32_s8(typingctx, a):
    """i32x16 -> s8x64: each lane clamped to [-128, 127] (like vpmovsdb) into bytes 0..15; bytes
    16..63 are zero. Store it with pk.store(y[i, j], v, n=16)."""
    if a != i32x16:
        return None
    def cg(ctx, b, sig, args):
        v16 = ir.VectorType(I32, 16)
        v = _call(b, "llvm.smax.v16i32", v16, [args[0], ir.Constant(v16, [-128] * 16)])
        v = _call(b, "llvm.smin.v16i32", v16, [v, ir.Constant(v16, [127] * 16)])
        t = b.trunc(v, ir.VectorType(I8, 16))
        return b.shuffle_vector(t, ir.Constant(t.type, None), ir.Constant(ir.VectorType(I32, 64), list(range(16)) + [16] * 48))
    return s8x64(a), cg


LOWER["cast_i32_u8"] = {"generic": "cast_i32_u8"}
LOWER["cast_i32_s8"] = {"generic": "cast_i32_s8"}


# ---------------------------------------------------------------------------------------------
# 4-bit unpacking (int4 weights, two per byte)

def _make_nibbles(high):
    @intrinsic
    def nibbles(typingctx, a):
        """u8x64 -> u8x64 of each byte's low (or high) 4 bits, 0..15: vpand (vpsrlw + vpand)."""
        if a != u8x64:
            return None
        def cg(ctx, b, sig, args):
            v = args[0]
            if high:
                v = b.lshr(v, ir.Constant(v.type, [4] * 64))
            return b.and_(v, ir.Constant(v.type, [15] * 64))
        return u8x64(a), cg
    return nibbles


low_nibbles, high_nibbles = _make_nibbles(False), _make_nibbles(True)
LOWER["low_nibbles"] = {"generic": "low_nibbles"}
LOWER["high_nibbles"] = {"generic": "high_nibbles"}
