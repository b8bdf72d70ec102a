"""`pacekern serve`: an OpenAI-compatible HTTP server over the Engine.

    pacekern serve --model smollm2-135m-instruct --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Processes. The front end (this process) runs uvicorn's event loop: HTTP, SSE, validation, and
tokenization in a worker thread; it holds only the tokenizer. The Engine runs in a process of its
own (engine_main) that steps while there is work and sleeps on its pipe when there is none;
requests go to it over that pipe and each step's outputs come back to a reader thread, which
hands them to each request's asyncio.Queue. So the event loop never waits on a forward pass (not
even for the GIL) and the engine never waits on a socket.

Admission. A request is refused at once (429 + Retry-After) when --max-queued requests already
wait for a slot, or when its predicted time to first token exceeds --max-predicted-ttft-s: the
wait for a slot (requests ahead beyond the slots / measured completion rate) plus every prompt not
yet started, its own included, at the measured prefill rate (an idle engine admits any request:
its own prefill is the least it can take). Refusing early keeps the admitted
requests' TTFT bounded instead of letting every request's latency grow with the queue.

Routes (one table, in create_app): POST /v1/completions, POST /v1/chat/completions (OpenAI's
bodies and SSE chunks; PACE's `gen_config` body too), GET /v1/models, GET /health (503 while the
model loads), GET /metrics (Prometheus, `pacekern:` names after vLLM's), GET / (the chat page).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineConfig, Request, RequestOutput
from .sampling import SamplingConfig


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None          # catalogue name, HF directory, .gguf or hub id (None: the default model)
    dtype: str = "bfloat16"
    weights: str = "native"
    threads: int | None = None
    engine: EngineConfig = EngineConfig()
    api_key: str | None = None        # set: every /v1 route needs `Authorization: Bearer KEY`
    max_queued: int = 64              # requests waiting for a slot beyond this get 429
    max_predicted_ttft_s: float = 1.5 # a predicted time to first token beyond this gets 429 (the SLO is 2 s)
    request_timeout_s: float = 300.0  # a request running longer is aborted
    served_name: str | None = None    # the `model` name clients use (default: the model's catalogue name)
    max_tokens_cap: int | None = None # a larger max_tokens gets 400; an unset one is at most this


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the offending parameter."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- request bodies (their schema is the server's OpenAPI document) -----------------------------------

class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")        # as OpenAI-compatible servers: unknown fields are ignored

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)            # vLLM's: -1 or 0 turns it off
    min_p: float | None = Field(None, ge=0, lt=1)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int | None = Field(None, ge=0)        # vLLM's extra: no EOS or stop before this many tokens
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None                # {"include_usage": bool}
    user: str | None = None


class PaceGenConfig(BaseModel):
    """AMD PACE's `gen_config` (its field names), accepted so PACE clients work unchanged."""
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    do_sample: bool | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    stop_strings: Union[str, list[str], None] = None
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class CompletionBody(Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=5)
    gen_config: PaceGenConfig | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def sampling_of(body: Body, chat: bool) -> SamplingConfig:
    """The OpenAI fields (or PACE's gen_config) as a SamplingConfig; unset ones come from the
    model's generation_config.json. temperature 0 is greedy, as OpenAI and vLLM define it."""
    g = getattr(body, "gen_config", None)
    if g is not None:
        max_new = g.max_new_tokens
        return SamplingConfig(max_new_tokens=max_new, min_new_tokens=(max_new if g.ignore_eos else g.min_new_tokens),
                              do_sample=g.do_sample if g.temperature != 0 else False,
                              temperature=g.temperature or None, top_p=g.top_p, top_k=g.top_k, seed=g.seed,
                              stop_strings=_stops(g.stop_strings), repetition_penalty=g.repetition_penalty,
                              frequency_penalty=g.frequency_penalty)
    max_new = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    t = body.temperature
    return SamplingConfig(
        max_new_tokens=max_new, min_new_tokens=(max_new if body.ignore_eos else body.min_tokens),
        do_sample=None if t is None else t > 0, temperature=t or None,
        top_k=None if body.top_k is None else max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p,
        seed=body.seed, stop_strings=_stops(body.stop), presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty)


def _stops(stop) -> tuple | None:
    if stop is None:
        return None
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not s for s in stops):
        raise APIError(400, "stop: stop sequences must be non-empty strings", param="stop")
    if len(stops) > 16:
        raise APIError(400, f"stop: at most 16 stop sequences, got {len(stops)}", param="stop")
    return stops


# ---- the engine in its own process ---------------------------------------------------------------------

@dataclass(frozen=True)
class EngineInfo:
    """What the engine process reports once it is ready."""
    path: str                         # the model directory (the front end loads its tokenizer from it)
    vocab: int
    max_tokens_per_seq: int
    num_blocks: int
    block_size: int
    startup_s: float


def engine_main(conn, config: ServerConfig) -> None:
    """The engine process: load and warm up, then step whenever there is work and sleep on the pipe
    when there is none. Messages in: ("add", Request), ("abort", id), ("stop", None). Out: ("ready",
    EngineInfo) or ("failed", why), then ("out", [RequestOutput], (waiting, running, blocks in
    use), (prompt tokens, seconds) of the step) per step and ("error", id, why, is_bad_input). Exits when the front end's end of the pipe
    closes, so a killed server leaves no engine behind."""
    from .generate import LLMModel
    t0 = time.perf_counter()
    try:
        eng = Engine(LLMModel(config.model, dtype=config.dtype, weights=config.weights, threads=config.threads),
                     config.engine)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", EngineInfo(str(eng.llm.path), eng.llm.spec.vocab, eng.max_tokens_per_seq, eng.pool.num_blocks,
                                   eng.pool.block_size, time.perf_counter() - t0)))
    stats = lambda: (len(eng.scheduler.waiting), len(eng.scheduler.running), eng.num_blocks_in_use())   # noqa: E731
    stepped = False
    while True:
        try:
            msgs = [conn.recv()] if not eng.has_unfinished() else []
            while conn.poll():
                msgs.append(conn.recv())
        except (EOFError, OSError):
            return
        outs = []
        for kind, arg in msgs:
            if kind == "stop":
                for rid in list(eng.seqs):
                    eng.abort(rid)
                conn.send(("out", [], stats()))
                return
            if kind == "add":
                try:
                    eng.add_request(arg)
                except Exception as e:                       # validated by the front end; a late refusal still answers
                    conn.send(("error", arg.request_id, f"{type(e).__name__}: {e}", isinstance(e, ValueError)))
            elif arg in eng.seqs:                            # abort (a finished request needs none)
                outs.append(eng.abort(arg))
        stepped = eng.has_unfinished()
        if stepped:
            try:
                outs += eng.step()
            except Exception as e:                           # a bug: fail what is in flight, keep serving
                import traceback
                traceback.print_exc()
                for rid in list(eng.seqs):
                    eng.abort(rid)
                    conn.send(("error", rid, f"{type(e).__name__}: {e}", False))
        conn.send(("out", outs, stats(), eng.last_step if stepped else (0, 0.0)))


class EngineProcess:
    """The front end's handle on the engine process. submit() and abort() are called from the event
    loop; a reader thread hands each request's outputs (RequestOutput, or an exception) to the
    asyncio.Queue it was submitted with. The GIL is the reason for a process: an engine thread in
    this process would hold it through every step's Python work and stall the event loop (measured:
    429 answers took 125-320 ms instead of a few)."""

    def __init__(self, config: ServerConfig, metrics: "Metrics"):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main, args=(child, config), name="pacekern-engine", daemon=True)
        self.proc.start()
        child.close()
        self.metrics, self.max_running = metrics, config.engine.max_running
        self.send_lock = threading.Lock()
        self.sinks: dict = {}                                # request id -> (event loop, asyncio.Queue)
        self.in_flight = 0                                   # submitted and not finished
        self.backlog: dict = {}                              # request id -> prompt tokens, until its first token
        self.prefill_steps: deque = deque(maxlen=16)         # (prompt tokens, seconds) of recent steps with prompts
        self.lock = threading.Lock()
        self.stats = (0, 0, 0)                               # engine's waiting, running, blocks in use
        self.finish_times: deque = deque(maxlen=32)
        self.last_token: dict = {}                           # request id -> time of its latest token
        try:
            kind, info = self.conn.recv()
        except EOFError:
            kind, info = "failed", f"the engine process died during start-up (exit code {self.proc.join(5) or self.proc.exitcode})"
        if kind != "ready":
            raise RuntimeError(info)
        self.info: EngineInfo = info
        self.reader = threading.Thread(target=self._read, name="pacekern-engine-reader", daemon=True)
        self.reader.start()

    # ---- from the event loop -------------------------------------------------------------------------
    def _put(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def submit(self, request: Request, sink: asyncio.Queue) -> None:
        self.sinks[request.request_id] = (asyncio.get_running_loop(), sink)
        with self.lock:
            self.in_flight += 1
            self.backlog[request.request_id] = len(request.prompt)
        self._put(("add", request))

    def abort(self, request_id: str) -> None:
        self._put(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(OSError):
            self._put(("stop", None))
        self.reader.join(timeout)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()

    def queued(self) -> int:
        """Submitted requests beyond the running slots: they wait for a slot."""
        return max(0, self.in_flight - self.max_running)

    def completion_rate(self) -> float | None:
        """Requests finished per second over the last few (None until there are enough)."""
        t = list(self.finish_times)
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) >= 4 and t[-1] > t[0] else None

    def prefill_rate(self) -> float | None:
        """Prompt tokens per second of engine time over recent steps that ran prompts (a step's
        whole time counts, decode rows included: an underestimate, so predictions err long)."""
        steps = list(self.prefill_steps)
        secs = sum(s for _, s in steps)
        return sum(t for t, _ in steps) / secs if len(steps) >= 2 and secs > 0 else None

    def predicted_ttft(self, prompt_tokens: list) -> float:
        """Seconds until the first token of requests with these prompts, if submitted now: waiting
        for a slot (requests ahead beyond the slots / completion rate) plus every prompt not yet
        started, theirs included, at the measured prefill rate. 0 until there are measurements."""
        with self.lock:
            ahead, backlog = max(0, self.in_flight + len(prompt_tokens) - self.max_running), sum(self.backlog.values())
        done, fill = self.completion_rate(), self.prefill_rate()
        slot = ahead / done if ahead and done else 0.0
        return slot + ((backlog + sum(prompt_tokens)) / fill if fill else 0.0)

    # ---- the reader thread ---------------------------------------------------------------------------
    def _send(self, rid: str, item, last: bool) -> None:
        sink = self.sinks.pop(rid, None) if last else self.sinks.get(rid)
        if sink is None:
            return
        loop, q = sink
        with contextlib.suppress(RuntimeError):              # the event loop has closed: nobody is listening
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):                      # the engine stopped (or died): fail what is left
                for rid in list(self.sinks):
                    self._send(rid, RuntimeError("the engine process exited"), last=True)
                return
            if msg[0] == "error":
                _, rid, why, bad_input = msg
                self._finish(rid)
                self._send(rid, (ValueError if bad_input else RuntimeError)(why), last=True)
                continue
            _, outs, self.stats, step = msg
            if step[0]:
                self.prefill_steps.append(step)
            now = time.perf_counter()
            for o in outs:
                if o.new_token_ids:
                    with self.lock:
                        self.backlog.pop(o.request_id, None)
                    prev = self.last_token.get(o.request_id)
                    if prev is not None:
                        self.metrics.itl.observe(now - prev)
                    self.last_token[o.request_id] = now
                    self.metrics.generation_tokens.inc(len(o.new_token_ids))
                if o.finish_reason is not None:
                    self._finish(o.request_id)
                    self.finish_times.append(now)
                    self.metrics.finished(o)
                self._send(o.request_id, o, last=o.finish_reason is not None)

    def _finish(self, rid: str) -> None:
        self.last_token.pop(rid, None)
        with self.lock:
            self.in_flight -= 1
            self.backlog.pop(rid, None)


# ---- metrics ------------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics named after vLLM's (docs/design/metrics.md) under `pacekern:`. Latency
    histograms come from the engine's own timestamps (arrival = when the HTTP request was read)."""

    def __init__(self):
        import prometheus_client as pc
        self.registry = r = pc.CollectorRegistry()
        lat = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
        self.ttft = pc.Histogram("pacekern:time_to_first_token_seconds", "Arrival to first token", buckets=lat, registry=r)
        self.itl = pc.Histogram("pacekern:inter_token_latency_seconds", "Gap between a request's tokens",
                                buckets=lat, registry=r)
        self.e2e = pc.Histogram("pacekern:e2e_request_latency_seconds", "Arrival to finish", buckets=lat, registry=r)
        self.queue = pc.Histogram("pacekern:request_queue_time_seconds", "Arrival to first scheduled", buckets=lat,
                                  registry=r)
        self.prompt_tokens = pc.Counter("pacekern:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = pc.Counter("pacekern:generation_tokens", "Tokens generated", registry=r)
        self.success = pc.Counter("pacekern:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.rejected = pc.Counter("pacekern:request_rejected", "Requests refused with 429", ["reason"], registry=r)
        self.prefix_queries = pc.Counter("pacekern:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                         registry=r)
        self.prefix_hits = pc.Counter("pacekern:prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                      registry=r)
        self.running = pc.Gauge("pacekern:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = pc.Gauge("pacekern:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = pc.Gauge("pacekern:kv_cache_usage_perc", "Fraction of KV blocks held by requests", registry=r)
        self._pc = pc

    def attach(self, engine: EngineProcess) -> None:
        self.waiting.set_function(lambda: engine.stats[0])
        self.running.set_function(lambda: engine.stats[1])
        self.kv_usage.set_function(lambda: engine.stats[2] / engine.info.num_blocks)

    def finished(self, o: RequestOutput) -> None:
        m = o.metrics
        self.success.labels(o.finish_reason).inc()
        self.prompt_tokens.inc(m.prompt_tokens)
        self.prefix_queries.inc(m.prompt_tokens)
        self.prefix_hits.inc(m.cached_prompt_tokens)
        self.queue.observe(m.queue_s)
        if m.new_tokens:
            self.ttft.observe(m.ttft_s)
            self.e2e.observe(m.ttft_s + (m.tpot_s * (m.new_tokens - 1) if m.new_tokens > 1 else 0.0))

    def exposition(self) -> bytes:
        return self._pc.generate_latest(self.registry)


# ---- one choice's text: stop sequences cut as OpenAI does ---------------------------------------------

class Choice:
    """The text of one choice as it streams. The engine keeps a stop string in its text (as HF's
    stop_strings); OpenAI's `stop` leaves it out, so text that could still become a stop string is
    held back until the next token settles it."""

    def __init__(self, index: int, stops: tuple):
        self.index, self.stops = index, stops
        self.text, self.sent = "", 0
        self.tokens: list = []
        self.logprobs: list = []
        self.finish: str | None = None

    def feed(self, o: RequestOutput) -> str:
        """Take an output; return the text that may be sent now."""
        self.text += o.text_delta
        self.tokens += o.new_token_ids
        self.logprobs += o.logprobs
        if o.finish_reason is not None:
            self.finish = {"eos": "stop", "stop": "stop", "length": "length"}.get(o.finish_reason, o.finish_reason)
            if o.finish_reason == "stop":
                cut = min((j for j in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if j >= 0),
                          default=len(self.text))
                self.text = self.text[:cut]
            safe = len(self.text)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            safe = len(self.text) - hold
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out


# ---- the app ------------------------------------------------------------------------------------------

class Server:
    """State shared by the routes: the engine process (once ready), the tokenizer, metrics, config."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.engine: EngineProcess | None = None
        self.tokenizer = None
        self.name = config.served_name
        self.load_error: str | None = None
        self.created = int(time.time())

    def load(self) -> None:
        """Start the engine process and wait until it has loaded and warmed up (this runs in a
        thread: /health answers 503 meanwhile)."""
        from .models import DEFAULT_MODEL
        from .tokenizer import Tokenizer
        c = self.config
        try:
            engine = EngineProcess(c, self.metrics)
            self.tokenizer = Tokenizer(Path(engine.info.path))
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            raise
        if self.name is None:                                # a catalogue name as given; a path by its directory's name
            path = Path(str(c.model or DEFAULT_MODEL))
            self.name = path.name if path.exists() else str(c.model or DEFAULT_MODEL)
        self.metrics.attach(engine)
        self.engine = engine
        i = engine.info
        print(f"[pacekern serve] {self.name} ready: engine started in {i.startup_s:.1f} s, {i.num_blocks} KV blocks of "
              f"{i.block_size} tokens", flush=True)

    def encode(self, prompt) -> list:
        from .generate import encode_prompt
        return encode_prompt(self.tokenizer, self.engine.info.vocab, prompt, self.name)

    # ---- checks every /v1 request passes ---------------------------------------------------------
    def authorize(self, req: HTTPRequest) -> None:
        key = self.config.api_key
        if key and req.headers.get("authorization", "") != f"Bearer {key}":
            raise APIError(401, "invalid or missing API key: send `Authorization: Bearer KEY`",
                           type="authentication_error", code="invalid_api_key")

    def ready(self) -> None:
        if self.engine is None:
            raise APIError(503, "the model is still loading" if not self.load_error else f"the model failed to load: "
                           f"{self.load_error}", type="service_unavailable")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"model {name!r} is not served here (this server serves {self.name!r})",
                           type="not_found_error", param="model", code="model_not_found")

    def admit(self, prompt_tokens: list) -> None:
        """Refuse now (429 + Retry-After) rather than queue requests (one per prompt and choice, of
        these lengths) that would wait too long: past --max-queued requests waiting for a slot, or
        a predicted time to first token beyond --max-predicted-ttft-s while others run or wait."""
        c, eng = self.config, self.engine
        q, n = eng.queued(), len(prompt_tokens)
        ttft = eng.predicted_ttft(prompt_tokens)
        # an idle engine admits whatever the prediction: its own prefill is the least it can take
        late = ttft > c.max_predicted_ttft_s and eng.in_flight > 0
        reason = "queue_full" if q + n > c.max_queued else "predicted_ttft" if late else None
        if reason is None:
            return
        self.metrics.rejected.labels(reason).inc()
        retry = max(1, math.ceil(ttft - c.max_predicted_ttft_s))
        why = (f"{q} requests are already queued (--max-queued {c.max_queued})" if reason == "queue_full" else
               f"the predicted time to first token is {ttft:.1f} s (--max-predicted-ttft-s {c.max_predicted_ttft_s:g})")
        raise APIError(429, f"server overloaded: {why}; retry in {retry} s", type="rate_limit_error",
                       code="server_overloaded", headers={"Retry-After": str(retry)})

    # ---- a generation request ----------------------------------------------------------------------
    async def generate(self, req: HTTPRequest, body: Body, chat: bool) -> Response:
        self.authorize(req)
        self.ready()
        self.check_model(body.model)
        arrival = time.perf_counter()
        sampling = sampling_of(body, chat)
        cap = self.config.max_tokens_cap
        if cap is not None and sampling.max_new_tokens is not None and sampling.max_new_tokens > cap:
            raise APIError(400, f"max_tokens={sampling.max_new_tokens}: this server allows at most {cap} "
                           "(--max-tokens-cap)", param="max_tokens")
        try:
            sampling = sampling.resolved(Path(self.engine.info.path))
            if cap is not None and sampling.max_new_tokens > cap:             # the model's default, capped
                sampling = replace(sampling, max_new_tokens=cap, min_new_tokens=min(sampling.min_new_tokens, cap))
        except ValueError as e:                               # name the field as the client sent it
            field = str(e).split("=")[0].removeprefix("SamplingConfig.")
            field = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop_strings": "stop"}.get(field, field)
            raise APIError(400, f"{field}: {e}", param=field)
        if chat:
            prompts = [[{"role": m.role, "content": m.content if isinstance(m.content, str)
                         else "".join(p.text for p in m.content)} for m in body.messages]]
        else:
            p = body.prompt
            prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
            if not prompts:
                raise APIError(400, "prompt: the prompt is empty", param="prompt")
        n = body.n
        ids = await self._tokenize(prompts, sampling, chat)
        self.admit([len(t) for t in ids for _ in range(n)])  # admit and submit with no await between: no race
        top = (body.top_logprobs or 0) if chat and body.logprobs else (body.logprobs if not chat else None)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        sink: asyncio.Queue = asyncio.Queue()
        choices = {}
        for i, t in enumerate(ids):
            for j in range(n):
                k = i * n + j
                seed = sampling.seed if sampling.seed is None else (sampling.seed + j) % 2 ** 63
                r = Request(t, replace(sampling, seed=seed), request_id=f"{rid}-{k}", arrival_s=arrival, logprobs=top)
                choices[r.request_id] = Choice(k, sampling.stop_strings)
                self.engine.submit(r, sink)
        usage_prompt = sum(len(t) for t in ids)
        meta = dict(id=rid, created=int(time.time()), model=self.name)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if body.stream:
            return StreamingResponse(self._stream(req, sink, choices, meta, chat, usage_prompt, include_usage),
                                     media_type="text/event-stream", headers={"X-Request-ID": rid})
        await self._collect(req, sink, choices)
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion",
                             "choices": [self._final_choice(c, chat) for c in sorted(choices.values(), key=lambda c: c.index)],
                             "usage": self._usage(usage_prompt, choices)}, headers={"X-Request-ID": rid})

    async def _tokenize(self, prompts, sampling, chat) -> list:
        """Token ids of each prompt (in a worker thread, off the event loop and the engine), checked
        against the context length."""
        what = "messages" if chat else "prompt"
        try:
            ids = await asyncio.to_thread(lambda: [self.encode(p) for p in prompts])
        except (ValueError, TypeError) as e:
            raise APIError(400, f"{what}: {e}", param=what)
        limit = self.engine.info.max_tokens_per_seq
        for t in ids:
            if len(t) + sampling.max_new_tokens > limit:
                raise APIError(400, f"{what} of {len(t)} tokens + max_tokens={sampling.max_new_tokens} exceeds the "
                               f"model's context of {limit} tokens", param="max_tokens", code="context_length_exceeded")
        return ids

    async def _next(self, req: HTTPRequest, sink: asyncio.Queue, deadline: float, unfinished,
                    poll_disconnect: bool) -> RequestOutput:
        """The next output; aborts the unfinished choices if the client left or time ran out. (A
        streaming response needs no polling: starlette cancels it when the client disconnects.)"""
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                self._abort(unfinished)
                raise APIError(504, f"the request ran past the server's limit of {self.config.request_timeout_s:g} s "
                               "(--request-timeout-s)", type="timeout")
            try:
                item = await asyncio.wait_for(sink.get(), min(left, 0.5))
            except asyncio.TimeoutError:
                if poll_disconnect and await req.is_disconnected():
                    self._abort(unfinished)
                    raise asyncio.CancelledError
                continue
            if isinstance(item, Exception):
                self._abort(unfinished)
                raise APIError(500 if not isinstance(item, ValueError) else 400, f"{type(item).__name__}: {item}",
                               type="server_error" if not isinstance(item, ValueError) else "invalid_request_error")
            return item

    def _abort(self, choices) -> None:
        for rid, c in choices.items():
            if c.finish is None:
                self.engine.abort(rid)

    async def _collect(self, req, sink, choices) -> None:
        deadline = time.perf_counter() + self.config.request_timeout_s
        try:
            while any(c.finish is None for c in choices.values()):
                o = await self._next(req, sink, deadline, choices, poll_disconnect=True)
                choices[o.request_id].feed(o)
        except asyncio.CancelledError:
            self._abort(choices)
            raise

    async def _stream(self, req, sink, choices, meta, chat, usage_prompt, include_usage):
        deadline = time.perf_counter() + self.config.request_timeout_s
        obj = "chat.completion.chunk" if chat else "text_completion"
        ev = lambda d: f"data: {json.dumps(d, ensure_ascii=False)}\n\n"          # noqa: E731
        try:
            if chat:
                for c in sorted(choices.values(), key=lambda c: c.index):
                    yield ev({**meta, "object": obj, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                                  "logprobs": None, "finish_reason": None}]})
            while any(c.finish is None for c in choices.values()):
                try:
                    o = await self._next(req, sink, deadline, choices, poll_disconnect=False)
                except APIError as e:
                    yield ev({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
                    break
                c = choices[o.request_id]
                n_lp = len(c.logprobs)
                text = c.feed(o)
                if not text and c.finish is None:
                    continue
                lp = self._logprobs(c.logprobs[n_lp:], c.tokens[len(c.tokens) - len(o.new_token_ids):], chat) \
                    if o.logprobs else None
                part = ({"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lp} if chat
                        else {"index": c.index, "text": text, "logprobs": lp})
                yield ev({**meta, "object": obj, "choices": [{**part, "finish_reason": c.finish}]})
            if include_usage:
                yield ev({**meta, "object": obj, "choices": [], "usage": self._usage(usage_prompt, choices)})
            yield "data: [DONE]\n\n"
        finally:                                             # the client went away (or we are done): free its blocks
            self._abort(choices)

    def _usage(self, prompt_tokens: int, choices) -> dict:
        done = sum(len(c.tokens) for c in choices.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    def _logprobs(self, lps, tokens, chat):
        tok = self.tokenizer
        text = lambda i: tok.decode([i])                                             # noqa: E731
        if chat:
            return {"content": [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode()),
                                 "top_logprobs": [{"token": text(a), "logprob": v, "bytes": list(text(a).encode())}
                                                  for a, v in alts]} for t, (lp, alts) in zip(tokens, lps)]}
        return {"tokens": [text(t) for t in tokens], "token_logprobs": [lp for lp, _ in lps],
                "top_logprobs": [{text(a): v for a, v in alts} for _, alts in lps], "text_offset": None}

    def _final_choice(self, c: Choice, chat: bool) -> dict:
        lp = self._logprobs(c.logprobs, c.tokens, chat) if c.logprobs else None
        if lp and not chat:
            offs, pos = [], 0
            for t in lp["tokens"]:
                offs.append(pos)
                pos += len(t)
            lp["text_offset"] = offs
        if chat:
            return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                    "finish_reason": c.finish}
        return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish}


def create_app(config: ServerConfig, load: bool = True) -> FastAPI:
    """The FastAPI app; with load=True the model loads in a thread when the app starts."""
    srv = Server(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if load:
            t = threading.Thread(target=_load_or_exit, args=(srv,), name="pacekern-load", daemon=True)
            t.start()
        yield
        if srv.engine is not None:                       # after uvicorn's graceful period: abort what is left
            left = srv.engine.in_flight
            srv.engine.stop()
            print(f"[pacekern serve] stopped ({left} unfinished requests aborted)", flush=True)

    app = FastAPI(title="pacekern", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions on pacekern kernels")
    app.state.server = srv

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):        # unknown path, wrong method, ...: OpenAI's JSON too
        return APIError(e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else "server_error",
                        headers=getattr(e, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        return APIError(400, f"{'.'.join(loc) or 'body'}: {err.get('msg')}", param=".".join(loc) or None).response()

    async def completions(req: HTTPRequest, body: CompletionBody):
        return await srv.generate(req, body, chat=False)

    async def chat_completions(req: HTTPRequest, body: ChatBody):
        return await srv.generate(req, body, chat=True)

    async def models(req: HTTPRequest):
        srv.authorize(req)
        srv.ready()
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": srv.created,
                                            "owned_by": "pacekern", "max_model_len": srv.engine.info.max_tokens_per_seq}]}

    async def health():
        if srv.engine is None:
            return JSONResponse({"status": "loading" if not srv.load_error else f"failed: {srv.load_error}"}, 503)
        return {"status": "ok"}

    async def metrics():
        return Response(srv.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def chat_page():
        return HTMLResponse((resources.files("llm") / "static" / "chat.html").read_text())

    routes = [("POST", "/v1/completions", completions),
              ("POST", "/v1/chat/completions", chat_completions),
              ("GET", "/v1/models", models),
              ("GET", "/health", health),
              ("GET", "/metrics", metrics),
              ("GET", "/", chat_page)]
    for method, path, fn in routes:
        app.add_api_route(path, fn, methods=[method], include_in_schema=path.startswith("/v1") or path == "/health")
    return app


def _load_or_exit(srv: Server) -> None:
    import os
    import signal
    import traceback
    try:
        srv.load()
    except Exception:
        traceback.print_exc()
        print(f"[pacekern serve] the model failed to load: {srv.load_error}; shutting down", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, grace_s: float = 10.0) -> None:
    """Run the server until SIGINT/SIGTERM: it stops accepting, lets in-flight requests finish for
    up to grace_s, then aborts the rest and exits."""
    import uvicorn
    uv = uvicorn.Config(create_app(config), host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace_s)
    print(f"[pacekern serve] listening on http://{host}:{port} (loading the model; /health says when it is ready)",
          flush=True)
    uvicorn.Server(uv).run()
