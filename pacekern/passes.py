"""Passes over the tile IR, each a plain function KernelIR -> KernelIR:

  bind_consts      tile parameters -> constants, constant folding, dead branches removed
  unroll           pk.unroll loops expanded (bounds must be constant by then)
  scalarize_tiles  register tile acc[i, j] -> scalar SSA variable acc_i_j (LLVM keeps those in registers)
  legalize         types inferred; DSL ops -> pacekern.isa intrinsics for one ISA level via isa.LOWER,
                   masked variants for tails (n=), vector operators -> add/mul/..., scalars broadcast
  verify           register budget of inner loops, one parallel axis

`lower(kernel_ir, config, level)` runs them all. Errors are CompileError with the user's line.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import replace

from . import ir, isa

VEC_ELEM = {"f32x16": "f32", "i32x16": "i32", "u8x64": "u8", "s8x64": "s8", "bf16x32": "bf16"}
SCALAR_BUILTINS = {"min", "max", "abs", "int", "float"}
ZMM_BUDGET = 32


class CompileError(Exception):
    """A kernel that parses but cannot be compiled for this config/ISA; names the line."""


class IsaError(CompileError):
    """The kernel uses an op that the ISA level being compiled for does not have (e.g. AMX)."""


def _err(k: ir.KernelIR, node, msg: str, cls=None):
    cfg = ", ".join(f"{n}={v}" for n, v in k.config)
    raise (cls or CompileError)(f"kernel '{k.name}'{f' [{cfg}]' if cfg else ''}, line {getattr(node, 'line', '?')}: {msg}")


# ---------------------------------------------------------------------------------------------
# constants

_FOLD = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod,
         "/": operator.truediv, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
         "==": operator.eq, "!=": operator.ne, "&": operator.and_, "|": operator.or_, "<<": operator.lshift,
         ">>": operator.rshift, "and": lambda a, b: a and b, "or": lambda a, b: a or b}


def _fold(e):
    if isinstance(e, ir.BinOp):
        a, b = e.a, e.b
        if isinstance(a, ir.Const) and isinstance(b, ir.Const):
            return ir.Const(_FOLD[e.op](a.value, b.value), line=e.line)
        # identities keep the generated source readable: x*1, x+0, 0*x, x//1
        if e.op in ("*", "+", "-", "//") and isinstance(b, ir.Const) and b.value == (1 if e.op in "*//" else 0) and not isinstance(b.value, bool):
            return a
        if e.op in ("*", "+") and isinstance(a, ir.Const) and a.value == (1 if e.op == "*" else 0) and not isinstance(a.value, bool):
            return b
        if e.op == "*" and (isinstance(a, ir.Const) and a.value == 0 or isinstance(b, ir.Const) and b.value == 0):
            if isinstance(a, (ir.Const, ir.Name)) and isinstance(b, (ir.Const, ir.Name)):
                return ir.Const(0, line=e.line)
    if isinstance(e, ir.UnaryOp) and isinstance(e.a, ir.Const):
        return ir.Const(-e.a.value if e.op == "-" else not e.a.value, line=e.line)
    if isinstance(e, ir.Op) and e.name in ("min", "max", "abs", "int", "float") and all(isinstance(a, ir.Const) for a in e.args):
        return ir.Const({"min": min, "max": max, "abs": abs, "int": int, "float": float}[e.name](*(a.value for a in e.args)), line=e.line)
    return e


def _subst(stmts, env: dict):
    """Replace Names found in env by Consts, fold, and drop branches with constant conditions."""
    def fn(e):
        if isinstance(e, ir.Name) and e.id in env:
            return ir.Const(env[e.id], line=e.line)
        return _fold(e)

    out = []
    for s in stmts:
        s = ir.map_stmt_exprs(s, fn)
        if isinstance(s, ir.Assign) and isinstance(s.target, ir.TileRef):
            s = replace(s, target=ir.map_expr(s.target, fn))
        if isinstance(s, ir.If):
            then, orelse = _subst(s.then, env), _subst(s.orelse, env)
            if isinstance(s.cond, ir.Const):
                out += list(then if s.cond.value else orelse)
                continue
            s = replace(s, then=then, orelse=orelse)
        elif isinstance(s, (ir.For, ir.While)):
            s = replace(s, body=_subst(s.body, env))
        out.append(s)
    return tuple(out)


def bind_consts(k: ir.KernelIR, config: dict) -> ir.KernelIR:
    missing = [c for c in k.consts if c not in config]
    extra = [c for c in config if c not in k.consts]
    if missing or extra:
        raise CompileError(f"kernel '{k.name}': config {config} does not match its tile parameters {list(k.consts)}")
    k = replace(k, config=tuple((c, config[c]) for c in k.consts))
    return replace(k, body=_subst(k.body, dict(config)))


def unroll(k: ir.KernelIR) -> ir.KernelIR:
    def go(stmts):
        out = []
        for s in stmts:
            if isinstance(s, ir.For) and s.kind == "unroll":
                if not all(isinstance(x, ir.Const) for x in (s.start, s.stop, s.step)):
                    _err(k, s, "pk.unroll bounds must be constants (tile parameters or literals)")
                for v in range(s.start.value, s.stop.value, s.step.value):
                    out += list(go(_subst(s.body, {s.var: v})))
                continue
            for sub in ("body", "then", "orelse"):
                if hasattr(s, sub):
                    s = replace(s, **{sub: go(getattr(s, sub))})
            out.append(s)
        return tuple(out)
    return replace(k, body=go(k.body))


# ---------------------------------------------------------------------------------------------
# register tiles

def scalarize_tiles(k: ir.KernelIR) -> ir.KernelIR:
    shapes = {}

    def ref(e):
        if isinstance(e, ir.TileRef):
            if e.tile not in shapes:
                _err(k, e, f"register tile '{e.tile}' is used before pk.tile(...) declares it")
            shape = shapes[e.tile][1]
            if len(e.idx) != len(shape):
                _err(k, e, f"tile '{e.tile}' has {len(shape)} dimensions, indexed with {len(e.idx)}")
            for i, (x, n) in enumerate(zip(e.idx, shape)):
                if not isinstance(x, ir.Const):
                    _err(k, e, f"register tile index {ir.show_expr(x)} must be a constant: loop over it with pk.unroll")
                if not 0 <= x.value < n:
                    _err(k, e, f"tile index {x.value} is out of bounds for dimension {i} of '{e.tile}' (size {n})")
            return ir.Name("_".join([e.tile] + [str(x.value) for x in e.idx]), line=e.line)
        return e

    def go(stmts):
        out = []
        for s in stmts:
            if isinstance(s, ir.Tile):
                if not all(isinstance(d, ir.Const) for d in s.shape):
                    _err(k, s, "pk.tile sizes must be constants (tile parameters or literals)")
                shape = tuple(d.value for d in s.shape)
                shapes[s.name] = (s.vtype, shape)
                for idx in itertools.product(*(range(n) for n in shape)):
                    out.append(ir.Assign("_".join([s.name] + [str(i) for i in idx]), ir.Op("zeros", (), vtype=s.vtype, line=s.line), line=s.line))
                continue
            s = ir.map_stmt_exprs(s, lambda e: ref(e))
            if isinstance(s, ir.Assign) and isinstance(s.target, ir.TileRef):
                s = replace(s, target=ref(s.target).id)
            for sub in ("body", "then", "orelse"):
                if hasattr(s, sub):
                    s = replace(s, **{sub: go(getattr(s, sub))})
            out.append(s)
        return tuple(out)
    return replace(k, body=go(k.body))


# ---------------------------------------------------------------------------------------------
# types and ISA legalization

def _param_types(k):
    t = {d: "int" for d in k.dims}
    for p in k.params:
        t[p.name] = f"arr:{p.dtype}" if p.shape else ("float" if p.dtype in ("f32", "bf16") else "int")
    for c, v in k.config:
        t[c] = "float" if isinstance(v, float) else "int"
    return t


def legalize(k: ir.KernelIR, level: str) -> ir.KernelIR:
    types = _param_types(k)
    dtypes = {p.name: p.dtype for p in k.params}          # arrays: parameters and pk.scratch buffers
    dtypes.update({s.name: s.dtype for s in ir.walk(k.body) if isinstance(s, ir.Scratch)})

    def arr_dtype(node, buf):
        return dtypes[buf]

    def ty(e):
        if isinstance(e, ir.Const):
            return "float" if isinstance(e.value, float) else ("bool" if isinstance(e.value, bool) else "int")
        if isinstance(e, ir.Name):
            if e.id not in types:
                _err(k, e, f"'{e.id}' is used before it is assigned")
            return types[e.id]
        if isinstance(e, ir.Index):
            return "float" if dtypes[e.buf] == "f32" else "int"
        if isinstance(e, ir.BinOp):
            a, b = ty(e.a), ty(e.b)
            if e.op in ("<", "<=", ">", ">=", "==", "!=", "and", "or"):
                return "bool"
            return "float" if "float" in (a, b) or e.op == "/" else "int"
        if isinstance(e, ir.UnaryOp):
            return "bool" if e.op == "not" else ty(e.a)
        if isinstance(e, ir.Op):
            return e.vtype if e.vtype else _OP_TYPES.get(e.name, lambda ts: None)([ty(a) for a in e.args])
        return None

    def is_vec(t):
        return t in VEC_ELEM

    def leg(e):
        """Rewrite one expression (children already rewritten)."""
        if isinstance(e, ir.BinOp):
            a, b = ty(e.a), ty(e.b)
            if is_vec(a) or is_vec(b):
                name = {"+": "add", "-": "sub", "*": "mul", "/": "div"}.get(e.op)
                if name is None:
                    _err(k, e, f"operator {e.op} is not defined on vectors")
                va, vb = e.a, e.b
                if not is_vec(a):
                    va = ir.Op(f"{b}_bcast", (e.a,), vtype=b, line=e.line); a = b
                if not is_vec(b):
                    vb = ir.Op(f"{a}_bcast", (e.b,), vtype=a, line=e.line); b = a
                if a != b:
                    _err(k, e, f"operands of {e.op} have different vector types {a} and {b}")
                return ir.Op(name, (va, vb), vtype=a, line=e.line)
            return e
        if isinstance(e, ir.UnaryOp) and e.op == "-" and is_vec(ty(e.a)):
            return ir.Op("neg", (e.a,), vtype=ty(e.a), line=e.line)
        if not isinstance(e, ir.Op):
            return e
        n, args, vt = e.name, e.args, e.vtype
        ts = [ty(a) for a in args]
        if vt and n in ("zeros", "bcast"):
            return ir.Op(f"{vt}_{n}", args, vtype=vt, line=e.line)
        if vt and n.startswith("load"):
            addr = args[0]
            want = {"load": VEC_ELEM[vt], "load_bf16": "bf16", "load_s8": "s8"}[n]
            if n != "load" and vt != "f32x16":
                _err(k, e, f"pk.{vt}.{n} does not exist: widening loads produce pk.f32x16")
            got = arr_dtype(e, addr.buf)
            if got != want:
                _err(k, e, f"pk.{vt}.{n} reads {want} elements but '{addr.buf}' holds {got}")
            name = f"{vt}_{n}" if n == "load" else f"f32x16_{n}"
            return ir.Op(name + ("_masked" if len(args) == 2 else ""), args, vtype=vt, line=e.line)
        if n in ("store", "store_bf16"):
            addr, v = args[0], args[1]
            if not is_vec(ts[1]):
                _err(k, e, f"pk.{n} stores a vector; got a {ts[1]} (store scalars with x[i] = value)")
            want = "bf16" if n == "store_bf16" else VEC_ELEM[ts[1]]
            if n == "store_bf16" and ts[1] != "f32x16":
                _err(k, e, "pk.store_bf16 rounds an f32x16 to bf16")
            if arr_dtype(e, addr.buf) != want:
                _err(k, e, f"cannot store {ts[1]} into '{addr.buf}', which holds {arr_dtype(e, addr.buf)}")
            return ir.Op(n + ("_masked" if len(args) == 3 else ""), args, line=e.line)
        if n in ("max", "min", "abs"):
            if any(is_vec(t) for t in ts):
                if n == "abs" or ts[0] != ts[1]:
                    _err(k, e, f"pk.{n} needs two vectors of the same type, got {ts}")
                return ir.Op("v" + n, args, vtype=ts[0], line=e.line)
            return e
        checks = {"fma": ["f32x16"] * 3, "hsum": None, "hmax": None, "hmin": None, "exp": ["f32x16"], "sqrt": ["f32x16"],
                  "dot4_u8s8": ["i32x16", "u8x64", "s8x64"], "dot2_bf16": ["f32x16", "bf16x32", "bf16x32"],
                  "to_i32": ["f32x16"], "to_f32": ["i32x16"], "to_bf16": ["f32x16"], "to_u8": ["i32x16"],
                  "to_s8": ["i32x16"], "low_nibbles": ["u8x64"], "high_nibbles": ["u8x64"]}
        if n in ("exp", "sqrt") and ts == ["float"]:
            return ir.Op(n, args, line=e.line)                   # scalar math: same intrinsic, scalar overload
        if n in checks and checks[n] is not None and ts != checks[n]:
            _err(k, e, f"pk.{n} takes ({', '.join(checks[n])}), got ({', '.join(str(t) for t in ts)})")
        if n in ("hsum", "hmax", "hmin") and ts[0] not in ("f32x16", "i32x16"):
            _err(k, e, f"pk.{n} reduces an f32x16 or i32x16, got {ts[0]}")
        if n == "bitcast":
            if not is_vec(ts[0]):
                _err(k, e, f"pk.bitcast reinterprets a vector, got a {ts[0]}")
            return ir.Op("bitcast", args, vtype=args[1].value, line=e.line)
        name = {"to_i32": "cast_f32_i32", "to_f32": "cast_i32_f32", "to_bf16": "f32_to_bf16_bits", "to_u8": "cast_i32_u8",
                "to_s8": "cast_i32_s8"}.get(n, n)
        if n in SCALAR_BUILTINS:
            return e
        target = isa.lower(name, level)
        if target is None:
            _err(k, e, f"pk.{n} needs ISA level {min(isa.LOWER.get(name, {'?': 0}), key=lambda l: isa.LEVELS.index(l) if l in isa.LEVELS else 99)} "
                       f"but this kernel is being compiled for '{level}'; choose the kernel by pk.target().level", IsaError)
        return ir.Op(target, args, vtype=vt, line=e.line)

    def go(stmts):
        out = []
        for s in stmts:
            s = ir.map_stmt_exprs(s, leg)
            if isinstance(s, ir.Assign):
                t = ty(s.value)
                if s.target in types and types[s.target] != t and not {types[s.target], t} <= {"int", "float", "bool"}:
                    _err(k, s, f"'{s.target}' was a {types[s.target]} and is assigned a {t}: use a new name")
                types[s.target] = t if t is not None else types.get(s.target)
            if isinstance(s, ir.For):
                types[s.var] = "int"
            if isinstance(s, ir.Scratch):
                types[s.name] = f"arr:{s.dtype}"
            for sub in ("body", "then", "orelse"):
                if hasattr(s, sub):
                    s = replace(s, **{sub: go(getattr(s, sub))})
            out.append(s)
        return tuple(out)

    body = go(k.body)
    return replace(k, body=body, isa=level), types


_OP_TYPES = {
    "fma": lambda ts: ts[0], "add": lambda ts: ts[0], "sub": lambda ts: ts[0], "mul": lambda ts: ts[0],
    "div": lambda ts: ts[0], "neg": lambda ts: ts[0], "exp": lambda ts: ts[0], "sqrt": lambda ts: ts[0],
    "vmax": lambda ts: ts[0], "vmin": lambda ts: ts[0],
    "max": lambda ts: ts[0] if ts[0] in VEC_ELEM else ("float" if "float" in ts else "int"),
    "min": lambda ts: ts[0] if ts[0] in VEC_ELEM else ("float" if "float" in ts else "int"),
    "abs": lambda ts: ts[0], "int": lambda ts: "int", "float": lambda ts: "float",
    "hsum": lambda ts: "float" if ts[0] == "f32x16" else "int", "hmax": lambda ts: "float" if ts[0] == "f32x16" else "int",
    "hmin": lambda ts: "float" if ts[0] == "f32x16" else "int",
    "dot4_u8s8": lambda ts: "i32x16", "dot2_bf16": lambda ts: "f32x16", "to_i32": lambda ts: "i32x16",
    "to_f32": lambda ts: "f32x16", "to_bf16": lambda ts: "bf16x32", "to_u8": lambda ts: "u8x64", "to_s8": lambda ts: "s8x64",
    "bitcast": lambda ts: None, "prefetch": lambda ts: None,
    "low_nibbles": lambda ts: "u8x64", "high_nibbles": lambda ts: "u8x64",
}
for _k in list(isa.LOWER):
    for _lv, _name in isa.LOWER[_k].items():
        _OP_TYPES.setdefault(_name, _OP_TYPES.get(_k, lambda ts: None))
_OP_TYPES.update({"dot4_u8s8_vnni": lambda ts: "i32x16", "dot4_u8s8_generic": lambda ts: "i32x16",
                  "dot4_u8s8_avx2": lambda ts: "i32x16", "dot4_u8s8_avx512": lambda ts: "i32x16",
                  "dot2_bf16_avx512bf16": lambda ts: "f32x16", "dot2_bf16_generic": lambda ts: "f32x16",
                  "cast_f32_i32": lambda ts: "i32x16", "cast_i32_f32": lambda ts: "f32x16",
                  "f32_to_bf16_bits": lambda ts: "bf16x32", "cast_i32_u8": lambda ts: "u8x64",
                  "cast_i32_s8": lambda ts: "s8x64"})


# ---------------------------------------------------------------------------------------------
# verification

def verify(k: ir.KernelIR, types: dict, level: str) -> ir.KernelIR:
    vec = {n for n, t in types.items() if t in VEC_ELEM}
    budget = ZMM_BUDGET if level in ("avx512", "avx512_vnni_bf16", "amx") else None

    def names_in(stmts):
        seen = set()
        for s in ir.walk(stmts):
            if isinstance(s, ir.Assign) and s.target in vec:
                seen.add(s.target)
            for e in ir.exprs_of(s):
                if isinstance(e, ir.Name) and e.id in vec:
                    seen.add(e.id)
        return seen

    def check(stmts, in_prange):
        for s in stmts:
            if isinstance(s, ir.For):
                if s.kind == "prange" and in_prange:
                    _err(k, s, "only one pk.prange axis is allowed (nested parallel loops)")
                inner = not any(isinstance(x, (ir.For, ir.While)) for x in ir.walk(s.body))
                if inner and budget:
                    live = names_in(s.body)
                    if len(live) > budget:
                        _err(k, s, f"the inner loop uses {len(live)} vector registers but this CPU has {budget}; "
                                   f"shrink the register tile (e.g. MR*NV + NV + 1 <= 32)")
                check(s.body, in_prange or s.kind == "prange")
            elif isinstance(s, ir.While):
                check(s.body, in_prange)
            elif isinstance(s, ir.If):
                check(s.then, in_prange)
                check(s.orelse, in_prange)
    check(k.body, False)
    nprange = sum(1 for s in ir.walk(k.body) if isinstance(s, ir.For) and s.kind == "prange")
    return k, nprange


def lower(k: ir.KernelIR, config: dict, level: str):
    """Run every pass: returns (lowered IR, variable types, whether the kernel has a prange)."""
    k = scalarize_tiles(unroll(bind_consts(k, config)))
    k, types = legalize(k, level)
    k, nprange = verify(k, types, level)
    return k, types, nprange > 0
