"""`pacekern tune llm` tunes the kernels the model's plans actually run: for every weight format and
row count, llm.tune.linear_problems names the kernel llm.ops.linear_pacekern dispatches to, with
arguments of the model's shapes that the kernel accepts and computes correctly."""
import pytest
import torch

import pacekern as pk
from conftest import INTERPRET
from llm import ops
from llm.tune import PREFILL_ROWS, linear_problems
from pacekern.llm import LLMModel

pytestmark = pytest.mark.skipif(INTERPRET, reason="model-sized kernels: too slow for the interpreter")


@pytest.mark.parametrize("dtype,weights", [("bfloat16", "native"), ("float32", "native"), ("float32", "int8"),
                                           ("float32", "int4")])
def test_problems_are_the_kernels_the_plans_run(dtype, weights, monkeypatch):
    m = LLMModel(dtype=dtype, weights=weights)
    for rows in (1, 8, PREFILL_ROWS):
        probs = linear_problems(m, rows)
        lin = m.weights.layers[0].down
        ran = []                                       # the kernels a plan for `rows` rows prepares
        monkeypatch.setattr(pk.Kernel, "prepare", lambda self, *a, _orig=pk.Kernel.prepare, **k: ran.append(self) or _orig(self, *a, **k))
        ops.linear_pacekern(lin, torch.randn(rows, lin.k), torch.empty(rows, lin.n))
        monkeypatch.undo()
        assert len(probs) == 4 + (rows <= ops.GEMV_MAX_ROWS)            # qkv, o, gate/up, down (+ head when decoding)
        kernel, args, start = probs[3]                                  # down
        assert kernel in ran and args[-1].shape == (rows, lin.n), (rows, kernel, ran)
        pk.check(kernel, *args, config=start)
