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


# whole-model tests: a 135M-parameter model through the NumPy interpreter would take hours; the
# interpreter run checks every kernel on its own (tests/test_llm_ops.py) instead
MODEL_TESTS = ("test_llm.py", "test_speculative.py", "test_llm_quality.py")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """tests/bench/ holds timings, not checks: they run with `pytest --benchmark-only`."""
    if INTERPRET:
        slow = pytest.mark.skip(reason="whole-model test: too slow in the NumPy interpreter (kernels are checked one by one)")
        for item in items:
            if os.path.basename(str(item.fspath)) in MODEL_TESTS:
                item.add_marker(slow)
    if config.getoption("benchmark_only", False):
        return
    skip = pytest.mark.skip(reason="a benchmark: run with pytest --benchmark-only")
    for item in items:
        if "tests/bench/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
