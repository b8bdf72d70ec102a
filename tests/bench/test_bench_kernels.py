"""pytest-benchmark: every registered op, ours beside PyTorch's baseline in one group.

    ./run pytest --benchmark-only            (tests/bench/ is skipped in ordinary runs)

Each op is checked against torch and tuned (cached) before it is timed; cold-weight ops rotate
through weight copies larger than the last-level cache so weights stream from DRAM.
"""
from functools import lru_cache

import pytest

import pacekern as pk
from pacekern_ops.registry import OPS

PROBLEMS = [(op.name, tuple(sizes.items())) for op in OPS.values() for sizes in (op.sizes, *op.variants)]


@lru_cache(maxsize=None)
def problem(name, sizes):
    prob = OPS[name].build(**dict(sizes))
    prob.check()
    for kernel, args in prob.tune:
        pk.tune(kernel, *args, cold=prob.unit == "GB/s", verbose=False)
    return prob


@pytest.mark.parametrize("impl", ["pacekern", "torch"])
@pytest.mark.parametrize("name,sizes", PROBLEMS, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in s)}" for n, s in PROBLEMS])
def test_bench(benchmark, name, sizes, impl):
    prob = problem(name, sizes)
    benchmark.group = f"{name} " + " ".join(f"{k}={v}" for k, v in sizes)
    benchmark.extra_info.update(work=prob.work, unit=prob.unit)
    benchmark(prob.ours if impl == "pacekern" else prob.torch)
