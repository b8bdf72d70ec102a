"""The runtime side of @pk.kernel: validate arguments, pick a config, compile, call.

Contracts: `KernelSpec` (frontend -> tuner) describes a kernel; `CompiledKernel` (codegen ->
runtime) is one compiled (config, ISA level) variant. Arguments may be torch tensors or NumPy
arrays; neither is copied (bf16 tensors travel as an int16 view of the same memory).
"""
from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import codegen, env, frontend, ir, passes
from .lang import Config, Dim, DimExpr, Space, BUCKETS
from .log import PROFILING, log, now, record, warn_once
from .target import cpu


class PkArgError(TypeError):
    """A kernel argument of the wrong type, dtype, shape or layout; the message names it."""


@dataclass(frozen=True)
class KernelSpec:
    name: str                 # kernel function name
    ir: ir.KernelIR           # unbound IR: tile parameters still symbolic, helpers inlined
    space: Space              # tile parameters to tune
    ref: Callable | None      # PyTorch reference: the kernel's args -> its outputs (must not write them)
    key: dict                 # dim -> bucket name or callable, for tuning-cache keys
    source_hash: str          # hash of the IR: covers inlined helpers and the numeric globals read
    origin: str               # "file.py:line" of the kernel definition


@dataclass(frozen=True)
class CompiledKernel:
    fn: Callable              # the Numba dispatcher (or plain Python in interpret mode)
    config: Config            # tile parameters it was generated with
    isa: str                  # ISA level it was compiled for
    path: Path                # generated source file
    parallel: bool            # has a prange axis


@dataclass
class Bound:
    """Arguments checked against the signature, ready for the generated function."""
    flat: list                # 1-D NumPy views of the arrays, then scalars, in parameter order
    dims: dict                # dim name -> size
    outs: list                # caller's objects for the output params (returned by __call__)
    args: tuple               # the caller's original arguments (for the reference)


_TORCH_TO_PK = {"float32": "f32", "bfloat16": "bf16", "int32": "i32", "int64": "i64", "int16": "i16",
                "uint8": "u8", "int8": "s8"}
_NP_OK = {"f32": ("float32",), "bf16": ("int16", "uint16"), "i32": ("int32",), "i64": ("int64",),
          "i16": ("int16",), "u8": ("uint8",), "s8": ("int8",)}


_TORCH_DTYPES: dict = {}       # torch dtype -> pk dtype name, filled on first use (torch imports lazily)


def _torch_dtype_name(dt):
    if not _TORCH_DTYPES:
        import torch
        _TORCH_DTYPES.update({getattr(torch, k): v for k, v in _TORCH_TO_PK.items()})
    return _TORCH_DTYPES.get(dt)


def _as_numpy(name, kname, p: ir.Param, a):
    """Zero-copy 1-D view of argument `a` for param p, or PkArgError naming it."""
    if isinstance(a, np.ndarray):
        if str(a.dtype) not in _NP_OK[p.dtype]:
            raise PkArgError(f"{kname}: argument '{name}' must have dtype {p.dtype} (numpy {_NP_OK[p.dtype][0]}), got {a.dtype}")
        if not a.flags.c_contiguous:
            raise PkArgError(f"{kname}: argument '{name}' is not C-contiguous; pass np.ascontiguousarray(...)")
        arr = a.view(np.int16) if p.dtype == "bf16" else a
    elif type(a).__module__.startswith("torch") and hasattr(a, "is_contiguous"):
        where = f"{kname}: argument '{name}'"
        if _torch_dtype_name(a.dtype) != p.dtype:
            raise PkArgError(f"{where} must have dtype {p.dtype} ({_pk_to_torch(p.dtype)}), got {a.dtype}")
        if a.device.type != "cpu":
            raise PkArgError(f"{where} is on {a.device}; pacekern kernels run on the CPU")
        if not a.is_contiguous():
            raise PkArgError(f"{where} is not contiguous (strides {tuple(a.stride())}); pass .contiguous()")
        if a.requires_grad:
            a = a.detach()
        if p.dtype == "bf16":
            import torch
            a = a.view(torch.int16)
        arr = a.numpy()
    else:
        raise PkArgError(f"{kname}: argument '{name}' must be a torch.Tensor or numpy.ndarray, got {type(a).__name__}")
    if arr.ndim != len(p.shape):
        raise PkArgError(f"{kname}: argument '{name}' must have {len(p.shape)} dimensions {_shape_str(p.shape)}, got shape {tuple(arr.shape)}")
    return arr


def _pk_to_torch(d):
    return {v: k for k, v in _TORCH_TO_PK.items()}[d]


def _shape_str(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


class Kernel:
    """A compiled, checkable, tunable kernel. Call it like the function it decorates."""

    def __init__(self, fn, space: Space, ref, key: dict, name: str | None = None, strict_fp: bool = False):
        self.fn = fn
        kir = frontend.parse(fn)
        kir = replace(kir, name=name or kir.name, strict_fp=strict_fp)
        unknown = set(space.params) ^ set(kir.consts)
        if unknown:
            raise frontend.PkSyntaxError(f"kernel '{kir.name}': space parameters {sorted(space.params)} must match "
                                         f"the keyword-only tile parameters {list(kir.consts)}")
        for d, b in key.items():
            if d not in kir.dims or not (callable(b) or b in BUCKETS):
                raise ValueError(f"kernel '{kir.name}': key entry {d}={b!r} must name a dim ({', '.join(kir.dims)}) "
                                 f"and 'exact', 'pow2' or a callable")
        self.spec = KernelSpec(kir.name, kir, space, ref, key, hashlib.sha256(ir.show(kir).encode()).hexdigest()[:16],
                               _origin(fn))
        self.name = kir.name
        self.__doc__ = fn.__doc__
        self._compiled: dict = {}
        self._chosen: dict = {}      # bucket -> Config
        self._pinned: dict = {}      # bucket (or None for all) -> Config
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<pacekern kernel {self.name} {self.spec.origin}>"

    # ---- arguments ----------------------------------------------------------------------------
    def bind(self, args) -> Bound:
        params = self.spec.ir.params
        if len(args) != len(params):
            names = ", ".join(p.name for p in params)
            raise PkArgError(f"{self.name}() takes {len(params)} arguments ({names}), got {len(args)}")
        flat, dims, src, outs, checks = [], {}, {}, [], []
        # per param, per dimension: a dim name to bind, an int, or a DimExpr to check afterwards
        for p, a in zip(params, args):
            if not p.shape:
                if not isinstance(a, (int, float, np.integer, np.floating)) or isinstance(a, bool):
                    raise PkArgError(f"{self.name}: argument '{p.name}' must be a number, got {type(a).__name__}")
                flat.append(np.float32(a) if p.dtype in ("f32", "bf16") else np.int64(a))
                continue
            arr = _as_numpy(p.name, self.name, p, a)
            shape = arr.shape
            for i, d in enumerate(p.shape):
                if type(d) is Dim:
                    got = dims.get(d.name)
                    if got is None:
                        dims[d.name], src[d.name] = shape[i], p.name
                    elif got != shape[i]:
                        raise PkArgError(f"{self.name}: argument '{p.name}' has shape {tuple(shape)} but {d.name}={got} "
                                         f"from argument '{src[d.name]}' (expected {_shape_str(p.shape)})")
                elif type(d) is int:
                    if d != shape[i]:
                        checks.append((p, shape, i, d))
                else:
                    checks.append((p, shape, i, d))
            flat.append(arr.reshape(-1))
            if p.out:
                outs.append(a)
        env_ = dims
        for p, shape, i, d in checks:
            want = d if isinstance(d, int) else d.eval(env_)
            if want != shape[i]:
                raise PkArgError(f"{self.name}: argument '{p.name}' has shape {tuple(shape)}; dimension {i} should be "
                                 f"{d}={want} (expected {_shape_str(p.shape)} with {_dims_str(env_)})")
        return Bound(flat, env_, outs, tuple(args))

    def bucket(self, dims: dict) -> tuple:
        """The tuning key's shape part: each dim exact, or bucketed as `key` says."""
        out = []
        for d in self.spec.ir.dims:
            b = self.spec.key.get(d, "exact")
            out.append((d, (BUCKETS[b] if isinstance(b, str) else b)(dims[d])))
        return tuple(out)

    # ---- configs ------------------------------------------------------------------------------
    def pin(self, config: Config, **bucket):
        """Use `config` for this shape bucket (all buckets if none given), skipping the tuning cache.
        `pacekern tune` prints this line for the winner."""
        key = tuple(sorted(bucket.items())) if bucket else None
        self._pinned[key] = self.resolve_config(config)
        self._chosen.clear()
        return self

    def config_for(self, bound: Bound) -> Config:
        b = self.bucket(bound.dims)
        cfg = self._chosen.get(b)
        if cfg is not None:
            return cfg
        cfg = self._pinned.get(tuple(sorted(b))) or self._pinned.get(None)
        if cfg is None and self.spec.space.params:
            from . import tuner
            cfg = tuner.cached_best(self, b)
            if cfg is None and env.flag("PACEKERN_TUNE"):
                cfg = tuner.tune(self, *bound.args).best
            if cfg is None:
                cfg = self.spec.space.default_config(cpu().level)
                log.debug("%s: no tuned config for %s; using the default %s", self.name, _dims_str(dict(b)), cfg)
        cfg = cfg or Config(())
        self._chosen[b] = cfg
        return cfg

    # ---- compilation --------------------------------------------------------------------------
    def resolve_config(self, config) -> Config | None:
        """A user's config (pk.Config or dict; None stays None) in the space's parameter order."""
        config = Config.coerce(config)
        if config is None or not (self.spec.space.params or config.values):
            return config
        return self.spec.space.normalize(config)

    def lower(self, config: Config | None = None, level: str | None = None):
        config = self.resolve_config(config)
        level = level or cpu().level
        config = self.spec.space.default_config(level) if config is None and self.spec.space.params else (config or Config(()))
        return passes.lower(self.spec.ir, config.asdict(), level)

    def source(self, config: Config | None = None, level: str | None = None, interpret: bool | None = None) -> str:
        """The generated Numba source for a config (default: the space's default config)."""
        k, _, parallel = self.lower(config, level)
        interp = env.flag("PACEKERN_INTERPRET") if interpret is None else interpret
        return codegen.generate(k, parallel, self.spec.origin, interpret=interp)

    def show_ir(self, config: Config | None = None, level: str | None = None, lowered: bool = True) -> str:
        """The tile IR, before (lowered=False) or after all passes."""
        return ir.show(self.lower(config, level)[0] if lowered else self.spec.ir)

    def compiled(self, config: Config) -> CompiledKernel:
        level = cpu().level
        interp = env.flag("PACEKERN_INTERPRET")
        key = (config, level, interp)
        ck = self._compiled.get(key)
        if ck is None:
            with self._lock:
                k, _, parallel = passes.lower(self.spec.ir, config.asdict(), level)
                src = codegen.generate(k, parallel, self.spec.origin, interpret=interp)
                fn, path = codegen.load(src, self.name)
                if env.flag("PACEKERN_PRINT_CODE"):
                    log.info("%s %s -> %s", self.name, config, path)
                ck = self._compiled[key] = CompiledKernel(fn, config, level, path, parallel)
        return ck

    # ---- calling ------------------------------------------------------------------------------
    def __call__(self, *args, config: Config | None = None):
        bound = self.bind(args)
        config = self.resolve_config(config)
        cfg = config if config is not None else self.config_for(bound)
        try:
            ck = self.compiled(cfg)
        except passes.IsaError as e:
            if self.spec.ref is None:
                raise
            warn_once(f"fallback-{self.name}", "%s cannot be compiled at ISA level %s (%s); running its reference instead",
                      self.name, cpu().level, e)
            return self.run_ref(bound)
        t0 = now() if PROFILING else 0.0
        ck.fn(*bound.flat, *(bound.dims[d] for d in self.spec.ir.dims))
        if PROFILING:
            record(self.name, now() - t0)
        return bound.outs[0] if len(bound.outs) == 1 else tuple(bound.outs)

    def prepare(self, *args, config: Config | None = None) -> Callable[[], None]:
        """Check and bind arguments once; the returned zero-argument call reruns the kernel on the
        same buffers (their contents may change) at the cost of the bare Numba call. For hot loops
        such as LLM decode, where buffers are fixed and only their values change."""
        bound = self.bind(args)
        config = self.resolve_config(config)
        ck = self.compiled(config if config is not None else self.config_for(bound))
        fn, call_args, name = ck.fn, (*bound.flat, *(bound.dims[d] for d in self.spec.ir.dims)), self.name
        if not PROFILING:
            return lambda: fn(*call_args)

        def profiled():
            t0 = now()
            fn(*call_args)
            record(name, now() - t0)
        return profiled

    def run_ref(self, bound: Bound):
        """Run the reference and write its results into the output arguments."""
        import torch
        res = self.spec.ref(*bound.args)
        res = res if isinstance(res, (tuple, list)) else (res,)
        for o, r in zip(bound.outs, res):
            r = torch.as_tensor(r)
            if isinstance(o, np.ndarray):
                o[...] = (r.view(torch.int16) if r.dtype == torch.bfloat16 else r).numpy()
            else:
                o.copy_(r)
        return bound.outs[0] if len(bound.outs) == 1 else tuple(bound.outs)

    # ---- PyTorch ------------------------------------------------------------------------------
    def as_torch_op(self, qualname: str | None = None):
        """Register this kernel as a torch custom op (`torch.ops.pacekern.<name>` by default) that
        writes its outputs in place, so torch.compile'd code can call it without a graph break."""
        import inspect
        import torch
        if qualname is None:
            qualname = f"pacekern::{self.name}"
        if qualname in _TORCH_OPS:
            return _TORCH_OPS[qualname]
        params = self.spec.ir.params
        sig = inspect.Signature([inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   annotation=torch.Tensor if p.shape else (float if p.dtype in ("f32", "bf16") else int))
                                 for p in params], return_annotation=None)

        def impl(*args, **kwargs):
            self(*sig.bind(*args, **kwargs).args)
        impl.__signature__ = sig
        impl.__name__ = self.name
        op = torch.library.custom_op(qualname, mutates_args=tuple(p.name for p in params if p.out))(impl)
        op.register_fake(lambda *args, **kwargs: None)
        _TORCH_OPS[qualname] = op
        return op

    # ---- inspection ---------------------------------------------------------------------------
    def asm(self, config: Config | None = None) -> "AsmReport":
        """Compile (uncached) and summarize the machine code: zmm registers used, vector spills."""
        from numba import types as nt
        src = self.source(config, interpret=False).replace("cache=True", "cache=False")
        mod, _ = codegen.write_module(src, self.name + "_asm")
        import importlib
        fn = getattr(importlib.import_module(mod), self.name)
        nb = {"f32": nt.float32, "bf16": nt.int16, "i32": nt.int32, "i64": nt.int64, "i16": nt.int16,
              "u8": nt.uint8, "s8": nt.int8}
        sig = [nt.Array(nb[p.dtype], 1, "C") if p.shape else (nt.float32 if p.dtype == "f32" else nt.int64)
               for p in self.spec.ir.params] + [nt.int64] * len(self.spec.ir.dims)
        fn.compile(tuple(sig))
        text = "\n".join(fn.inspect_asm().values())
        return AsmReport.of(text)


_TORCH_OPS: dict = {}


def _origin(fn) -> str:
    """'pacekern_ops/gemm_f32.py:41': the module path from its top package (stable across clones)."""
    mod, code = fn.__module__ or "", fn.__code__
    if mod and mod != "__main__" and code.co_filename.endswith(".py"):
        return mod.replace(".", "/") + f".py:{code.co_firstlineno}"
    return f"{Path(code.co_filename).name}:{code.co_firstlineno}"


def _dims_str(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


@dataclass(frozen=True)
class AsmReport:
    """Machine code of a kernel, reduced to what matters: the kernel body (for a prange kernel, the
    parallel loop body Numba outlines), its innermost loops (found from backward jumps), and for
    the hot one (most vector arithmetic) the registers used and stack spills."""
    text: str                 # the whole module's assembly
    body: str                 # the kernel body function
    inner_loops: tuple        # assembly of each innermost loop
    hot_loop: str             # the innermost loop with the most vector arithmetic
    zmm_registers: int        # distinct zmm registers in the hot loop
    ymm_registers: int
    inner_spills: int         # vector loads/stores to the stack inside the hot loop
    counts: dict              # mnemonic -> count in the hot loop, for the interesting ones

    @staticmethod
    def of(text: str) -> "AsmReport":
        funcs, cur = {}, None
        for line in text.splitlines():
            m = re.match(r"^([^\s.#][^\s:]*):\s*$", line)
            if m:
                cur = m.group(1)
                funcs[cur] = []
            elif cur:
                funcs[cur].append(line)
        hot = [n for n in funcs if "numba_parfor_gufunc" in n and not n.startswith("__gufunc__")] or \
              [n for n in funcs if n.startswith("_ZN") and "cpython" not in n and "numba_parfor" not in n][:1]
        body = [l for n in hot for l in funcs[n]]
        labels = {m.group(1): i for i, l in enumerate(body) if (m := re.match(r"^(\.LBB[\w]+):", l))}
        loops = []
        for j, l in enumerate(body):
            m = re.match(r"\s+j\w+\s+(\.LBB\w+)", l)
            if m and m.group(1) in labels and labels[m.group(1)] < j:
                loops.append((labels[m.group(1)], j))
        inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
        code = [body[a: b + 1] for a, b in inner]
        # the hot loop: the innermost loop with the most FMA/dot instructions, then the most other
        # vector arithmetic (reduction and epilogue blocks that LLVM also lays out as loops are
        # not what the register budget is about)
        def n_work(c):
            ops = [l.split()[0] for l in c if l.strip()]
            return (sum(o.startswith(("vfmadd", "vpdpbusd", "vdpbf16ps", "tdpb")) for o in ops),
                    sum(o.startswith(("vaddps", "vmulps", "vmaxps", "vpaddd")) for o in ops))
        hot = max(code, key=n_work) if code else []
        flat = [l.strip() for l in hot if l.strip() and not l.strip().startswith((".", "#"))]
        spills = [l for l in flat if re.search(r"%[xyz]mm\d+", l) and re.search(r"\(%r[sb]p\)", l)]
        interesting = ("vfmadd", "vpdpbusd", "vdpbf16ps", "tdpb", "tileloadd", "vbroadcastss", "vpbroadcastd", "vmovups")
        counts = {k: sum(1 for l in flat if l.split()[0].startswith(k)) for k in interesting}
        return AsmReport(text, "\n".join(body), tuple("\n".join(c) for c in code), "\n".join(hot),
                         len({r for l in flat for r in re.findall(r"%zmm\d+", l)}),
                         len({r for l in flat for r in re.findall(r"%ymm\d+", l)}),
                         len(spills), {k: v for k, v in counts.items() if v})

    def summary(self) -> str:
        c = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return (f"hot loop of {len(self.inner_loops)} inner loop(s): {self.zmm_registers} zmm / {self.ymm_registers} ymm "
                f"registers, {self.inner_spills} vector spills; {c}")
