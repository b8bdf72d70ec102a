"""Swap one op of the LLM for a new kernel and measure the end-to-end change.

The idea tried here: SiLU(gate) * up with the sigmoid written as 0.5 + 0.5 * tanh(a / 2), tanh
from one exp of a non-positive argument (never overflows), two 16-lane chunks per step. The new
kernel is checked against torch, registered as an implementation of the `silu_mul` op, and the
model decodes with it, with the built-in kernel and with torch's op, interleaved round by round
(the machine is shared: medians, ratios within a round).

    ./run python experiments/swap_op.py [--tokens 64] [--rounds 5]
"""
import argparse
import statistics

import torch

import pacekern as pk
from llm import ops
from pacekern.llm import LLMModel, OpConfig, SamplingConfig

R, F = pk.dims("R F")


def ref(gu, out):
    f = out.shape[1]
    return torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]


@pk.func
def sigmoid(a):
    e = pk.exp(-pk.max(a, -a))                       # exp(-|a|) in (0, 1]: no overflow
    t = (1.0 - e) / (1.0 + e)                         # tanh(|a| / 2)
    one = pk.f32x16.bcast(1.0)
    sign = pk.min(pk.max(a * 1e30, -one), one)        # -1, 0 or 1 (a tiny |a| rounds towards 0: harmless)
    return 0.5 + 0.5 * sign * t                       # 0.5 + 0.5 tanh(a / 2)


@pk.kernel(ref=ref, key={"R": "pow2"})
def silu_mul_tanh(gu: pk.f32[R, 2 * F], out: pk.Out[pk.f32[R, F]]):
    for r in range(R):
        for c in range(0, F, 32):
            for v in pk.unroll(2):
                k = c + 16 * v
                if k < F:
                    a = pk.f32x16.load(gu[r, k], n=F - k)
                    u = pk.f32x16.load(gu[r, F + k], n=F - k)
                    pk.store(out[r, k], a * sigmoid(a) * u, n=F - k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    gu = torch.randn(4, 2 * 1536) * 6
    pk.check(silu_mul_tanh, gu, torch.empty(4, 1536))
    print("silu_mul_tanh matches torch")
    ops.register("silu_mul", "tanh", lambda gu, act: silu_mul_tanh.prepare(gu, act))

    model = LLMModel()                                               # SmolLM2-135M, bf16
    variants = {"built-in": OpConfig(), "tanh (new)": OpConfig(silu_mul="tanh"),
                "torch": OpConfig(silu_mul="torch")}
    cfg = SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    prompt = "The history of the printing press"
    speed, tokens = {k: [] for k in variants}, {}
    for r in range(args.rounds + 1):
        for name, oc in variants.items():
            model.model.set_opconfig(oc)
            out = model.generate(prompt, cfg)
            if r:                                                    # round 0 warms up (compiles, plans)
                speed[name].append(out.metrics.decode_tokens_per_s)
            tokens[name] = out.token_ids
    base = statistics.median(speed["built-in"])
    print(f"{'silu_mul':12s} {'decode tok/s':>12s} {'vs built-in':>12s}  same tokens")
    for name in variants:
        s = statistics.median(speed[name])
        print(f"{name:12s} {s:12.1f} {s / base:11.3f}x  {tokens[name] == tokens['built-in']}")


if __name__ == "__main__":
    main()
