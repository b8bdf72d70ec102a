"""`pacekern tune llm`: tune the decode GEMVs of a model for its exact layer shapes, with the
weights streamed from DRAM as in decode (cold mode). Results go to the tuning cache, which every
later LLMModel picks up (kernels read their config from it when a plan is built)."""
from __future__ import annotations

import torch


def decode_problems(llm, rows: int = 1) -> list:
    """(kernel, args, start config) for each distinct linear shape of the model at `rows` rows per
    step; start: the config its plan would use untuned (the search starts there)."""
    from pacekern_ops import gemm_s8x16, gemv, gemv_int4
    w = llm.weights
    lins = [w.layers[0].qkv, w.layers[0].o, w.layers[0].gate_up, w.layers[0].down, w.lm_head]
    seen, out = set(), []
    for lin in lins:
        key = (lin.fmt, lin.n, lin.k)
        if key in seen:
            continue
        seen.add(key)
        x, y = torch.randn(rows, lin.k), torch.empty(rows, lin.n)
        if lin.fmt == "int8":                            # as llm.ops.linear_pacekern runs it
            xh, xl, xs = torch.empty(rows, lin.k, dtype=torch.uint8), torch.empty(rows, lin.k, dtype=torch.uint8), torch.empty(rows)
            gemv.quantize_x16(x, xh, xl, xs)
            if lin.k % 4 == 0:
                if lin.packed is None:
                    lin.packed = gemm_s8x16.pack_weight(lin.w.t())
                args = (xh.view(torch.int32), xl.view(torch.int32), xs, lin.packed, lin.scale, lin.wsum, y)
                out.append((gemm_s8x16.gemm_s8x16, args, gemm_s8x16.rows_config(args)))
            else:
                out.append((gemv.gemv_s8, (xh, xl, xs, lin.w, lin.scale, lin.wsum, y), None))
        elif lin.fmt == "int4":
            xq, xs, xm = gemv_int4.activation_buffers(rows, lin.k)
            gemv_int4.quantize_x8(x, xq, xs, xm)
            out.append((gemv_int4.gemv_int4, (xq, xs, xm, lin.w, lin.scale, lin.mins, y), None))
        else:
            kern = gemv.gemv_f32 if lin.fmt == "f32" else gemv.gemv_bf16
            out.append((kern, (x, lin.w, y), gemv.rows_config(kern, x, lin.w, y)))
    return out


def tune_model(llm, budget_s: float = 30.0, rows=(1,), force: bool = False) -> list:
    """Tune every decode GEMV shape of `llm`; returns the pk.TuneResults."""
    import pacekern as pk
    results = []
    for r in rows:
        for kernel, args, start in decode_problems(llm, r):
            results.append(pk.tune(kernel, *args, budget_s=budget_s, force=force, cold=True, start=start))
    llm.model.plans.clear()                      # rebuild plans with the new configs
    return results
