"""Training (fp32, or bf16 autocast on CPUs with AMX/AVX512-BF16) with sparse embedding gradients,
evaluation by AUC, and checkpoints.

Optimizers: row-wise sparse Adagrad on the tables (MLPerf trains DLRMv2 with Adagrad; torchrec's
row-wise variant keeps one accumulator per row; only the rows a batch touches are read or
written, and it is several times faster here than torch.optim.Adagrad on sparse gradients, which
coalesces them), fused Adam on the dense layers. Checkpoints are written to `path.partial`
and renamed, so an interrupted save never replaces a good one. Everything is deterministic by
seed (data, init, order), up to floating-point reduction order across threads.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pacekern.log import log

from .data import auc, validate
from .model import DLRMv2, DlrmSpec, load_file


@dataclass(frozen=True)
class TrainConfig:
    rows: int = 200_000                 # training rows (one pass over a stream)
    batch: int = 1024
    lr_dense: float = 1e-3              # Adam
    lr_emb: float = 0.05                # sparse Adagrad
    precision: str = "fp32"             # fp32 | bf16 (autocast of the dense layers)
    seed: int = 0
    eval_rows: int = 50_000             # AUC on held-out rows at the end (0: skip)
    eval_every: int = 0                 # batches between progress AUCs on a small eval slice (0: never)
    checkpoint: str | None = None       # path of the checkpoint written at the end (and every `save_every`)
    save_every: int = 0                 # batches


def save_checkpoint(path, model: DLRMv2, meta: dict) -> Path:
    """Atomic save: spec, weights, and free-form metadata (data source, metrics, config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    meta = json.loads(json.dumps(meta, default=str))       # plain values only: loadable with weights_only=True
    torch.save({"spec": model.spec.to_dict(), "state": model.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> tuple[DLRMv2, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no DLRM checkpoint at {path} (train one with `pacekern dlrm train --out {path}`)")
    ck = load_file(path, "checkpoint")
    model = DLRMv2(DlrmSpec.from_dict(ck["spec"]))
    model.load_state_dict(ck["state"])
    model.eval()
    return model, ck.get("meta", {})


@torch.no_grad()
def evaluate(predict, batches, progress: bool = True, desc: str = "eval") -> dict:
    """AUC, log loss and click rate of `predict(batch) -> probabilities` over batches; also the
    oracle AUC when the batches carry the teacher's probabilities (synthetic data)."""
    from tqdm import tqdm
    ps, ys, pt = [], [], []
    for b in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
        ps.append(predict(b).float())
        ys.append(b.labels)
        if b.p_true is not None:
            pt.append(b.p_true)
    p, y = torch.cat(ps), torch.cat(ys)
    pc = p.double().clamp(1e-7, 1 - 1e-7)
    out = dict(rows=int(y.numel()), auc=auc(p, y), logloss=float(-(y * pc.log() + (1 - y) * (1 - pc).log()).mean()),
               ctr=float(y.mean()), mean_p=float(p.mean()))
    if pt:
        out["oracle_auc"] = auc(torch.cat(pt), y)
    out["_p"] = p
    return out


def fp32_predict(model: DLRMv2):
    def predict(b):
        validate(b, model.spec)
        return torch.sigmoid(model(b.dense, b.indices, b.offsets))
    return predict


class RowwiseAdagrad:
    """Sparse row-wise Adagrad: per touched row r, with g_r its summed gradient,
    acc[r] += mean(g_r^2); w[r] -= lr g_r / (sqrt(acc[r]) + eps)."""

    def __init__(self, weights, lr: float, eps: float = 1e-8):
        self.weights, self.lr, self.eps = list(weights), lr, eps
        self.acc = [torch.zeros(w.shape[0]) for w in self.weights]

    @torch.no_grad()
    def step(self):
        for w, acc in zip(self.weights, self.acc):
            g = w.grad
            if g is None:
                continue
            if not g.is_sparse:
                rows = torch.nonzero(g.abs().sum(1)).squeeze(1)
                vals = g[rows]
            else:
                idx, val = g._indices()[0], g._values()
                rows, inv = torch.unique(idx, return_inverse=True)
                vals = torch.zeros(rows.numel(), w.shape[1], dtype=val.dtype).index_add_(0, inv, val)
            a = acc[rows] + vals.pow(2).mean(1)
            acc[rows] = a
            w.index_add_(0, rows, vals * (-self.lr / (a.sqrt() + self.eps))[:, None])

    def zero_grad(self):
        for w in self.weights:
            w.grad = None


def train(source, cfg: TrainConfig, model: DLRMv2 | None = None, progress: bool = True) -> tuple[DLRMv2, dict]:
    """Train on `source.stream('train', ...)` (SyntheticCTR or a real dataset); returns the model
    and metrics (AUC on `cfg.eval_rows` eval rows)."""
    from tqdm import tqdm
    torch.manual_seed(cfg.seed)
    spec = source.spec
    if model is None:
        model = DLRMv2(spec, seed=cfg.seed)
        ctr = getattr(source, "ctr", None)
        if ctr:                                   # start at the click rate: no early steps spent on the bias
            with torch.no_grad():
                model.top[-1].bias.fill_(math.log(ctr / (1 - ctr)))
    model.train()
    emb_params = [e.weight for e in model.embs]
    dense_params = [p for n, p in model.named_parameters() if not n.startswith("embs.")]
    opt_emb = RowwiseAdagrad(emb_params, lr=cfg.lr_emb)
    opt_dense = torch.optim.Adam(dense_params, lr=cfg.lr_dense, fused=True)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    use_bf16 = cfg.precision == "bf16"
    loss_fn = torch.nn.BCEWithLogitsLoss()
    nb = math.ceil(cfg.rows / cfg.batch)
    t0, seen, ema = time.time(), 0, None
    bar = tqdm(source.stream("train", cfg.rows, cfg.batch), total=nb, desc="train", unit="batch", disable=not progress)
    for step, b in enumerate(bar):
        validate(b, spec)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(b.dense, b.indices, b.offsets)
        loss = loss_fn(logits.float(), b.labels)
        opt_emb.zero_grad()
        opt_dense.zero_grad(set_to_none=True)
        loss.backward()
        opt_emb.step()
        opt_dense.step()
        seen += b.size
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        bar.set_postfix(loss=f"{ema:.4f}", rows_s=f"{seen / (time.time() - t0):.0f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            model.eval()
            m = evaluate(fp32_predict(model), source.stream("eval", 10_000, 2048), progress=False)
            model.train()
            log.info("step %d: loss %.4f, eval AUC %.4f (10k rows)", step + 1, ema, m["auc"])
        if cfg.checkpoint and cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(cfg.checkpoint, model, dict(step=step + 1, rows=seen, config=asdict(cfg),
                                                        source=source.describe()))
    model.eval()
    train_s = time.time() - t0
    metrics = dict(train_rows=seen, train_s=train_s, train_rows_per_s=seen / max(train_s, 1e-9), final_loss=ema)
    if cfg.eval_rows:
        m = evaluate(fp32_predict(model), source.stream("eval", cfg.eval_rows, 4096), progress=progress)
        metrics.update({k: v for k, v in m.items() if not k.startswith("_")})
        log.info("fp32 eval: AUC %.4f on %d rows (oracle %.4f), logloss %.4f", m["auc"], m["rows"],
                 m.get("oracle_auc", float("nan")), m["logloss"])
    if cfg.checkpoint:
        save_checkpoint(cfg.checkpoint, model, dict(step=nb, rows=seen, config=asdict(cfg), metrics=metrics,
                                                    source=source.describe()))
    return model, metrics
