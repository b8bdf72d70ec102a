"""The tile IR: a small tree of frozen dataclasses between the frontend and code generation.

Every node keeps the line of the user's kernel it came from (`line`, excluded from equality) so
that errors in any pass can point at the source. `show(kernel_ir)` prints it as readable text.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Union

# ---------------------------------------------------------------------------------------------
# expressions


@dataclass(frozen=True)
class Const:
    value: Union[int, float, bool, str]      # str only for type names passed to ops
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Name:
    id: str                                   # local variable, loop index, parameter or shape dim
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class BinOp:
    op: str                                   # '+', '-', '*', '/', '//', '%', '<', '<=', '==', 'and', ...
    a: "Expr"
    b: "Expr"
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class UnaryOp:
    op: str                                   # '-', 'not'
    a: "Expr"
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Index:
    buf: str                                  # array parameter
    idx: tuple                                # one Expr per dimension (linearized by codegen)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Addr:
    buf: str                                  # the address of x[i, j]: first argument of loads/stores
    idx: tuple
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Op:
    name: str                                 # a DSL op ("load", "fma", "hsum", ...) before legalization,
    args: tuple                               # an intrinsic of pacekern.isa after it
    vtype: str = ""                           # vector type for constructors: 'f32x16.load' -> vtype f32x16
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class TileRef:
    tile: str                                 # register tile, e.g. acc[i, j]; scalarized to Name('acc_i_j')
    idx: tuple
    line: int = field(default=0, compare=False)


Expr = Union[Const, Name, BinOp, UnaryOp, Index, Addr, Op, TileRef]

# ---------------------------------------------------------------------------------------------
# statements


@dataclass(frozen=True)
class Assign:
    target: Union[str, TileRef]
    value: Expr
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Store:
    buf: str                                  # x[i, j] = value (scalar element store)
    idx: tuple
    value: Expr
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Eval:
    expr: Expr                                # an op called for its effect (vector store, AMX)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class For:
    var: str
    start: Expr
    stop: Expr
    step: Expr
    kind: str                                 # 'range' | 'prange' (the one parallel axis) | 'unroll'
    body: tuple
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class While:
    cond: Expr
    body: tuple
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class If:
    cond: Expr
    then: tuple
    orelse: tuple
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Tile:
    name: str                                 # acc = pk.tile(pk.f32x16, MR, NV): MR*NV registers
    vtype: str
    shape: tuple                              # Exprs, constant after const binding
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Scratch:
    name: str                                 # buf = pk.scratch(pk.f32, QB, KB): a local array
    dtype: str
    shape: tuple                              # Exprs (runtime sizes allowed)
    line: int = field(default=0, compare=False)


Stmt = Union[Assign, Store, Eval, For, While, If, Tile, Scratch]


@dataclass(frozen=True)
class Param:
    name: str
    dtype: str                                # 'f32', 'bf16', 'u8', 's8', 'i32', 'i64', 'i16'
    shape: tuple                              # lang.Dim / DimExpr / int per dimension
    out: bool = False                         # written by the kernel (returned, compared with ref)


@dataclass(frozen=True)
class KernelIR:
    name: str
    params: tuple                             # Param, in call order
    dims: tuple                               # names of the runtime shape dims, in codegen argument order
    consts: tuple                             # names of the keyword-only tile parameters
    body: tuple
    config: tuple = ()                        # (name, value) pairs once constants are bound
    isa: str = ""                             # ISA level once legalized
    strict_fp: bool = False                   # float ops in source order (no 'reassoc'; see pk.kernel)


# ---------------------------------------------------------------------------------------------
# generic traversal


def map_expr(node, fn):
    """Rebuild `node` (an Expr) bottom-up, applying fn to every sub-expression after its children."""
    if isinstance(node, BinOp):
        node = replace(node, a=map_expr(node.a, fn), b=map_expr(node.b, fn))
    elif isinstance(node, UnaryOp):
        node = replace(node, a=map_expr(node.a, fn))
    elif isinstance(node, (Index, Addr, TileRef)):
        node = replace(node, idx=tuple(map_expr(i, fn) for i in node.idx))
    elif isinstance(node, Op):
        node = replace(node, args=tuple(map_expr(a, fn) for a in node.args))
    return fn(node)


def map_stmt_exprs(s, fn):
    """Apply map_expr(., fn) to every expression directly held by statement s (not its body)."""
    changes = {}
    for f in fields(s):
        v = getattr(s, f.name)
        if f.name in ("body", "then", "orelse", "line", "target"):   # assignment targets are not read
            continue
        if isinstance(v, (Const, Name, BinOp, UnaryOp, Index, Addr, Op, TileRef)):
            changes[f.name] = map_expr(v, fn)
        elif isinstance(v, tuple) and f.name in ("idx", "shape"):
            changes[f.name] = tuple(map_expr(x, fn) for x in v)
    return replace(s, **changes) if changes else s


def walk(stmts):
    """Yield every statement, depth first."""
    for s in stmts:
        yield s
        for sub in ("body", "then", "orelse"):
            if hasattr(s, sub):
                yield from walk(getattr(s, sub))


def exprs_of(s):
    """Yield every expression node held directly by statement s (recursively into expressions)."""
    out = []
    map_stmt_exprs(s, lambda e: out.append(e) or e)
    return out


# ---------------------------------------------------------------------------------------------
# printer

# Python's binding order, loosest first; unary minus binds tighter than all of them (UNARY)
_PREC = {"or": 1, "and": 2, "<": 4, "<=": 4, ">": 4, ">=": 4, "==": 4, "!=": 4, "|": 5, "&": 6,
         "<<": 7, ">>": 7, "+": 8, "-": 8, "*": 9, "/": 9, "//": 9, "%": 9}
UNARY = 10


def show_expr(e, prec: int = 0) -> str:
    if isinstance(e, Const):
        return repr(e.value)
    if isinstance(e, Name):
        return e.id
    if isinstance(e, BinOp):
        p = _PREC[e.op]
        s = f"{show_expr(e.a, p)} {e.op} {show_expr(e.b, p + 1)}"
        return f"({s})" if p < prec else s
    if isinstance(e, UnaryOp):
        return f"{e.op}{' ' if e.op == 'not' else ''}{show_expr(e.a, UNARY)}"
    if isinstance(e, Index):
        return f"{e.buf}[{', '.join(show_expr(i) for i in e.idx)}]"
    if isinstance(e, Addr):
        return f"&{e.buf}[{', '.join(show_expr(i) for i in e.idx)}]"
    if isinstance(e, TileRef):
        return f"{e.tile}[{', '.join(show_expr(i) for i in e.idx)}]"
    if isinstance(e, Op):
        head = f"{e.vtype}.{e.name}" if e.vtype else e.name
        return f"{head}({', '.join(show_expr(a) for a in e.args)})"
    raise TypeError(f"not an expression: {e!r}")


def show_stmts(stmts, indent: int = 0) -> list:
    pad, out = "  " * indent, []
    for s in stmts:
        if isinstance(s, Assign):
            t = s.target if isinstance(s.target, str) else show_expr(s.target)
            out.append(f"{pad}{t} = {show_expr(s.value)}")
        elif isinstance(s, Store):
            out.append(f"{pad}{s.buf}[{', '.join(show_expr(i) for i in s.idx)}] = {show_expr(s.value)}")
        elif isinstance(s, Eval):
            out.append(f"{pad}{show_expr(s.expr)}")
        elif isinstance(s, Tile):
            out.append(f"{pad}tile {s.name}: {s.vtype}[{', '.join(show_expr(d) for d in s.shape)}]")
        elif isinstance(s, Scratch):
            out.append(f"{pad}scratch {s.name}: {s.dtype}[{', '.join(show_expr(d) for d in s.shape)}]")
        elif isinstance(s, For):
            out.append(f"{pad}for {s.var} in {s.kind}({show_expr(s.start)}, {show_expr(s.stop)}, {show_expr(s.step)}):")
            out += show_stmts(s.body, indent + 1) or [pad + "  pass"]
        elif isinstance(s, While):
            out.append(f"{pad}while {show_expr(s.cond)}:")
            out += show_stmts(s.body, indent + 1) or [pad + "  pass"]
        elif isinstance(s, If):
            out.append(f"{pad}if {show_expr(s.cond)}:")
            out += show_stmts(s.then, indent + 1) or [pad + "  pass"]
            if s.orelse:
                out.append(f"{pad}else:")
                out += show_stmts(s.orelse, indent + 1)
    return out


def show(k: KernelIR) -> str:
    params = ", ".join(f"{'out ' if p.out else ''}{p.name}: {p.dtype}[{', '.join(map(str, p.shape))}]" for p in k.params)
    head = [f"kernel {k.name}({params})"]
    if k.config:
        head.append("  # config: " + ", ".join(f"{n}={v}" for n, v in k.config))
    if k.isa:
        head.append(f"  # isa: {k.isa}")
    if k.strict_fp:
        head.append("  # strict_fp: float ops in source order")
    return "\n".join(head + show_stmts(k.body, 1)) + "\n"
