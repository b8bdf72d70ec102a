"""DLRMv2 (DLRM-DCNv2, MLPerf) with INT8 inference on pacekern kernels.

    from pacekern.dlrm import DlrmSpec, DLRMv2, SyntheticCTR, train, quantize, PacekernDlrm

model (DlrmSpec, DLRMv2) -> data (SyntheticCTR, MovieLens100k, Batch, validate) -> train ->
quantize (QuantizedDlrm) -> infer (PacekernDlrm, PacekernDlrmFp32) beside torch_int8
(TorchInt8Dlrm) -> evaluate (AUC bars) -> bench; cli: `pacekern dlrm train|quantize|eval|bench`.
"""
from .data import Batch, BatchError, IdOutOfRange, SyntheticCTR, auc, log_dense, make_batch, validate
from .model import DLRMv2, DlrmSpec, MLPERF_HOTNESS, MLPERF_ROWS, PRESETS
from .quantize import ActQ, QLinear, QuantizedDlrm, quantize
from .train import TrainConfig, evaluate, load_checkpoint, save_checkpoint, train
from .infer import PacekernDlrm, PacekernDlrmFp32
from .torch_int8 import FakeQuantDlrm, TorchInt8Dlrm
from .evaluate import EvalReport, evaluate_all, source_from

__all__ = ["ActQ", "Batch", "BatchError", "DLRMv2", "DlrmSpec", "EvalReport", "FakeQuantDlrm", "IdOutOfRange",
           "MLPERF_HOTNESS", "MLPERF_ROWS", "PRESETS", "PacekernDlrm", "PacekernDlrmFp32", "QLinear", "QuantizedDlrm",
           "SyntheticCTR", "TorchInt8Dlrm", "TrainConfig", "auc", "evaluate", "evaluate_all", "load_checkpoint",
           "log_dense", "make_batch", "quantize", "save_checkpoint", "source_from", "train", "validate"]


def __getattr__(name):
    # lazily: MovieLens100k (dataset I/O); the benchmark harness is the submodule dlrm.bench
    if name == "MovieLens100k":
        from .movielens import MovieLens100k
        return MovieLens100k
    raise AttributeError(f"module 'dlrm' has no attribute {name!r}")
