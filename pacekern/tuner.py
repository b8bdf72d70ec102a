"""The autotuner: search a kernel's space for one shape bucket, under a wall-clock budget.

  1. configs = space.where, then space.prune(cfg, dims, cpu) for this problem
  2. already measured configs come from the tuning cache (only new ones are timed)
  3. small spaces are run whole; larger ones by pattern search from the default config
     (coordinate moves, Helion's PatternSearch idea), in rounds: first every axis through the
     default, then the neighbours of the best
  4. each round compiles its candidates in worker processes (Numba writes its cache there, the
     main process then only loads), validates every one against `ref`, and times the survivors
     interleaved with the current best (medians)
  5. every record goes to the cache; the winner is printed as a line to paste into code
"""
from __future__ import annotations

import importlib
import json
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass

from . import bench, cache, codegen, env, passes
from .check import check
from .lang import Config
from .log import log
from .target import cpu

FULL_SEARCH_MAX = 24          # spaces up to this size are measured whole
COMPILE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TuneResult:
    kernel: str
    bucket: tuple             # ((dim, bucketed size), ...)
    best: Config
    best_s: float             # median seconds per call of the winner
    default_s: float          # same for the space's default config (nan if not measured)
    records: tuple            # TuneRecord for every config considered
    elapsed_s: float
    new: int                  # configs measured in this run (the rest came from the cache)

    def pin_line(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.bucket)
        return f"{self.kernel}.pin({self.best!r}, {dims})"


_memo: dict = {}


def _key(kernel, bucket):
    parts = cache.key_parts(kernel, bucket)
    return cache.key_of(parts), parts


def cached_best(kernel, bucket) -> Config | None:
    """Best config recorded for this kernel/bucket on this machine, or None (no compile, no timing)."""
    if env.flag("PACEKERN_INTERPRET"):
        return None
    key, _ = _key(kernel, bucket)
    if key in _memo:
        return _memo[key]
    space = set(kernel.spec.space.configs(cpu().level))
    ok = [r for r in cache.records(key) if r.status == "ok" and r.config in space]
    best = min(ok, key=lambda r: r.time_s).config if ok else None
    _memo[key] = best
    return best


def _signature_spec(kernel) -> list:
    return [("array" if p.shape else "scalar", p.dtype) for p in kernel.spec.ir.params] + [("dim", "i64")] * len(kernel.spec.ir.dims)


def _compile_worker(module: str, fn_name: str, src_dir: str, spec: list) -> tuple:
    """Runs in a worker process: import the generated module and compile it for the call signature."""
    t0 = time.perf_counter()
    try:
        sys.path.insert(0, src_dir)
        from pacekern.target import cpu as _cpu
        _cpu()                                       # applies PACEKERN_ISA's feature string to Numba
        from numba import types as nt
        nb = {"f32": nt.float32, "bf16": nt.int16, "i32": nt.int32, "i64": nt.int64, "i16": nt.int16, "u8": nt.uint8,
              "s8": nt.int8}
        sig = tuple(nt.Array(nb[d], 1, "C") if kind == "array" else
                    (nt.float32 if d in ("f32", "bf16") else nt.int64) for kind, d in spec)
        fn = getattr(importlib.import_module(module), fn_name)
        fn.compile(sig)
        return "ok", time.perf_counter() - t0, ""
    except Exception as e:                           # reported as a failed config, never raised
        return "error", time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[:1500]}"


class _CompilePool:
    """Persistent compile workers (`python -m pacekern.tuner --worker`, one JSON line per job).
    Plain subprocesses rather than multiprocessing: spawn would re-run the user's __main__ script,
    and fork after LLVM/OpenMP have started threads is unsafe."""

    def __init__(self, n: int):
        self.jobs: queue.Queue = queue.Queue()
        self.procs: list = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._serve, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _spawn(self):
        p = subprocess.Popen([sys.executable, "-m", "pacekern.tuner", "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        with self.lock:
            self.procs.append(p)
        return p

    def _serve(self):
        p = None
        while True:
            item = self.jobs.get()
            if item is None:
                break
            payload, fut = item
            try:
                if p is None or p.poll() is not None:
                    p = self._spawn()
                p.stdin.write(json.dumps(payload) + "\n")
                p.stdin.flush()
                line = p.stdout.readline()
                fut.set_result(tuple(json.loads(line)) if line else ("error", 0.0, "compile worker died (killed or crashed)"))
            except (OSError, ValueError) as e:
                fut.set_result(("error", 0.0, f"compile worker failed: {e}"))
                p = None
        if p is not None and p.poll() is None:
            p.stdin.close()
            p.wait()

    def submit(self, **payload) -> Future:
        fut: Future = Future()
        self.jobs.put((payload, fut))
        return fut

    def kill(self):
        """Stop a stuck compile: running workers die, their jobs report an error, new ones respawn."""
        with self.lock:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()

    def close(self):
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(timeout=5)
        self.kill()


def _moves(space, cfg: Config, allowed: set, reach: int | None = None) -> list:
    """cfg with one parameter moved to another of its values, up to `reach` places away in its
    choice list (None: any), nearest first; allowed configs only."""
    out = []
    for name, choice in space.params.items():
        vals = list(choice.values)
        i = vals.index(getattr(cfg, name))
        for d in range(1, (reach or len(vals)) + 1):
            for j in (i - d, i + d):
                if 0 <= j < len(vals):
                    c = Config(tuple((k, vals[j] if k == name else v) for k, v in cfg.values))
                    if c in allowed and c not in out:
                        out.append(c)
    return out


def tune(kernel, *args, budget_s: float | None = None, force: bool | None = None, cold: bool = False,
         verbose: bool = True, start: Config | None = None) -> TuneResult:
    """Tune `kernel` for the shape bucket of `args` (which are also the validation inputs).
    start: where the pattern search starts (default: the space's default config, also measured)."""
    t_start = time.perf_counter()
    budget = float(budget_s if budget_s is not None else env.get("PACEKERN_TUNE_BUDGET_S"))
    force = env.flag("PACEKERN_FORCE_TUNE") if force is None else force
    bound = kernel.bind(args)
    bucket = kernel.bucket(bound.dims)
    space = kernel.spec.space
    hw = cpu()
    default = space.default_config(hw.level)
    say = log.info if verbose else log.debug
    if env.flag("PACEKERN_INTERPRET") or not space.params:
        return TuneResult(kernel.name, bucket, default, float("nan"), float("nan"), (), 0.0, 0)
    key, parts = _key(kernel, bucket)
    known = {} if force else {r.config: r for r in cache.records(key)}
    allowed = [c for c in space.configs(hw.level) if space.prune is None or space.prune(c, dict(bound.dims), hw)]
    seed = start or default
    for c in (default, seed):
        if c not in allowed:
            allowed.insert(0, c)
    allowed_set = set(allowed)
    full = len(allowed) <= FULL_SEARCH_MAX
    say("tuning %s for %s: %d configs%s, budget %.0fs", kernel.name, ", ".join(f"{k}={v}" for k, v in bucket),
        len(allowed), "" if full else " (pattern search)", budget)

    make = _arg_factory(args, kernel, cold, hw)
    new_records, best = [], None
    # pattern search starts with a line search along every axis through the default (each
    # parameter set to each of its values, the others kept), so that its first step is not limited
    # to the default's neighbourhood
    frontier = allowed if full else list(dict.fromkeys([seed, default] + _moves(space, seed, allowed_set)))
    workers = max(1, min(hw.cores, 4))
    pool = _CompilePool(workers)
    try:
        rnd = 0
        while frontier and time.perf_counter() - t_start < budget:
            rnd += 1
            todo = [c for c in frontier if c not in known]
            # only as many compiles as the remaining budget allows at the compile speed seen so far
            secs = [r.compile_s for r in known.values() if r.compile_s > 0] or [3.0]
            left = budget - (time.perf_counter() - t_start)
            fit = int(left * 0.8 * workers / (sum(secs) / len(secs))) if rnd > 1 else len(todo)
            if todo and fit < 1:
                break
            todo = todo[:max(fit, 0)]
            recs = _run_round(kernel, todo, pool, args, make, best, known, t_start, budget)
            new_records += recs
            for r in recs:
                known[r.config] = r
            ok = [r for r in known.values() if r.status == "ok" and r.config in allowed_set]
            prev = best
            best = min(ok, key=lambda r: r.time_s) if ok else None
            say("  round %d: %d new, %d failed; best %s %.3f ms (%.0fs elapsed)", rnd, len(recs),
                sum(r.status != "ok" for r in recs), best.config if best else "-", best.time_s * 1e3 if best else float("nan"),
                time.perf_counter() - t_start)
            if full or best is None:
                break
            if prev is not None and best.config == prev.config and not [c for c in _moves(space, best.config, allowed_set, reach=2) if c not in known]:
                break
            frontier = _moves(space, best.config, allowed_set, reach=2)
            if all(c in known for c in frontier):
                break
    finally:
        pool.close()
    if new_records:
        cache.put(key, kernel.name, parts, new_records)
    _memo.pop(key, None)
    if best is None:
        log.warning("%s: no config compiled and validated for %s; using the default %s", kernel.name, bucket, default)
        best_cfg, best_s = default, float("nan")
    else:
        best_cfg, best_s = best.config, best.time_s
    d = known.get(default)
    res = TuneResult(kernel.name, bucket, best_cfg, best_s, d.time_s if d and d.status == "ok" else float("nan"),
                     tuple(known.values()), time.perf_counter() - t_start, len(new_records))
    kernel._chosen[bucket] = best_cfg
    say("%s: best %s %.3f ms (default %.3f ms) in %.1fs; pin it with:\n    %s", kernel.name, best_cfg, best_s * 1e3,
        res.default_s * 1e3, res.elapsed_s, res.pin_line())
    return res


def _arg_factory(args, kernel, cold: bool, hw):
    """Callable returning the argument tuple for the next timed call (rotating copies when cold)."""
    if not cold:
        return lambda: args
    import torch
    nbytes = sum(a.numel() * a.element_size() if isinstance(a, torch.Tensor) else getattr(a, "nbytes", 0) for a in args)
    copies = bench.cold_copies(nbytes, hw.l3)

    def one():
        return tuple(a.clone() if isinstance(a, torch.Tensor) else (a.copy() if hasattr(a, "copy") else a) for a in args)
    return bench.rotating(one, copies)


def _run_round(kernel, todo, pool, args, make, best, known, t_start, budget) -> list:
    recs = []
    spec = _signature_spec(kernel)
    jobs = {}
    for cfg in todo:
        try:
            k, _, parallel = passes.lower(kernel.spec.ir, cfg.asdict(), cpu().level)
        except passes.CompileError as e:
            recs.append(cache.TuneRecord(cfg, "error", float("nan"), float("nan"), 0.0, str(e)))
            continue
        src = codegen.generate(k, parallel, kernel.spec.origin)
        mod, _ = codegen.write_module(src, kernel.name)
        jobs[cfg] = pool.submit(module=mod, fn_name=kernel.name, src_dir=str(codegen.src_dir()), spec=spec)
    compiled = {}
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=f"compile {kernel.name}", leave=False, disable=len(jobs) < 4)
    except ImportError:
        bar = None
    for cfg, fut in jobs.items():
        left = max(1.0, min(COMPILE_TIMEOUT_S, budget - (time.perf_counter() - t_start)))
        try:
            status, secs, detail = fut.result(timeout=left)
        except FutureTimeout:
            pool.kill()
            status, secs, detail = "timeout", left, "compile did not finish in time"
        if bar:
            bar.update(1)
        if status == "ok":
            compiled[cfg] = secs
        else:
            recs.append(cache.TuneRecord(cfg, status, float("nan"), float("nan"), secs, detail))
    if bar:
        bar.close()
    fns = {}
    for cfg, secs in compiled.items():
        res = check(kernel, *args, config=cfg, raise_on_fail=False) if kernel.spec.ref else None
        if res is not None and not res.ok:
            recs.append(cache.TuneRecord(cfg, "wrong", float("nan"), float("nan"), secs, res.message))
            continue
        fns[cfg] = (lambda c=cfg: kernel(*make(), config=c))
    if best is not None and best.config not in fns:
        fns[best.config] = lambda c=best.config: kernel(*make(), config=c)
    if fns:
        timings = bench.interleaved(fns, rounds=5)
        for cfg, t in timings.items():
            if cfg in compiled:
                recs.append(cache.TuneRecord(cfg, "ok", t.median_s, t.iqr_s, compiled[cfg]))
            elif cfg in known:                      # the incumbent, re-timed in this round's conditions
                r = known[cfg]
                known[cfg] = cache.TuneRecord(cfg, r.status, t.median_s, t.iqr_s, r.compile_s, r.detail)
    return recs


if __name__ == "__main__" and "--worker" in sys.argv:
    for _line in sys.stdin:
        print(json.dumps(_compile_worker(**json.loads(_line))), flush=True)
