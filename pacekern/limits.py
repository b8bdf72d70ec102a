"""This machine's measured limits, the yardsticks `pacekern bench` reports against:
peak fp32 FMA rate (all threads, zmm FMAs on independent accumulators) and streaming read
bandwidth (all threads summing an array much larger than the last-level cache), measured once per
CPU fingerprint and cached in <cache>/limits.json (`pacekern bench --remeasure` redoes it); and
probes of the same timed beside a kernel in its run (`fma_probe`, `vnni_probe`, `stream_probe`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import bench, env, isa
from . import lang as pk
from .target import cpu

N = pk.dims("N")


# Independent accumulator chains: enough to cover the FMA latency times the ports (4 x 2 needs
# >= 8 vectors in flight), few enough to stay in registers: 24 zmm, or 6 (12 ymm) where the level
# has 16 ymm (24 there spilled to the stack and read ~40% below torch's own GEMM rate).
FMA_SPACE = pk.Space(C=pk.choice(6, 24), regs=lambda c: c.C + 2, default=(dict(C=24), dict(C=6)))


@pk.kernel(space=FMA_SPACE)
def _fma_peak(x: pk.f32[16], out: pk.Out[pk.f32[N]], iters: pk.i64, *, C):
    """C independent FMA chains per thread: pure issue rate."""
    for t in pk.prange(N // 16):
        acc = pk.tile(pk.f32x16, C)
        for j in pk.unroll(C):
            acc[j] = pk.f32x16.bcast(0.001 * j)
        a = pk.f32x16.load(x[0])
        b = pk.f32x16.bcast(0.999)
        for i in range(iters):
            for j in pk.unroll(C):
                acc[j] = pk.fma(acc[j], b, a)
        s = acc[0]
        for j in pk.unroll(1, C):
            s = s + acc[j]
        pk.store(out[t * 16], s)


# the u8 x s8 dot's chains: 12 zmm; 4 where 16 ymm also hold its lowering's widened operands
VNNI_SPACE = pk.Space(C=pk.choice(4, 12), regs=lambda c: c.C + 4, default=(dict(C=12), dict(C=4)))


@pk.kernel(space=VNNI_SPACE)
def _vnni_peak(x: pk.i32[4], out: pk.Out[pk.i32[N]], iters: pk.i64, *, C):
    """C independent vpdpbusd chains per thread: the u8 x s8 dot-product issue rate (on levels
    without VNNI, the rate of its lowering there)."""
    for t in pk.prange(N // 16):
        acc = pk.tile(pk.i32x16, C)
        for j in pk.unroll(C):
            acc[j] = pk.i32x16.bcast(j)
        b = pk.bitcast(pk.i32x16.bcast(x[1]), pk.s8x64)
        for i in range(iters):
            for j in pk.unroll(C):
                # the chain's own bytes as the u8 operand: with a loop-invariant one, LLVM sums a
                # generic lowering's invariant products once and drops the loop
                acc[j] = pk.dot4_u8s8(acc[j], pk.bitcast(acc[j], pk.u8x64), b)
        s = acc[0]
        for j in pk.unroll(1, C):
            s = s + acc[j]
        pk.store(out[t * 16], s)


def _probe_config(space):
    """The probe's chain count for this level, passed explicitly (a probe is never tuned)."""
    return space.default_config(cpu().level)


@pk.kernel
def _stream_sum(x: pk.f32[N], out: pk.Out[pk.f32[64]], chunk: pk.i64):
    """Each thread sums its contiguous chunk with 8 accumulators: bandwidth, not latency, bound."""
    for t in pk.prange(N // chunk):
        acc = pk.tile(pk.f32x16, 8)
        for i in range(t * chunk, t * chunk + chunk, 128):
            for j in pk.unroll(8):
                acc[j] = acc[j] + pk.f32x16.load(x[i + 16 * j])
        s = acc[0]
        for j in pk.unroll(1, 8):
            s = s + acc[j]
        out[t] = pk.hsum(s)


@dataclass(frozen=True)
class Limits:
    fma_gflops: float         # fp32 GFLOP/s, all threads
    stream_gbs: float         # GB/s read from DRAM, all threads
    threads: int
    fingerprint: str


def _path() -> Path:
    return Path(env.get("PACEKERN_CACHE_DIR")) / "limits.json"


def measure() -> Limits:
    hw = cpu()
    threads = hw.threads
    cfg = _probe_config(FMA_SPACE)
    iters = 20000 * 24 // cfg.C
    x = np.ones(16, np.float32)
    out = np.zeros(16 * threads, np.float32)
    t = bench.interleaved({"fma": lambda: _fma_peak(x, out, iters, config=cfg)}, rounds=5)["fma"]
    gflops = threads * iters * cfg.C * 16 * 2 / t.median_s / 1e9
    n = max(64 << 20, 4 * hw.l3 // 4)                # floats: >= 4x the last-level cache
    chunk = -(-n // threads)
    chunk = -(-chunk // 128) * 128
    big = np.ones(chunk * threads, np.float32)
    res = np.zeros(64, np.float32)
    t = bench.interleaved({"stream": lambda: _stream_sum(big, res, chunk)}, rounds=5, min_sample_s=0.05, warmup=1)["stream"]
    gbs = big.nbytes / t.median_s / 1e9
    return Limits(round(gflops, 1), round(gbs, 2), threads, hw.fingerprint())


def limits(remeasure: bool = False) -> Limits:
    """Cached measurement for this CPU fingerprint and thread count (measures on first use, ~10 s)."""
    p = _path()
    if not remeasure and p.exists():
        try:
            d = json.loads(p.read_text())
            if d.get("fingerprint") == cpu().fingerprint():
                return Limits(**d)
        except (ValueError, TypeError):
            pass
    lim = measure()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(asdict(lim)))
    return lim


def stream_probe(nbytes: int):
    """(callable, bytes per call): reads `nbytes` (rounded) of memory that is out of cache, rotating
    through a pool of at least 4x the last-level cache; times the DRAM read rate *now*, to put
    beside a kernel timed in the same interleaved run."""
    hw = cpu()
    per = max(hw.threads * 128, -(-nbytes // 4 // (hw.threads * 128)) * hw.threads * 128)   # floats per call
    chunk = per // hw.threads
    copies = max(2, -(-4 * hw.l3 // (per * 4)))
    pool = np.ones(per * copies, np.float32)
    res = np.zeros(64, np.float32)
    state = [0]

    def run():
        i = state[0] = (state[0] + 1) % copies
        _stream_sum(pool[i * per:(i + 1) * per], res, chunk)
    return run, per * 4


def fma_probe():
    """(callable, flops per call): the FMA peak kernel, ~2 ms per call (long enough that the
    parallel region's start-up does not count)."""
    hw = cpu()
    cfg = _probe_config(FMA_SPACE)
    iters = 200000 * 24 // cfg.C                          # the same FMAs a call whatever the chains
    x, out = np.ones(16, np.float32), np.zeros(16 * hw.threads, np.float32)
    return (lambda: _fma_peak(x, out, iters, config=cfg)), hw.threads * iters * cfg.C * 16 * 2.0


def vnni_probe():
    """(callable, ops per call, 2 per multiply-add as the u8s8 GEMMs count them): the vpdpbusd peak
    kernel, ~7 ms per call (shorter calls read 5-8% lower here; ~6 ms on AVX2's lowering)."""
    hw = cpu()
    cfg = _probe_config(VNNI_SPACE)
    native = isa.lower("dot4_u8s8", hw.level) == "dot4_u8s8_vnni"     # ~10x the rate of the lowerings below
    iters = (2000000 if native else 200000) * 12 // cfg.C
    x, out = np.array([0x01010101, 0x01010101, 0, 0], np.int32), np.zeros(16 * hw.threads, np.int32)
    return (lambda: _vnni_peak(x, out, iters, config=cfg)), hw.threads * iters * cfg.C * 64 * 2.0
