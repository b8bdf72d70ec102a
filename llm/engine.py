"""Engine: requests join and leave while it runs; each `step()` is one forward over everything the
scheduler picked (continuous batching), over a paged KV cache with prefix caching.

    from pacekern.llm import LLMModel, Engine, EngineConfig, Request, SamplingConfig
    engine = Engine(LLMModel("smollm2-135m-instruct"), EngineConfig(max_running=16))
    rid = engine.add_request(Request("The capital of France is", SamplingConfig(max_new_tokens=16)))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, repr(out.text_delta), out.finish_reason)

The pieces, each a small contract (frozen dataclasses between them, as vLLM v1's SchedulerOutput):
  BlockPool   KV blocks of BS tokens for every layer ([NB, KVH, BS, D] fp32 per layer), a free list
              in LRU order, reference counts, and the prefix cache: a full block is keyed by
              (its parent's key, its tokens), so a new request reuses the longest cached prefix of
              its prompt; unused cached blocks stay reusable until the pool needs them.
  Scheduler   FCFS under a token budget per step: the running requests' next tokens first (one to
              decode, or the next chunk of a prompt: chunked prefill), then chunks of waiting
              prompts, up to max_running requests. When blocks run out, the newest running request
              is preempted (its blocks freed; it recomputes later from its tokens so far).
  FlatRunner  (llm/model.py) runs the step as one flat list of tokens, padded to a fixed set of
              row counts prepared at start-up, so no step compiles, tunes or plans anything.
  Engine      samples the sampled rows with each request's own RowState (llm/generate.py: the same
              picking, stop strings, EOS and text as LLMModel.generate), emits text deltas and
              per-request metrics, frees finished and aborted requests' blocks at once.

Exactness: attention and RoPE give a row the same bits whatever else is in the step (the paged
kernel keeps attention.py's key-order numerics). The projections do not promise that: a step's row
count picks GEMV (<= 16 rows) or GEMM and, per row-count bucket, a tuned config whose K blocking
may differ, so a request's logits can differ in the last bits between batch compositions, and a
greedy tie can in principle flip (test_engine measures this against each request run alone).
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from .generate import RowState
from .model import FlatBatch, FlatRunner
from .sampling import SamplingConfig


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 16             # requests decoding or prefilling at once
    max_tokens_per_step: int = 256    # token budget of one step (decode rows + prompt chunks)
    kv_budget_mb: int = 1024          # the paged KV cache, all layers
    block_size: int = 16              # tokens per KV block (and the prefix cache's granularity)
    prefix_caching: bool = True
    max_waiting: int = 1024           # add_request refuses more queued requests than this

    def __post_init__(self):
        for name, lo in (("max_running", 1), ("max_tokens_per_step", 1), ("kv_budget_mb", 1), ("block_size", 1),
                         ("max_waiting", 0)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < lo:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r}: must be an integer >= {lo}")


@dataclass(frozen=True)
class Request:
    prompt: object                    # a string, chat messages or token ids (as LLMModel.generate)
    sampling: SamplingConfig = SamplingConfig()
    request_id: str | None = None     # None: the engine numbers it
    arrival_s: float | None = None    # time.perf_counter() at arrival; None: when added
    logprobs: int | None = None       # return each output token's log-probability and this many top alternatives


@dataclass(frozen=True)
class RequestMetrics:
    queue_s: float                    # arrival -> first scheduled
    ttft_s: float                     # arrival -> first token
    tpot_s: float                     # mean time per output token after the first
    max_itl_s: float                  # longest gap between two tokens
    prompt_tokens: int
    cached_prompt_tokens: int         # served from the prefix cache (at first admission)
    new_tokens: int
    preemptions: int


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple              # tokens produced in this step
    text_delta: str                   # text produced in this step (never half a character)
    finish_reason: str | None         # "eos" | "length" | "stop" | "abort" once finished
    token_ids: tuple = ()             # all tokens so far, once finished
    text: str | None = None           # the whole text, once finished
    metrics: RequestMetrics | None = None   # once finished
    logprobs: tuple = ()              # per new token, if asked: (its logprob, ((token, logprob), ...) top first)


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    tokens: tuple                     # the request's next tokens to run
    start: int                        # their first position (tokens already cached)
    blocks: tuple                     # the request's KV blocks, covering start + len(tokens)
    sample: bool                      # this chunk reaches the request's last token: sample after it


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple                     # ScheduledChunk, running requests first
    preempted: tuple                  # request ids preempted in this step

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


# ---- KV blocks and the prefix cache ------------------------------------------------------------------

class BlockPool:
    def __init__(self, spec, config: EngineConfig):
        self.block_size = bs = config.block_size
        per_block = 2 * spec.n_layers * spec.n_kv_heads * bs * spec.head_dim * 4
        self.num_blocks = (config.kv_budget_mb << 20) // per_block
        if self.num_blocks < 2:
            raise ValueError(f"kv_budget_mb={config.kv_budget_mb} holds {self.num_blocks} KV blocks of {bs} tokens "
                             f"({per_block >> 10} KB each): give it more")
        self.bytes_per_token = per_block // bs
        self.kv = torch.zeros(2, spec.n_layers, self.num_blocks, spec.n_kv_heads, bs, spec.head_dim)
        self.k, self.v = list(self.kv[0]), list(self.kv[1])
        self.caching = config.prefix_caching
        self.ref = [0] * self.num_blocks
        self.key = [None] * self.num_blocks                 # prefix-cache key of a full block
        self.cached: dict = {}                             # key -> block
        self.free: OrderedDict = OrderedDict((b, None) for b in range(self.num_blocks))   # LRU first

    def num_free(self) -> int:
        return len(self.free)

    def in_use(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        b, _ = self.free.popitem(last=False)
        if self.key[b] is not None:                         # evict its cached contents
            if self.cached.get(self.key[b]) == b:
                del self.cached[self.key[b]]
            self.key[b] = None
        self.ref[b] = 1
        return b

    def release(self, blocks) -> None:
        for b in reversed(blocks):                          # a prefix's tail is evicted before its head
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None

    @staticmethod
    def block_key(parent, tokens) -> tuple:
        return (hash(parent), tuple(tokens))

    def lookup(self, tokens) -> list:
        """The cached blocks holding the longest prefix of whole blocks of `tokens` (taken: their
        reference counts go up)."""
        if not self.caching:
            return []
        out, parent, bs = [], None, self.block_size
        for i in range(len(tokens) // bs):
            key = self.block_key(parent, tokens[i * bs:(i + 1) * bs])
            b = self.cached.get(key)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
            out.append(b)
            parent = key
        return out

    def register(self, blocks, tokens, first: int, last: int) -> None:
        """Blocks first .. last - 1 of a sequence (with these tokens) are now full: cache them."""
        if not self.caching:
            return
        bs, parent = self.block_size, None
        for i in range(last):
            key = self.block_key(parent, tokens[i * bs:(i + 1) * bs])
            if i >= first and self.key[blocks[i]] is None:
                self.key[blocks[i]] = key
                self.cached.setdefault(key, blocks[i])
            parent = key


# ---- the scheduler ------------------------------------------------------------------------------------

class Sequence:
    """A request inside the engine: its tokens (prompt + output), how many are in the KV cache, its
    blocks, its RowState (sampling, stop, text) and timings."""

    def __init__(self, rid: str, prompt: list, state: RowState, arrival: float):
        self.id, self.prompt, self.state, self.arrival = rid, prompt, state, arrival
        self.computed = 0
        self.blocks: list = []
        self.registered = 0                                 # full blocks already in the prefix cache
        self.cached_prompt = None                           # prefix-cache hit at first admission
        self.scheduled_at = None
        self.token_times: list = []
        self.preemptions = 0
        self.logprobs = None                                # top alternatives to report per token, if any

    @property
    def tokens(self) -> list:
        return self.prompt + self.state.out


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool):
        self.config, self.pool = config, pool
        self.waiting: deque = deque()
        self.running: list = []

    def _ensure_blocks(self, seq: Sequence, tokens: int) -> bool:
        need = -(-tokens // self.pool.block_size) - len(seq.blocks)
        if need > self.pool.num_free():
            return False
        seq.blocks += [self.pool.allocate() for _ in range(need)]
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.computed, seq.registered = [], 0, 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_tokens_per_step
        picked, preempted = {}, []                          # seq -> tokens to run
        for seq in list(self.running):                      # running requests first, oldest first
            if budget == 0:
                break
            if seq not in self.running:                     # preempted below for an older one
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            while not self._ensure_blocks(seq, seq.computed + n):
                victim = self.running[-1]                   # the newest running request gives way
                self.preempt(victim)
                preempted.append(victim.id)
                budget += picked.pop(victim, 0)
                if victim is seq:
                    break
            if seq in self.running:
                picked[seq] = n
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running and not preempted:
            seq = self.waiting[0]
            if not seq.blocks:                              # the prefix cache; the last token always runs
                seq.blocks = self.pool.lookup(seq.tokens[:len(seq.tokens) - 1])
                seq.computed = seq.registered = len(seq.blocks) * self.pool.block_size
                if seq.cached_prompt is None:
                    seq.cached_prompt = seq.computed
            n = min(len(seq.tokens) - seq.computed, budget)
            if not self._ensure_blocks(seq, seq.computed + n):
                self.pool.release(seq.blocks)               # wait for blocks, holding none
                seq.blocks, seq.computed, seq.registered = [], 0, 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            picked[seq] = n
            budget -= n
        chunks = tuple(ScheduledChunk(seq.id, tuple(seq.tokens[seq.computed:seq.computed + n]), seq.computed,
                                      tuple(seq.blocks), seq.computed + n == len(seq.tokens))
                       for seq, n in picked.items())
        return SchedulerOutput(chunks, tuple(preempted))


# ---- the engine ---------------------------------------------------------------------------------------

class Engine:
    def __init__(self, llm, config: EngineConfig = EngineConfig()):
        """Serve `llm` (an LLMModel, or a model name for one). Builds and warms up every plan the
        steps will run; `startup_s` says how long that took."""
        from .generate import LLMModel
        t0 = time.perf_counter()
        self.llm = llm if isinstance(llm, LLMModel) else LLMModel(llm)
        self.llm._check_full_head()
        if self.llm.drafter is not None:
            raise ValueError("speculative decoding inside the engine is not implemented yet: load the model "
                             "without pard_config (LLMModel.generate still drafts)")
        self.config = config
        spec = self.llm.spec
        self.max_tokens_per_seq = self.llm.cache.max_tokens
        self.pool = BlockPool(spec, config)
        self.scheduler = Scheduler(config, self.pool)
        self.runner = FlatRunner(self.llm.weights, self.pool, config.max_tokens_per_step, config.max_running,
                                 self.max_tokens_per_seq, self.llm.model.opconfig)
        self.runner.warm_up()
        self.seqs: dict = {}
        self._ids = itertools.count()
        self.steps = 0
        self.last_step = (0, 0.0)                           # (prompt tokens, seconds) of the latest step
        self.startup_s = time.perf_counter() - t0

    # ---- requests ----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> str:
        """Queue a request (validated now: a bad one raises here and touches nothing); returns its id."""
        if not isinstance(request, Request):
            raise TypeError(f"add_request takes a Request, not {type(request).__name__}")
        if request.logprobs is not None and not (isinstance(request.logprobs, int) and 0 <= request.logprobs <= 20):
            raise ValueError(f"Request.logprobs={request.logprobs!r}: must be an integer in [0, 20] or None")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise OverloadedError(f"{len(self.scheduler.waiting)} requests are already waiting "
                                  f"(EngineConfig.max_waiting={self.config.max_waiting})")
        rid = request.request_id if request.request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request id {rid!r} is already in use")
        cfg = request.sampling.resolved(self.llm.path)
        prompt = self.llm.encode(request.prompt)
        if len(prompt) + cfg.max_new_tokens > self.max_tokens_per_seq:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the "
                             f"context of {self.max_tokens_per_seq} tokens")
        if -(-(len(prompt) + cfg.max_new_tokens) // self.pool.block_size) > self.pool.num_blocks:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={cfg.max_new_tokens} needs more KV "
                             f"blocks than the whole cache has ({self.pool.num_blocks}; EngineConfig.kv_budget_mb)")
        seq = Sequence(rid, prompt, RowState(self.llm, cfg, prompt, 0),
                       request.arrival_s if request.arrival_s is not None else time.perf_counter())
        seq.logprobs = request.logprobs
        self.seqs[rid] = seq
        self.scheduler.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a request now and free its blocks."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            raise KeyError(f"no unfinished request {request_id!r}")
        if seq in self.scheduler.running:
            self.scheduler.running.remove(seq)
        else:
            self.scheduler.waiting.remove(seq)
        self.scheduler.free(seq)
        seq.state.finish = "abort"
        return self._finished(seq, ())

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def num_blocks_in_use(self) -> int:
        """KV blocks held by requests (cached-but-unused blocks count as free)."""
        return sum(1 for r in self.pool.ref if r > 0)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list:
        """Run one forward over the scheduled chunks; returns a RequestOutput per request that
        produced tokens or finished in this step."""
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        now = time.perf_counter()
        for c in sched.chunks:
            s = self.seqs[c.request_id]
            if s.scheduled_at is None:
                s.scheduled_at = now
        logits, greedy = self.runner.run(FlatBatch(tuple(c.tokens for c in sched.chunks), tuple(c.start for c in sched.chunks),
                                                   tuple(c.blocks for c in sched.chunks), tuple(c.sample for c in sched.chunks)))
        self.steps += 1
        self.last_step = (sum(len(c.tokens) for c in sched.chunks if c.start < len(self.seqs[c.request_id].prompt)),
                          time.perf_counter() - now)
        outs, row = [], 0
        for c in sched.chunks:
            seq = self.seqs[c.request_id]
            seq.computed += len(c.tokens)
            full = seq.computed // self.pool.block_size
            if full > seq.registered:
                self.pool.register(seq.blocks, seq.tokens, seq.registered, full)
                seq.registered = full
            if not c.sample:
                continue
            state = seq.state
            scores, tok = logits[row], state.pick(logits[row], greedy[row])
            row += 1
            state.accept(tok)
            seq.token_times.append(time.perf_counter())
            delta = state.text[state.emitted:]
            state.emitted = len(state.text)
            lp = () if seq.logprobs is None else (token_logprobs(scores, tok, seq.logprobs),)
            if state.finish is not None:
                outs.append(self._finished(seq, (tok,), delta, lp))
            else:
                outs.append(RequestOutput(seq.id, (tok,), delta, None, logprobs=lp))
        return outs

    def _finished(self, seq: Sequence, new: tuple, delta: str = "", logprobs: tuple = ()) -> RequestOutput:
        self.seqs.pop(seq.id, None)
        if seq in self.scheduler.running:
            self.scheduler.running.remove(seq)
        self.scheduler.free(seq)
        st, tt = seq.state, seq.token_times
        gaps = [b - a for a, b in zip(tt, tt[1:])]
        m = RequestMetrics(
            queue_s=(seq.scheduled_at or time.perf_counter()) - seq.arrival,
            ttft_s=tt[0] - seq.arrival if tt else float("nan"),
            tpot_s=(tt[-1] - tt[0]) / (len(tt) - 1) if len(tt) > 1 else float("nan"),
            max_itl_s=max(gaps, default=float("nan")), prompt_tokens=len(seq.prompt),
            cached_prompt_tokens=seq.cached_prompt or 0, new_tokens=len(st.out), preemptions=seq.preemptions)
        return RequestOutput(seq.id, new, delta, st.finish, tuple(st.out),
                             st.text if st.cfg.return_text else None, m, logprobs)

    def run(self, requests) -> list:
        """Add every request, step until all finish; the finished RequestOutputs in request order."""
        ids = [self.add_request(r if isinstance(r, Request) else Request(r)) for r in requests]
        done = {}
        while self.has_unfinished():
            for o in self.step():
                if o.finish_reason is not None:
                    done[o.request_id] = o
        return [done[i] for i in ids]


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple:
    """(logprob of `token`, its `top` likeliest alternatives) under the model's own distribution:
    log_softmax of the raw logits, before penalties or temperature (as vLLM and OpenAI report)."""
    lp = torch.log_softmax(logits.float(), -1)
    alts = torch.topk(lp, top) if top else None
    return (float(lp[token]), tuple(zip(alts.indices.tolist(), alts.values.tolist())) if top else ())


class OverloadedError(RuntimeError):
    """The engine refuses a request now (its queue is full); try again later."""
