"""`pacekern` command line: demo, generate, serve, bench, tune, check, show, cache, models, env."""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def _ops(names):
    from pacekern_ops.registry import OPS
    unknown = [n for n in names if n not in OPS]
    if unknown:
        sys.exit(f"pacekern: unknown op(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
    return [OPS[n] for n in (names or OPS)]


def _sizes(op, text: str | None):
    sizes = dict(op.sizes)
    for part in filter(None, (text or "").split(",")):
        k, _, v = part.partition("=")
        if k not in sizes or not v.isdigit():
            sys.exit(f"pacekern: --sizes expects {','.join(f'{k}=N' for k in op.sizes)}, got {part!r}")
        sizes[k] = int(v)
    return sizes


def _problems(args):
    for op in _ops(args.ops):
        size_list = [_sizes(op, args.sizes)] + ([] if args.sizes else [dict(v) for v in op.variants])
        for sizes in size_list:
            yield op, sizes


def _shape(sizes) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())


def cmd_tune(args):
    import pacekern as pk
    if args.ops and args.ops[0] in ("llm", "llm-int8", "llm-int4"):
        from llm.tune import tune_model
        from pacekern.llm import LLMModel
        model = LLMModel(args.model, weights={"llm-int8": "int8", "llm-int4": "int4"}.get(args.ops[0], "native"))
        for res in tune_model(model, budget_s=args.budget or 30.0, force=args.force):
            print(res.pin_line())
        return
    for op, sizes in _problems(args):
        prob = op.build(**sizes)
        for kernel, kargs in prob.tune:
            res = pk.tune(kernel, *kargs, budget_s=args.budget, force=args.force, cold=prob.unit == "GB/s")
            print(res.pin_line())


def cmd_check(args):
    failed = 0
    for op, sizes in _problems(args):
        prob = op.build(**sizes)
        try:
            prob.check()
            print(f"ok    {op.name} {_shape(sizes)}")
        except AssertionError as e:
            failed += 1
            print(f"FAIL  {op.name} {_shape(sizes)}: {str(e).splitlines()[0]}")
    sys.exit(1 if failed else 0)


def bench_rows(problems, tune: bool, budget: float | None, rounds: int = 7):
    """Check, (tune), and time ours, torch and the relevant machine limit, interleaved in one run
    (medians): on a shared machine a limit measured at another moment is no yardstick."""
    import pacekern as pk
    from pacekern.bench import interleaved
    from pacekern.limits import fma_probe, stream_probe, vnni_probe
    rows = []
    for op, sizes in problems:
        prob = op.build(**sizes)
        prob.check()
        if tune:
            for kernel, kargs in prob.tune:
                pk.tune(kernel, *kargs, budget_s=budget, cold=prob.unit == "GB/s", verbose=False)
        fns = {"ours": prob.ours, "torch": prob.torch}
        if prob.limit:
            probe, probe_work = {"dram": lambda: stream_probe(int(prob.work)), "fma": fma_probe,
                                 "vnni": vnni_probe}[prob.limit]()
            fns["limit"] = probe
        t = interleaved(fns, rounds=rounds)
        ours, base = t["ours"].median_s, t["torch"].median_s
        # ratios are taken per round (the same moment on a shared machine), then the median
        ratio = statistics.median(b / o for b, o in zip(t["torch"].samples, t["ours"].samples))
        rate = prob.work / ours / 1e9
        pct = (100 * statistics.median(l / o for l, o in zip(t["limit"].samples, t["ours"].samples)) * prob.work / probe_work
               if prob.limit else None)
        rows.append(dict(op=op.name, shape=_shape(sizes), ours_ms=ours * 1e3, torch_ms=base * 1e3, ratio=ratio,
                         rate=rate, unit=prob.unit, peak=probe_work / t["limit"].median_s / 1e9 if prob.limit else None, pct=pct))
    return rows


def print_table(rows):
    import pacekern as pk
    print(pk.target().describe())
    print(f"{'op':10s} {'shape':24s} {'ours ms':>8s} {'torch ms':>9s} {'x torch':>8s} {'rate':>16s} {'limit now':>10s} {'% limit':>8s}")
    for r in rows:
        lim = f"{r['peak']:10.1f} {r['pct']:7.0f}%" if r["peak"] else f"{'-':>10s} {'-':>8s}"
        print(f"{r['op']:10s} {r['shape']:24s} {r['ours_ms']:8.3f} {r['torch_ms']:9.3f} {r['ratio']:7.2f}x "
              f"{r['rate']:8.1f} {r['unit']:7s} {lim}")
    print("x torch and % limit: medians of per-round ratios. limit now: this machine's fp32 FMA peak (GFLOP/s), vpdpbusd\n"
          "peak (GOP/s) or DRAM read rate (GB/s), timed interleaved with the op in the same run")


def cmd_bench_llm(args):
    from llm.bench import bench_llm, table
    rows, gbs = bench_llm(args.model, rounds=args.rounds if args.rounds != 7 else 3,
                          engines=tuple(e.strip() for e in args.engines.split(",")),
                          progress=lambda m: print(f"[bench llm] {m}", file=sys.stderr, flush=True))
    print(table(rows, gbs))


LLM_ENGINES = "pacekern bf16,pacekern int8,pacekern int4,hf bf16,llama.cpp"


def cmd_bench_engine(args):
    from llm.bench import bench_engine, engine_table
    engines = "pacekern bf16,hf bf16,llama.cpp" if args.engines == LLM_ENGINES else args.engines
    rows = bench_engine(args.model, requests=args.requests or 64, new_tokens=args.new_tokens or 128,
                        concurrency=args.concurrency,
                        engines=tuple(e.strip() for e in engines.split(",")),
                        progress=lambda m: print(f"[bench engine] {m}", file=sys.stderr, flush=True))
    print(engine_table(rows))


def cmd_bench_serve(args):
    """Load a running server (--url), or with --compare start ours and llama.cpp's and sweep both."""
    import asyncio
    from llm import bench_serve as bs
    try:
        rates = tuple(float(r) for r in args.rates.split(","))
    except ValueError:
        sys.exit(f"pacekern bench serve: --rates expects numbers like 0.5,1,2, got {args.rates!r}")
    if any(r <= 0 for r in rates):
        sys.exit("pacekern bench serve: every rate must be > 0")
    n, new = args.requests or 32, args.new_tokens or 64
    say = lambda m: print(f"[bench serve] {m}", file=sys.stderr, flush=True)     # noqa: E731
    if args.compare:
        rows = bs.compare(args.model, rates, n, new, seed=args.seed, slots=args.concurrency, progress=say)
    elif args.url:
        pool = bs.load_prompts(n * len(rates), 32, 512, args.seed, args.model)       # fresh prompts per rate
        rows = [asyncio.run(bs.run_load(args.url.rstrip("/"), pool[i * n:(i + 1) * n], r, new, args.seed,
                                        api_key=args.api_key, server=args.url)) for i, r in enumerate(rates)]
    else:
        sys.exit("pacekern bench serve: pass --url URL (a running server) or --compare")
    print(bs.table(rows))
    for server in dict.fromkeys(r.server for r in rows):
        print(f"{server}: highest rate holding the SLO: {bs.best_rate(rows, server):g} req/s")
    if args.plot:
        bs.plot(rows, args.plot)
        print(f"plot: {args.plot}")


def cmd_bench(args):
    if args.ops == ["serve"]:
        return cmd_bench_serve(args)
    if args.ops == ["llm"]:
        return cmd_bench_llm(args)
    if args.ops == ["engine"]:
        return cmd_bench_engine(args)
    if args.ops and args.ops[0] == "dlrm":
        from dlrm.cli import main as dlrm_main
        return dlrm_main(["bench", *args.ops[1:]])
    rows = bench_rows(list(_problems(args)), tune=not args.no_tune, budget=args.budget, rounds=args.rounds)
    print_table(rows)


def cmd_generate(args):
    """Stream a completion (or a chat reply with --chat) from a model and print its speed."""
    t0 = time.perf_counter()
    from pacekern.llm import LLMModel, SamplingConfig
    from llm.models import ModelError
    spec = None
    if getattr(args, "pard", None) or getattr(args, "draft", None):
        from pacekern.llm import DraftModelSpecDecodeConfig, PardSpecDecodeConfig
        from llm.models import DEFAULT_MODEL, DEFAULT_PARD_DRAFT
        if args.pard == "default":
            args.pard = DEFAULT_PARD_DRAFT.get(args.model or DEFAULT_MODEL)
            if args.pard is None:
                sys.exit(f"pacekern generate: no shipped PARD draft for {args.model}; pass one: --pard DRAFT")
        if (args.tree_nodes or args.lookup_tokens) and not args.pard:
            sys.exit("pacekern generate: --tree-nodes / --lookup-tokens need a PARD draft (--pard)")
        nodes = 6 if args.tree_nodes is None else args.tree_nodes
        lookup = (8 if nodes else 0) if args.lookup_tokens is None else args.lookup_tokens
        spec = (PardSpecDecodeConfig(args.pard, num_speculative_tokens=args.k or 4, weights=args.draft_weights,
                                     tree_nodes=nodes, lookup_tokens=lookup)
                if args.pard else DraftModelSpecDecodeConfig(args.draft, num_speculative_tokens=args.k or 4,
                                                             weights=args.draft_weights))
    try:
        model = LLMModel(args.model, dtype=args.dtype, weights=args.weights, threads=args.threads, pard_config=spec)
    except (ModelError, ValueError) as e:
        sys.exit(f"pacekern generate: {e}")
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0 or None,
                         temperature=args.temperature or None, seed=args.seed)
    print(f"[{model.path.parent.name if model.path.name == 'hf' else model.path.name}: {model.fmt} weights, "
          f"loaded in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    try:
        out = model.generate(prompt, cfg, streamer="stdout")
    except ValueError as e:
        sys.exit(f"\npacekern generate: {e}")
    m = out.metrics
    spec_txt = (f"; {m.mean_accepted_per_round:.2f} tokens/round, acceptance {m.acceptance_rate:.0%}"
                if m.acceptance_rate is not None else "")
    print(f"\n[{m.new_tokens} tokens, {out.finish_reason}; prefill {m.prompt_tokens} tokens in {m.ttft_s * 1e3:.0f} ms, "
          f"decode {m.decode_tokens_per_s:.1f} tok/s{spec_txt}]", file=sys.stderr)


def _generate_args(p, prompt_default=None):
    p.add_argument("prompt", nargs="?" if prompt_default else None, default=prompt_default)
    p.add_argument("--model", default=None, help="catalogue name (pacekern models), HF directory, .gguf file or hub id")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--weights", default="native", choices=["native", "int8", "int4"])
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--pard", metavar="DRAFT", nargs="?", const="default", default=None,
                   help="speculative decoding with a PARD draft (greedy); alone: the draft shipped for --model")
    p.add_argument("--draft", metavar="MODEL", default=None, help="speculative decoding with a plain draft model (greedy)")
    # PARD: the API's defaults are PACE's (a chain of K=12); on the CLI the setting measured fastest
    # with the shipped draft on 2 cores (experiments/pard_speed.py, bf16, 16 held-out prompts,
    # 2026-12-01: K=4 tree 6 + lookup 8 2.03x plain decode, K=3 tree 4 + 8 1.95x, chain K=4 1.52x)
    p.add_argument("--k", type=int, default=None, help="draft depth per round (PARD: 4, draft model: 4)")
    p.add_argument("--tree-nodes", type=int, default=None,
                   help="PARD: verify a tree of this many drafts (the likeliest paths, depth <= K); 0: a chain (default 6)")
    p.add_argument("--lookup-tokens", type=int, default=None,
                   help="PARD trees: add a prompt-lookup branch of up to this many tokens (default 8; 0: off)")
    p.add_argument("--draft-weights", default=None, choices=["native", "int8", "int4"], help="the draft's weights (default: as --weights)")


def cmd_serve(args):
    """An OpenAI-compatible server on the engine (llm/server.py)."""
    from llm.engine import EngineConfig
    from llm.server import ServerConfig, serve
    try:
        engine = EngineConfig(max_running=args.max_running, max_tokens_per_step=args.max_tokens_per_step,
                              kv_budget_mb=args.kv_budget_mb, prefix_caching=not args.no_prefix_caching)
        cfg = ServerConfig(model=args.model, dtype=args.dtype, weights=args.weights, threads=args.threads, engine=engine,
                           api_key=args.api_key, max_queued=args.max_queued, max_predicted_ttft_s=args.max_predicted_ttft_s,
                           request_timeout_s=args.request_timeout_s, served_name=args.served_model_name,
                           max_tokens_cap=args.max_tokens_cap)
    except ValueError as e:
        sys.exit(f"pacekern serve: {e}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"[pacekern serve] warning: listening on {args.host} without --api-key", file=sys.stderr)
    serve(cfg, host=args.host, port=args.port, grace_s=args.grace_s)


def _serve_args(p):
    p.add_argument("--model", default=None, help="catalogue name (pacekern models), HF directory, .gguf file or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--weights", default="native", choices=["native", "int8", "int4"])
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every /v1 route")
    p.add_argument("--served-model-name", default=None, help="the `model` name clients send (default: --model)")
    p.add_argument("--max-running", type=int, default=16, help="requests decoding or prefilling at once")
    p.add_argument("--max-tokens-per-step", type=int, default=256,
                   help="token budget of one engine step (decode rows + prompt chunks: chunked prefill)")
    p.add_argument("--kv-budget-mb", type=int, default=1024, help="memory for the paged KV cache, all layers")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    p.add_argument("--max-queued", type=int, default=64, help="waiting requests beyond this are refused with 429")
    p.add_argument("--max-predicted-ttft-s", type=float, default=1.5,
                   help="while others run, refuse (429 + Retry-After) a request whose predicted time to first token exceeds this")
    p.add_argument("--request-timeout-s", type=float, default=300.0, help="abort a request running longer (504)")
    p.add_argument("--max-tokens-cap", type=int, default=None,
                   help="refuse a larger max_tokens (400) and cap the default (default: the context length)")
    p.add_argument("--grace-s", type=float, default=10.0,
                   help="on SIGTERM/SIGINT: seconds in-flight requests may finish before they are aborted")


def cmd_demo(args):
    """Generate text with the default model on pacekern kernels; --kernels: the kernel table instead."""
    if not args.kernels:
        return cmd_generate(args)
    import pacekern as pk
    hw = pk.target()
    print(f"pacekern {pk.__version__}: ISA level {hw.level} (host {hw.host_level}), {hw.threads} threads, "
          f"L2 {hw.l2 >> 20} MiB/core, L3 {hw.l3 >> 20} MiB")
    t0 = time.perf_counter()
    from pacekern_ops.registry import OPS
    problems = [(OPS["gemm_f32"], dict(M=512, N=512, K=512)), (OPS["gemv_bf16"], dict(M=1, N=8960, K=1536)),
                (OPS["gemv_s8"], dict(M=1, N=8960, K=1536))]
    rows = bench_rows(problems, tune=True, budget=args.budget, rounds=5)
    print_table(rows)
    print(f"done in {time.perf_counter() - t0:.1f}s (tuning results are cached: the next run only times)")


def cmd_show(args):
    import pacekern as pk
    op = _ops([args.op])[0]
    prob = op.build(**_sizes(op, args.sizes))
    for kernel, kargs in prob.tune:
        cfg = kernel.config_for(kernel.bind(kargs))
        print(f"# {kernel.name} {cfg}")
        if args.what == "ir":
            print(kernel.show_ir(cfg))
        elif args.what == "source":
            print(kernel.source(cfg))
        else:
            r = kernel.asm(cfg)
            print(r.summary())
            if args.full:
                print("\n\n".join(r.inner_loops))


def cmd_cache(args):
    from pacekern import cache, env
    if args.action == "clear":
        n = cache.clear()
        print(f"cleared {env.get('PACEKERN_CACHE_DIR')} ({n} files)")
        return
    rows = cache.summary()
    print(f"tuning cache: {env.get('PACEKERN_CACHE_DIR')}/tune.sqlite, {len(rows)} kernel/bucket entries")
    for r in sorted(rows, key=lambda r: r["kernel"]):
        best = f"{r['best'][0] * 1e3:.3f} ms {r['best'][1]}" if r["best"] else "no valid config"
        print(f"  {r['kernel']:16s} {r['bucket']:28s} {r['n']:3d} configs  best {best}")


def cmd_models(args):
    from llm.models import models_dir, status
    print(f"model cache: {models_dir()}")
    for name, mb, state, about in status():
        print(f"  {name:30s} {mb:5d} MB  {state:10s}  {about}")


def cmd_env(args):
    from pacekern.env import markdown_table
    print(markdown_table())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dlrm"]:                                     # its own parser (dlrm/cli.py), -h included
        sys.exit(__import__("dlrm.cli", fromlist=["main"]).main(argv[1:]))
    ap = argparse.ArgumentParser(prog="pacekern", description="Python CPU kernels: check, tune, benchmark.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="generate text with the default model (--kernels: benchmark the proof kernels)")
    _generate_args(d, prompt_default="Write a haiku about fast computers.")
    d.set_defaults(chat=True)
    d.add_argument("--kernels", action="store_true", help="check, tune and benchmark the proof kernels instead")
    d.add_argument("--budget", type=float, default=20.0, help="with --kernels: tuning budget per kernel, seconds")
    d.set_defaults(fn=cmd_demo)
    g = sub.add_parser("generate", help="stream a completion from an LLM on pacekern kernels")
    _generate_args(g)
    g.set_defaults(fn=cmd_generate)
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, SSE, /metrics, a chat page)")
    _serve_args(sv)
    sv.set_defaults(fn=cmd_serve)
    for name, fn, hlp in [("bench", cmd_bench, "time ops beside PyTorch: ratio, rate, %% of this machine's limits"),
                          ("tune", cmd_tune, "tune ops for their sizes and print the pin lines"),
                          ("check", cmd_check, "check ops against PyTorch")]:
        p = sub.add_parser(name, help=hlp)
        p.add_argument("ops", nargs="*", help="op names (default: all; see pacekern_ops/registry.py), or `llm` / `engine` / `serve` / `dlrm`")
        p.add_argument("--sizes", help="e.g. M=1,N=8960,K=1536 (default: the op's sizes)")
        if name in ("bench", "tune"):
            p.add_argument("--budget", type=float, default=None, help="tuning budget per kernel, seconds")
        if name == "tune":
            p.add_argument("--force", action="store_true", help="re-time configs already in the cache")
            p.add_argument("--model", default=None, help="with `tune llm` / `llm-int8` / `llm-int4`: the model")
        if name == "bench":
            p.add_argument("--no-tune", action="store_true", help="time the cached/default configs only")
            p.add_argument("--rounds", type=int, default=7)
            p.add_argument("--model", default=None, help="with `bench llm`: the model (default: the catalogue default)")
            p.add_argument("--engines", default=LLM_ENGINES,
                           help="with `bench llm` / `bench engine`: comma-separated engines to time")
            p.add_argument("--requests", type=int, default=None,
                           help="with `bench engine`: requests, all at once (64); `bench serve`: per rate (32)")
            p.add_argument("--new-tokens", type=int, default=None,
                           help="tokens per request (`bench engine` 128, `bench serve` 64)")
            p.add_argument("--concurrency", type=int, default=16,
                           help="with `bench engine`/`serve`: running requests / llama.cpp slots / HF batch rows")
            p.add_argument("--url", default=None, help="with `bench serve`: the server to load, e.g. http://127.0.0.1:8000")
            p.add_argument("--rates", default="0.5,1,2,4", help="with `bench serve`: Poisson request rates, req/s")
            p.add_argument("--seed", type=int, default=0, help="with `bench serve`: prompts and arrival times")
            p.add_argument("--api-key", default=None, help="with `bench serve --url`: the server's key")
            p.add_argument("--compare", action="store_true",
                           help="with `bench serve`: start pacekern serve and llama.cpp's server, sweep both")
            p.add_argument("--plot", default=None, help="with `bench serve`: write latency/goodput plots to this PNG")
        p.set_defaults(fn=fn)
    s = sub.add_parser("show", help="generated IR / source / asm summary of an op's kernel")
    s.add_argument("op")
    s.add_argument("what", choices=["ir", "source", "asm"])
    s.add_argument("--sizes")
    s.add_argument("--full", action="store_true", help="with asm: print the inner loops")
    s.set_defaults(fn=cmd_show)
    c = sub.add_parser("cache", help="list or clear the tuning cache and generated code")
    c.add_argument("action", choices=["ls", "clear"])
    c.set_defaults(fn=cmd_cache)
    mo = sub.add_parser("models", help="the offline model catalogue and what is cached")
    mo.set_defaults(fn=cmd_models)
    e = sub.add_parser("env", help="the environment variables pacekern reads")
    e.set_defaults(fn=cmd_env)
    dl = sub.add_parser("dlrm", help="DLRMv2: train | quantize | eval | bench (see `pacekern dlrm -h`)", add_help=False)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
