"""DLRMv2 as MLPerf defines it (torchrec DLRM_DCN), in fp32 PyTorch: the training model and the
accuracy oracle for the quantized paths.

    dense [B, 13] (log(x + 3) counts) -> bottom MLP 13-512-256-128 (ReLU after each layer)
    26 sum-pooled multi-hot embedding bags of dim 128
    x0 = [bottom, emb_0, ..., emb_25]  (width 27 * 128 = 3456)
    DCNv2, 3 low-rank layers (rank 512): x_{l+1} = x0 * (W_l (V_l x_l) + b_l) + x_l
    top MLP 3456-1024-1024-512-256-1 (ReLU except the last), sigmoid -> click probability

Size presets only cap the table rows (ids are hashed mod rows by the data, as MLPerf's
max_ind_range does); every layer keeps MLPerf's shape. `DlrmSpec` also admits smaller layer
widths, for tests that must run under the NumPy interpreter.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
import torch.nn.functional as F

# MLPerf DLRMv2 (Criteo 1TB multi-hot): rows per table (40 M = max_ind_range) and ids per bag
MLPERF_ROWS = (40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956, 405_282, 10,
               2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152, 12_973, 108, 36)
MLPERF_HOTNESS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)

# preset -> row cap per table. tiny: tests; small/ci/dev: training and accuracy; large/xl:
# inference-only (random weights) with tables well beyond the last-level cache (int8 row-wise:
# 0.97 GB at 1 M, 1.8 GB at 2 M; fp32 4x that)
PRESETS = {"tiny": 1_000, "small": 20_000, "ci": 100_000, "dev": 200_000, "large": 1_000_000, "xl": 2_000_000}


@dataclass(frozen=True)
class DlrmSpec:
    """The model's shape: everything an implementation of it must agree on."""
    rows: tuple                               # rows of each of the 26 tables
    hotness: tuple = MLPERF_HOTNESS           # ids per bag drawn by the synthetic data (the model takes any bag)
    num_dense: int = 13
    dim: int = 128                            # embedding dim = bottom MLP output width
    bottom: tuple = (512, 256, 128)
    top: tuple = (1024, 1024, 512, 256, 1)
    dcn_layers: int = 3
    dcn_rank: int = 512
    name: str = "custom"

    def __post_init__(self):
        if len(self.rows) != len(self.hotness):
            raise ValueError(f"DlrmSpec: {len(self.rows)} tables but {len(self.hotness)} hotness values")
        if self.bottom[-1] != self.dim:
            raise ValueError(f"DlrmSpec: the bottom MLP must end at the embedding dim {self.dim}, got {self.bottom}")
        if self.top[-1] != 1:
            raise ValueError(f"DlrmSpec: the top MLP must end with 1 output, got {self.top}")
        if min(self.rows) < 1:
            raise ValueError(f"DlrmSpec: every table needs at least one row, got {self.rows}")

    @property
    def num_sparse(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Interaction width: (1 + tables) * dim (3456 for MLPerf)."""
        return (1 + self.num_sparse) * self.dim

    @staticmethod
    def preset(name: str) -> "DlrmSpec":
        """MLPerf's DLRMv2 with rows capped at PRESETS[name]."""
        if name not in PRESETS:
            raise ValueError(f"unknown size preset {name!r}; choose one of {', '.join(PRESETS)}")
        cap = PRESETS[name]
        return DlrmSpec(rows=tuple(min(r, cap) for r in MLPERF_ROWS), name=name)

    @staticmethod
    def micro(rows=(50, 3, 20, 7, 30, 3, 11, 5, 2, 40, 33, 25, 4, 9, 17, 6, 2, 8, 3, 64, 64, 64, 21, 12, 5, 4),
              hotness=MLPERF_HOTNESS) -> "DlrmSpec":
        """Same structure, small widths (dim 32, rank 16): for interpreter-mode tests only."""
        return DlrmSpec(rows=tuple(rows), hotness=tuple(hotness), dim=32, bottom=(48, 32), top=(64, 32, 1),
                        dcn_layers=3, dcn_rank=16, name="micro")

    def with_rows(self, rows) -> "DlrmSpec":
        return replace(self, rows=tuple(int(r) for r in rows))

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "DlrmSpec":
        return DlrmSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def param_count(self) -> dict:
        emb = sum(self.rows) * self.dim
        dims = (self.num_dense,) + tuple(self.bottom)
        bottom = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
        dcn = self.dcn_layers * (2 * self.width * self.dcn_rank + self.width)
        tdims = (self.width,) + tuple(self.top)
        top = sum(a * b + b for a, b in zip(tdims[:-1], tdims[1:]))
        return dict(embeddings=emb, bottom=bottom, dcn=dcn, top=top)


def mlp(dims, relu_last: bool) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if relu_last or i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LowRankCross(nn.Module):
    """DCNv2 cross net (torchrec LowRankCrossNet): x_{l+1} = x0 * (W_l (V_l x_l) + b_l) + x_l."""

    def __init__(self, width: int, rank: int, layers: int):
        super().__init__()
        self.V = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(layers))
        self.W = nn.ModuleList(nn.Linear(rank, width, bias=True) for _ in range(layers))

    def forward(self, x0):
        x = x0
        for v, w in zip(self.V, self.W):
            x = x0 * w(v(x)) + x
        return x


class DLRMv2(nn.Module):
    """fp32 DLRMv2. forward(dense, indices, offsets) -> logits [B]; a batch is table-major and
    jagged (see dlrm.data.Batch)."""

    def __init__(self, spec: DlrmSpec, seed: int = 0):
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(seed)
        # torchrec's init: uniform(+-sqrt(1 / rows)) per table
        self.embs = nn.ModuleList()
        for r in spec.rows:
            e = nn.EmbeddingBag(r, spec.dim, mode="sum", sparse=True, include_last_offset=True)
            with torch.no_grad():
                e.weight.uniform_(-(1.0 / r) ** 0.5, (1.0 / r) ** 0.5, generator=g)
            self.embs.append(e)
        self.bottom = mlp((spec.num_dense,) + tuple(spec.bottom), relu_last=True)
        self.cross = LowRankCross(spec.width, spec.dcn_rank, spec.dcn_layers)
        self.top = mlp((spec.width,) + tuple(spec.top), relu_last=False)
        with torch.no_grad():                                 # seeded dense init (xavier-like, as nn.Linear)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    bound = (6.0 / (m.in_features + m.out_features)) ** 0.5
                    m.weight.uniform_(-bound, bound, generator=g)
                    if m.bias is not None:
                        m.bias.zero_()

    def linears(self) -> dict:
        """name -> nn.Linear, in execution order (bottom, cross V/W per layer, top)."""
        out = {}
        for i, m in enumerate(l for l in self.bottom if isinstance(l, nn.Linear)):
            out[f"bottom.{i}"] = m
        for i, (v, w) in enumerate(zip(self.cross.V, self.cross.W)):
            out[f"cross.V.{i}"], out[f"cross.W.{i}"] = v, w
        for i, m in enumerate(l for l in self.top if isinstance(l, nn.Linear)):
            out[f"top.{i}"] = m
        return out

    def pooled(self, indices: torch.Tensor, offsets: torch.Tensor, batch: int) -> list:
        """Per-table sum-pooled [B, dim] embeddings of a table-major jagged batch."""
        bounds = offsets[::batch].tolist()
        out = []
        for t, e in enumerate(self.embs):
            o = offsets[t * batch:(t + 1) * batch + 1]
            out.append(e(indices[bounds[t]:bounds[t + 1]], o - o[0]))
        return out

    def interaction_input(self, dense, indices, offsets) -> torch.Tensor:
        """x0 = [bottom(dense), pooled embeddings] [B, width]."""
        b = dense.shape[0]
        return torch.cat([self.bottom(dense)] + self.pooled(indices, offsets, b), dim=1)

    def forward(self, dense, indices, offsets) -> torch.Tensor:
        return self.top(self.cross(self.interaction_input(dense, indices, offsets))).squeeze(1)

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        """Click probabilities [B] of a dlrm.data.Batch (validated)."""
        from .data import validate
        validate(batch, self.spec)
        return torch.sigmoid(self(batch.dense, batch.indices, batch.offsets))


def load_file(path, what: str) -> dict:
    """A checkpoint or quantized model written by this package, loaded without executing anything
    in it (`weights_only=True`: tensors and plain containers only; a pickle that would construct
    other objects or run code is refused). Any file that is not one of ours gets an error naming it."""
    import pathlib
    import pickle
    try:
        with torch.serialization.safe_globals([pathlib.PosixPath, pathlib.WindowsPath]):   # paths in older metadata
            d = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a pacekern DLRM {what}, or it is damaged (refused to load it: {first})") from None
    if not isinstance(d, dict) or "spec" not in d:
        raise ValueError(f"{path} is not a pacekern DLRM {what} (no 'spec' in it)")
    return d
