"""Prompt prefill alone, ours against Hugging Face transformers, interleaved round by round.

    ./run python experiments/prefill_speed.py                         # SmolLM2, bf16, 128 tokens
    ./run python experiments/prefill_speed.py --tokens 512 --dtype float32 --rounds 9

`pacekern bench llm` measures time to first token inside whole generate calls beside several other
engines; this script times only the forward pass over the prompt (our plan for [1, T] tokens
against HF's model(ids) with its KV cache on and, as in its generate, logits for the last token
only; our prefill plan too runs the LM head on the last token), alternating the two so that machine noise hits both,
and prints the medians and their ratio. The prompt is random token ids (prefill cost does not
depend on the values).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pacekern.llm import LLMModel          # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM
    ours = LLMModel(args.model, dtype=args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(ours.path), dtype=getattr(torch, args.dtype)).eval()
    ids = torch.randint(100, ours.spec.vocab - 100, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def run_ours():
        slot = ours.cache.alloc(1, args.tokens + 1)
        t = time.perf_counter()
        ours.model.forward(ids, slot)
        dt = time.perf_counter() - t
        ours.cache.free(slot, 1)
        return dt

    @torch.no_grad()
    def run_hf():
        t = time.perf_counter()
        hf(ids, use_cache=True, logits_to_keep=1)                   # as generate: the LM head on the last token
        return time.perf_counter() - t

    for f in (run_ours, run_hf, run_ours, run_hf):                 # warm-up: plans, kernels, allocator
        f()
    a, b = [], []
    for _ in range(args.rounds):
        a.append(run_ours())
        b.append(run_hf())
    ma, mb = statistics.median(a), statistics.median(b)
    ratio = statistics.median(y / x for x, y in zip(a, b))
    print(f"{args.model} {args.dtype}, {args.tokens}-token prefill, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds:")
    print(f"  pacekern {ma * 1e3:7.1f} ms ({args.tokens / ma:6.0f} tok/s)")
    print(f"  HF       {mb * 1e3:7.1f} ms ({args.tokens / mb:6.0f} tok/s)")
    print(f"  pacekern / HF speed: {ratio:.2f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
