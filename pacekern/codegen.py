"""Code generation: lowered tile IR -> readable Numba source, written to a file and imported.

One module per (kernel, config, ISA level). Numba can cache only functions defined in real files
and re-imports a cached function's module by name, so modules are written under
`<cache>/src/<module>.py` with that folder on sys.path. The file name is a hash of the full text,
which embeds a hash of pacekern/isa.py: Numba does not notice edits in imported modules, so an
intrinsic change must change every generated file.

The fastmath subset keeps inf/nan semantics ('nnan'/'ninf' would let LLVM delete the isinf checks
that attention masks rely on); 'reassoc' and 'contract' allow reductions to vectorize and FMAs;
strict_fp kernels drop 'reassoc' so that their outputs do not depend on the tile config.
"""
from __future__ import annotations

import hashlib
import importlib
import math
import os
import sys
from pathlib import Path

from . import env, ir
from .lang import Dim
from .passes import SCALAR_BUILTINS

_NP_DTYPE = {"f32": "float32", "bf16": "int16", "i32": "int32", "i64": "int64", "i16": "int16", "u8": "uint8", "s8": "int8"}
FASTMATH = "{'reassoc', 'contract', 'arcp', 'nsz', 'afn'}"
FASTMATH_STRICT = "{'contract', 'arcp', 'nsz', 'afn'}"       # strict_fp kernels: no reassociation
_PREC = ir._PREC


def isa_hash() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for f in ("isa.py", "interp.py", "codegen.py"):
        h.update((here / f).read_bytes())
    return h.hexdigest()[:16]


def _shape_py(d) -> str:
    return d.py() if isinstance(d, Dim) else str(d)


class _Emitter:
    def __init__(self, k: ir.KernelIR):
        self.k = k
        self.params = {p.name: p for p in k.params}
        self.scratch: dict = {}       # pk.scratch name -> number of dimensions (strides are locals)
        self.lines: list = []

    def strides(self, p) -> list:
        """Row-major strides of param p as source expressions (last dim contiguous)."""
        out = []
        for i in range(len(p.shape) - 1):
            rest = p.shape[i + 1:]
            if all(isinstance(d, int) for d in rest):
                n = 1
                for d in rest:
                    n *= d
                out.append(str(n))
            else:
                out.append(f"_{p.name}_s{i}")
        return out

    def linear(self, buf, idx) -> str:
        if buf in self.scratch:
            ndim, strides = self.scratch[buf], [f"_{buf}_s{i}" for i in range(self.scratch[buf] - 1)]
        else:
            ndim, strides = len(self.params[buf].shape), self.strides(self.params[buf])
        if len(idx) != ndim:
            raise ValueError(f"line {idx[0].line if idx else '?'}: '{buf}' has {ndim} dimensions, indexed with {len(idx)}")
        terms = []
        for e, s in zip(idx, strides + [None]):
            if isinstance(e, ir.Const) and e.value == 0:
                continue
            x = self.expr(e, _PREC["*"] if s else _PREC["+"])
            terms.append(x if s is None else (x if s == "1" else f"{x} * {s}"))
        return " + ".join(terms) or "0"

    def expr(self, e, prec: int = 0) -> str:
        if isinstance(e, ir.Const):
            v = e.value
            if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
                return "np.nan" if math.isnan(v) else ("np.inf" if v > 0 else "-np.inf")
            return repr(v)
        if isinstance(e, ir.Name):
            return e.id
        if isinstance(e, ir.BinOp):
            p = _PREC[e.op]
            s = f"{self.expr(e.a, p)} {e.op} {self.expr(e.b, p + 1)}"
            return f"({s})" if p < prec else s
        if isinstance(e, ir.UnaryOp):
            return f"(not {self.expr(e.a, ir.UNARY)})" if e.op == "not" else f"-{self.expr(e.a, ir.UNARY)}"
        if isinstance(e, ir.Index):
            return f"_k.ld({e.buf}, {self.linear(e.buf, e.idx)})"
        if isinstance(e, ir.Op):
            args = []
            for a in e.args:
                args.append(f"{a.buf}, {self.linear(a.buf, a.idx)}" if isinstance(a, ir.Addr) else self.expr(a))
            fn = e.name if e.name in SCALAR_BUILTINS else f"_k.{e.name}"
            return f"{fn}({', '.join(args)})"
        raise TypeError(f"cannot generate code for {e!r}")

    def stmts(self, stmts, ind: int):
        pad = "    " * ind
        if not stmts:
            self.lines.append(pad + "pass")
        for s in stmts:
            if isinstance(s, ir.Assign):
                self.lines.append(f"{pad}{s.target} = {self.expr(s.value)}")
            elif isinstance(s, ir.Store):
                self.lines.append(f"{pad}_k.st({s.buf}, {self.linear(s.buf, s.idx)}, {self.expr(s.value)})")
            elif isinstance(s, ir.Eval):
                self.lines.append(pad + self.expr(s.expr))
            elif isinstance(s, ir.Scratch):
                n = len(s.shape)
                self.scratch[s.name] = n
                for i in reversed(range(n - 1)):
                    rest = self.expr(s.shape[i + 1], _PREC["*"])
                    self.lines.append(f"{pad}_{s.name}_s{i} = {rest}" + (f" * _{s.name}_s{i + 1}" if i < n - 2 else ""))
                size = self.expr(s.shape[0], _PREC["*"]) + (f" * _{s.name}_s0" if n > 1 else "")
                self.lines.append(f"{pad}{s.name} = np.empty({size}, np.{_NP_DTYPE[s.dtype]})")
            elif isinstance(s, ir.For):
                start, stop, step = (self.expr(x) for x in (s.start, s.stop, s.step))
                if s.kind == "prange":
                    if start == "0" and step == "1":
                        # Numba types a plain copy of a prange index (p = t) as unsigned, and then
                        # min(p, n - 1) as float64: the kernel sees a signed copy
                        self.lines.append(f"{pad}for _{s.var}_t in prange({stop}):")
                        self.lines.append(f"{pad}    {s.var} = np.int64(_{s.var}_t)")
                    else:   # prange needs unit steps: iterate over tile numbers instead
                        span = stop if start == "0" else f"{stop} - {start}"
                        n = f"({span} + {step} - 1) // {step}" if step != "1" else span
                        self.lines.append(f"{pad}for _{s.var}_t in prange({n}):")
                        first = "" if start == "0" else f"{start} + "
                        self.lines.append(f"{pad}    {s.var} = {first}_{s.var}_t" + (f" * {step}" if step != "1" else ""))
                else:
                    rng = stop if (start == "0" and step == "1") else (f"{start}, {stop}" if step == "1" else f"{start}, {stop}, {step}")
                    self.lines.append(f"{pad}for {s.var} in range({rng}):")
                self.stmts(s.body, ind + 1)
            elif isinstance(s, ir.While):
                self.lines.append(f"{pad}while {self.expr(s.cond)}:")
                self.stmts(s.body, ind + 1)
            elif isinstance(s, ir.If):
                self.lines.append(f"{pad}if {self.expr(s.cond)}:")
                self.stmts(s.then, ind + 1)
                if s.orelse:
                    self.lines.append(f"{pad}else:")
                    self.stmts(s.orelse, ind + 1)
            else:
                raise TypeError(f"cannot generate code for {s!r}")


def func_name(k: ir.KernelIR) -> str:
    return k.name


def generate(k: ir.KernelIR, parallel: bool, origin: str, interpret: bool = False) -> str:
    """Source text of a module defining one function named after the kernel."""
    e = _Emitter(k)
    args = [p.name for p in k.params] + list(k.dims)
    body = []
    for p in k.params:
        for i, s in enumerate(e.strides(p)):
            if s.startswith("_"):
                rest = " * ".join(_shape_py(d) for d in p.shape[i + 1:])
                body.append(f"    {s} = {rest}")
    e.stmts(k.body, 1)
    cfg = ", ".join(f"{n}={v!r}" for n, v in k.config) or "-"
    head = [
        "# Generated by pacekern; do not edit. Inspect with kernel.source(config), kernel.show_ir(config).",
        f"# kernel: {k.name}  ({origin})",
        f"# config: {cfg}",
        f"# isa:    {k.isa}  (intrinsics {isa_hash()})",
        "# arrays arrive flattened (C order); x[i, j] is _k.ld(x, i * stride + j)",
    ]
    head.append("import numpy as np")
    if interpret:
        head += ["from pacekern.interp import njit, prange", "from pacekern import interp as _k"]
    else:
        head += ["from numba import njit, prange", "from pacekern import isa as _k"]
    deco = (f"@njit(cache=True, fastmath={FASTMATH_STRICT if k.strict_fp else FASTMATH}, boundscheck=False, error_model='numpy', nogil=True"
            + (", parallel=True)" if parallel else ")"))
    return "\n".join(head + ["", "", deco, f"def {func_name(k)}({', '.join(args)}):"] + body + e.lines) + "\n"


def src_dir() -> Path:
    d = Path(env.get("PACEKERN_CACHE_DIR")) / "src"
    d.mkdir(parents=True, exist_ok=True)
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    return d


def write_module(source: str, kernel_name: str) -> tuple:
    """Write source under a content-hashed module name (atomically); return (module name, path)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    mod = f"pk_{kernel_name}_{digest}"
    path = src_dir() / f"{mod}.py"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)
    return mod, path


def load(source: str, kernel_name: str):
    """Import the generated module and return its kernel function (compiled lazily by Numba)."""
    mod, path = write_module(source, kernel_name)
    module = sys.modules.get(mod) or importlib.import_module(mod)
    return getattr(module, kernel_name), path
