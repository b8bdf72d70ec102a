"""Frontend: the Python source of a @pk.kernel function -> tile IR (pacekern.ir).

Only a small subset of Python is accepted; anything else raises PkSyntaxError naming the file
and line of the user's kernel and saying what to write instead. Calls to @pk.func helpers are
inlined here, with their locals renamed so they cannot clash with the caller's.
"""
from __future__ import annotations

import ast
import inspect
import itertools
import textwrap

from . import ir, lang

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>"}
_CMPOPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
_SCALAR_BUILTINS = {"min": (2, 2), "max": (2, 2), "abs": (1, 1), "float": (1, 1), "int": (1, 1)}
_fresh = itertools.count()


class PkSyntaxError(SyntaxError):
    """Kernel source the compiler does not support; the message names the file and line."""


def _source(fn):
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError) as e:
        raise PkSyntaxError(f"kernel '{fn.__name__}': cannot read its source ({e}); kernels and @pk.func helpers "
                            f"must be defined in a .py file (not exec() or an interactive prompt)") from None
    src = textwrap.dedent("".join(lines))
    return src, first, inspect.getsourcefile(fn) or "<unknown>"


class _Translator:
    def __init__(self, fn, params: dict, dims: set, consts: set, prefix: str = ""):
        self.fn = fn
        self.src, self.first, self.file = _source(fn)
        self.params, self.dims, self.consts = params, dims, consts   # params: source name -> kernel param
        self.tiles: dict = {}                # source name -> IR tile name (helpers see the caller's tiles)
        self.scratch: set = set()            # source names of pk.scratch arrays (kept in params)
        self.prefix = prefix                 # renaming of locals when inlining a helper
        self.locals: set = set()
        self.pre: list = []                  # statements hoisted out of the current expression (inlined helpers)
        self.returned = None

    # ---- errors -------------------------------------------------------------------------------
    def line(self, node) -> int:
        return self.first + getattr(node, "lineno", 1) - 1

    def error(self, node, msg: str):
        ln = self.line(node)
        try:
            text = open(self.file).read().splitlines()[ln - 1].strip()
        except (OSError, IndexError):
            text = ""
        raise PkSyntaxError(f"{self.file}:{ln}: in kernel '{self.fn.__name__}': {msg}\n    {text}")

    # ---- names --------------------------------------------------------------------------------
    def local(self, name: str) -> str:
        return self.prefix + name if self.prefix else name

    def is_pk(self, node) -> bool:
        """`pk` may be the pacekern package or pacekern.lang (inside pacekern itself)."""
        return isinstance(node, ast.Name) and self.fn.__globals__.get(node.id) in (lang_module(), lang)

    # ---- statements ---------------------------------------------------------------------------
    def body(self, stmts) -> tuple:
        out = []
        for i, s in enumerate(stmts):
            if i == 0 and isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str):
                continue                      # docstring
            out += self.stmt(s)
        return tuple(out)

    def stmt(self, s) -> list:
        self.pre = []
        res = self._stmt(s)
        return self.pre + res

    def _stmt(self, s) -> list:
        ln = self.line(s)
        if isinstance(s, ast.Pass):
            return []
        if isinstance(s, ast.Return):
            if not self.prefix:
                self.error(s, "kernels write their results into output arrays (pk.Out[...]); `return` is only allowed in @pk.func helpers")
            self.returned = self.expr(s.value) if s.value is not None else None
            return []
        if isinstance(s, ast.Expr):
            e = self.expr(s.value)
            return [ir.Eval(e, line=ln)] if isinstance(e, ir.Op) else []
        if isinstance(s, ast.AugAssign):
            target = s.target
            value = ast.BinOp(left=_load_copy(target), op=s.op, right=s.value, lineno=s.lineno)
            return self.assign(target, value, ln, s)
        if isinstance(s, ast.Assign):
            if len(s.targets) != 1:
                self.error(s, "chained assignment (a = b = ...) is not supported: assign one name per statement")
            return self.assign(s.targets[0], s.value, ln, s)
        if isinstance(s, ast.AnnAssign):
            return self.assign(s.target, s.value, ln, s)
        if isinstance(s, ast.For):
            return [self.for_(s)]
        if isinstance(s, ast.While):
            if s.orelse:
                self.error(s, "while/else is not supported")
            return [ir.While(self.expr(s.test), self.body(s.body), line=ln)]
        if isinstance(s, ast.If):
            cond = self.expr(s.test)
            pre = self.pre
            then, orelse = self.body(s.body), self.body(s.orelse)
            self.pre = pre
            return [ir.If(cond, then, orelse, line=ln)]
        what = type(s).__name__
        hint = {"With": "use plain loops", "Try": "kernels cannot raise or catch exceptions",
                "FunctionDef": "define helpers at module level with @pk.func", "Break": "use a while loop with a condition",
                "Continue": "use an if around the loop body", "Raise": "validate inputs outside the kernel"}.get(what, "")
        self.error(s, f"'{what}' statements are not supported in kernels" + (f"; {hint}" if hint else ""))

    def assign(self, target, value, ln, node) -> list:
        if isinstance(value, ast.Call) and self._pk_attr(value.func) == "tile":
            if not isinstance(target, ast.Name):
                self.error(node, "pk.tile(...) must be assigned to a plain name")
            if len(value.args) < 2:
                self.error(node, "pk.tile(vtype, *shape) needs a vector type and at least one size")
            vt = self._vtype(value.args[0])
            name = self.local(target.id)
            self.tiles[target.id] = name
            return [ir.Tile(name, vt, tuple(self.expr(a) for a in value.args[1:]), line=ln)]
        if isinstance(value, ast.Call) and self._pk_attr(value.func) == "scratch":
            if not isinstance(target, ast.Name) or target.id in self.locals or target.id in self.dims or \
                    target.id in self.consts or (target.id in self.params and target.id not in self.scratch):
                self.error(node, "pk.scratch(...) must be assigned to a new plain name")
            dt = self._pk_attr(value.args[0]) if value.args else None
            if dt not in lang.DTYPES or len(value.args) < 2 or value.keywords:
                self.error(node, "pk.scratch(dtype, *shape) needs an element type (pk.f32, pk.i32, ...) and at least one size")
            name = self.local(target.id)
            self.params[target.id] = name
            self.scratch.add(target.id)
            return [ir.Scratch(name, dt, tuple(self.expr(a) for a in value.args[1:]), line=ln)]
        val = self.expr(value)
        if isinstance(target, ast.Name):
            if target.id in self.params or target.id in self.dims or target.id in self.consts:
                self.error(node, f"'{target.id}' is a parameter of the kernel and cannot be reassigned")
            self.locals.add(target.id)
            return [ir.Assign(self.local(target.id), val, line=ln)]
        if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            base = target.value.id
            idx = self.index(target)
            if base in self.tiles:
                return [ir.Assign(ir.TileRef(self.tiles[base], idx, line=ln), val, line=ln)]
            if base in self.params:
                return [ir.Store(self.params[base], idx, val, line=ln)]
        self.error(node, "can only assign to a name, a register tile element acc[i, j] or an array element x[i, j]")

    def for_(self, s) -> ir.For:
        if s.orelse:
            self.error(s, "for/else is not supported")
        if not isinstance(s.target, ast.Name):
            self.error(s, "loop variable must be a single name")
        it = s.iter
        kind = None
        if isinstance(it, ast.Call):
            if isinstance(it.func, ast.Name) and it.func.id == "range":
                kind = "range"
            elif self._pk_attr(it.func) in ("prange", "unroll"):
                kind = self._pk_attr(it.func)
        if kind is None or not 1 <= len(it.args) <= 3 or it.keywords:
            self.error(s, "loops must be `range(...)`, `pk.prange(...)` or `pk.unroll(...)` with 1 to 3 arguments")
        args = [self.expr(a) for a in it.args]
        start, stop, step = (ir.Const(0), args[0], ir.Const(1)) if len(args) == 1 else \
            (args[0], args[1], args[2] if len(args) == 3 else ir.Const(1))
        self.locals.add(s.target.id)
        pre = self.pre
        body = self.body(s.body)
        self.pre = pre
        return ir.For(self.local(s.target.id), start, stop, step, kind, body, line=self.line(s))

    # ---- expressions --------------------------------------------------------------------------
    def index(self, sub) -> tuple:
        sl = sub.slice
        elts = sl.elts if isinstance(sl, ast.Tuple) else [sl]
        for e in elts:
            if isinstance(e, ast.Slice):
                self.error(sub, "slices are not supported: index one element, or load a vector with pk.<vtype>.load(x[i, j])")
        return tuple(self.expr(e) for e in elts)

    def _pk_attr(self, node):
        if isinstance(node, ast.Attribute) and self.is_pk(node.value):
            return node.attr
        return None

    def _vtype(self, node) -> str:
        name = self._pk_attr(node)
        if name not in lang.VECTYPES:
            self.error(node, f"expected a vector type (pk.{', pk.'.join(lang.VECTYPES)})")
        return name

    def expr(self, e):
        ln = self.line(e)
        if isinstance(e, ast.Constant):
            if isinstance(e.value, (bool, int, float)):
                return ir.Const(e.value, line=ln)
            self.error(e, f"constant {e.value!r} is not a number")
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.BinOp):
            op = _BINOPS.get(type(e.op))
            if op is None:
                self.error(e, f"operator {type(e.op).__name__} is not supported")
            return ir.BinOp(op, self.expr(e.left), self.expr(e.right), line=ln)
        if isinstance(e, ast.Compare):
            if len(e.ops) != 1:
                self.error(e, "chained comparisons (a < b < c) are not supported: use `and`")
            return ir.BinOp(_CMPOPS[type(e.ops[0])], self.expr(e.left), self.expr(e.comparators[0]), line=ln)
        if isinstance(e, ast.BoolOp):
            op = "and" if isinstance(e.op, ast.And) else "or"
            out = self.expr(e.values[0])
            for v in e.values[1:]:
                out = ir.BinOp(op, out, self.expr(v), line=ln)
            return out
        if isinstance(e, ast.UnaryOp):
            if isinstance(e.op, ast.USub):
                a = self.expr(e.operand)
                return ir.Const(-a.value, line=ln) if isinstance(a, ir.Const) else ir.UnaryOp("-", a, line=ln)
            if isinstance(e.op, ast.Not):
                return ir.UnaryOp("not", self.expr(e.operand), line=ln)
            if isinstance(e.op, ast.UAdd):
                return self.expr(e.operand)
        if isinstance(e, ast.Subscript) and isinstance(e.value, ast.Name):
            base = e.value.id
            if base in self.tiles:
                return ir.TileRef(self.tiles[base], self.index(e), line=ln)
            if base in self.params:
                return ir.Index(self.params[base], self.index(e), line=ln)
            self.error(e, f"'{base}' is neither an array parameter nor a register tile")
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.IfExp):
            self.error(e, "conditional expressions are not supported: use an if statement, or pk.max/pk.min")
        what = type(e).__name__
        hint = {"ListComp": "write a for loop that stores into an output array or a pk.tile",
                "GeneratorExp": "write a for loop that accumulates into a variable",
                "DictComp": "kernels have no dicts: use arrays", "SetComp": "kernels have no sets: use arrays",
                "List": "kernels have no lists: use a pk.tile or an array parameter",
                "Tuple": "kernels have no tuples: use one name per value",
                "Dict": "kernels have no dicts: use arrays", "Lambda": "define helpers at module level with @pk.func",
                "JoinedStr": "kernels have no strings",
                "Attribute": "kernels see pk ops, parameters and locals only"}.get(what, "")
        self.error(e, f"'{what}' expressions are not supported in kernels" + (f"; {hint}" if hint else ""))

    def name(self, e):
        n, ln = e.id, self.line(e)
        if n in self.locals:
            return ir.Name(self.local(n), line=ln)
        if n in self.params:
            return ir.Name(self.params[n], line=ln)
        if n in self.dims or n in self.consts:
            return ir.Name(n, line=ln)
        if n in self.fn.__globals__ or n in _closure(self.fn):
            v = _closure(self.fn).get(n, self.fn.__globals__.get(n))
            if isinstance(v, (bool, int, float)):
                return ir.Const(v, line=ln)
            if isinstance(v, lang.Dim):
                return ir.Name(v.name, line=ln)
            self.error(e, f"global '{n}' is a {type(v).__name__}; kernels can only read numeric globals")
        self.error(e, f"name '{n}' is not defined (not a local, parameter, dim or tile parameter)")

    def call(self, e):
        ln = self.line(e)
        f = e.func
        kw = {k.arg: k.value for k in e.keywords}
        # pk.f32x16.load(x[i, j], n=...) and friends
        if isinstance(f, ast.Attribute) and self._pk_attr(f.value) in lang.VECTYPES:
            vt, meth = f.value.attr, f.attr
            if meth not in lang.VEC_METHODS:
                self.error(e, f"pk.{vt} has no method '{meth}' (has: {', '.join(lang.VEC_METHODS)})")
            if len(e.args) != lang.VEC_METHODS[meth]:
                self.error(e, f"pk.{vt}.{meth} takes {lang.VEC_METHODS[meth]} positional argument(s)")
            args = [self.address(a) if meth.startswith("load") else self.expr(a) for a in e.args]
            if "n" in kw:
                args.append(self.expr(kw.pop("n")))
            if kw:
                self.error(e, f"unexpected keyword(s) {', '.join(kw)} (only n= for masked tails)")
            return ir.Op(meth, tuple(args), vtype=vt, line=ln)
        op = self._pk_attr(f)
        if op is not None:
            if op == "cdiv":
                a, b = (self.expr(x) for x in e.args)
                return ir.BinOp("//", ir.BinOp("-", ir.BinOp("+", a, b), ir.Const(1)), b, line=ln)
            if op not in lang.OPS:
                self.error(e, f"pk.{op} is not a kernel op (ops: {', '.join(sorted(lang.OPS))})")
            lo, hi = lang.OPS[op]
            if not lo <= len(e.args) <= hi:
                self.error(e, f"pk.{op} takes {lo if lo == hi else f'{lo} to {hi}'} positional arguments")
            args = []
            for i, a in enumerate(e.args):
                if op in ("store", "store_bf16", "prefetch", "amx_load", "amx_store", "amx_config") and \
                        i == (1 if op in ("amx_load", "amx_store") else 0):
                    args.append(self.address(a))
                elif op == "bitcast" and i == 1:
                    args.append(ir.Const(self._vtype(a)))
                else:
                    args.append(self.expr(a))
            if "n" in kw:
                if op not in ("store", "store_bf16"):
                    self.error(e, "n= (masked tail) is only accepted by loads, pk.store and pk.store_bf16")
                args.append(self.expr(kw.pop("n")))
            if kw:
                self.error(e, f"unexpected keyword(s) {', '.join(kw)}")
            return ir.Op(op, tuple(args), line=ln)
        if isinstance(f, ast.Name) and f.id == "float" and len(e.args) == 1 and isinstance(e.args[0], ast.Constant) \
                and isinstance(e.args[0].value, str):
            try:                                       # float("inf"), float("-inf"), float("nan")
                return ir.Const(float(e.args[0].value), line=ln)
            except ValueError:
                self.error(e, f"float({e.args[0].value!r}) is not a number")
        if isinstance(f, ast.Name) and f.id in _SCALAR_BUILTINS and f.id not in self.locals:
            lo, hi = _SCALAR_BUILTINS[f.id]
            if not lo <= len(e.args) <= hi or kw:
                self.error(e, f"{f.id}() takes {lo} argument(s) here")
            return ir.Op(f.id, tuple(self.expr(a) for a in e.args), line=ln)
        if isinstance(f, ast.Name):
            target = _closure(self.fn).get(f.id, self.fn.__globals__.get(f.id))
            if getattr(target, "__pk_func__", False):
                return self.inline(target, e)
            if f.id == "range":
                self.error(e, "range() is only allowed as a for-loop iterator")
        name = ast.unparse(f) if hasattr(ast, "unparse") else "this"
        leaf = name.rsplit(".", 1)[-1]
        hint = (f"; use pk.{leaf}" if leaf in lang.OPS else
                {"sum": "; accumulate in a for loop, or pk.hsum(v) over a vector's lanes",
                 "len": "; use the dims of the parameter's shape (pk.dims)",
                 "print": "; kernels cannot print: run with PACEKERN_INTERPRET=1 and step through the generated "
                          "source with pdb (PACEKERN_PRINT_CODE=1 names the file)"}.get(leaf, ""))
        self.error(e, f"{name}() cannot be called in kernels: only pk ops, pk.<vtype> methods, @pk.func helpers "
                      f"and min/max/abs/int/float can" + hint)

    def address(self, a):
        """The first argument of loads/stores: an element x[i, j] whose address is used."""
        if not (isinstance(a, ast.Subscript) and isinstance(a.value, ast.Name) and a.value.id in self.params):
            self.error(a, "loads and stores take an array element as address, e.g. pk.f32x16.load(x[i, k])")
        return ir.Addr(self.params[a.value.id], self.index(a), line=self.line(a))

    def inline(self, helper, call):
        if call.keywords:
            self.error(call, "@pk.func helpers take positional arguments only")
        tree = ast.parse(_source(helper)[0]).body[0]
        names = [a.arg for a in tree.args.args]
        if len(names) != len(call.args):
            self.error(call, f"{helper.__name__}() takes {len(names)} arguments, got {len(call.args)}")
        sub = _Translator(helper, {}, self.dims, self.consts, prefix=f"_{helper.__name__}{next(_fresh)}_")
        stmts = []
        for n, a in zip(names, call.args):
            # arrays and tiles pass by name; anything else is evaluated once into a helper local
            if isinstance(a, ast.Name) and a.id in self.params and a.id not in self.locals:
                sub.params[n] = self.params[a.id]
            elif isinstance(a, ast.Name) and a.id in self.tiles:
                sub.tiles[n] = self.tiles[a.id]
            else:
                sub.locals.add(n)
                stmts.append(ir.Assign(sub.local(n), self.expr(a), line=self.line(call)))
        stmts += list(sub.body(tree.body))
        self.pre += stmts
        return sub.returned if sub.returned is not None else ir.Const(0)


def _load_copy(target):
    t = ast.parse(ast.unparse(target), mode="eval").body
    ast.copy_location(t, target)
    for n in ast.walk(t):
        n.lineno = getattr(target, "lineno", 1)
    return t


def _closure(fn) -> dict:
    cv = inspect.getclosurevars(fn) if fn.__closure__ else None
    return dict(cv.nonlocals) if cv else {}


def lang_module():
    import pacekern
    return pacekern


def parse(fn) -> ir.KernelIR:
    """Translate a kernel function into unbound tile IR (tile parameters still symbolic)."""
    sig = inspect.signature(fn)
    try:       # also works under `from __future__ import annotations` (string annotations)
        annotations = inspect.get_annotations(fn, eval_str=True)
    except Exception as e:
        raise PkSyntaxError(f"kernel '{fn.__name__}': cannot evaluate its parameter annotations: {e}") from None
    params, consts, ir_params, dims = {}, [], [], []
    for p in sig.parameters.values():
        if p.kind == p.KEYWORD_ONLY:
            consts.append(p.name)
            continue
        ann = annotations.get(p.name)
        if isinstance(ann, lang.ArrayType):
            for d in ann.shape:
                for n in lang.dim_names(d):
                    if n not in dims:
                        dims.append(n)
                if not isinstance(d, (lang.Dim, int)):
                    raise PkSyntaxError(f"kernel '{fn.__name__}': parameter '{p.name}' has a shape entry {d!r}; use dims (pk.dims) or ints")
            ir_params.append(ir.Param(p.name, ann.dtype.name, tuple(ann.shape), out=ann.out))
        elif isinstance(ann, lang.DType):
            ir_params.append(ir.Param(p.name, ann.name, (), out=False))
        else:
            raise PkSyntaxError(f"kernel '{fn.__name__}': parameter '{p.name}' needs an annotation such as pk.f32[M, K] "
                                f"(array) or pk.f32 (scalar); tile parameters go after '*' as keyword-only")
        params[p.name] = p.name
    bare = {d.name for p in ir_params for d in p.shape if isinstance(d, lang.Dim) and not isinstance(d, lang.DimExpr)}
    for p in ir_params:
        for d in p.shape:
            hidden = [n for n in lang.dim_names(d) if n not in bare] if isinstance(d, lang.DimExpr) else []
            if hidden:
                raise PkSyntaxError(f"kernel '{fn.__name__}': dim {hidden[0]} appears only inside the expression {d!r} "
                                    f"(parameter '{p.name}'), so its value cannot be read from the arguments; give some "
                                    f"parameter {hidden[0]} as a plain dimension, or use a separate dim for {d!r}")
    t = _Translator(fn, params, set(dims), set(consts))
    tree = ast.parse(t.src).body[0]
    body = t.body(tree.body)
    return ir.KernelIR(fn.__name__, tuple(ir_params), tuple(dims), tuple(consts), body)
