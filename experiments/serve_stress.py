"""Overload and disconnect checks of `pacekern serve` (issue bars; figures go to docs/results/serve.md).

    ./run python experiments/serve_stress.py --rate 20 --seconds 30 --clients 50

1. Overload: Poisson arrivals at --rate (set it to ~10x the highest rate that holds the SLO in
   `pacekern bench serve --compare`) for --seconds. Reports how many completed / got 429, the
   slowest 429, the admitted requests' TTFT / TPOT p99, the peak RSS of the server's processes, and
   that a normal request works afterwards.
2. Disconnects: --clients streaming clients that drop after 3 chunks; the time until the server
   reports 0 running requests and 0 KV blocks in use.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import time

import httpx

from llm import bench_serve as bs


def rss_peak_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process and its children, MB."""
    pids, total = [pid], 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(open(f"/proc/{p}/stat").read().split(")")[1].split()[1]) == pid:
                    pids.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def metrics(url) -> dict:
    from llm.bench_serve import scrape_metrics
    return scrape_metrics(url)


async def overload(url, rate, seconds, new_tokens, seed):
    prompts = bs.load_prompts(int(rate * seconds), 32, 256, seed)
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    import random
    rng = random.Random(seed)

    async def one(c, p):
        t0 = time.perf_counter()
        r = await bs.one_request(c, url, None, p, new_tokens, {})
        return r, time.perf_counter() - t0
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(one(c, p)))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


async def disconnects(url, clients):
    async def drop(c, i):
        async with c.stream("POST", url + "/v1/completions",
                            json={"prompt": "Tell me a long story.", "max_tokens": 500, "min_tokens": 500, "stream": True}) as r:
            if r.status_code != 200:
                return r.status_code
            got = 0
            async for line in r.aiter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    return 200
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        return await asyncio.gather(*(drop(c, i) for i in range(clients)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    proc, url = bs.start_pacekern(None, 16, ["--max-queued", "64"])
    try:
        bs.wait_ready(url, proc)
        res = asyncio.run(overload(url, a.rate, a.seconds, a.new_tokens, a.seed))
        ok = [(r, dt) for r, dt in res if r["status"] == 200]
        no = [dt for r, dt in res if r["status"] == 429]
        other = [r["status"] for r, _ in res if r["status"] not in (200, 429)]
        ttft = [r["times"][0] - r["t0"] for r, _ in ok if r["times"]]
        tpot = [(r["end"] - r["times"][0]) / max(r["tokens"] - 1, 1) for r, _ in ok if r["times"]]
        print(f"overload: {len(res)} requests at {a.rate:g} req/s for {a.seconds:g} s: {len(ok)} completed, "
              f"{len(no)} refused (429), {len(other)} other {sorted(set(map(str, other)))}")
        if no:
            print(f"  429 latency: median {sorted(no)[len(no) // 2] * 1e3:.1f} ms, max {max(no) * 1e3:.1f} ms, "
                  f"{sum(dt < 0.05 for dt in no)}/{len(no)} within 50 ms")
        p = bs.pct(ttft), bs.pct(tpot)
        print(f"  admitted: TTFT p50/p99 {p[0][0] * 1e3:.0f}/{p[0][2] * 1e3:.0f} ms, TPOT p50/p99 "
              f"{p[1][0] * 1e3:.0f}/{p[1][2] * 1e3:.0f} ms; within the SLO: "
              f"{sum(1 for x, y in zip(ttft, tpot) if x <= 2 and y <= 0.1)}/{len(ttft)}")
        print(f"  peak RSS of the server's processes: {rss_peak_mb(proc.pid):.0f} MB")
        after = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=60)
        print(f"  afterwards: {after.status_code}, {after.json()['usage']['completion_tokens']} tokens")
        st = asyncio.run(disconnects(url, a.clients))
        t0 = time.perf_counter()
        while True:
            m = metrics(url)
            if m["pacekern:num_requests_running"] == 0 and m["pacekern:kv_cache_usage_perc"] == 0:
                break
            if time.perf_counter() - t0 > 30:
                break
            time.sleep(0.02)
        print(f"disconnects: {a.clients} streaming clients ({st.count(200)} streamed, others {sorted(set(st) - {200})}) "
              f"dropped after 3 chunks: running {m['pacekern:num_requests_running']:.0f}, KV usage "
              f"{m['pacekern:kv_cache_usage_perc']:.3f} after {time.perf_counter() - t0:.2f} s")
    finally:
        bs.stop(proc)


if __name__ == "__main__":
    main()
