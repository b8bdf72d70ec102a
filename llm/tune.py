"""`pacekern tune llm`: tune the linear-layer kernels of a model for its exact layer shapes, at
decode row counts (weights streamed from DRAM as in decode: cold mode) and at a prefill length
(the GEMMs). Results go to the tuning cache, which every later LLMModel picks up (kernels read
their config from it when a plan is built)."""
from __future__ import annotations

import torch

PREFILL_ROWS = 128           # a prompt of 65-128 tokens (the GEMMs bucket M by powers of two)


def linear_problems(llm, rows: int = 1) -> list:
    """(kernel, args, start config) for each distinct linear shape of the model at `rows` rows per
    call, as llm.ops.linear_pacekern runs it; start: the config its plan would use untuned (the
    search starts there; None: the space's default)."""
    from pacekern_ops import gemm_bf16, gemm_f32, gemm_int4, gemm_s8x16, gemv, gemv_int4
    from .ops import GEMV_MAX_ROWS, packed
    w = llm.weights
    lins = [w.layers[0].qkv, w.layers[0].o, w.layers[0].gate_up, w.layers[0].down, w.lm_head]
    gemm = rows > GEMV_MAX_ROWS
    seen, out = set(), []
    for lin in lins:
        key = (lin.fmt, lin.n, lin.k)
        if key in seen or (gemm and lin is w.lm_head):             # prefill runs the head on the last token only
            continue
        seen.add(key)
        x, y = torch.randn(rows, lin.k), torch.empty(rows, lin.n)
        if lin.fmt == "int8":
            xh, xl, xs = torch.empty(rows, lin.k, dtype=torch.uint8), torch.empty(rows, lin.k, dtype=torch.uint8), torch.empty(rows)
            gemv.quantize_x16(x, xh, xl, xs)
            if lin.k % 4 == 0:
                out.append(gemm_s8x16.kernel_call(xh.view(torch.int32), xl.view(torch.int32), xs, packed(lin), lin.scale,
                                                  lin.wsum, y))
            else:
                out.append((gemv.gemv_s8, (xh, xl, xs, lin.w, lin.scale, lin.wsum, y), None))
        elif lin.fmt == "int4" and gemm:
            xq, xs, xm = gemv_int4.activation_buffers(rows, lin.k)
            gemv_int4.quantize_x8(x, xq, xs, xm)
            out.append((gemm_int4.gemm_int4, (xq.view(torch.int32), xs, xm, *packed(lin), -(-lin.k // gemv_int4.G), y), None))
        elif lin.fmt == "int4":
            xq, xs, xm = gemv_int4.activation_buffers(rows, lin.k)
            gemv_int4.quantize_x8(x, xq, xs, xm)
            out.append((gemv_int4.gemv_int4, (xq, xs, xm, lin.w, lin.scale, lin.mins, y), None))
        elif lin.fmt == "f32" and not gemm:
            out.append((gemv.gemv_f32, (x, lin.w, y), gemv.rows_config(gemv.gemv_f32, x, lin.w, y)))
        elif lin.fmt == "f32":
            out.append((gemm_f32.gemm_f32, (x, packed(lin), y), None))
        else:
            xb = x.bfloat16()
            if not gemm and lin.k % 2 == 0:
                out.append(gemm_bf16.rows_call(xb, packed(lin), y))
            elif gemm_bf16.use_amx(rows, lin.k):
                out.append((gemm_bf16.gemm_bf16_amx, (gemm_bf16.amx_configs(rows, lin.n), xb, packed(lin), y), None))
            else:
                out.append((gemm_bf16.gemm_bf16_avx512, (xb.view(torch.int32), packed(lin), y), None))
    return out


def tune_model(llm, budget_s: float = 30.0, rows=(1, 8, PREFILL_ROWS), force: bool = False) -> list:
    """Tune every linear shape of `llm` at each row count; returns the pk.TuneResults. Decode row
    counts are timed with the weights cold (from DRAM), prefill ones warm (a GEMM reuses them)."""
    import pacekern as pk
    from .ops import GEMV_MAX_ROWS
    results = []
    for r in rows:
        for kernel, args, start in linear_problems(llm, r):
            results.append(pk.tune(kernel, *args, budget_s=budget_s, force=force, cold=r <= GEMV_MAX_ROWS, start=start))
    llm.model.plans.clear()                      # rebuild plans with the new configs
    return results
