"""What a researcher writes: dims, typed array parameters, vector types, ops, spaces, decorators.

A kernel body is never executed as Python: `@pk.kernel` parses its source into the tile IR. The
objects here exist so that annotations evaluate, so that editors can complete names, and so that
errors can name what was meant. See README.md for a worked example.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

# ---------------------------------------------------------------------------------------------
# shapes: dims are symbols bound from the actual arguments at call time


class Dim:
    """A named runtime size, shared by every parameter that uses it: `M, N, K = pk.dims("M N K")`."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name

    def __iter__(self):
        """`N, = pk.dims("N")` unpacks like the several-name form (`N = pk.dims("N")` works too)."""
        yield self

    def py(self) -> str:
        return self.name

    def eval(self, env: dict) -> int:
        return env[self.name]

    def _expr(self, op, other, swap=False):
        a, b = (other, self) if swap else (self, other)
        return DimExpr(op, a, b)

    __add__ = lambda s, o: s._expr("+", o)
    __sub__ = lambda s, o: s._expr("-", o)
    __mul__ = lambda s, o: s._expr("*", o)
    __rmul__ = lambda s, o: s._expr("*", o, swap=True)
    __floordiv__ = lambda s, o: s._expr("//", o)


class DimExpr(Dim):
    """Arithmetic on dims, e.g. a packed weight `pk.f32[cdiv(N, 16), K, 16]`."""

    def __init__(self, op: str, a, b):
        self.op, self.a, self.b = op, a, b
        super().__init__(f"({_py(a)} {op} {_py(b)})" if op != "cdiv" else f"cdiv({_py(a)}, {_py(b)})")

    def py(self) -> str:
        a, b = _py(self.a), _py(self.b)
        return f"(({a} + {b} - 1) // {b})" if self.op == "cdiv" else f"({a} {self.op} {b})"

    def eval(self, env: dict) -> int:
        a = self.a.eval(env) if isinstance(self.a, Dim) else self.a
        b = self.b.eval(env) if isinstance(self.b, Dim) else self.b
        return {"+": a + b, "-": a - b, "*": a * b, "//": a // b, "cdiv": -(-a // b)}[self.op]

    def names(self) -> list:
        return [n for x in (self.a, self.b) if isinstance(x, Dim) for n in dim_names(x)]


def _py(x) -> str:
    return x.py() if isinstance(x, Dim) else str(x)


def dim_names(d) -> list:
    if isinstance(d, DimExpr):
        return d.names()
    return [d.name] if isinstance(d, Dim) else []


def dims(names: str) -> tuple:
    """`M, N, K = pk.dims("M N K")`; one name gives the Dim itself (`N = pk.dims("N")`, or `N, = ...`)."""
    out = tuple(Dim(n) for n in names.replace(",", " ").split())
    return out if len(out) > 1 else out[0]


def cdiv(a, b):
    """Ceiling division, usable in shapes (`pk.cdiv(N, 16)`) and inside kernels."""
    if isinstance(a, Dim) or isinstance(b, Dim):
        return DimExpr("cdiv", a, b)
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# element types. bf16 travels as int16 bit patterns (NumPy has no bfloat16).

@dataclass(frozen=True)
class DType:
    name: str            # 'f32', 'bf16', ...
    numpy: str           # numpy dtype name holding the bits
    torch: str           # torch dtype name accepted from callers

    def __getitem__(self, shape) -> "ArrayType":
        return ArrayType(self, shape if isinstance(shape, tuple) else (shape,))

    def __repr__(self):
        return f"pk.{self.name}"


f32 = DType("f32", "float32", "float32")
bf16 = DType("bf16", "int16", "bfloat16")
i32 = DType("i32", "int32", "int32")
i64 = DType("i64", "int64", "int64")
i16 = DType("i16", "int16", "int16")
u8 = DType("u8", "uint8", "uint8")
s8 = DType("s8", "int8", "int8")
DTYPES = {d.name: d for d in (f32, bf16, i32, i64, i16, u8, s8)}


@dataclass(frozen=True)
class ArrayType:
    """Annotation of an array parameter: `x: pk.f32[M, K]` (C-contiguous, CPU)."""
    dtype: DType
    shape: tuple
    out: bool = False


class _Out:
    """`y: pk.Out[pk.f32[M, N]]` marks a parameter the kernel writes (compared against `ref`)."""

    def __getitem__(self, t: ArrayType) -> ArrayType:
        return ArrayType(t.dtype, t.shape, out=True)


Out = _Out()


# ---------------------------------------------------------------------------------------------
# vector types and ops: stubs for names; their meaning is in pacekern/isa.py (LLVM) and
# pacekern/interp.py (NumPy). Calling them outside a kernel is an error.

def _not_python(name):
    def stub(*a, **k):
        raise RuntimeError(f"pk.{name} only has a meaning inside a @pk.kernel body")
    stub.__name__ = name
    return stub


@dataclass(frozen=True)
class VecType:
    name: str
    elem: str
    lanes: int

    def __getattr__(self, op):          # pk.f32x16.load(...), .zeros(), .bcast(s), .load_bf16(...)
        if op.startswith("__"):
            raise AttributeError(op)
        return _not_python(f"{self.name}.{op}")


f32x16 = VecType("f32x16", "f32", 16)
i32x16 = VecType("i32x16", "i32", 16)
u8x64 = VecType("u8x64", "u8", 64)
s8x64 = VecType("s8x64", "s8", 64)
bf16x32 = VecType("bf16x32", "bf16", 32)
VECTYPES = {v.name: v for v in (f32x16, i32x16, u8x64, s8x64, bf16x32)}

# vector ops, by name; the frontend checks calls against this table: name -> (min args, max args)
OPS = {
    "store": (2, 2), "store_bf16": (2, 2), "fma": (3, 3), "max": (2, 2), "min": (2, 2),
    "hsum": (1, 1), "hmax": (1, 1), "hmin": (1, 1), "exp": (1, 1), "sqrt": (1, 1),
    "dot4_u8s8": (3, 3), "dot2_bf16": (3, 3), "to_i32": (1, 1), "to_f32": (1, 1),
    "bitcast": (2, 2), "to_bf16": (1, 1), "to_u8": (1, 1), "to_s8": (1, 1),
    "low_nibbles": (1, 1), "high_nibbles": (1, 1),     # u8x64 -> the 4-bit halves of each byte (int4 weights)
    "amx_config": (1, 1), "amx_zero": (1, 1), "amx_load": (3, 3), "amx_store": (3, 3),
    "amx_dot_bf16": (3, 3), "amx_dot_u8s8": (3, 3), "amx_release": (0, 0),
    "prefetch": (1, 1),       # pk.prefetch(x[i, j]): bring x[i, j]'s cache line towards L1 (a hint)
}
VEC_METHODS = {"zeros": 0, "bcast": 1, "load": 1, "load_bf16": 1, "load_s8": 1}


def tile(vtype, *shape):
    """`acc = pk.tile(pk.f32x16, MR, NV)`: MR*NV vector registers, indexed with constants."""
    raise RuntimeError("pk.tile only has a meaning inside a @pk.kernel body")


def scratch(dtype, *shape):
    """`buf = pk.scratch(pk.f32, QB, KB)`: a local C-contiguous array (uninitialized), indexed,
    loaded and stored like an array parameter. Sizes may be runtime expressions; it is allocated
    each time the statement runs, so declare it inside the pk.prange body for per-thread buffers."""
    raise RuntimeError("pk.scratch only has a meaning inside a @pk.kernel body")


def prange(*args):
    """The one parallel loop of a kernel (threads split its iterations)."""
    return range(*args)


def unroll(*args):
    """A loop unrolled at compile time; its bounds must be constants (tile parameters)."""
    return range(*args)


# ---------------------------------------------------------------------------------------------
# tuning spaces and configs


@dataclass(frozen=True)
class Choice:
    values: tuple


def choice(*values) -> Choice:
    return Choice(tuple(values))


def pow2(lo: int, hi: int) -> Choice:
    """Powers of two from lo to hi inclusive."""
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return Choice(tuple(out))


@dataclass(frozen=True)
class Config:
    """One point of a space: the values of the kernel's tile parameters. `pk.Config(U=2)`,
    `pk.Config({"U": 2})` and `pk.Config((("U", 2),))` are the same config."""
    values: tuple                        # ((name, value), ...) in the space's order

    def __init__(self, values=(), /, **kw):
        if isinstance(values, Config):
            values = values.values
        elif isinstance(values, dict):
            values = tuple(values.items())
        else:
            values = tuple((k, v) for k, v in values)
        object.__setattr__(self, "values", values + tuple(kw.items()))

    @staticmethod
    def coerce(c) -> "Config | None":
        """A Config from what a user may pass: None, a Config, or a dict of parameter values."""
        if c is None or isinstance(c, Config):
            return c
        if isinstance(c, dict):
            return Config(c)
        raise TypeError(f"expected pk.Config(...) or a dict of tile parameters, got {type(c).__name__}: {c!r}")

    def __getattr__(self, name):
        for k, v in object.__getattribute__(self, "values"):
            if k == name:
                return v
        raise AttributeError(name)

    def asdict(self) -> dict:
        return dict(self.values)

    def __repr__(self):
        return "pk.Config(" + ", ".join(f"{k}={v!r}" for k, v in self.values) + ")"

    @staticmethod
    def of(**kw) -> "Config":
        return Config(tuple(kw.items()))


@dataclass(frozen=True)
class Space:
    """Tile parameters to search. `where(cfg)` rejects configs statically; `regs(cfg)` is how many
    64-byte vectors the config's register tile keeps live (accumulators, operands), and a config
    that needs more than the ISA level's register file holds (`REGISTERS`) is not searched there;
    `prune(cfg, dims, cpu)` rejects configs for a given problem (e.g. too few tiles per thread).
    `default` is a config dict, or several in order of preference: the first whose registers fit
    the level is the default there (a tile shaped for 32 zmm, then one for 16 ymm)."""
    params: dict = field(default_factory=dict)
    where: Callable[[Config], bool] | None = None
    prune: Callable[[Config, dict, Any], bool] | None = None
    default: tuple | None = None
    regs: Callable[[Config], int] | None = None

    def __init__(self, where=None, prune=None, default=None, regs=None, **params):
        for k, v in params.items():
            if not isinstance(v, Choice):
                params[k] = Choice((v,))
        if isinstance(default, dict):
            default = (default,)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "prune", prune)
        object.__setattr__(self, "default", tuple(default) if default else None)
        object.__setattr__(self, "regs", regs)

    def normalize(self, cfg: Config) -> Config:
        """`cfg` in the space's parameter order (a hand-written pk.Config may list them in any
        order). A config with other names is returned as it is: compiling it raises the error
        that names the mismatch."""
        vals = cfg.asdict()
        if set(vals) != set(self.params):
            return cfg
        return Config(tuple((k, vals[k]) for k in self.params))

    def fits(self, cfg: Config, level: str | None) -> bool:
        """Whether cfg's register tile fits the register file at `level` (None: any level)."""
        return level is None or self.regs is None or self.regs(cfg) <= REGISTERS[level]

    def fitted(self, cfg: Config, level: str, shrink: tuple) -> Config:
        """cfg, or where its tile does not fit `level`'s registers, the config with the parameters
        named in `shrink` lowered (round robin, each to its next smaller choice) until it fits and
        passes `where`: for configs computed by hand from a shape (rows_config and the like)."""
        vals = cfg.asdict()
        while True:
            c = Config(tuple(vals.items()))
            if self.fits(c, level) and (self.where is None or self.where(c)):
                return c
            moved = False
            for name in shrink:
                smaller = [v for v in self.params[name].values if v < vals[name]]
                if smaller and not self.fits(Config(tuple(vals.items())), level):
                    vals[name] = max(smaller)
                    moved = True
            if not moved:
                return c

    def configs(self, level: str | None = None) -> list:
        """Every config that passes `where` and, given a level, fits its registers."""
        names = list(self.params)
        out = []
        for vals in itertools.product(*(self.params[n].values for n in names)):
            cfg = Config(tuple(zip(names, vals)))
            if (self.where is None or self.where(cfg)) and self.fits(cfg, level):
                out.append(cfg)
        return out

    def default_config(self, level: str | None = None) -> Config:
        """The default at `level`: the first of `default` that fits its registers (None: the first)."""
        if self.default:
            cands = [Config(tuple((n, d.get(n, c.values[0])) for n, c in self.params.items())) for d in self.default]
            return next((c for c in cands if self.fits(c, level)), cands[-1])
        cs = self.configs(level) or self.configs()
        if not cs:
            raise ValueError("the tuning space is empty after `where`")
        return cs[0]

    def fingerprint(self) -> str:
        import inspect
        parts = [repr(sorted((k, v.values) for k, v in self.params.items())), repr(self.default)]
        for f in (self.where, self.prune, self.regs):
            try:
                parts.append(inspect.getsource(f) if f else "")
            except (OSError, TypeError):
                parts.append(repr(f))
        return "\n".join(parts)


# 64-byte vectors the register file holds at each ISA level: 32 zmm; 16 ymm (two per vector); the
# generic target's 16 xmm (four per vector). Tiles beyond this spill to the stack in the hot loop.
REGISTERS = {"generic": 4, "avx2": 8, "avx512": 32, "avx512_vnni_bf16": 32, "amx": 32}


# shape buckets for tuning keys: dims not named in `key` are exact
def bucket_pow2(n: int) -> int:
    """Smallest power of two >= n (1, 2, 4, ...)."""
    return 1 << max(0, (n - 1).bit_length())


BUCKETS = {"exact": lambda n: n, "pow2": bucket_pow2}


# ---------------------------------------------------------------------------------------------
# decorators

def func(fn):
    """A helper that is inlined into the kernels that call it."""
    fn.__pk_func__ = True
    return fn


def kernel(fn=None, *, space: Space | None = None, ref: Callable | None = None, key: dict | None = None,
           name: str | None = None, strict_fp: bool = False):
    """Compile a Python function into a checked, tunable CPU kernel.

    space: tile parameters to tune (keyword-only parameters of fn); ref: the PyTorch reference,
    taking the kernel's arguments (outputs only for their shapes) and returning its outputs; key: dim -> 'exact' |
    'pow2' | callable, how problem sizes are bucketed for tuning (default: exact); strict_fp: LLVM may
    not reassociate float arithmetic (a * (b * c) stays so), for kernels whose every output must be
    the same bits whatever the tile config and the problem size (float reductions then do not
    vectorize on their own: accumulate in explicit vectors).
    """
    from .runtime import Kernel

    def wrap(f):
        return Kernel(f, space=space or Space(), ref=ref, key=key or {}, name=name, strict_fp=strict_fp)
    return wrap(fn) if fn is not None else wrap
