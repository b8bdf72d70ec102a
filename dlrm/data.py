"""Batches, their validation, and a synthetic Criteo-like click stream with a known best AUC.

A `Batch` is table-major and jagged (like torchrec's KeyedJaggedTensor): the bag of sample b in
table t is indices[offsets[t B + b]: offsets[t B + b + 1]], ids local to table t. Dense values are
already preprocessed with log(max(x, 0) + 3) (torchrec's Criteo transform; `log_dense`).

Bad input is an error, never a silent wrong answer (`validate`): a wrong number of dense or sparse
features, malformed offsets, an id outside its table (the message names feature, sample and id)
and NaN or infinite dense values all raise `BatchError`.

`SyntheticCTR` streams Criteo-like rows, deterministic by (seed, split, batch index):
  * sparse: per table a primary id from a truncated Zipf law (hot ids scattered over the table by
    an affine permutation), plus hotness - 1 companions that are a fixed uniform hash of the
    primary id, as MLPerf's multi-hot construction (they carry no signal, only cold gathers);
  * dense: 13 zero-inflated log-normal counts correlated with each other and with two tables'
    ids, then log(x + 3);
  * label ~ Bernoulli(sigmoid(teacher logit)): a hidden teacher (not a DLRM) made of per-id
    effects, rank-8 factorization-machine crossings of 12 table pairs, a small MLP of the dense
    features and dense x sparse crossings, scaled so that the oracle AUC (the true probability's
    AUC) is about `target_auc` at a click rate of about `ctr`. Ids of every table are drawn with
    a per-split stream, so train, calibration and eval rows are disjoint samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from pacekern_ops.embedding_bag import batch_problems

from .model import DlrmSpec


class BatchError(ValueError):
    """A batch that does not fit the model: wrong shapes, ids outside their table, NaN dense values."""


class IdOutOfRange(BatchError, IndexError):
    """A sparse id outside [0, rows) of its table."""


@dataclass
class Batch:
    dense: torch.Tensor                 # f32 [B, num_dense], log(x + 3) values
    indices: torch.Tensor               # i32 [nnz], table-major
    offsets: torch.Tensor               # i32 [T B + 1]
    labels: torch.Tensor | None = None  # f32 [B] (0/1)
    p_true: torch.Tensor | None = field(default=None, repr=False)   # synthetic data: the teacher's probability

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])

    def table(self, t: int):
        """(indices, offsets [B + 1] from 0) of table t."""
        b = self.size
        o = self.offsets[t * b:(t + 1) * b + 1]
        return self.indices[int(o[0]):int(o[-1])], o - o[0]


def log_dense(raw) -> torch.Tensor:
    """torchrec's Criteo dense transform: log(max(x, 0) + 3) (negative counts clamp to 0)."""
    return torch.log(torch.as_tensor(raw, dtype=torch.float32).clamp_min(0) + 3.0)


def make_batch(dense, bags, labels=None) -> Batch:
    """From per-table bags: bags[t][b] is a sequence of ids (any length, including 0)."""
    dense = torch.as_tensor(dense, dtype=torch.float32)
    idx, off = [], [0]
    for t_bags in bags:
        for bag in t_bags:
            idx.extend(int(i) for i in bag)
            off.append(len(idx))
    return Batch(dense.contiguous(), torch.tensor(idx, dtype=torch.int32), torch.tensor(off, dtype=torch.int32),
                 None if labels is None else torch.as_tensor(labels, dtype=torch.float32))


def validate(batch: Batch, spec: DlrmSpec) -> None:
    """Raise BatchError unless the batch fits the model (see the module docstring)."""
    d = batch.dense
    if not isinstance(d, torch.Tensor) or d.dim() != 2 or d.dtype != torch.float32:
        raise BatchError(f"dense must be a float32 tensor [batch, {spec.num_dense}], got "
                         f"{getattr(d, 'dtype', type(d).__name__)} {tuple(getattr(d, 'shape', ()))}")
    b = d.shape[0]
    if d.shape[1] != spec.num_dense:
        raise BatchError(f"expected {spec.num_dense} dense features, got {d.shape[1]}")
    if b == 0:
        raise BatchError("empty batch")
    off, idx = batch.offsets, batch.indices
    for name, t in (("indices", idx), ("offsets", off)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int32:
            raise BatchError(f"{name} must be a 1-D int32 tensor, got {getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    nt = spec.num_sparse
    if off.shape[0] != nt * b + 1:
        got = (off.shape[0] - 1) / b
        raise BatchError(f"offsets has {off.shape[0]} entries for a batch of {b}: expected {nt} sparse features "
                         f"({nt} x {b} + 1 entries), got {got:g} features")
    flags = torch.empty(3, dtype=torch.int32)
    batch_problems(d.contiguous(), idx.contiguous(), off.contiguous(), b, _row_limits(spec.rows), flags)   # one pass
    nonfinite, bad_offsets, bad_ids = flags.tolist()
    if nonfinite:
        bad = (~torch.isfinite(d)).nonzero()[0].tolist()
        raise BatchError(f"dense feature {bad[1]} of sample {bad[0]} is {float(d[bad[0], bad[1]])}: dense values must "
                         "be finite (impute missing counts before log(x + 3), e.g. as 0)")
    if bad_offsets and (int(off[0]) != 0 or int(off[-1]) != idx.shape[0]):
        raise BatchError(f"offsets must start at 0 and end at len(indices) = {idx.shape[0]}, "
                         f"got {int(off[0])} .. {int(off[-1])}")
    if bad_offsets:
        raise BatchError("offsets must be non-decreasing")
    if bad_ids:                                                    # find the first bad id, to name it
        per_table = (off[1:] - off[:-1]).view(nt, b).sum(1)
        limit = torch.repeat_interleave(torch.tensor(spec.rows, dtype=torch.int32), per_table)
        j = int(((idx < 0) | (idx >= limit)).nonzero()[0])
        bag = int(torch.searchsorted(off, torch.tensor([j], dtype=torch.int32), right=True)[0]) - 1
        t, s = divmod(bag, b)
        raise IdOutOfRange(f"sparse feature {t}: id {int(idx[j])} of sample {s} is outside its table "
                           f"[0, {spec.rows[t]})")


@lru_cache(maxsize=16)
def _row_limits(rows: tuple) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def concat(batches) -> Batch:
    """One batch from several (same tables)."""
    batches = list(batches)
    nt = (batches[0].offsets.shape[0] - 1) // batches[0].size
    dense = torch.cat([x.dense for x in batches])
    idx, off = [], [torch.zeros(1, dtype=torch.int64)]
    pos = 0
    for t in range(nt):
        for x in batches:
            i, o = x.table(t)
            idx.append(i)
            off.append(o[1:].long() + pos)
            pos += int(o[-1])
    lab = None if batches[0].labels is None else torch.cat([x.labels for x in batches])
    pt = None if batches[0].p_true is None else torch.cat([x.p_true for x in batches])
    return Batch(dense, torch.cat(idx).to(torch.int32), torch.cat(off).to(torch.int32), lab, pt)


# ---------------------------------------------------------------------------------------------
# counter-based hashing: every id-derived quantity is a pure function of (seed, table, id, slot)

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (uint64 -> uint64, wrapping)."""
    with np.errstate(over="ignore"):
        x = x + _GOLD
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _hash(seed: int, table: int, ids: np.ndarray, slot: int) -> np.ndarray:
    key = np.uint64((seed * 1_000_003 + table * 7919 + slot * 104_729) & 0xFFFFFFFFFFFFFFFF)
    return _mix(_mix(ids.astype(np.uint64) ^ key) + np.uint64(slot))


def _uniform(h: np.ndarray) -> np.ndarray:
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def _centered(seed, table, ids, slot) -> np.ndarray:
    """Uniform with mean 0 and variance 1 (latent factors: one hash, no transcendental)."""
    return (_uniform(_hash(seed, table, ids, slot)) - 0.5) * math.sqrt(12.0)


def _normal(seed, table, ids, slot) -> np.ndarray:
    u1, u2 = _uniform(_hash(seed, table, ids, 2 * slot)), _uniform(_hash(seed, table, ids, 2 * slot + 1))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)


def auc(scores, labels) -> float:
    """ROC AUC by ranks (ties get half credit), float64, any size (NaN if one class is absent)."""
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64).reshape(-1))
    y = np.asarray(torch.as_tensor(labels).reshape(-1)).astype(bool)
    npos = int(y.sum())
    nneg = y.size - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ss = s[order]
    first = np.r_[True, ss[1:] != ss[:-1]]                  # starts of runs of equal scores
    run = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], ss.size]
    avg = (starts + ends + 1) / 2.0                          # average 1-based rank of each run
    ranks = np.empty(ss.size)
    ranks[order] = avg[run]
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


SPLITS = {"train": 1, "calib": 2, "eval": 3}


class SyntheticCTR:
    """Criteo-like rows with a hidden teacher (see the module docstring)."""

    N_PAIRS, RANK, N_DXS = 12, 8, 3

    def __init__(self, spec: DlrmSpec, seed: int = 0, ctr: float = 0.25, target_auc: float = 0.80, zipf: float = 1.15):
        self.spec, self.seed, self.ctr, self.target_auc, self.zipf = spec, seed, ctr, target_auc, zipf
        rng = np.random.default_rng([seed, 99])
        nt = spec.num_sparse
        rows = np.array(spec.rows)
        # affine permutation rank -> id per table (multiplier coprime with rows)
        self._perm_a = np.array([self._coprime(int(r), rng) for r in rows], dtype=np.int64)
        self._perm_c = np.array([int(rng.integers(0, r)) for r in rows], dtype=np.int64)
        # teacher: per-id effects, strongest on small tables (learnable from few rows, like Criteo's
        # low-cardinality features), weaker on huge ones; FM pairs among the tables below 100 k rows
        self.eff = np.where(rows <= 1, 0.0, np.where(rows <= 2_000, 0.8, np.where(rows <= 100_000, 0.5, 0.3)))
        self.eff = self.eff * rng.uniform(0.5, 1.5, nt)
        mid = np.flatnonzero((rows > 1) & (rows <= 100_000))
        self.pairs = [tuple(rng.choice(mid, 2, replace=False)) for _ in range(self.N_PAIRS)]
        self.dxs = rng.choice(mid, self.N_DXS, replace=False)
        nd = spec.num_dense
        self.g1 = rng.normal(0, 1 / math.sqrt(nd), (nd, 16))
        self.g2 = rng.normal(0, 1 / math.sqrt(16), 16)
        self.h = rng.normal(0, 1 / math.sqrt(nd), (nd, self.RANK))
        self.dense_mu = rng.uniform(0.0, 4.0, nd)
        self.dense_sig = rng.uniform(0.5, 1.5, nd)
        self.dense_mix = rng.normal(0, 1, (nd, 4)) / 2.0
        self.dense_zero = rng.uniform(0.0, 0.4, nd)
        self.dense_tables = rng.choice(nt, 2, replace=False)
        self.dense_center = np.zeros(nd)
        self.dense_scale = np.ones(nd)
        self.temp, self.bias = 1.0, 0.0
        self._calibrate()

    @staticmethod
    def _coprime(r: int, rng) -> int:
        if r <= 2:
            return 1
        while True:
            a = int(rng.integers(1, r))
            if math.gcd(a, r) == 1:
                return a

    # ---- rows ---------------------------------------------------------------------------------
    def _primary(self, rng, t: int, n: int) -> np.ndarray:
        """Truncated Zipf(s) rank in [0, rows) by the continuous inverse CDF, then permuted."""
        r = self.spec.rows[t]
        s = self.zipf if r > 1000 else 1.3
        u = rng.random(n)
        top = (r + 1.0) ** (1 - s)
        x = (1 - u * (1 - top)) ** (1 / (1 - s))
        rank = np.minimum(np.floor(x).astype(np.int64) - 1, r - 1)
        return (self._perm_a[t] * rank + self._perm_c[t]) % r

    def _raw(self, rng, n: int):
        """(dense log features, primary ids [T, n], teacher logit before scaling)."""
        spec = self.spec
        prim = np.stack([self._primary(rng, t, n) for t in range(spec.num_sparse)])
        # dense: correlated latent + two tables' id latents
        z = rng.normal(0, 1, (n, 4)) * 0.8
        for k, t in enumerate(self.dense_tables):
            z[:, 2 * k] += 0.6 * _normal(self.seed, int(t), prim[t], 50)
            z[:, 2 * k + 1] += 0.6 * _normal(self.seed, int(t), prim[t], 51)
        lat = z @ self.dense_mix.T + rng.normal(0, 0.5, (n, spec.num_dense))
        counts = np.floor(np.exp(self.dense_mu + self.dense_sig * lat))
        counts[rng.random((n, spec.num_dense)) < self.dense_zero] = 0
        dense = np.log(counts + 3.0)
        dz = (dense - self.dense_center) / self.dense_scale
        # teacher
        logit = 2.0 * (np.tanh(dz @ self.g1) @ self.g2)
        for t in range(spec.num_sparse):
            if self.eff[t] > 0:
                logit += self.eff[t] * _normal(self.seed, t, prim[t], 0)
        lat_cache = {}

        def latent(t):
            if t not in lat_cache:
                lat_cache[t] = np.stack([_centered(self.seed, t, prim[t], 10 + k) for k in range(self.RANK)], 1)
            return lat_cache[t]
        for s_, t in self.pairs:
            logit += (latent(int(s_)) * latent(int(t))).sum(1) * (0.6 / math.sqrt(self.RANK))
        hd = dz @ self.h
        for t in self.dxs:
            logit += (hd * latent(int(t))).sum(1) * (0.5 / math.sqrt(self.RANK))
        return dense, prim, logit

    def _calibrate(self, n: int = 30_000):
        """Standardize the dense features and the raw teacher logit, then pick the logit scale
        (temperature) and bias that give the target oracle AUC and click rate."""
        rng = np.random.default_rng([self.seed, 0, 0])
        dense, _, _ = self._raw(rng, n)
        self.dense_center, self.dense_scale = dense.mean(0), dense.std(0) + 1e-6
        _, _, raw = self._raw(np.random.default_rng([self.seed, 0, 1]), n)
        self._raw_mean, self._raw_std = float(raw.mean()), float(raw.std() + 1e-12)
        z = (raw - self._raw_mean) / self._raw_std
        u = np.random.default_rng([self.seed, 0, 2]).random(n)

        def fit_bias(temp):
            lo, hi = -20.0, 20.0
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if (1 / (1 + np.exp(-(z * temp + mid)))).mean() < self.ctr else (lo, mid)
            return (lo + hi) / 2

        lo, hi = 0.05, 10.0                              # the oracle AUC grows with the logit scale
        for _ in range(25):
            mid = (lo + hi) / 2
            p = 1 / (1 + np.exp(-(z * mid + fit_bias(mid))))
            lo, hi = (mid, hi) if auc(torch.from_numpy(p), torch.from_numpy(u < p)) < self.target_auc else (lo, mid)
        self.temp = (lo + hi) / 2
        self.bias = fit_bias(self.temp)

    def describe(self) -> dict:
        """What rebuilds this source (stored in checkpoints): `source_from(describe())`."""
        return dict(kind="synthetic", spec=self.spec.to_dict(), seed=self.seed, ctr=self.ctr,
                    target_auc=self.target_auc, zipf=self.zipf)

    def batch(self, split: str, index: int, size: int) -> Batch:
        """Batch `index` of a split ('train', 'calib', 'eval'): the same rows for the same arguments."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        rng = np.random.default_rng([self.seed, SPLITS[split], index, size])
        dense, prim, raw = self._raw(rng, size)
        z = (raw - self._raw_mean) / self._raw_std
        p = 1 / (1 + np.exp(-(z * self.temp + self.bias)))
        labels = (rng.random(size) < p).astype(np.float32)
        spec = self.spec
        idx, lengths = [], []
        for t in range(spec.num_sparse):
            h, r = spec.hotness[t], spec.rows[t]
            ids = np.empty((size, h), dtype=np.int64)
            ids[:, 0] = prim[t]
            if h > 1:                                   # MLPerf's uniform companions: a fixed hash of the primary id
                key = prim[t][:, None].astype(np.uint64) * np.uint64(131) + np.arange(1, h, dtype=np.uint64)
                ids[:, 1:] = (_hash(self.seed + 17, t, key, 0) % np.uint64(r)).astype(np.int64)
            idx.append(ids.reshape(-1))
            lengths.append(np.full(size, h))
        off = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
        return Batch(torch.from_numpy(dense.astype(np.float32)), torch.from_numpy(np.concatenate(idx).astype(np.int32)),
                     torch.from_numpy(off.astype(np.int32)), torch.from_numpy(labels),
                     torch.from_numpy(p.astype(np.float32)))

    def stream(self, split: str, rows: int, batch_size: int, start: int = 0):
        """Batches covering `rows` rows of a split (the last one may be smaller), from batch `start`."""
        i, done = start, 0
        while done < rows:
            n = min(batch_size, rows - done)
            yield self.batch(split, i, n)
            i, done = i + 1, done + n
