"""pytest-benchmark: DLRMv2 inference, pacekern INT8 beside PyTorch fp32 eager and PyTorch int8
(quantized embedding bags + fbgemm quantized linear) on the same model and batches.

    ./run pytest tests/bench/test_bench_dlrm.py --benchmark-only     (skipped in ordinary runs)

One group per batch size; samples/s = batch / mean time. Weights are seeded random at the `dev`
size preset (set DLRM_BENCH_PRESET=tiny for a quick look), quantized with calibrated ranges.
"""
import os
from functools import lru_cache

import pytest

from dlrm.bench import build
from dlrm.data import SyntheticCTR
from dlrm.model import DlrmSpec

PRESET = os.environ.get("DLRM_BENCH_PRESET", "dev")
IMPLS = ("pacekern-int8", "pacekern-int4", "torch-fp32", "torch-int8")
BATCHES = (1, 64, 256, 2048)


@lru_cache(maxsize=1)
def impls():
    return build(DlrmSpec.preset(PRESET), IMPLS)


@lru_cache(maxsize=None)
def batch(b):
    return SyntheticCTR(DlrmSpec.preset(PRESET), seed=0).batch("eval", 0, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b", BATCHES)
def test_bench_dlrm(benchmark, b, impl):
    f, x = impls()[impl], batch(b)
    f(x)                                                   # warm-up: compile, pack, allocate
    benchmark.group = f"dlrm {PRESET} batch={b}"
    benchmark.extra_info.update(batch=b, unit="samples/s")
    benchmark(f, x)
