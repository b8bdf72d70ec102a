"""`pacekern serve` (llm/server.py) as users reach it: a real server process on loopback, the real
`openai` client (sync and async, streaming and not), httpx for the error cases, and a real headless
chromium for the chat page. Greedy text over HTTP is checked against LLMModel.generate."""
import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from pacekern.llm import SamplingConfig

KEY = "test-key"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little girl named",
           "The three primary colors are"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags, timeout=180):
    """`pacekern serve` in a subprocess; returns (process, base url) once /health says ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pacekern.cli", "serve", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    t0, seen_503 = time.time(), False
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"pacekern serve exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return proc, url, seen_503
            seen_503 |= r.status_code == 503
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"pacekern serve was not ready in {timeout} s: {proc.stdout.read()}")


def stop_server(proc, grace=30) -> str:
    """SIGTERM; the server's output once it has exited cleanly (uvicorn re-raises the signal after
    its graceful shutdown, so the exit status is -SIGTERM)."""
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(grace)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert rc in (0, -signal.SIGTERM) and "[pacekern serve] stopped" in out, (rc, out[-2000:])
    return out


@pytest.fixture(scope="module")
def server():
    # the queue bound alone refuses here (test_overload...): no predicted-TTFT limit, which on a
    # slow host would refuse some of the 12 requests that fill the slots and the queue
    proc, url, seen_503 = start_server("--api-key", KEY, "--max-running", "8", "--max-queued", "4",
                                       "--kv-budget-mb", "256", "--request-timeout-s", "60",
                                       "--max-predicted-ttft-s", "1000")
    yield url, seen_503
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(url) -> dict:
    from llm.bench_serve import scrape_metrics
    return scrape_metrics(url)


# ---- what the openai client sees ---------------------------------------------------------------------

def test_health_was_503_while_loading_and_models_lists_the_loaded_one(server, client):
    assert server[1], "/health never answered 503 while the model loaded"
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]


def test_greedy_completions_equal_generate(client, smol_bf16):
    for p in PROMPTS:
        r = client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=24, temperature=0)
        ref = smol_bf16.generate(p, SamplingConfig(max_new_tokens=24))
        assert r.choices[0].text == ref.text, p
        assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[ref.finish_reason]
        assert r.usage.prompt_tokens == len(ref.prompt_ids) and r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming_equals_generate(client, smol_bf16):
    msgs = [{"role": "user", "content": "Name three fruits."}]
    ref = smol_bf16.generate(msgs, SamplingConfig(max_new_tokens=40))
    whole = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_completion_tokens=40,
                                           temperature=0)
    assert whole.choices[0].message.content == ref.text and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=40,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_sequences_are_cut_as_openai_does(client, smol_bf16):
    p = "1, 2, 3, 4,"
    ref = smol_bf16.generate(p, SamplingConfig(max_new_tokens=30)).text
    stop = ref[ref.index("7") - 1:ref.index("7") + 1]                  # " 7": spans a token boundary or not
    for stream in (False, True):
        r = client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=30, temperature=0,
                                      stop=[stop, "zzz"], stream=stream)
        if stream:
            parts = list(r)
            text, finish = "".join(c.choices[0].text for c in parts), parts[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == ref[:ref.index(stop)] and finish == "stop", (stream, text)


def test_seed_and_n(client):
    kw = dict(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.95, n=2)
    a = client.completions.create(seed=11, **kw)
    b = client.completions.create(seed=11, **kw)
    c = client.completions.create(seed=12, **kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert [x.index for x in a.choices] == [0, 1]
    assert a.choices[0].text != a.choices[1].text or a.choices[0].text != c.choices[0].text
    assert 2 <= a.usage.completion_tokens <= 32 and a.usage.prompt_tokens == b.usage.prompt_tokens


def test_logprobs(client):
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:                                   # greedy: the chosen token is the likeliest
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    c = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=4,
                                  temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]


def test_async_streams_at_once_equal_their_greedy_text(server, client):
    import openai

    async def main():
        ac = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def one(p):
            s = await ac.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=20, temperature=0,
                                            stream=True)
            return "".join([c.choices[0].text async for c in s])
        return await asyncio.gather(*(one(p) for p in PROMPTS * 2))
    texts = asyncio.run(main())
    for p, t in zip(PROMPTS * 2, texts):
        alone = client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=20, temperature=0)
        assert t == alone.choices[0].text, p


def test_pace_request_body(server, client):
    p = PROMPTS[0]
    r = httpx.post(server[0] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "smollm2-135m-instruct", "prompt": p, "gen_config": {"max_new_tokens": 12, "do_sample": False}})
    ref = client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=12, temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.choices[0].text


# ---- errors: status, OpenAI's error JSON, and the field named ------------------------------------------

BAD = [  # (route, body, status, words the message must contain)
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": [10 ** 9]}, 400, "vocabulary"),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "hi " * 9000, "max_tokens": 8}, 400, "context"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "gpt-4"),
    ("completions", {"prompt": "hi", "gen_config": {"num_beams": 4}}, 400, "num_beams"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{r}:{w}" for r, _, _, w in BAD])
def test_bad_requests_name_the_problem(server, route, body, status, words):
    r = httpx.post(f"{server[0]}/v1/{route}", headers={"Authorization": f"Bearer {KEY}"}, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"], err


def test_malformed_json_and_auth(server):
    url = server[0] + "/v1/completions"
    r = httpx.post(url, headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"}, content=b"{nope")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, headers=headers, json={"prompt": "hi"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server[0] + "/v1/models").status_code == 401
    assert httpx.get(server[0] + "/health").status_code == 200          # health and metrics need no key
    assert "pacekern:num_requests_running" in httpx.get(server[0] + "/metrics").text


# ---- under load and faults -------------------------------------------------------------------------------

@pytest.mark.heavy
def test_clients_that_disconnect_free_their_requests(server):
    """Streaming clients that drop mid-stream: running requests fall to 0 within 1 s and every KV
    block is free again."""
    url, n = server[0], 10

    async def drop(c, i):
        async with c.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={"prompt": PROMPTS[i % 4], "max_tokens": 400, "stream": True, "min_tokens": 400}) as r:
            got = 0
            async for line in r.aiter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    return True                                  # leaving the block closes the connection

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(drop(c, i) for i in range(n)))
    before = metrics(url)
    assert all(asyncio.run(main()))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 5:
        m = metrics(url)
        if m["pacekern:num_requests_running"] == 0 and m["pacekern:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.05)
    freed = time.perf_counter() - t0
    assert m["pacekern:num_requests_running"] == 0 and m["pacekern:kv_cache_usage_perc"] == 0, m
    assert freed < 1.0, f"requests freed {freed:.2f} s after the clients left"
    aborted = m.get('pacekern:request_success_total{finished_reason="abort"}', 0) - \
        before.get('pacekern:request_success_total{finished_reason="abort"}', 0)
    assert aborted == n


@pytest.mark.heavy
def test_overload_is_refused_fast_and_honestly(server, client):
    """Fill the 8 running slots and the queue of 4, then ask for more: each extra request gets 429
    with Retry-After within 50 ms (timed one by one, so the client's own burst handling is not in
    the figure), every admitted request completes, and the server serves normally after."""
    url, auth = server[0], {"Authorization": f"Bearer {KEY}"}

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            admitted = [asyncio.create_task(c.post(url + "/v1/completions", headers=auth, json={
                "prompt": PROMPTS[i % 4], "max_tokens": 64, "min_tokens": 64})) for i in range(12)]
            t0 = time.perf_counter()
            while metrics(url)["pacekern:num_requests_waiting"] < 4:          # the engine holds 8 + 4
                assert time.perf_counter() - t0 < 20 and not any(t.done() for t in admitted), \
                    [t.result().status_code for t in admitted if t.done()]
                await asyncio.sleep(0.02)
            refused = []
            for i in range(20):
                t0 = time.perf_counter()
                r = await c.post(url + "/v1/completions", headers=auth, json={"prompt": PROMPTS[i % 4], "max_tokens": 8})
                refused.append((r, time.perf_counter() - t0))
            return await asyncio.gather(*admitted), refused
    ok, refused = asyncio.run(main())
    assert [r.status_code for r in ok] == [200] * 12 and all(r.json()["usage"]["completion_tokens"] == 64 for r in ok)
    assert [r.status_code for r, _ in refused] == [429] * 20
    for r, _ in refused:
        assert int(r.headers["Retry-After"]) >= 1 and "overloaded" in r.json()["error"]["message"]
    assert max(dt for _, dt in refused) < 0.05, sorted(round(dt, 3) for _, dt in refused)
    after = client.completions.create(model="smollm2-135m-instruct", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert after.usage.completion_tokens == 4


@pytest.mark.heavy
def test_a_long_predicted_ttft_is_refused_before_the_queue_fills():
    """With 2 slots and room for 64 queued, requests that would wait past --max-predicted-ttft-s
    (from the measured completion and prefill rates) get 429 naming the prediction, long before
    the queue bound; the admitted ones complete."""
    proc, url, _ = start_server("--max-running", "2", "--max-queued", "64", "--max-predicted-ttft-s", "0.5")
    try:
        long_prompt = " ".join(PROMPTS * 12)                        # ~200 tokens each
        for i in range(4):                                          # rates to predict from
            assert httpx.post(url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 4}, timeout=60).status_code == 200

        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                sent, refused = [], None
                for i in range(40):
                    sent.append(asyncio.create_task(c.post(url + "/v1/completions", json={
                        "prompt": long_prompt, "max_tokens": 32, "min_tokens": 32})))
                    await asyncio.sleep(0.05)
                    done = [t.result() for t in sent if t.done() and t.result().status_code == 429]
                    if done:
                        refused = done[0]
                        break
                return refused, len(sent), await asyncio.gather(*sent)
        refused, n, answers = asyncio.run(main())
        assert refused is not None, f"{n} requests all admitted"
        assert n < 2 + 64, n                                        # refused before the queue bound
        msg = refused.json()["error"]["message"]
        assert "predicted time to first token" in msg and int(refused.headers["Retry-After"]) >= 1, msg
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 429} and codes[0] == 200, codes           # the first found the engine idle
        assert metrics(url)['pacekern:request_rejected_total{reason="predicted_ttft"}'] >= 1
    finally:
        stop_server(proc)


@pytest.mark.heavy
def test_request_time_limit_and_sigterm_leave_nothing_behind():
    """A second server: a request past --request-timeout-s (3 s) gets 504; SIGTERM while a stream
    runs lets it go on for the 1 s grace period, then aborts it, and the process exits cleanly."""
    proc, url, _ = start_server("--request-timeout-s", "3", "--grace-s", "1")
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2000, "min_tokens": 2000}, timeout=30)
        assert r.status_code == 504 and "limit" in r.json()["error"]["message"], r.text
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": "hi", "max_tokens": 300, "min_tokens": 300, "stream": True}) as s:
            lines = s.iter_lines()
            next(lines)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            got = 1
            try:
                for line in lines:                                 # the stream ends: aborted after the grace period
                    got += line.startswith("data: {")
            except httpx.RemoteProtocolError:
                pass
            ended = time.perf_counter() - t0
        stop_server(proc, grace=10)
        # not finished, not cut before the grace period; ended within a few engine steps and
        # uvicorn's shutdown of the grace period (2.51 s seen on a busy 2-core AVX2 host)
        assert 0.9 < ended < 3.5 and got < 300, (ended, got)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- the chat page in a real browser -------------------------------------------------------------------

def chromium():
    """Debian's chromium and its driver (.ci/run installs them); None if this machine lacks them."""
    b, d = shutil.which("chromium"), shutil.which("chromedriver")
    return (b, d) if b and d else None


@pytest.mark.heavy
@pytest.mark.skipif(chromium() is None, reason="no chromium + chromedriver here (apt-get install chromium chromium-driver; CI installs them)")
def test_chat_page_streams_a_reply_in_headless_chromium(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    browser, driver_path = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get(server[0] + "/")
        drv.find_element(By.ID, "key").send_keys(KEY)
        drv.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        box = drv.find_element(By.ID, "input")
        box.send_keys("Name three colors.")
        box.send_keys(Keys.ENTER)
        seen = []

        def grows(d):                                   # sample the reply as it streams
            t = d.find_element(By.ID, "reply-1").text
            if not seen or seen[-1] != t:
                seen.append(t)
            return d.find_element(By.ID, "reply-1").get_attribute("data-done") == "1"
        WebDriverWait(drv, 60, poll_frequency=0.02).until(grows)
        reply = drv.find_element(By.ID, "reply-1")
        assert "error" not in reply.get_attribute("class"), reply.text
        assert len(reply.text) > 10
        assert len([s for s in seen if s]) >= 2, seen      # text appeared in pieces, not all at once
        WebDriverWait(drv, 10).until(lambda d: d.find_element(By.ID, "model").text == "smollm2-135m-instruct")
    finally:
        drv.quit()


# ---- fuzzing the server's own OpenAPI schema ------------------------------------------------------------

@pytest.mark.heavy
def test_schemathesis_bodies_never_get_a_5xx():
    """schemathesis generates valid and invalid bodies from /openapi.json for every route (bounded:
    40 valid and 40 invalid per operation, generations capped at 4 tokens); no answer may be a 5xx,
    and every error is OpenAI's JSON with a message."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    proc, url, _ = start_server("--max-tokens-cap", "4", "--max-queued", "64")
    failures = []
    try:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        ops = [r.ok() for r in schema.get_all_operations()]
        assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
        for op in ops:
            modes = list(schemathesis.GenerationMode) if op.method.upper() == "POST" else [schemathesis.GenerationMode.POSITIVE]
            for mode in modes:                           # a GET without parameters has no invalid form
                @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def fuzz(case):
                    r = case.call(base_url=url, timeout=60)
                    if r.status_code >= 500:
                        failures.append((op.path, mode.value, r.status_code, case.body, r.text[:300]))
                    elif r.status_code >= 400:
                        assert r.json().get("error", {}).get("message"), (r.status_code, r.text, case.body)
                fuzz()
    finally:
        stop_server(proc)
    assert not failures, failures[:5]


def test_bench_serve_load_generator_against_the_server(server):
    """`pacekern bench serve`'s open-loop generator on loopback: a handful of Poisson arrivals,
    every request streamed to the end and its tokens counted from the server's usage."""
    from llm import bench_serve as bs
    prompts = bs.load_prompts(6, 16, 64, seed=1)
    r = asyncio.run(bs.run_load(server[0], prompts, rate=4.0, new_tokens=8, seed=1, api_key=KEY, server="ours"))
    assert (r.sent, r.completed, r.refused, r.failed) == (6, 6, 0, 0)
    assert r.out_tok_s == pytest.approx(6 * 8 / r.duration_s)
    assert 0 < r.ttft_ms[0] <= r.ttft_ms[1] <= r.ttft_ms[2] and r.tpot_ms[0] > 0
    assert 0 <= r.met <= 1 and r.goodput_req_s == pytest.approx(r.met * 6 / r.duration_s)
    assert "| ours | 4 | 6 / 0 / 0 |" in bs.table([r])
    assert bs.best_rate([r], "ours") in (0.0, 4.0)
