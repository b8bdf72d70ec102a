"""Train DLRMv2 on synthetic Criteo-like data, INT8-quantize it and compare AUCs of every path.

    ./run python experiments/dlrm_accuracy.py [--preset small] [--rows 60000] [--eval-rows 200000]

The same as `pacekern dlrm train`, `quantize` and `eval` in one process (smaller defaults: a
shared 2-core machine trains ~250-500 rows/s).
"""
import argparse

import pacekern as pk
from dlrm import DlrmSpec, SyntheticCTR, TrainConfig, evaluate_all, quantize, train

p = argparse.ArgumentParser()
p.add_argument("--preset", default="small")
p.add_argument("--rows", type=int, default=60_000)
p.add_argument("--eval-rows", type=int, default=200_000)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
pk.set_num_threads(a.threads)
src = SyntheticCTR(DlrmSpec.preset(a.preset), seed=0)
model, m = train(src, TrainConfig(rows=a.rows, batch=512, precision="bf16", eval_rows=0))
q = quantize(model, src.stream("calib", 32_768, 4096))
print(evaluate_all(model, q, src.stream("eval", a.eval_rows, 4096), match_rows=32_768).table())
