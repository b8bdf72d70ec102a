"""Plain draft-model speculative decoding: pacekern beside Hugging Face's assisted generation.

    ./run python experiments/draft_model_speed.py                     # Qwen2.5-Coder 1.5B drafted by 0.5B
    ./run python experiments/draft_model_speed.py --prompts 4 --max-new-tokens 128 --k 4

Same target, same draft, same (bf16) weights, same prompts, 2 threads. For every prompt four runs go
back to back (so machine noise hits all alike): pacekern plain greedy, pacekern with the draft model
(`DraftModelSpecDecodeConfig`, K tokens per round), HF `generate` greedy, and HF `generate` with
`assistant_model=` (HF's own schedule for the number of draft tokens). pacekern's speculative output
must equal its plain greedy output. Speed = new tokens / wall time of the whole call (prefill
included, the same for every engine); printed as medians over prompts and per-prompt ratios.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pacekern as pk                                                         # noqa: E402
from pacekern.llm import DraftModelSpecDecodeConfig, LLMModel, SamplingConfig  # noqa: E402

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number, with a docstring.",
           "Write a Python class for a stack with push, pop and peek, and a short usage example.",
           "Explain what a hash map is and implement one in Python with open addressing.",
           "Write a function that checks whether a string is a palindrome, ignoring case and spaces.",
           "Write a Python script that counts the words in a text file and prints the ten most common.",
           "Implement binary search in Python and explain its complexity."]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    pk.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    m = LLMModel(args.model, dtype="bfloat16",
                 pard_config=DraftModelSpecDecodeConfig(args.draft, num_speculative_tokens=args.k))
    drafter = m.drafter
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(m.path), dtype=torch.bfloat16).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(str(drafter.llm.path), dtype=torch.bfloat16).eval()
    n = args.max_new_tokens
    cfg = SamplingConfig(max_new_tokens=n)
    eos = m.spec.eos_ids[0]

    def hf_run(ids, assistant):
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              assistant_model=assistant, pad_token_id=eos, top_p=None, top_k=None, temperature=None)
        return out[0, len(ids):].tolist()

    prompts = [[{"role": "user", "content": p}] for p in (PROMPTS * 4)[:args.prompts]]
    m.set_drafter(None, 0)
    m.generate(prompts[0], SamplingConfig(max_new_tokens=8))                   # warm-up: plans, kernels
    hf_run(m.encode(prompts[0])[:16], hf_draft)
    speed = {k: [] for k in ("ours", "ours-draft", "hf", "hf-assisted")}
    for i, p in enumerate(prompts):
        ids = m.encode(p)
        m.set_drafter(None, 0)
        ref, t = timed(lambda: m.generate(ids, cfg))
        speed["ours"].append(len(ref.token_ids) / t)
        m.set_drafter(drafter, args.k)
        spec, t = timed(lambda: m.generate(ids, cfg))
        if spec.token_ids != ref.token_ids:
            raise AssertionError(f"prompt {i}: draft-model output differs from plain greedy decoding")
        speed["ours-draft"].append(len(spec.token_ids) / t)
        out, t = timed(lambda: hf_run(ids, None))
        speed["hf"].append(len(out) / t)
        out, t = timed(lambda: hf_run(ids, hf_draft))
        speed["hf-assisted"].append(len(out) / t)
        print(f"prompt {i}: " + ", ".join(f"{k} {v[-1]:.2f} tok/s" for k, v in speed.items())
              + f"; ours-draft {spec.metrics.mean_accepted_per_round:.2f} tokens/round", flush=True)

    print(f"\n{args.model} drafted by {args.draft}, bf16, {args.threads} threads, {len(prompts)} prompts x {n} tokens"
          f" (ours K={args.k}; output identical to plain greedy)")
    for k, v in speed.items():
        print(f"{k:12s} {statistics.median(v):7.2f} tok/s")
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(speed[a], speed[b]))
    print(f"ours-draft / hf-assisted: {ratio('ours-draft', 'hf-assisted'):.2f}x   "
          f"ours-draft / ours: {ratio('ours-draft', 'ours'):.2f}x   hf-assisted / hf: {ratio('hf-assisted', 'hf'):.2f}x")


if __name__ == "__main__":
    main()
