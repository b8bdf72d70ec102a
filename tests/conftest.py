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


def assert_vnni_inner_loop(kernel, tile: int):
    """kernel's hot loop (default config) runs vpdpbusd on zmm registers only, a multiple of `tile`
    of them (the register tile, once or unrolled by LLVM), with no vector spills. Skips where there
    is no VNNI machine code to read."""
    import re
    from pacekern.isa import LEVELS
    level = pk.target().level
    if INTERPRET:
        pytest.skip("interpret mode generates no machine code")
    if LEVELS.index(level) < LEVELS.index("avx512_vnni_bf16"):
        pytest.skip(f"vpdpbusd needs VNNI (this run: {level})")
    rep = kernel.asm()
    loops = [lp for lp in rep.inner_loops if "vpdpbusd" in lp]
    assert loops, f"no inner loop contains vpdpbusd: {rep.summary()}"
    n = len(re.findall(r"\bvpdpbusd\b", loops[0]))
    assert n > 0 and n % tile == 0, (n, tile)
    assert "%zmm" in loops[0] and "%ymm" not in loops[0]
    spills = [ln for ln in loops[0].splitlines() if re.search(r"%[xyz]mm\d+", ln) and re.search(r"\(%r[sb]p\)", ln)]
    assert not spills, spills


# whole-model tests: a 135M-parameter model through the NumPy interpreter would take hours; the
# interpreter run checks every kernel on its own (tests/test_llm_ops.py) instead
MODEL_TESTS = ("test_llm.py", "test_speculative.py", "test_llm_quality.py", "test_engine.py", "test_server.py")


@pytest.fixture(scope="module")
def smol_f32():
    """SmolLM2-135M in fp32 (one per test module: the whole-model tests share it)."""
    from pacekern.llm import LLMModel
    return LLMModel(dtype="float32")


@pytest.fixture(scope="module")
def smol_bf16():
    from pacekern.llm import LLMModel
    return LLMModel(dtype="bfloat16")


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
