"""The CPU we compile for: feature set, ISA level, caches, threads, AMX permission.

Everything is keyed on the *feature set*, never the CPU name (this VM calls itself `rocketlake`
while having AMX). PACEKERN_ISA forces a lower level by handing LLVM a reduced feature string,
so the code really is compiled for (and only uses) that level; it must be set before the first
compile of the process.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from . import env
from .isa import LEVELS
from .log import log, warn_once

# features each level needs, on top of the previous level's
_NEEDS = {
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_vnni_bf16": {"avx512vnni", "avx512bf16"},
    "amx": {"amx-tile", "amx-int8", "amx-bf16"},
}
_ARCH_REQ_XCOMP_PERM, _ARCH_GET_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_arch_prctl = 0x1023, 0x1022, 18, 158


@dataclass(frozen=True)
class CpuInfo:
    features: tuple          # sorted enabled LLVM feature names of the host
    level: str               # ISA level kernels are compiled for (after PACEKERN_ISA)
    host_level: str          # best level the host supports
    l1d: int                 # bytes per core
    l2: int                  # bytes per core
    l3: int                  # bytes, shared
    cores: int               # logical CPUs usable by this process
    threads: int             # thread budget for kernels
    amx_ok: bool             # AMX tile data permission granted (arch_prctl)

    def fingerprint(self) -> str:
        """What a tuned config depends on: the feature set, not the marketing name."""
        return f"{self.level}|{','.join(self.features)}|l1d={self.l1d}|l2={self.l2}|l3={self.l3}|threads={self.threads}"

    def describe(self) -> str:
        """One line for benchmark reports: the CPU model, the ISA level used and the threads."""
        info = {}
        for ln in _read("/proc/cpuinfo").splitlines():
            k, _, v = ln.partition(":")
            info.setdefault(k.strip(), v.strip())
        model = info.get("model name", "unknown CPU")
        if "cpu family" in info:                      # guests often say only "AMD EPYC"
            model += f" (family {info['cpu family']} model {info.get('model', '?')})"
        forced = "" if self.level == self.host_level else f", forced below the host's {self.host_level}"
        return f"{model}: ISA level {self.level}{forced}, {self.threads} threads"

    def has(self, level: str) -> bool:
        return LEVELS.index(self.level) >= LEVELS.index(level)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _host_features() -> set:
    import llvmlite.binding as llb
    return {k for k, v in llb.get_host_cpu_features().items() if v}


def _level_of(feats: set) -> str:
    level = "generic"
    for lv in LEVELS[1:]:
        need = set().union(*(_NEEDS[x] for x in LEVELS[1: LEVELS.index(lv) + 1]))
        if need <= feats:
            level = lv
    return level


def _cache_size(index: int, default: int) -> int:
    p = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
    try:
        s = p.read_text().strip()
        return int(s[:-1]) * (1024 if s[-1] == "K" else 1024 * 1024) if s[-1] in "KM" else int(s)
    except (OSError, ValueError):
        return default


def request_amx() -> bool:
    """Ask Linux for AMX tile-data permission (per process); without it tile ops raise SIGILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_arch_prctl, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            return False
        mask = ctypes.c_uint64(0)
        libc.syscall(_SYS_arch_prctl, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask))
        return bool(mask.value >> _XFEATURE_XTILEDATA & 1)
    except (OSError, AttributeError):
        return False


def _numba_features(level: str, host: set) -> tuple:
    """(cpu name, feature string) that make LLVM generate code for `level` only."""
    if level == "generic":
        return "generic", ""
    drop = set()
    for lv in LEVELS[LEVELS.index(level) + 1:]:
        drop |= _NEEDS[lv]
    if LEVELS.index(level) < LEVELS.index("avx512"):
        drop |= {f for f in host if f.startswith(("avx512", "amx", "avxvnni"))}
    if LEVELS.index(level) < LEVELS.index("amx"):
        drop |= {f for f in host if f.startswith("amx")}
    feats = sorted(host - drop)
    return ("haswell" if level == "avx2" else None), ",".join([f"+{f}" for f in feats] + [f"-{f}" for f in sorted(drop)])


_CPU: CpuInfo | None = None


def cpu() -> CpuInfo:
    """This process's CPU facts and thread budget, detected once. PACEKERN_NUM_THREADS, when set,
    is applied to Numba and torch here, so that kernels, torch and the tuner's key agree."""
    global _CPU
    if _CPU is None:
        info = _detect()
        if env.get("PACEKERN_NUM_THREADS"):
            _apply_threads(info.threads)
        _CPU = info
    return _CPU


def _detect() -> CpuInfo:
    host = _host_features()
    host_level = _level_of(host)
    forced = env.get("PACEKERN_ISA").strip()
    level = host_level
    if forced:
        if forced not in LEVELS:
            raise ValueError(f"PACEKERN_ISA={forced!r} is not one of {', '.join(LEVELS)}")
        if LEVELS.index(forced) > LEVELS.index(host_level):
            warn_once("isa-forced-high", "PACEKERN_ISA=%s is above what this CPU supports (%s); using %s", forced, host_level, host_level)
        else:
            level = forced
    amx_ok = False
    if level == "amx":
        amx_ok = request_amx()
        if not amx_ok:
            warn_once("amx-perm", "the CPU has AMX but the kernel refused tile-data permission (arch_prctl); using avx512_vnni_bf16")
            level = "avx512_vnni_bf16"
    if level != host_level:
        from numba.core import config
        name, feats = _numba_features(level, host)
        config.CPU_NAME = name or config.CPU_NAME
        config.CPU_FEATURES = feats
        log.debug("compiling for ISA level %s (host: %s)", level, host_level)
    if LEVELS.index(level) < LEVELS.index("avx512"):
        warn_once("no-avx512", "running without AVX512 (ISA level %s): kernels use %s code paths and are slower",
                  level, level)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = int(env.get("PACEKERN_NUM_THREADS") or cores)
    return CpuInfo(tuple(sorted(host)), level, host_level, _cache_size(0, 32 << 10), _cache_size(2, 1 << 20),
                   _cache_size(3, 8 << 20), cores, threads, amx_ok)


def _apply_threads(n: int):
    import numba
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"{n} threads: choose 1 to {numba.config.NUMBA_NUM_THREADS} (this process's CPUs; "
                         "PACEKERN_NUM_THREADS or pk.set_num_threads)")
    numba.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def set_num_threads(n: int):
    """One thread budget for pacekern kernels and torch (they run one after another, never nested);
    `pk.target().threads` and the tuning key follow it."""
    global _CPU
    n = int(n)
    _apply_threads(n)
    _CPU = dataclasses.replace(cpu(), threads=n)
