"""The engine (llm/engine.py), written against the offline generator, Hugging Face and itself:
requests that join at different steps, chunked prefill, the prefix cache, preemption, aborts and
bad input. Each request's greedy tokens must not depend on what else ran beside it."""
import os

import pytest
import torch

from pacekern.llm import Engine, EngineConfig, OverloadedError, Request, SamplingConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl named", "def fibonacci(n):",
           "The three primary colors are", "import numpy as np\n\n# compute the mean of each row\n",
           "In 1969, the first humans", "Water boils at", "My favourite recipe for pancakes:",
           "List the planets of the solar system in order: " * 3, "Q: What is 12 * 7?\nA:",
           "The quick brown fox", "Translate to French: good morning ->", "x" * 90,
           "A haiku about autumn leaves:\n", "Rust and C++ differ in", "The mitochondria is"]
NEW = 16
GREEDY = SamplingConfig(max_new_tokens=NEW, min_new_tokens=NEW)


def staggered(engine, prompts, sampling=GREEDY, every=2):
    """Add one request every `every` steps while the others run; the finished outputs in order,
    after checking that each one's text deltas add up to its text."""
    ids, done, deltas, pending, step = [], {}, {}, list(prompts), 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            ids.append(engine.add_request(Request(pending.pop(0), sampling)))
        for o in engine.step():
            deltas[o.request_id] = deltas.get(o.request_id, "") + o.text_delta
            if o.finish_reason is not None:
                done[o.request_id] = o
        step += 1
    outs = [done[i] for i in ids]
    for i, o in zip(ids, outs):
        assert deltas[i] == o.text, i
    assert engine.num_blocks_in_use() == 0
    return outs


VARIANTS = {"chunked+prefix": EngineConfig(max_tokens_per_step=32),
            "no-prefix-cache": EngineConfig(max_tokens_per_step=64, prefix_caching=False),
            "preempting": EngineConfig(max_tokens_per_step=48, kv_budget_mb=8, block_size=16)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_staggered_requests_equal_each_request_alone(dtype, variant, request):
    """16 requests of 6-90 prompt tokens joining every other step: each one's greedy tokens equal
    the same request run alone (through the engine and through LLMModel.generate)."""
    llm = request.getfixturevalue("smol_f32" if dtype == "float32" else "smol_bf16")
    engine = Engine(llm, VARIANTS[variant])
    outs = staggered(engine, PROMPTS)
    if variant == "preempting":
        assert sum(o.metrics.preemptions for o in outs) > 0        # the small KV budget forced some
    for p, o in zip(PROMPTS, outs):
        alone = engine.run([Request(p, GREEDY)])[0]
        assert o.token_ids == alone.token_ids, p
        assert list(o.token_ids) == llm.generate(p, GREEDY).token_ids, p
        assert o.metrics.new_tokens == NEW and o.finish_reason == "length"


def test_greedy_equals_hf_fp32(smol_f32):
    """The engine's batched greedy tokens against HF transformers' fp32 generate."""
    from test_llm import hf_greedy, hf_model
    hf = hf_model(smol_f32.path, torch.float32)
    outs = staggered(Engine(smol_f32, EngineConfig(max_tokens_per_step=32)), PROMPTS[:6], every=1)
    for p, o in zip(PROMPTS, outs):
        assert list(o.token_ids) == hf_greedy(hf, smol_f32.encode(p), NEW), p


def test_prefix_cache_hits_and_changes_nothing(smol_f32):
    shared = "You are a helpful assistant. Answer in one short sentence. " * 6
    questions = [shared + q for q in ("What is the capital of Italy?", "Why is the sky blue?", "Name a prime number.")]
    cached = Engine(smol_f32, EngineConfig())
    plain = Engine(smol_f32, EngineConfig(prefix_caching=False))
    first = cached.run(questions[:1])[0]
    assert first.metrics.cached_prompt_tokens == 0
    rest = cached.run(questions[1:])
    n_shared = len(smol_f32.encode(shared)) - 1
    for o in rest:
        assert o.metrics.cached_prompt_tokens >= n_shared // 16 * 16 - 16
    for a, b in zip([first] + rest, plain.run(questions)):
        assert a.token_ids == b.token_ids and b.metrics.cached_prompt_tokens == 0


def test_decoding_streams_never_wait_for_a_long_prompt(smol_f32):
    """Chunked prefill: while a 600-token prompt is prefilled in chunks, every running stream gets
    a token in every step."""
    engine = Engine(smol_f32, EngineConfig(max_tokens_per_step=64))
    streams = [engine.add_request(Request(p, SamplingConfig(max_new_tokens=40, min_new_tokens=40))) for p in PROMPTS[:4]]
    for _ in range(3):
        engine.step()
    long = engine.add_request(Request("word " * 600, SamplingConfig(max_new_tokens=2)))
    steps_with_long = 0
    while long in engine.seqs and engine.seqs[long].state.out == []:
        got = {o.request_id for o in engine.step()}
        assert set(streams) <= got
        steps_with_long += 1
    assert steps_with_long >= 600 // 64


def test_abort_and_bad_input_leave_the_others_serving(smol_f32):
    engine = Engine(smol_f32, EngineConfig(max_tokens_per_step=32, max_waiting=3))
    a = engine.add_request(Request(PROMPTS[0], GREEDY))
    b = engine.add_request(Request(PROMPTS[1], GREEDY))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request(Request(PROMPTS[2], SamplingConfig(do_sample=True, temperature=0.0)))
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.add_request(Request([1] * 9000, GREEDY))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(Request([10 ** 7], GREEDY))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(Request(PROMPTS[2], GREEDY, request_id=a))
    for _ in range(4):
        engine.step()
    c = engine.add_request(Request(PROMPTS[2], GREEDY))
    d = engine.add_request(Request(PROMPTS[3], GREEDY))
    engine.add_request(Request(PROMPTS[4], GREEDY))
    with pytest.raises(OverloadedError, match="max_waiting"):
        engine.add_request(Request(PROMPTS[5], GREEDY))
    out = engine.abort(b)                                     # mid-decode
    assert out.finish_reason == "abort" and 0 < len(out.token_ids) < NEW
    assert engine.abort(d).finish_reason == "abort"            # still waiting
    with pytest.raises(KeyError, match="no unfinished request"):
        engine.abort(b)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finish_reason})
    assert engine.num_blocks_in_use() == 0
    for rid, p in ((a, PROMPTS[0]), (c, PROMPTS[2])):
        assert list(done[rid].token_ids) == smol_f32.generate(p, GREEDY).token_ids


def test_sampled_requests_follow_their_seed(smol_f32):
    """A seeded sampled request gives LLMModel.generate's tokens (same sampler, same seed), beside
    greedy ones; different seeds differ."""
    engine = Engine(smol_f32, EngineConfig())
    cfgs = [SamplingConfig(max_new_tokens=20, do_sample=True, temperature=1.0, seed=s) for s in (1, 2)]
    outs = engine.run([Request(PROMPTS[0], cfgs[0]), Request(PROMPTS[1], GREEDY), Request(PROMPTS[0], cfgs[1])])
    assert list(outs[0].token_ids) == smol_f32.generate(PROMPTS[0], cfgs[0]).token_ids
    assert list(outs[2].token_ids) == smol_f32.generate(PROMPTS[0], cfgs[1]).token_ids
    assert outs[0].token_ids != outs[2].token_ids


def test_bench_engine_runs_every_engine():
    """`pacekern bench engine` end to end at a tiny size: every engine serves the same prompts and
    the table has a row and ratios for each (the figures themselves go in docs/results)."""
    from llm.bench import bench_engine, engine_table
    rows = bench_engine(requests=3, new_tokens=4, concurrency=2, lo=8, hi=40, progress=lambda m: None)
    assert [r.engine.split()[0] for r in rows] == ["pacekern", "hf", "llama.cpp"]
    assert all(r.out_tok_s > 0 and r.total_tok_s > r.out_tok_s for r in rows)
    assert "x |" in engine_table(rows)
    with pytest.raises(ValueError, match="choose from"):
        bench_engine(engines=("vllm",))
