"""The simulated engine: vLLM-style continuous batching on a virtual clock.

Requests wait FIFO, are admitted while there is a free sequence slot and KV-cache room, and then
advance in engine steps: each step prefills up to ``max_num_batched_tokens`` uncached prompt tokens
(chunked prefill) and decodes one token for every request past prefill. The step's duration comes
from the latency model in :class:`~extproc.sim.config.SimConfig`; the engine sleeps that long times
``time_scale``. All latencies it reports are in simulated seconds, so they do not depend on how busy
the host is, and ``time_scale=0`` runs the same schedule as fast as Python allows.

With ``--kv-events-config`` enabled, the cache records vLLM's KV-cache events as blocks are stored,
evicted or reset, and the engine publishes them as one batch at the end of each step that had any
(:mod:`extproc.sim.kv_events`), as vLLM's scheduler does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.sim.config import SimConfig
from extproc.sim.kv_events import ZmqEventPublisher
from extproc.sim.kvcache import Allocation, KVCache
from extproc.sim.metrics import SimMetrics
from extproc.sim.tokens import CHARS_PER_TOKEN, Prompt, block_hashes, count_tokens, token_ids


class QueueFull(Exception):
    """The waiting queue is at ``max_waiting``: the request is refused (HTTP 429)."""


@dataclass(eq=False)
class EngineRequest:
    prompt: Prompt
    prompt_tokens: int
    max_tokens: int
    finish_reason: str  # what the request ends with once max_tokens are out: "length" or "stop"
    stream: bool
    max_tokens_param: int = 0  # max_tokens as vLLM's sampling params hold it (the context left when unset)
    hashes: list[int] = field(default_factory=list)
    block_ids: Sequence[int] | None = None  # ids of the tokens ``hashes`` cover; kept only for KV events
    # Progress.
    arrival: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    computed: int = 0  # tokens whose KV is in the cache (cached + prefilled)
    generated: int = 0
    cached_tokens: int = 0
    allocation: Allocation | None = None
    prefill_started: bool = False
    last_token_time: float = 0.0
    # Delivery to the HTTP handler.
    done: asyncio.Future[None] | None = None
    tokens: asyncio.Queue[int | None] | None = None

    @property
    def prefill_target(self) -> int:
        """Tokens to hold in KV before the next token can be sampled (grows after a preemption)."""
        return self.prompt_tokens + max(0, self.generated - 1)


class Engine:
    def __init__(self, config: SimConfig, metrics: SimMetrics | None = None) -> None:
        self.config = config
        self.cache = KVCache(config.num_gpu_blocks, config.block_size)
        self.metrics = metrics
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._clock = 0.0
        self._wall0 = time.monotonic()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        # KV-cache events: only when enabled does the cache record any (it needs the running loop then).
        self.kv_events: ZmqEventPublisher | None = None
        if config.kv_events is not None and config.kv_events.publishes:
            self.kv_events = ZmqEventPublisher(config.kv_events)
            self.cache.events = []

    # ----- public surface -------------------------------------------------------------------

    def state(self) -> tuple[int, int, float]:
        return len(self.running), len(self.waiting), self.cache.usage

    def make_request(self, prompt: Prompt, max_tokens: int | None, stream: bool) -> EngineRequest:
        """``max_tokens`` None: the request stops (as at EOS) after ``default_max_tokens``."""
        n = count_tokens(prompt)
        return EngineRequest(
            prompt=prompt,
            prompt_tokens=n,
            max_tokens=max_tokens if max_tokens is not None else self.config.default_max_tokens,
            finish_reason="length" if max_tokens is not None else "stop",
            stream=stream,
            max_tokens_param=max_tokens if max_tokens is not None else self.config.max_model_len - n,
        )

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; raises QueueFull when the waiting queue is at its limit."""
        cfg = self.config
        if len(self.waiting) + len(self.running) >= cfg.max_waiting + cfg.max_num_seqs:
            raise QueueFull
        loop = asyncio.get_running_loop()
        if self.kv_events is None:
            request.hashes = block_hashes(request.prompt, cfg.block_size, cfg.vocab_size)
        else:
            # Tokenize once and hash those ids (the same hashes as from the text): events carry the ids.
            request.block_ids = self._block_token_ids(request.prompt)
            request.hashes = block_hashes(request.block_ids, cfg.block_size, cfg.vocab_size)
        request.done = loop.create_future()
        if request.stream:
            request.tokens = asyncio.Queue()
        request.arrival = self.now()
        self.waiting.append(request)
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        assert self._wake is not None
        self._wake.set()

    def abort(self, request: EngineRequest) -> None:
        """The client went away: free the request's place and blocks."""
        if request.finished is not None:
            return
        if request in self.running:
            self.running.remove(request)
            self._finish(request, "abort")
        elif request in self.waiting:
            self.waiting.remove(request)
            request.finished = self._clock

    def now(self) -> float:
        """Simulated time; while idle it follows the wall clock (scaled) so gaps between requests pass."""
        if not self.running and not self.waiting and self.config.time_scale > 0:
            self._clock = max(self._clock, (time.monotonic() - self._wall0) / self.config.time_scale)
        return self._clock

    def reset_prefix_cache(self) -> int:
        """Drop the unheld cached blocks; the event goes out now, as the step loop may be idle."""
        n = self.cache.reset()
        self._publish_events()
        return n

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.kv_events is not None:
            await self.kv_events.close()
            self.kv_events = None
            self.cache.events = None

    def _publish_events(self) -> None:
        """Send what the cache recorded since the last batch, if anything (no message for a quiet step)."""
        events = self.cache.events
        if events and self.kv_events is not None:
            self.cache.events = []
            self.kv_events.publish(events)

    def _block_token_ids(self, prompt: Prompt) -> Sequence[int]:
        """The ids of the prompt's full blocks' tokens: the ones /tokenize answers for its text."""
        size = self.config.block_size
        covered = count_tokens(prompt) // size * size
        if isinstance(prompt, str):
            return token_ids(prompt[: covered * CHARS_PER_TOKEN], self.config.vocab_size)
        return prompt[:covered]

    # ----- the step loop --------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        scale = self.config.time_scale
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                self.now()
                continue
            self._admit()
            if not self.running:
                # Only possible when the head request cannot fit even in an empty cache; it was
                # rejected at validation, so this is a safety net against a livelock.
                self._fail_head()
                continue
            duration, progress = self._plan_step()
            if scale > 0:
                await asyncio.sleep(duration * scale)
            else:
                await asyncio.sleep(0)
            self._clock += duration
            self.steps += 1
            self._apply_step(progress, duration)
            if self.cache.events:
                self._publish_events()

    def _admit(self) -> None:
        cfg = self.config
        while self.waiting and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            target = request.prefill_target
            # vLLM recomputes at least the last prompt token, so the last block is never a hit.
            lookup = (request.prompt_tokens - 1) // cfg.block_size
            allocation = self.cache.allocate(request.hashes, lookup, target + 1, request.block_ids)
            if allocation is None:
                break  # FIFO: the head waits for room, the rest wait behind it
            self.waiting.popleft()
            request.allocation = allocation
            request.prefill_started = False
            cached = allocation.cached_blocks * cfg.block_size
            if request.admitted is None:
                request.admitted = self._clock
                request.cached_tokens = cached
                if self.metrics is not None:
                    self.metrics.prefix_cache_queries.inc(request.prompt_tokens)
                    self.metrics.prefix_cache_hits.inc(cached)
            request.computed = cached
            self.running.append(request)

    def _plan_step(self) -> tuple[float, list[tuple[EngineRequest, int]]]:
        """Decide what each running request does this step and how long the step takes."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        progress: list[tuple[EngineRequest, int]] = []
        prefill_tokens = 0
        new_prefills = 0
        # Decodes first (one token each), then prefill chunks in admission order, as vLLM does.
        for request in self.running:
            if request.computed >= request.prefill_target and budget > 0:
                progress.append((request, 0))
                budget -= 1
        for request in self.running:
            remaining = request.prefill_target - request.computed
            if remaining > 0 and budget > 0:
                chunk = min(remaining, budget)
                budget -= chunk
                prefill_tokens += chunk
                if not request.prefill_started:
                    request.prefill_started = True
                    new_prefills += 1
                progress.append((request, chunk))
        seqs = len(progress)
        duration = (
            cfg.itl * (1.0 + cfg.load_factor * max(0, seqs - 1))
            + prefill_tokens * cfg.prefill_per_token
            + new_prefills * cfg.prefill_overhead
        )
        return duration, progress

    def _apply_step(self, progress: list[tuple[EngineRequest, int]], duration: float) -> None:
        now = self._clock
        metrics = self.metrics
        # vLLM's vllm:iteration_tokens_total: per step with output, the prompts that got their first token
        # (whole prompt, cached part included) plus one per sampled token.
        step_tokens = 0
        for request, chunk in progress:
            if request.finished is not None or request.allocation is None:
                continue  # aborted or preempted during the step
            if chunk:
                request.computed += chunk
                if request.computed < request.prefill_target:
                    continue
                if metrics is not None and request.generated == 0:
                    metrics.prompt_tokens.inc(request.prompt_tokens)
            # A token is sampled: the first after prefill, or the next decode token.
            if not self._ensure_room(request):
                continue
            request.computed = request.prompt_tokens + request.generated
            request.generated += 1
            step_tokens += 1
            if request.first_token is None:
                request.first_token = now
                step_tokens += request.prompt_tokens
                if metrics is not None:
                    metrics.ttft.observe(now - request.arrival)
                    metrics.queue_time.observe((request.admitted or now) - request.arrival)
            elif metrics is not None:
                metrics.itl.observe(now - request.last_token_time)
            request.last_token_time = now
            if request.tokens is not None:
                request.tokens.put_nowait(request.generated - 1)
            if request.generated >= request.max_tokens:
                self.running.remove(request)
                self._finish(request, request.finish_reason)
        if metrics is not None and step_tokens:
            metrics.iteration_tokens.observe(step_tokens)

    def _ensure_room(self, request: EngineRequest) -> bool:
        """Grow the request's blocks for one more token; preempt the newest request if full."""
        allocation = request.allocation
        assert allocation is not None
        needed = request.prompt_tokens + request.generated + 1
        while not self.cache.grow(allocation, needed):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: EngineRequest) -> None:
        """vLLM's recompute preemption: drop the request's blocks and requeue it at the front."""
        self.running.remove(request)
        if request.allocation is not None:
            self.cache.release(request.allocation)
            request.allocation = None
        request.computed = 0
        self.waiting.appendleft(request)
        if self.metrics is not None:
            self.metrics.preemptions.inc()

    def _finish(self, request: EngineRequest, reason: str) -> None:
        now = self._clock
        request.finished = now
        if request.allocation is not None:
            self.cache.release(request.allocation)
            request.allocation = None
        metrics = self.metrics
        if metrics is not None and reason != "abort":
            metrics.generation_tokens.inc(request.generated)
            metrics.request_success[reason].inc()
            metrics.e2e.observe(now - request.arrival)
            admitted = request.admitted if request.admitted is not None else now
            first = request.first_token if request.first_token is not None else now
            metrics.prefill_time.observe(first - admitted)
            metrics.decode_time.observe(now - first)
            metrics.inference_time.observe(now - admitted)
            metrics.request_prompt_tokens.observe(request.prompt_tokens)
            metrics.request_generation_tokens.observe(request.generated)
            metrics.params_n.observe(1)  # the API refuses n > 1
            metrics.params_max_tokens.observe(request.max_tokens_param)
        if request.tokens is not None:
            request.tokens.put_nowait(None)
        if request.done is not None and not request.done.done():
            request.done.set_result(None)

    def _fail_head(self) -> None:
        request = self.waiting.popleft()
        request.finished = self._clock
        if request.done is not None and not request.done.done():
            request.done.set_exception(RuntimeError("request does not fit in the KV cache"))
        if request.tokens is not None:
            request.tokens.put_nowait(None)
