"""INT8 post-training quantization of DLRMv2: the quantized model both inference paths share
(pacekern's kernels in dlrm.infer, PyTorch's quantized ops in dlrm.torch_int8).

Recipe (MLPerf CPU submitters' consensus, dlrm.md 2.5):
  * Linear weights: int8, per output channel, symmetric (scale = max|w_n| / 127, codes -127..127).
  * Activations entering a GEMM: u8, per tensor, affine (scale, zero point), static: ranges
    observed on held-out calibration batches of the fp32 model, clipped at the [1e-4, 1 - 1e-4]
    quantiles (`pct`; 0 = min/max). ReLU outputs get zero point 0. Accumulation is exact int32.
  * Outputs: a GEMM followed by another GEMM requantizes to u8 in its epilogue (bias and ReLU
    fused); the bottom MLP's last layer, every DCN W GEMM and the final 256 -> 1 layer stay fp32.
  * DCN: x_{l+1} = x0 * (W_l h_l + b_l) + x_l in fp32 (the residual stream is the accuracy-
    sensitive part); x_l is requantized to u8 once per layer for V_l and the top MLP.
  * Embeddings: row-wise asymmetric int8 (fp32 scale and bias a row, torch's byte format), or
    4-bit (fp16 scale and bias a row, torch's 4-bit format); pooled sums in fp32.
  * Smoothing (alpha, default 0.5). x0 = [bottom MLP output, 26 pooled embeddings] puts values of
    very different sizes in one tensor; with plain per-tensor u8 the small embedding columns
    collapse to a few codes (measured: INT8 AUC 99.06% of fp32). So every input that pacekern's
    own kernels quantize (dense features, x_0 .. x_L) gets SmoothQuant's per-column factor f
    folded into the consuming weights (`ActQ.f`), and every Linear -> (ReLU) -> Linear pair (DCN
    V_l -> W_l, consecutive MLP layers) is cross-layer equalized the same way (an exact rewrite
    of the fp32 model, so PyTorch's int8 reference runs it too).
    Measured (dev preset, 400k training rows, 65,536 eval rows): min/max ranges with equalization
    of the DCN pairs only 99.28% of fp32 AUC (the top MLP's ReLU outputs lost ~0.6%); all pairs
    equalized 99.73%; plus 1e-4 quantile clipping 100.1% (clipping a few outliers regularizes).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pacekern_ops import embedding_bag as eb

from .model import DLRMv2, DlrmSpec, load_file


@dataclass(frozen=True, eq=False)
class ActQ:
    """u8 affine quantization of one activation tensor [.., K]:
    q[k] = clamp(round(x[k] / (scale f[k])) + zp, 0, 255). f (optional, per column) is a
    SmoothQuant-style factor folded into the consuming layer's weight rows (w[k, :] f[k]), so
    columns of very different ranges (x0's bottom-MLP slot beside small embedding values) share
    one u8 grid without losing the small ones."""
    scale: float
    zp: int
    f: torch.Tensor | None = None            # f32 [K] or None (all ones)

    @staticmethod
    def from_range(lo: float, hi: float, f: torch.Tensor | None = None) -> "ActQ":
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = max(hi - lo, 1e-8) / 255.0
        return ActQ(scale, int(min(255, max(0, round(-lo / scale)))), f)

    def inv_scale(self, k: int) -> torch.Tensor:
        """f32 [k]: 1 / (scale f), what the quantizing kernels multiply by."""
        f = torch.ones(k) if self.f is None else self.f.float()
        return (1.0 / (self.scale * f.double())).float().contiguous()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The kernels' arithmetic in torch: round(x * inv_scale) (f32 product, half to even) + zp."""
        inv = self.inv_scale(x.shape[-1])
        return torch.clamp(torch.round(x.float() * inv) + self.zp, 0, 255).to(torch.uint8)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """(q - zp) scale: the value in the smoothed domain (x / f), which meets the folded weights."""
        return (q.float() - self.zp) * self.scale


@dataclass
class QLinear:
    """One quantized Linear: y = (x_u8 - zp_in) s_in (w_s8 s_w) + bias, ReLU, then u8 (out) or f32."""
    w: torch.Tensor               # s8 [K, N]: y = x @ w (torch's Linear weight transposed)
    scale_w: torch.Tensor         # f32 [N]
    bias: torch.Tensor            # f32 [N]
    inp: ActQ
    out: ActQ | None              # None: fp32 output
    relu: bool
    _packed: object = field(default=None, repr=False)

    @staticmethod
    def of(lin: torch.nn.Linear, inp: ActQ, out: ActQ | None, relu: bool) -> "QLinear":
        w = lin.weight.detach().float()
        if inp.f is not None:                         # fold the input's smoothing into the weight rows
            w = w * inp.f[None, :]
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        bias = lin.bias.detach().float() if lin.bias is not None else torch.zeros(w.shape[0])
        return QLinear(q.t().contiguous(), scale.contiguous(), bias.contiguous(), inp, out, relu)

    def packed(self):
        """pacekern's packed weights (built once)."""
        if self._packed is None:
            from pacekern_ops.gemm_u8s8 import pack
            self._packed = pack(self.w, self.scale_w)
        return self._packed

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] fp32, torch Linear layout."""
        return (self.w.float() * self.scale_w[None, :]).t()


@dataclass
class QuantizedDlrm:
    """Everything both INT8 paths need; `save`/`load` round-trip it."""
    spec: DlrmSpec
    linears: dict                 # name (DLRMv2.linears order) -> QLinear
    x_q: list                     # ActQ of x_0 .. x_L (inputs of V_0 .. V_{L-1}, then of the top MLP)
    tables: dict                  # bits (8, 4) -> PackedTables (pacekern formats)
    fp32_tables: eb.PackedTables | None = None   # kept for the fp32 path on the same kernels (optional)
    calib: dict = field(default_factory=dict)    # observed ranges, for reports

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        a = lambda q: None if q is None else (q.scale, q.zp, q.f)
        lin = {k: dict(w=v.w, scale_w=v.scale_w, bias=v.bias, inp=a(v.inp), out=a(v.out), relu=v.relu)
               for k, v in self.linears.items()}
        tabs = {b: dict(w=p.w, scale=p.scale.contiguous(), bias=p.bias.contiguous(), rows=p.rows)
                for b, p in self.tables.items()}
        torch.save(dict(format=2, spec=self.spec.to_dict(), linears=lin, x_q=[a(x) for x in self.x_q], tables=tabs,
                        calib=self.calib), tmp)
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path) -> "QuantizedDlrm":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no quantized DLRM at {path} (make one with `pacekern dlrm quantize`)")
        d = load_file(path, "quantized model")
        lin = {k: QLinear(v["w"], v["scale_w"], v["bias"], ActQ(*v["inp"]), None if v["out"] is None else ActQ(*v["out"]),
                          v["relu"]) for k, v in d["linears"].items()}
        tabs = {}
        for b, t in d["tables"].items():
            if b == 8 and d.get("format", 1) < 2:         # format 1 stored b + 128 s (the +128 folded in)
                t["bias"] = t["bias"] - 128.0 * t["scale"]
            tabs[b] = eb.PackedTables(b, t["w"], eb.scale_bias(t["scale"], t["bias"]), eb._bases(t["rows"]),
                                      tuple(t["rows"]), int(t["w"].shape[1]) * (2 if b == 4 else 1))
        return QuantizedDlrm(DlrmSpec.from_dict(d["spec"]), lin, [ActQ(*a) for a in d["x_q"]], tabs, None, d.get("calib", {}))


class RangeObserver:
    """Running range of a tensor [.., K] over calibration batches: per column min/max, and the
    [p, 1 - p] quantiles of a bounded random subsample of its rows (clips rare outliers; p = 0
    means min/max). Rows, not elements, are kept so that equalization can rescale the columns."""

    def __init__(self, pct: float = 0.0, keep: int = 1 << 21, seed: int = 0):
        self.pct, self.keep = pct, keep
        self.lo = self.hi = None
        self.samples = []                      # f32 [rows, K] subsamples
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor):
        x2 = x.detach().float().reshape(-1, x.shape[-1])
        lo, hi = x2.amin(0), x2.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.pct > 0:
            n = min(x2.shape[0], max(1, (1 << 18) // x2.shape[1]))
            self.samples.append(x2[torch.randint(0, x2.shape[0], (n,), generator=self.gen)])

    def rescale(self, f: torch.Tensor):
        """The observed tensor divided by f per column (cross-layer equalization)."""
        self.lo, self.hi = self.lo / f, self.hi / f
        self.samples = [s / f for s in self.samples]

    def range(self) -> tuple:
        if self.pct <= 0 or not self.samples:
            return float(self.lo.min()), float(self.hi.max())
        s = torch.cat(self.samples).reshape(-1)
        if s.numel() > self.keep:                # the same subsample at every call: a producer's output
            g = torch.Generator().manual_seed(self.seed)       # and its consumer's input get one range
            s = s[torch.randperm(s.numel(), generator=g)[: self.keep]]
        return float(torch.quantile(s, self.pct)), float(torch.quantile(s, 1 - self.pct))


@torch.no_grad()
def calibrate(model: DLRMv2, batches, pct: float = 0.0, progress: bool = True) -> dict:
    """Observers of every quantized activation of the fp32 model: name -> RangeObserver."""
    from tqdm import tqdm
    obs: dict = {}

    def see(name, x):
        obs.setdefault(name, RangeObserver(pct))(x)
    lins = model.linears()
    spec = model.spec
    for b in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
        x = b.dense
        for i in range(len(spec.bottom)):
            see(f"bottom.{i}.in", x)
            x = torch.relu(lins[f"bottom.{i}"](x))
        x0 = torch.cat([x] + model.pooled(b.indices, b.offsets, b.size), dim=1)
        xl = x0
        see("x.0", xl)
        for l in range(spec.dcn_layers):
            h = lins[f"cross.V.{l}"](xl)
            see(f"h.{l}", h)
            xl = x0 * lins[f"cross.W.{l}"](h) + xl
            see(f"x.{l + 1}", xl)
        y = xl
        for i in range(len(spec.top)):
            see(f"top.{i}.in", y)
            y = lins[f"top.{i}"](y)
            if i < len(spec.top) - 1:
                y = torch.relu(y)
    return obs


def quantize_tables(model: DLRMv2, bits=(8, 4)) -> dict:
    """Row-wise quantized copies of all tables: bits -> PackedTables."""
    rows = model.spec.rows
    w = torch.cat([e.weight.detach().float() for e in model.embs])
    out = {}
    for b in bits:
        if b == 8:
            out[8] = eb.pack_s8(*eb.quantize_rows_u8(w), rows)
        elif b == 4:
            out[4] = eb.pack_u4(*eb.quantize_rows_u4(w), rows)
        else:
            raise ValueError(f"embedding bits must be 8 or 4, got {b}")
    return out


def smoothing(obs: RangeObserver, lin: torch.nn.Linear, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-column factor f_k = max|x_k|^alpha / max|w_k|^(1 - alpha)
    (normalized to geometric mean 1): the input's columns are divided by f, the weight rows
    multiplied by it, so that both quantize well (alpha 1: flatten the inputs entirely). Both maxima
    are floored at 1e-3 of their largest: a ReLU channel never active in calibration would get a
    tiny f, i.e. a producer row (and bias) scaled up ~1000x, whose rare activations at inference
    saturate the u8 grid (measured: 0.016 off in probability vs PyTorch int8 on the dev preset)."""
    amax = torch.maximum(obs.lo.abs(), obs.hi.abs()).double()
    amax = amax.clamp_min(max(float(amax.max()) * 1e-3, 1e-6))
    wmax = lin.weight.detach().abs().amax(0).double()
    wmax = wmax.clamp_min(max(float(wmax.max()) * 1e-3, 1e-6))
    f = amax ** alpha / wmax ** (1 - alpha)
    return (f / f.log().mean().exp()).float()


def equalized_pairs(spec: DlrmSpec) -> list:
    """(producer, consumer, observer of the u8 tensor between them) for every Linear -> Linear
    pair with at most a ReLU between: each DCN V_l -> W_l, and consecutive bottom / top MLP layers."""
    pairs = [(f"cross.V.{l}", f"cross.W.{l}", f"h.{l}") for l in range(spec.dcn_layers)]
    for part, n in (("bottom", len(spec.bottom)), ("top", len(spec.top))):
        pairs += [(f"{part}.{i}", f"{part}.{i + 1}", f"{part}.{i + 1}.in") for i in range(n - 1)]
    return pairs


def equalize(model: DLRMv2, obs: dict, alpha: float) -> DLRMv2:
    """Cross-layer equalization of every pair of `equalized_pairs`: a copy of the model with the
    producer's output rows (and bias) divided by f > 0 and the consumer's input columns multiplied
    by f, f = smoothing(between, consumer). The same function in exact arithmetic (ReLU(y / f) =
    ReLU(y) / f), but the u8 tensor between the two uses its per-tensor grid evenly: without it
    the top MLP's ReLU outputs, a few channels far larger than the rest, lost 0.2-0.3% of the AUC
    each (measured on the dev preset). The observers are rescaled to match."""
    m = copy.deepcopy(model)
    lins = m.linears()
    with torch.no_grad():
        for prod, cons, between in equalized_pairs(m.spec):
            o = obs[between]
            f = smoothing(o, lins[cons], alpha)
            lins[prod].weight /= f[:, None]
            if lins[prod].bias is not None:
                lins[prod].bias /= f
            lins[cons].weight *= f[None, :]
            o.rescale(f)
    return m


def quantize(model: DLRMv2, calib_batches, emb_bits=(8, 4), pct: float = 1e-4, alpha: float | None = 0.5,
             progress: bool = True) -> QuantizedDlrm:
    """Post-training quantization of a trained fp32 model (see the module docstring). `pct`:
    activation ranges clipped at the [pct, 1 - pct] quantiles (0: min/max). `alpha`: SmoothQuant
    strength for the inputs that pacekern's own kernels quantize (the dense features, x0 and the
    DCN outputs x_l) and for the cross-layer equalization of every pair of `equalized_pairs`;
    None turns both off."""
    spec = model.spec
    obs = calibrate(model, calib_batches, pct, progress)
    if alpha is not None:
        model = equalize(model, obs, alpha)
    lins = model.linears()

    def act(name, consumer=None):
        o = obs[name]
        if alpha is None or consumer is None:
            return ActQ.from_range(*o.range())
        f = smoothing(o, lins[consumer], alpha)
        smoothed = copy.copy(o)
        smoothed.rescale(f)
        return ActQ.from_range(*smoothed.range(), f)

    q = {}
    nb, nt = len(spec.bottom), len(spec.top)
    for i in range(nb):
        out = act(f"bottom.{i + 1}.in") if i + 1 < nb else None
        q[f"bottom.{i}"] = QLinear.of(lins[f"bottom.{i}"], act(f"bottom.{i}.in", "bottom.0" if i == 0 else None), out,
                                      relu=True)
    x_q = [act(f"x.{l}", f"cross.V.{l}") for l in range(spec.dcn_layers)] + [act("top.0.in", "top.0")]
    for l in range(spec.dcn_layers):
        q[f"cross.V.{l}"] = QLinear.of(lins[f"cross.V.{l}"], x_q[l], act(f"h.{l}"), relu=False)
        q[f"cross.W.{l}"] = QLinear.of(lins[f"cross.W.{l}"], act(f"h.{l}"), None, relu=False)
    for i in range(nt):
        out = act(f"top.{i + 1}.in") if i + 1 < nt else None
        q[f"top.{i}"] = QLinear.of(lins[f"top.{i}"], x_q[-1] if i == 0 else act(f"top.{i}.in"), out, relu=i + 1 < nt)
    ranges = {k: list(o.range()) for k, o in obs.items()}
    return QuantizedDlrm(spec, q, x_q, quantize_tables(model, emb_bits), eb.pack_f32([e.weight for e in model.embs]),
                         ranges)
