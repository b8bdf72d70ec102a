"""Timing that survives a noisy shared machine: warm-up, calibrated repetitions, interleaved rounds,
medians; and a cold mode that streams inputs from DRAM as LLM decode does (rotating through
copies larger than the last-level cache)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    median_s: float           # per call
    iqr_s: float
    min_s: float
    samples: tuple            # per-call seconds of each sample

    def __str__(self):
        return f"{self.median_s * 1e3:.3f} ms (iqr {self.iqr_s * 1e3:.3f}, min {self.min_s * 1e3:.3f})"


def _summary(samples) -> Timing:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return Timing(statistics.median(s), q[2] - q[0], s[0], tuple(samples))


def calibrate(fn, min_sample_s: float = 2e-3, warmup: int = 3) -> int:
    """Calls per sample so that one sample lasts at least min_sample_s (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_sample_s or n >= 1 << 16:
            return n
        n = max(n * 2, int(n * min_sample_s / max(dt, 1e-9)) + 1)


def interleaved(fns: dict, rounds: int = 7, min_sample_s: float = 2e-3, warmup: int = 3) -> dict:
    """Time several callables in interleaved rounds (A B C A B C ...) so that load changes on the
    machine hit all of them alike; returns name -> Timing of one call."""
    reps = {k: calibrate(f, min_sample_s, warmup) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            n = reps[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: _summary(v) for k, v in samples.items()}


def rotating(make_args, copies: int):
    """A callable factory for cold-cache timing: `make_args()` builds one independent set of
    arguments; calls cycle through `copies` sets so each call finds its inputs out of cache."""
    sets = [make_args() for _ in range(copies)]
    state = {"i": 0}

    def next_args():
        i = state["i"]
        state["i"] = (i + 1) % copies
        return sets[i]
    return next_args


def cold_copies(bytes_per_set: int, l3_bytes: int, max_bytes: int = 4 << 30) -> int:
    """How many argument copies make one rotation at least 2x the last-level cache."""
    need = -(-2 * l3_bytes // max(bytes_per_set, 1)) + 1
    return max(2, min(need, max(2, max_bytes // max(bytes_per_set, 1))))
