"""KV cache: per layer, a preallocated pool of sequence slots [slots, KVH, S, D] (fp32), all views
of one tensor [2 (k, v), layers, slots, KVH, S, D] so that one copy can move rows in every layer.

A sequence owns one slot and a length; the rows of a batch are consecutive slots, so the attention
kernels see one contiguous [B, KVH, S, D] view per layer with no copy. `truncate` rolls a sequence
back (speculative decoding drops rejected draft rows this way: the rows past the length are simply
overwritten later); `move` compacts the rows of an accepted tree path. The pool grows on demand in
whole blocks of tokens and never past `budget_bytes`; asking for more gets a clear error instead
of swapping the machine to death.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheConfig:
    max_tokens: int | None = None     # per sequence; None: the model's context length
    budget_mb: int = 4096             # all slots of all layers together
    block: int = 256                  # capacity grows in multiples of this many tokens


class KVCache:
    def __init__(self, spec, config: KVCacheConfig = KVCacheConfig()):
        self.spec, self.config = spec, config
        self.max_tokens = min(config.max_tokens or spec.max_pos, spec.max_pos)
        self.slots, self.capacity = 0, 0
        self.kv = torch.zeros(0)
        self.k: list = []
        self.v: list = []
        self.lengths: list = []
        self.in_use: list = []
        self.version = 0                  # bumped when the storage is reallocated (forward plans rebind)

    def bytes_for(self, slots: int, capacity: int) -> int:
        s = self.spec
        return 2 * s.n_layers * slots * s.n_kv_heads * capacity * s.head_dim * 4

    def reserve(self, slots: int, tokens: int) -> None:
        """Make room for `slots` sequences of up to `tokens` tokens (existing contents are kept)."""
        if tokens > self.max_tokens:
            raise ValueError(f"a sequence of {tokens} tokens does not fit the context of {self.max_tokens} tokens")
        blk = self.config.block
        cap = max(self.capacity, min(-(-tokens // blk) * blk, self.max_tokens))
        slots = max(slots, self.slots)
        if cap == self.capacity and slots == self.slots:
            return
        need = self.bytes_for(slots, cap)
        if need > self.config.budget_mb << 20:
            raise MemoryError(f"the KV cache for {slots} sequences x {cap} tokens needs {need >> 20} MB, over the "
                              f"budget of {self.config.budget_mb} MB (KVCacheConfig(budget_mb=...))")
        s = self.spec
        kv = torch.zeros(2, s.n_layers, slots, s.n_kv_heads, cap, s.head_dim)
        if self.slots:
            kv[:, :, : self.slots, :, : self.capacity] = self.kv
        self.kv, self.k, self.v = kv, list(kv[0]), list(kv[1])
        self.lengths += [0] * (slots - self.slots)
        self.in_use += [False] * (slots - self.slots)
        self.slots, self.capacity = slots, cap
        self.version += 1

    def alloc(self, n: int, tokens: int) -> int:
        """n consecutive free slots able to hold `tokens` tokens each; returns the first."""
        self.reserve(n, tokens)
        for s0 in range(self.slots - n + 1):
            if not any(self.in_use[s0:s0 + n]):
                break
        else:
            s0 = self.slots
            self.reserve(self.slots + n, tokens)
        for s in range(s0, s0 + n):
            self.in_use[s], self.lengths[s] = True, 0
        return s0

    def free(self, s0: int, n: int = 1) -> None:
        for s in range(s0, s0 + n):
            self.in_use[s], self.lengths[s] = False, 0

    def truncate(self, slot: int, length: int) -> None:
        """Roll sequence `slot` back to its first `length` tokens."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def move(self, slot: int, src: list, dst: int) -> None:
        """Copy rows src of sequence `slot` to rows dst, dst + 1, ... in every layer (the gather
        reads all of src before anything is written)."""
        if src and not (dst >= 0 and max(src) < self.capacity and dst + len(src) <= self.capacity):
            raise ValueError(f"cannot move rows {src} of slot {slot} to {dst} (capacity {self.capacity})")
        self.kv[:, :, slot, :, dst:dst + len(src)] = self.kv[:, :, slot, :, torch.tensor(src)]

    def views(self, s0: int, n: int):
        """Per layer (k, v) views [n, KVH, S, D] of slots s0 .. s0 + n - 1."""
        return [(k[s0:s0 + n], v[s0:s0 + n]) for k, v in zip(self.k, self.v)]
