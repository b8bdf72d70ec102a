"""pk.check: run a kernel and its PyTorch reference on the same inputs and compare.

One entry point for tests and the tuner. Tolerances are per output dtype:
  f32   |got - want| <= rtol*|want| + atol*max|want|, rtol 1e-4, atol 2e-5: accumulation order
        differs from torch's (blocking, FMA contraction), and the error of a K-long dot product
        grows with the size of its terms, hence a bound relative to the output's largest value
  bf16  rtol 1.6e-2 (bf16 has 8 significant bits), atol 1e-2 of the largest value
  i32   exact (integer accumulation is associative)
  u8/s8 +-1 (requantization rounds a float: a tie can go either way)

A check cannot be fooled by an output that already holds the answer (a tuner's previous candidate,
an earlier call): before the reference and the kernel run, every output the kernel never reads is
filled with a poison value (NaN for floats, 0x5A... for integers), so a kernel that skips a tail
or a strip leaves poison where the reference has values. The reference sees the same poison, so
rows a kernel legitimately leaves alone (a KV cache outside this call's rows) compare equal.
Outputs the kernel reads (in-place updates such as `res += x`) keep their contents. The tolerance
scale is the largest *finite* reference value, so a NaN or inf in the reference cannot widen it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOLERANCES = {"f32": (1e-4, 2e-5), "bf16": (1.6e-2, 1e-2), "i32": (0.0, 0.0), "i64": (0.0, 0.0),
              "i16": (0.0, 0.0), "u8": (0.0, 1.0), "s8": (0.0, 1.0)}
_ABSOLUTE_ATOL = {"u8", "s8"}          # atol is in units of the value, not of max|want|


class CheckError(AssertionError):
    """A kernel output that disagrees with its reference; says where and by how much."""


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    max_abs_err: float        # over all outputs
    max_rel_err: float        # |got - want| / max|want|
    message: str              # first mismatch, or a one-line summary


POISON = {"f32": float("nan"), "bf16": float("nan"), "i32": 0x5A5A5A5A, "i64": 0x5A5A5A5A5A5A5A5A,
          "i16": 0x5A5A, "u8": 0x5A, "s8": 0x5A}
_STORE_OPS = {"store": 0, "store_bf16": 0, "amx_store": 1}    # op -> which argument is the written address


def read_params(kir) -> set:
    """Names of the parameters the kernel body ever reads (scalar index or an op's address argument
    other than the one a store writes)."""
    names, read = {p.name for p in kir.params}, set()
    from . import ir
    for s in ir.walk(kir.body):
        for e in ir.exprs_of(s):
            if isinstance(e, ir.Index) and e.buf in names:
                read.add(e.buf)
            elif isinstance(e, ir.Op):
                written = _STORE_OPS.get(e.name)
                read.update(a.buf for i, a in enumerate(e.args) if isinstance(a, ir.Addr) and i != written)
    return read & names


def poison_outputs(kernel, args) -> None:
    """Fill the outputs `kernel` never reads with POISON (in place)."""
    import torch
    read = read_params(kernel.spec.ir)
    for p, a in zip(kernel.spec.ir.params, args):
        if p.out and p.name not in read and isinstance(a, torch.Tensor):
            if a.dtype == torch.int16 and p.dtype == "bf16":
                a.view(torch.bfloat16).fill_(float("nan"))
            else:
                a.fill_(POISON[p.dtype])
        elif p.out and p.name not in read and isinstance(a, np.ndarray):
            a.view(np.int16).fill(0x7FC0) if p.dtype == "bf16" else a.fill(POISON[p.dtype])


def _to_float(x, dtype: str):
    import torch
    t = torch.as_tensor(x)
    if dtype == "bf16" and t.dtype == torch.int16:
        t = t.view(torch.bfloat16)
    return t.detach().to(torch.float64)


def compare(name: str, got, want, dtype: str, rtol=None, atol=None) -> CheckResult:
    import torch
    r0, a0 = TOLERANCES[dtype]
    rtol = r0 if rtol is None else rtol
    atol = a0 if atol is None else atol
    g, w = _to_float(got, dtype), _to_float(want, dtype).reshape(_to_float(got, dtype).shape)
    finite = w[torch.isfinite(w)]
    scale = 1.0 if dtype in _ABSOLUTE_ATOL else max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-30)
    nan_ok = torch.isnan(g) == torch.isnan(w)
    diff = torch.where(torch.isnan(g) | torch.isnan(w), torch.zeros_like(g), (g - w).abs())
    inf_ok = torch.where(torch.isinf(w), g == w, torch.ones_like(g, dtype=torch.bool))
    bad = (diff > rtol * w.abs().nan_to_num(posinf=0.0, neginf=0.0) + atol * scale) | ~nan_ok | ~inf_ok
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not bad.any():
        return CheckResult(True, max_abs, max_abs / scale, f"{name}: ok (max abs err {max_abs:.3g})")
    idx = tuple(int(i) for i in np.unravel_index(int(torch.nonzero(bad.reshape(-1))[0]), tuple(g.shape)))
    n = int(bad.sum())
    return CheckResult(False, max_abs, max_abs / scale,
                       f"{name}: {n} of {g.numel()} elements differ; first at {idx}: got {float(g[idx]):.6g}, "
                       f"want {float(w[idx]):.6g} (rtol {rtol}, atol {atol} x {scale:.3g}); max abs err {max_abs:.3g}")


def check(kernel, *args, config=None, rtol=None, atol=None, raise_on_fail: bool = True) -> CheckResult:
    """Run `kernel.spec.ref(*args)` and `kernel(*args)`; compare every output parameter. Outputs
    the kernel does not read are poisoned first (module docstring), so they must be fully written."""
    ref = kernel.spec.ref
    if ref is None:
        raise ValueError(f"kernel '{kernel.name}' has no ref= to check against")
    params = kernel.spec.ir.params
    poison_outputs(kernel, args)
    want = ref(*args)                     # before the kernel runs: outputs may alias nothing yet
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    kernel(*args, config=config)
    outs = [(p, a) for p, a in zip(params, args) if p.out]
    if len(outs) != len(want):
        raise ValueError(f"{kernel.name}: ref returned {len(want)} outputs for {len(outs)} output parameters")
    results = [compare(f"{kernel.name}.{p.name}", a, w, p.dtype, rtol, atol) for (p, a), w in zip(outs, want)]
    ok = all(r.ok for r in results)
    res = CheckResult(ok, max(r.max_abs_err for r in results), max(r.max_rel_err for r in results),
                      "; ".join(r.message for r in results if not r.ok) or results[0].message)
    if not ok and raise_on_fail:
        raise CheckError(res.message + (f" [config {config}]" if config is not None else ""))
    return res
