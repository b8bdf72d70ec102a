"""A row softmax written in pacekern: checked against torch, tuned, benchmarked.

    ./run python experiments/softmax.py

Three passes over each row (max; exp and sum; scale), U vectors per step for instruction-level
parallelism, rows split across threads. exp is pacekern's polynomial (no libm), and the max
subtraction keeps every exp argument <= 0, where it is accurate to ~2e-7.
"""
import torch

import pacekern as pk
from pacekern.bench import interleaved

R, N = pk.dims("R N")


def ref(x, y):
    return torch.softmax(x, dim=-1)


@pk.kernel(space=pk.Space(U=pk.choice(1, 2, 4)), ref=ref, key={"R": "pow2"})
def softmax(x: pk.f32[R, N], y: pk.Out[pk.f32[R, N]], *, U):
    for r in pk.prange(R):
        full = N // (16 * U) * (16 * U)                       # unrolled vector part; the rest is a scalar tail
        m = pk.tile(pk.f32x16, U)
        for u in pk.unroll(U):
            m[u] = pk.f32x16.bcast(-float("inf"))
        for i in range(0, full, 16 * U):
            for u in pk.unroll(U):
                m[u] = pk.max(m[u], pk.f32x16.load(x[r, i + 16 * u]))
        mx = pk.hmax(m[0])
        for u in pk.unroll(1, U):
            mx = max(mx, pk.hmax(m[u]))
        for i in range(full, N):
            mx = max(mx, x[r, i])
        s = pk.tile(pk.f32x16, U)
        for i in range(0, full, 16 * U):
            for u in pk.unroll(U):
                e = pk.exp(pk.f32x16.load(x[r, i + 16 * u]) - mx)
                pk.store(y[r, i + 16 * u], e)
                s[u] = s[u] + e
        total = pk.hsum(s[0])
        for u in pk.unroll(1, U):
            total += pk.hsum(s[u])
        for i in range(full, N):
            y[r, i] = pk.hsum(pk.exp(pk.f32x16.bcast(x[r, i] - mx)) * pk.f32x16.bcast(1.0 / 16))
            total += y[r, i]
        inv = 1.0 / total
        for i in range(0, full, 16):
            pk.store(y[r, i], pk.f32x16.load(y[r, i]) * inv)
        for i in range(full, N):
            y[r, i] = y[r, i] * inv


if __name__ == "__main__":
    x = torch.randn(256, 4000) * 4
    x[0, :7] = -float("inf")                                  # masked positions, as attention uses them
    y = torch.empty_like(x)
    print(pk.check(softmax, x, y).message)                    # 1. correct?
    best = pk.tune(softmax, x, y).best                        # 2. fastest config (cached afterwards)
    t = interleaved({"pacekern": lambda: softmax(x, y), "torch": lambda: torch.softmax(x, -1)})   # 3. how fast?
    print(f"softmax {tuple(x.shape)}: pacekern {t['pacekern']}, torch {t['torch']}, "
          f"{t['torch'].median_s / t['pacekern'].median_s:.2f}x torch")
