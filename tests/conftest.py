import os

import pytest
import torch

import pacekern as pk

INTERPRET = os.environ.get("PACEKERN_INTERPRET", "0") == "1"


def needs_compiled_avx512():
    """Skip reason for tests that read machine code: meaningless in interpret mode or below AVX512."""
    if INTERPRET:
        return "PACEKERN_INTERPRET=1 runs NumPy emulations: there is no machine code to inspect"
    if not pk.target().has("avx512"):
        return f"ISA level {pk.target().level} has no zmm registers"
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """tests/bench/ holds timings, not checks: they run with `pytest --benchmark-only`."""
    if config.getoption("benchmark_only", False):
        return
    skip = pytest.mark.skip(reason="a benchmark: run with pytest --benchmark-only")
    for item in items:
        if "tests/bench/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
