"""Timing baselines: argument checks, and sane results from both engines on SmolLM2."""
import os

import pytest
import torch

from llm import baselines
from llm.baselines import BaselineResult

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to"


def test_result_and_argument_validation(tmp_path):
    r = BaselineResult("x", 0.5, 0.02, 50.0, 32.0, [1, 2])
    assert "TTFT 500.0 ms" in r.summary() and "50.0 tok/s decode" in r.summary()
    with pytest.raises(ValueError, match="decode_tok_s must be a positive number"):
        BaselineResult("x", 0.5, 0.02, 0.0, 32.0)
    with pytest.raises(ValueError, match="new_tokens must be an int >= 2"):
        baselines.hf_generate_bench(tmp_path, "fp32", [1, 2, 3], 1)
    with pytest.raises(ValueError, match="non-empty sequence of token ids"):
        baselines.hf_generate_bench(tmp_path, "fp32", [], 8)
    with pytest.raises(ValueError, match="non-empty sequence of token ids"):
        baselines.llamacpp_bench(tmp_path / "m.gguf", [1, -2], 8)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        baselines.hf_generate_bench(tmp_path, "fp32", [1, 2], 8, batch=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        baselines.hf_generate_bench(tmp_path, "fp8", [1, 2], 8)
    with pytest.raises(ValueError, match="no config.json"):
        baselines.hf_generate_bench(tmp_path, torch.float32, torch.tensor([1, 2]), 8)
    with pytest.raises(ValueError, match="does not exist"):
        baselines.llamacpp_bench(tmp_path / "m.gguf", [1, 2], 8)


@pytest.fixture(scope="module")
def smollm2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from llm import models
    d = models.resolve(None)
    ids = AutoTokenizer.from_pretrained(d)(PROMPT).input_ids[:16]
    assert len(ids) == 16
    return d, ids


def _sane(r: BaselineResult, n: int):
    assert len(r.tokens) == n and all(0 <= t < 49152 for t in r.tokens)
    assert r.ttft_s > 0 and r.tpot_s > 0 and r.decode_tok_s > 0 and r.prefill_tok_s > 0
    assert r.decode_tok_s == pytest.approx(1 / r.tpot_s) and r.ttft_s < 60 and r.tpot_s < 10


@pytest.mark.heavy
def test_hf_generate_matches_a_greedy_loop(smollm2):
    from transformers import AutoModelForCausalLM
    d, ids = smollm2
    r = baselines.hf_generate_bench(d, "fp32", ids, 8)
    _sane(r, 8)
    assert r.prefill_tok_s == pytest.approx(16 / r.ttft_s)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(8):                                  # no cache: the full sequence every step
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert r.tokens == seq[16:]


@pytest.mark.heavy
def test_llamacpp_on_the_same_tokens(smollm2):
    from llm import models
    _, ids = smollm2
    r = baselines.llamacpp_bench(models.fetch_gguf(models.MODELS[models.DEFAULT_MODEL]), ids, 8)
    _sane(r, 8)
    assert r.tokens[0] == 1238                              # " play", as HF fp32 greedy says
    assert "llama.cpp" in r.name
