"""`pacekern bench serve`: an open-loop load generator for OpenAI-compatible servers, and with
--compare a sweep of `pacekern serve` and llama.cpp's server on the same prompts in one run.

Definitions (as vLLM's `bench serve`): arrivals are Poisson (exponential gaps from a fixed seed),
sent whether or not earlier requests finished. TTFT runs from a request's send time to its first
streamed token; TPOT = (latency - TTFT) / (output tokens - 1), the first token excluded; ITL is
each gap between streamed chunks. A request meets the SLO when its TTFT and TPOT are both within
bounds; refused (429) and failed requests do not. Goodput = requests per second that met it. A
rate "holds the SLO" when at least 99% of its requests met it (so its p99 TTFT and TPOT are within
bounds, counting refusals as misses).

Prompts are windows of real text (Botchan) sent as token ids, so every server sees the same tokens,
and each rate gets windows of its own (a repeated prompt would be a prefix-cache hit); every
request asks for exactly `new_tokens` (ignore_eos) at temperature 0.
"""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.100


@dataclass(frozen=True)
class LoadResult:
    server: str
    rate: float                       # requests per second offered
    sent: int
    completed: int
    refused: int                      # 429
    failed: int                       # any other error
    duration_s: float                 # first send to last answer
    ttft_ms: tuple                    # p50, p90, p99 over completed requests
    tpot_ms: tuple
    itl_ms: tuple
    req_s: float                      # completed requests per second
    out_tok_s: float
    goodput_req_s: float              # requests per second that met the SLO
    met: float                        # fraction of sent requests that met the SLO

    @property
    def holds(self) -> bool:
        return self.met >= 0.99


def pct(xs, qs=(0.5, 0.9, 0.99)) -> tuple:
    xs = sorted(xs)
    return tuple(xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan") for q in qs)


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, prompt: list, new_tokens: int,
                      headers: dict) -> dict:
    """Stream one completion; its send time, chunk times and token count (from usage when the
    server reports it, else one token per chunk)."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    t0, times, tokens = time.perf_counter(), [], None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "t0": t0, "end": time.perf_counter()}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if d.get("usage"):
                    tokens = d["usage"].get("completion_tokens", tokens)
                if d.get("choices") and d["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return {"status": type(e).__name__, "t0": t0, "end": time.perf_counter()}
    return {"status": 200, "t0": t0, "end": time.perf_counter(), "times": times,
            "tokens": tokens if tokens is not None else len(times)}


async def run_load(url: str, prompts: list, rate: float, new_tokens: int, seed: int = 0, model: str | None = None,
                   api_key: str | None = None, server: str = "", slo: SLO = SLO()) -> LoadResult:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks, start = [], time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(one_request(client, url, model, p, new_tokens, headers)))
            await asyncio.sleep(rng.expovariate(rate))
        res = await asyncio.gather(*tasks)
    ok = [r for r in res if r["status"] == 200 and r["times"]]
    ttft = [r["times"][0] - r["t0"] for r in ok]
    tpot = [(r["end"] - r["times"][0]) / max(r["tokens"] - 1, 1) for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    good = sum(1 for a, b in zip(ttft, tpot) if a <= slo.ttft_s and b <= slo.tpot_s)
    dur = max(r["end"] for r in res) - start
    ms = lambda xs: tuple(v * 1e3 for v in pct(xs))          # noqa: E731
    return LoadResult(server, rate, len(res), len(ok), sum(r["status"] == 429 for r in res),
                      sum(r["status"] not in (200, 429) for r in res) + sum(1 for r in res if r["status"] == 200 and not r["times"]),
                      dur, ms(ttft), ms(tpot), ms(itl), len(ok) / dur, sum(r["tokens"] for r in ok) / dur, good / dur,
                      good / len(res))


def scrape_metrics(url: str) -> dict:
    """A server's /metrics as {sample name with labels: value}."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def load_prompts(n: int, lo: int, hi: int, seed: int, model=None) -> list:
    from .bench import engine_prompts
    from .models import resolve
    from .tokenizer import Tokenizer
    return engine_prompts(Tokenizer(resolve(model)), n, lo, hi, seed)


# ---- servers to compare ------------------------------------------------------------------------------

def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} was not ready after {timeout:.0f} s")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pacekern(model, slots: int, extra=()) -> tuple:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pacekern.cli", "serve", "--port", str(port), "--max-running",
                             str(slots), *(["--model", model] if model else []), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


LLAMACPP = """
import signal, sys, xllamacpp as x
p = x.CommonParams()
p.model.path, p.port, p.hostnames, p.n_parallel = sys.argv[1], int(sys.argv[2]), ["127.0.0.1"], int(sys.argv[3])
p.n_ctx, p.cont_batching, p.verbosity = int(sys.argv[4]), True, -1
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = int(sys.argv[5])
srv = x.Server(p)
print(srv.listening_address, flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
"""


def start_llamacpp(gguf, slots: int, ctx_per_slot: int, threads: int) -> tuple:
    """llama.cpp's own HTTP server (xllamacpp's Server) on loopback: `slots` parallel slots,
    continuous batching, the context split evenly among them."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", LLAMACPP, str(gguf), str(port), str(slots), str(slots * ctx_per_slot),
                             str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def compare(model=None, rates=(0.5, 1, 2, 4), requests: int = 32, new_tokens: int = 64, lo: int = 32, hi: int = 512,
            seed: int = 0, slots: int = 16, servers=("pacekern", "llama.cpp"), progress=print) -> list:
    """Start each server in turn and sweep the same prompts and arrival times through it."""
    import xllamacpp

    import pacekern as pk
    from . import models
    # fresh prompts for each rate (consecutive text windows): a prompt seen at an earlier rate would
    # be a prefix-cache hit, which says nothing about serving new traffic
    pool = load_prompts(requests * (len(rates) + 1), lo, hi, seed, model)
    per_rate = [pool[i * requests:(i + 1) * requests] for i in range(len(rates) + 1)]
    rows = []
    for name in servers:
        if name == "pacekern":
            proc, url = start_pacekern(model, slots)
            label = "pacekern serve (bf16)"
        else:
            src = models.MODELS.get(model or models.DEFAULT_MODEL)
            if src is None:
                progress("llama.cpp: skipped (the model is not from the catalogue, so there is no GGUF)")
                continue
            proc, url = start_llamacpp(models.fetch_gguf(src), slots, hi + new_tokens + 16, pk.target().threads)
            label = f"llama.cpp {xllamacpp.__version__} ({src.name} GGUF)"
        try:
            wait_ready(url, proc)
            asyncio.run(run_load(url, per_rate[-1][:4], 100.0, 4, seed))             # warm-up, not counted
            for rate, prompts in zip(rates, per_rate):
                r = asyncio.run(run_load(url, prompts, rate, new_tokens, seed, server=label))
                rows.append(r)
                progress(table([r]))
        finally:
            stop(proc)
    return rows


def table(rows, slo: SLO = SLO()) -> str:
    f = lambda t: " / ".join(f"{v:.0f}" for v in t)          # noqa: E731
    lines = [f"| server | rate req/s | done / 429 / failed | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | "
             f"req/s | out tok/s | goodput req/s | met SLO (TTFT<={slo.ttft_s:g}s, TPOT<={slo.tpot_s * 1e3:.0f}ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.server} | {r.rate:g} | {r.completed} / {r.refused} / {r.failed} | {f(r.ttft_ms)} | {f(r.tpot_ms)} | "
                     f"{f(r.itl_ms)} | {r.req_s:.2f} | {r.out_tok_s:.1f} | {r.goodput_req_s:.2f} | "
                     f"{r.met:.0%}{' holds' if r.holds else ''} |")
    return "\n".join(lines)


def best_rate(rows, server: str) -> float:
    """The highest offered rate at which `server` held the SLO (0 if none)."""
    return max((r.rate for r in rows if r.server == server and r.holds), default=0.0)


def plot(rows, path) -> None:
    """Latency percentiles and goodput against the offered rate, one line per server."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for server in dict.fromkeys(r.server for r in rows):
        rs = sorted((r for r in rows if r.server == server), key=lambda r: r.rate)
        x = [r.rate for r in rs]
        for i, (what, key) in enumerate((("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"))):
            line, = ax[i].plot(x, [getattr(r, key)[2] for r in rs], "o-", label=f"{server} p99")
            ax[i].plot(x, [getattr(r, key)[0] for r in rs], "o--", color=line.get_color(), alpha=0.6, label=f"{server} p50")
        ax[2].plot(x, [r.goodput_req_s for r in rs], "o-", label=server)
    for a, title, bound in ((ax[0], "TTFT (ms)", SLO().ttft_s * 1e3), (ax[1], "TPOT (ms)", SLO().tpot_s * 1e3),
                            (ax[2], "goodput (req/s within the SLO)", None)):
        a.set_title(title)
        a.set_xlabel("offered rate (req/s, Poisson)")
        a.set_xscale("log", base=2)
        if bound:
            a.axhline(bound, color="gray", ls=":", label="SLO")
            a.set_yscale("log")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
