"""Accuracy of every path of one trained model on the same evaluation rows (a paired comparison):
fp32 PyTorch, pacekern INT8 (int8 and 4-bit tables), the PyTorch int8 reference, and the bars:

  * INT8 AUC >= 99.9% of the fp32 AUC; 4-bit embeddings >= 99%;
  * pacekern INT8 probabilities within 1e-3 of the PyTorch int8 reference (same quantized model),
    checked on the first `match_rows` rows (PyTorch's int8 path is the slowest one); not a bar on
    CPUs without VNNI, where PyTorch's int8 linear saturates (gemm_u8s8.torch_int8_saturates).

Two implementations of one quantized model agree up to float rounding, which can move a value
that lies within ~1e-6 of a rounding tie to the neighbouring u8 code; such a flip is one
quantization step, and DCN's x0 * (W h) can amplify it. So the report gives the mean, the 99th
percentile and the max of |dp| (the bar is stated on the max).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pacekern_ops.gemm_u8s8 import torch_int8_saturates

from .data import SyntheticCTR, auc
from .infer import PacekernDlrm, PacekernDlrmFp32
from .model import DLRMv2, DlrmSpec
from .quantize import QuantizedDlrm
from .torch_int8 import TorchInt8Dlrm

AUC_RATIO_INT8, AUC_RATIO_INT4, MATCH_TOL = 0.999, 0.99, 1e-3


def source_from(desc: dict):
    """Rebuild a data source from its `describe()` (stored in checkpoints)."""
    kind = desc.get("kind")
    if kind == "synthetic":
        return SyntheticCTR(DlrmSpec.from_dict(desc["spec"]), seed=desc["seed"], ctr=desc["ctr"],
                            target_auc=desc["target_auc"], zipf=desc["zipf"])
    if kind == "movielens-100k":
        from .movielens import MovieLens100k
        return MovieLens100k(seed=desc["seed"])
    raise ValueError(f"unknown data source {desc!r}")


@dataclass
class EvalReport:
    rows: int
    auc: dict                       # path -> AUC (all rows)
    oracle_auc: float | None
    match_rows: int                 # rows compared against PyTorch's int8 path
    diff_vs_torch_int8: dict        # max, mean, p99 of |p_pacekern_int8 - p_torch_int8|
    max_diff_int8_vs_fp32: float
    torch_int8_exact: bool = True   # False: PyTorch's int8 linear saturates on this CPU (no VNNI)

    def ratio(self, path: str) -> float:
        return self.auc[path] / self.auc["fp32"]

    def bars(self) -> dict:
        out = {}
        if "pacekern-int8" in self.auc:
            out["int8 AUC >= 99.9% fp32"] = self.ratio("pacekern-int8") >= AUC_RATIO_INT8
        if "pacekern-int4" in self.auc:
            out["4-bit AUC >= 99% fp32"] = self.ratio("pacekern-int4") >= AUC_RATIO_INT4
        if self.match_rows and self.torch_int8_exact:
            out["|p - p_torch_int8| <= 1e-3 (max)"] = self.diff_vs_torch_int8["max"] <= MATCH_TOL
        return out

    def table(self) -> str:
        lines = [f"{'path':<16} {'AUC':>8} {'/ fp32':>8}", "-" * 34]
        for k, v in self.auc.items():
            lines.append(f"{k:<16} {v:8.5f} {v / self.auc['fp32']:8.5f}")
        if self.oracle_auc is not None:
            lines.append(f"{'oracle':<16} {self.oracle_auc:8.5f}")
        lines.append(f"rows: {self.rows}; int8 vs fp32 max |dp| {self.max_diff_int8_vs_fp32:.2e}")
        if self.match_rows:
            d = self.diff_vs_torch_int8
            lines.append(f"pacekern int8 vs torch int8 on {self.match_rows} rows: |dp| max {d['max']:.2e}, "
                         f"p99 {d['p99']:.2e}, mean {d['mean']:.2e}")
            if not self.torch_int8_exact:
                lines.append("  (no bar: PyTorch's int8 linear saturates its int16 pair sums on this CPU, "
                             "pacekern's accumulates exactly)")
        for k, ok in self.bars().items():
            lines.append(f"  [{'PASS' if ok else 'FAIL'}] {k}")
        return "\n".join(lines)


def _make(path, model, q):
    if path == "fp32":
        return lambda b: torch.sigmoid(model(b.dense, b.indices, b.offsets))
    if path == "pacekern-fp32":
        return PacekernDlrmFp32(model)
    if path == "pacekern-int8":
        return PacekernDlrm(q, 8)
    if path == "pacekern-int4":
        return PacekernDlrm(q, 4)
    if path == "torch-int8":
        return TorchInt8Dlrm(q, 8)
    raise ValueError(f"unknown path {path!r}")


@torch.no_grad()
def evaluate_all(model: DLRMv2, q: QuantizedDlrm, batches, paths=("fp32", "pacekern-int8", "pacekern-int4"),
                 match_rows: int = 65536, progress: bool = True) -> EvalReport:
    """Run every path on the same batches (AUCs from the concatenated scores), and PyTorch's int8
    reference beside pacekern's INT8 on the first `match_rows` rows (0: skip)."""
    from tqdm import tqdm
    fns = {p: _make(p, model, q) for p in paths}
    if "fp32" not in fns:
        raise ValueError("evaluate_all needs the fp32 path (the AUC ratios are relative to it)")
    ref = TorchInt8Dlrm(q, 8) if match_rows and "pacekern-int8" in fns else None
    scores = {p: [] for p in fns}
    labels, oracle, diffs = [], [], []
    seen = 0
    for b in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        for p, f in fns.items():
            scores[p].append(f(b).float())
        if ref is not None and seen < match_rows:
            n = min(b.size, match_rows - seen)
            diffs.append((scores["pacekern-int8"][-1] - ref(b))[:n].abs())
        seen += b.size
        labels.append(b.labels)
        if b.p_true is not None:
            oracle.append(b.p_true)
    y = torch.cat(labels)
    s = {p: torch.cat(v) for p, v in scores.items()}
    nan = float("nan")
    d = torch.cat(diffs).double() if diffs else None
    stats = dict(max=float(d.max()), mean=float(d.mean()), p99=float(torch.quantile(d, 0.99))) if d is not None else {}
    return EvalReport(int(y.numel()), {p: auc(v, y) for p, v in s.items()}, auc(torch.cat(oracle), y) if oracle else None,
                      0 if d is None else int(d.numel()), stats,
                      float((s["pacekern-int8"] - s["fp32"]).abs().max()) if "pacekern-int8" in s else nan,
                      not torch_int8_saturates())
