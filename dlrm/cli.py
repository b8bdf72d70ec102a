"""`pacekern dlrm train|quantize|eval|bench` (also `python -m dlrm ...`): main(argv).

    dlrm train    [--data synthetic|movielens] [--preset small] [--rows 200000] [--out CKPT]
    dlrm quantize [--checkpoint CKPT] [--calib-rows 128000] [--out QCKPT]
    dlrm eval     [--checkpoint CKPT] [--quantized QCKPT] [--rows 1000000]
    dlrm bench    [--preset dev] [--batches 1,64,256,2048] [--threads 2] [--impls ...]

Default files: <PACEKERN_MODEL_DIR>/dlrm/<data>-<preset>.pt and ...-<preset>.int8.pt.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pacekern import env

from .model import PRESETS, DlrmSpec


def default_checkpoint(data: str, preset: str) -> Path:
    name = "movielens-100k" if data == "movielens" else f"synthetic-{preset}"
    return Path(env.get("PACEKERN_MODEL_DIR")) / "dlrm" / f"{name}.pt"


def quantized_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.stem + ".int8.pt")


def spec_for(preset: str) -> DlrmSpec:
    return DlrmSpec.micro() if preset == "micro" else DlrmSpec.preset(preset)


def make_source(data: str, preset: str, seed: int):
    if data == "movielens":
        from .movielens import MovieLens100k
        return MovieLens100k(seed=seed)
    from .data import SyntheticCTR
    return SyntheticCTR(spec_for(preset), seed=seed)


def _threads(n):
    if n:
        import pacekern as pk
        pk.set_num_threads(n)


def cmd_train(a) -> int:
    from .train import TrainConfig, train
    _threads(a.threads)
    src = make_source(a.data, a.preset, a.seed)
    out = Path(a.out) if a.out else default_checkpoint(a.data, a.preset)
    if a.precision is None:                       # bf16 autocast where the CPU has native bf16 dot products
        import pacekern as pk
        a.precision = "bf16" if pk.target().has("avx512_vnni_bf16") else "fp32"
    cfg = TrainConfig(rows=a.rows, batch=a.batch, lr_dense=a.lr_dense, lr_emb=a.lr_emb, precision=a.precision,
                      seed=a.seed, eval_rows=a.eval_rows, eval_every=a.eval_every, checkpoint=str(out),
                      save_every=a.save_every)
    _, m = train(src, cfg)
    print(json.dumps({k: v for k, v in m.items() if isinstance(v, (int, float))}, indent=1))
    print(f"checkpoint: {out}")
    return 0


def cmd_quantize(a) -> int:
    from .evaluate import source_from
    from .quantize import quantize
    from .train import load_checkpoint
    _threads(a.threads)
    ckpt = Path(a.checkpoint) if a.checkpoint else default_checkpoint(a.data, a.preset)
    model, meta = load_checkpoint(ckpt)
    src = source_from(meta["source"])
    bits = tuple(int(b) for b in a.bits.split(","))
    q = quantize(model, src.stream("calib", a.calib_rows, 4096), emb_bits=bits, pct=a.percentile,
                 alpha=None if a.alpha < 0 else a.alpha)
    out = q.save(Path(a.out) if a.out else quantized_path(ckpt))
    print(f"quantized model ({'/'.join(map(str, bits))}-bit tables): {out}")
    return 0


def cmd_eval(a) -> int:
    from .evaluate import evaluate_all, source_from
    from .quantize import QuantizedDlrm
    from .train import load_checkpoint
    _threads(a.threads)
    ckpt = Path(a.checkpoint) if a.checkpoint else default_checkpoint(a.data, a.preset)
    model, meta = load_checkpoint(ckpt)
    q = QuantizedDlrm.load(Path(a.quantized) if a.quantized else quantized_path(ckpt))
    src = source_from(meta["source"])
    paths = ["fp32", "pacekern-int8"] + (["pacekern-int4"] if 4 in q.tables else [])
    if a.pacekern_fp32:
        paths.append("pacekern-fp32")
    if a.torch_int8_auc:
        paths.append("torch-int8")
    rep = evaluate_all(model, q, src.stream("eval", a.rows, a.batch), paths=paths, match_rows=a.match_rows)
    print(rep.table())
    return 0 if all(rep.bars().values()) else 1


def cmd_bench(a) -> int:
    from .bench import bench, format_table
    rows = bench(spec_for(a.preset), batches=tuple(int(b) for b in a.batches.split(",")),
                 impls=tuple(a.impls.split(",")), threads=a.threads, rounds=a.rounds, budget_s=a.budget, tune=a.tune)
    print(format_table(rows))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacekern dlrm", description="DLRMv2 (DCNv2): train, INT8-quantize, evaluate and "
                                "benchmark on pacekern kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    presets = list(PRESETS) + ["micro"]

    def common(s, threads=None):
        s.add_argument("--data", choices=["synthetic", "movielens"], default="synthetic")
        s.add_argument("--preset", choices=presets, default="small", help="table row cap (synthetic data)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=threads, help="threads (default: PACEKERN_NUM_THREADS or all cores)")

    s = sub.add_parser("train", help="train fp32/bf16 with sparse embedding gradients, save a checkpoint")
    common(s)
    s.add_argument("--rows", type=int, default=100_000, help="training rows (MovieLens: 80,000 a pass)")
    s.add_argument("--batch", type=int, default=512)
    s.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="default: bf16 autocast on CPUs with AVX512-BF16/AMX, else fp32")
    s.add_argument("--lr-dense", type=float, default=1e-3)
    s.add_argument("--lr-emb", type=float, default=0.05)
    s.add_argument("--eval-rows", type=int, default=50_000)
    s.add_argument("--eval-every", type=int, default=0)
    s.add_argument("--save-every", type=int, default=100)
    s.add_argument("--out", help="checkpoint path")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("quantize", help="INT8 post-training quantization calibrated on held-out rows")
    common(s)
    s.add_argument("--checkpoint")
    s.add_argument("--calib-rows", type=int, default=128_000, help="MLPerf calibrates on 128,000 rows")
    s.add_argument("--bits", default="8,4", help="embedding table formats to build: 8, 4 or 8,4")
    s.add_argument("--percentile", type=float, default=1e-4,
                   help="clip activation ranges at these quantiles (0: min/max); 1e-4 measured best")
    s.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant / equalization strength (negative: off)")
    s.add_argument("--out")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("eval", help="AUC of fp32, pacekern INT8/4-bit and torch int8 on the same rows, with the bars")
    common(s)
    s.add_argument("--checkpoint")
    s.add_argument("--quantized")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--batch", type=int, default=4096)
    s.add_argument("--pacekern-fp32", action="store_true", help="also the fp32 path on pacekern kernels")
    s.add_argument("--torch-int8-auc", action="store_true", help="also PyTorch int8's AUC on all rows (slow)")
    s.add_argument("--match-rows", type=int, default=65536, help="rows compared with PyTorch's int8 reference")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("bench", help="samples/s and p99 latency vs PyTorch fp32 eager and PyTorch int8")
    common(s, threads=2)
    s.set_defaults(preset="dev")
    s.add_argument("--batches", default="1,64,256,2048")
    s.add_argument("--impls", default="pacekern-int8,pacekern-int4,torch-fp32,torch-int8")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--budget", type=float, default=4.0, help="seconds per (implementation, batch size)")
    s.add_argument("--tune", action="store_true", help="tune pacekern's kernels for these shapes first (cached)")
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except (FileNotFoundError, ValueError) as e:
        print(f"pacekern dlrm {a.cmd}: {e}", file=sys.stderr)
        return 2
