"""PARD speculative decoding against plain decoding, end to end, on prompts the draft never saw.

    ./run python experiments/pard_speed.py                       # shipped SmolLM2 draft, K = 2, 4, 6, 8
    ./run python experiments/pard_speed.py --k 4 --prompts 8 --weights int8
    ./run python experiments/pard_speed.py --k 4 --trees 4:6,4:6:8           # chain K=4, trees (K:nodes[:lookup])
    ./run python experiments/pard_speed.py --k 4 --trees 4:6:8 --generic     # open-ended requests instead

The draft (`smollm2-135m-instruct-pard`, made by experiments/pard_train.py) lists its training and
held-out prompts in pard_train.json; this script uses only the held-out ones (their passages of
Botchan / the Lee corpus were split off before any training text was generated). For every prompt,
plain greedy decoding and PARD at each K run back to back (interleaved, so machine noise hits all
alike); the output must be token for token the same. The held-out prompts are raw passages to
continue and questions about a passage (answers quote it: prompt lookup's best case); --generic
runs open-ended chat requests that quote nothing instead. Printed: decode tokens/s (medians over
prompts), the speed-up over plain decoding, accepted drafts and committed tokens per round.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pacekern.llm import LLMModel, PardSpecDecodeConfig, SamplingConfig   # noqa: E402
from llm.speculative import heldout_prompts                                 # noqa: E402

GENERIC = ["Write a short story about a robot who learns to paint.", "Explain how photosynthesis works.",
           "List five tips for staying productive when working from home.",
           "What are the main differences between Python and JavaScript?", "Describe the water cycle in simple terms.",
           "Write a poem about autumn leaves.", "How does a bicycle stay upright?", "Give me a recipe for a simple tomato soup.",
           "Why is the sky blue?", "Summarize the plot of Romeo and Juliet.", "What should I pack for a week of hiking?",
           "Explain recursion to a beginner programmer.", "Write a polite email declining a meeting invitation.",
           "What causes earthquakes?", "Describe a typical day in the life of a medieval farmer.",
           "How do vaccines train the immune system?"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="smollm2-135m-instruct-pard")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--k", default="2,4,6,8", type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--trees", default="", type=lambda s: [tuple(int(y) for y in x.split(":")) for x in s.split(",") if x],
                    help="tree verification runs, K:nodes[:lookup tokens],... (e.g. 4:6,4:6:4)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generic", action="store_true", help="open-ended chat requests (up to 16) instead of the held-out prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--weights", default="native", choices=["native", "int8", "int4"])
    ap.add_argument("--draft-weights", default=None, choices=["native", "int8", "int4"], help="default: as --weights")
    args = ap.parse_args(argv)

    modes = [(k, 0, 0) for k in args.k] + [(t + (0,))[:3] for t in args.trees]   # (K, tree nodes (0: a chain), lookup)
    m = LLMModel(args.model, dtype=args.dtype, weights=args.weights,
                 pard_config=PardSpecDecodeConfig(args.draft, num_speculative_tokens=max(md[0] for md in modes),
                                                  weights=args.draft_weights))
    drafter = m.drafter
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens)
    prompts = ([[{"role": "user", "content": g}] for g in GENERIC[:args.prompts]] if args.generic
               else heldout_prompts(args.draft, args.prompts))
    name = {(k, n, lk): f"K={k}" + (f" tree {n}" if n else "") + (f"+{lk}" if lk else "") for k, n, lk in modes}
    for k, n, lk in [(0, 0, 0)] + modes:                              # warm-up: plans and kernels of every shape
        m.set_drafter(drafter if k else None, k, n, lk)
        m.generate(prompts[0], SamplingConfig(max_new_tokens=16))
    speed = {md: [] for md in [(0, 0, 0)] + modes}
    accepted = {md: [] for md in modes}
    for i, prompt in enumerate(prompts):
        m.set_drafter(None, 0)
        ref = m.generate(prompt, cfg)
        speed[0, 0, 0].append(ref.metrics.decode_tokens_per_s)
        for md in modes:
            m.set_drafter(drafter, *md)
            out = m.generate(prompt, cfg)
            if out.token_ids != ref.token_ids:
                raise AssertionError(f"prompt {i}, {name[md]}: PARD output differs from plain greedy decoding")
            speed[md].append(out.metrics.decode_tokens_per_s)
            accepted[md].append(out.metrics.mean_accepted_per_round)
        print(f"prompt {i}: {len(ref.token_ids)} tokens, plain {speed[0, 0, 0][-1]:.1f} tok/s, " + ", ".join(
            f"{name[md]} {speed[md][-1]:.1f} ({accepted[md][-1]:.2f}/round)" for md in modes), flush=True)
    base = statistics.median(speed[0, 0, 0])
    print(f"\n{args.model} {m.fmt}, draft {args.draft} {drafter.llm.fmt}, {len(prompts)} {'generic' if args.generic else 'held-out'} "
          f"prompts x {args.max_new_tokens} "
          f"tokens, outputs identical to plain greedy decoding")
    print(f"{'':12s} {'tok/s':>7s} {'x plain':>8s} {'drafts accepted/round':>22s} {'tokens/round':>13s}")
    print(f"{'plain':12s} {base:7.1f} {1.0:8.2f}")
    for md in modes:
        s, a = statistics.median(speed[md]), statistics.mean(accepted[md])
        ratio = statistics.median(x / y for x, y in zip(speed[md], speed[0, 0, 0]))
        print(f"{name[md]:12s} {s:7.1f} {ratio:8.2f} {a - 1:22.2f} {a:13.2f}")


if __name__ == "__main__":
    main()
