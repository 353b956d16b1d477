"""`extproc demo`: the multi-model demo of the write-up, on a laptop: the gateway plus its three traffic scenarios.

It starts the local gateway of `extproc up` (two simulated Llama-3.2-1B replicas, two simulated
Llama-3.2-3B replicas, the picker and Envoy) with one more route, the A/B split ``/v1/ab-test/...``
(70% to pool ``1b``, 30% to pool ``3b``, sticky on ``x-user-id``), then sends, at ``--rate`` requests/s
in total (open loop):

1. **path routing** (15% of the time): the write-up's bodies to ``/v1/1b/chat/completions`` and
   ``/v1/3b/chat/completions``, alternately;
2. **A/B split** (25%): ``{"model": "auto", ...}`` to ``/v1/ab-test/chat/completions``; one request in
   four carries an ``x-user-id`` of a handful of users, to show that a user stays on one arm;
3. **load test** (60%): both pools at once: multi-turn conversations of three tenants, each tenant's
   conversations sharing a long system prompt (so prefix-cache hits show), a few single-turn requests,
   and a fifth of A/B requests.

Then it prints a summary (and writes ``--json`` and ``--report``). Without ``--duration`` the scenarios
take 60 s and the gateway stays up for your own ``curl`` commands until Ctrl-C; with ``--duration S`` the
scenarios take S seconds (startup, about 5 s, comes on top) and the command exits. Ctrl-C at any time
stops every process the demo started; interrupted scenarios still get a (partial) summary and exit 130.

Where each figure comes from:

* requests, latencies and the A/B counts: the load generator itself, per response: the HTTP status, the
  wall time from sending the request to reading the whole answer (client-side end to end), the body's
  ``model`` and the headers Envoy adds (``x-gateway-upstream-host``: the replica; ``x-gateway-pool``
  when the gateway sends it);
* which pool served an A/B request: ``x-gateway-pool`` if present, else the response's ``model``, else
  the replica's pool; a response whose model and replica disagree counts as a mismatch;
* the A/B share: only requests *without* ``x-user-id`` (independent draws), with a Wilson score 95%
  interval; sticky users are reported separately (how many always got the same pool);
* routing overhead: ``x-gateway-routing-us``, which Envoy fills per request with the time from the last
  byte of the request to the first byte sent upstream (``%COMMON_DURATION(DS_RX_END:US_TX_BEG:us)%``): the
  ext_proc round trip with the pick, the route re-evaluation and getting an upstream connection. Without
  that header: the client-side end to end minus Envoy's ``x-envoy-upstream-service-time`` (everything but
  the model server: Envoy, the ext_proc and the client's own HTTP stack; 1 ms resolution, so an upper
  bound). Both come with the picker's own decision time (``extproc_decision_duration_seconds``, from its
  ``/metrics``) and the p50/p95 of Envoy's downstream and upstream request-time histograms;
* prefix-cache hit rate: ``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`` from every
  simulator's ``/metrics``, the increase over the run summed per pool (tokens, as vLLM counts them).

JSON (``--json PATH``), stable keys; times in ms, shares in 0..1, ``null`` where nothing was measured:

* ``version`` (1), ``interrupted`` (bool), ``gateway`` (URL), ``rate_target`` (req/s), ``duration_s``
  (traffic time), ``seed``;
* ``phases``: list of ``{name, title, start_s, duration_s, requests, ok, failed}`` (``name``: ``path-routing``,
  ``ab-split``, ``load-test``);
* ``requests``: ``{sent, ok, failed, failed_by_status: {status: n}, errors: [first distinct messages],
  not_sent, cancelled}`` (status ``0`` = no HTTP answer; ``not_sent``: the generator's in-flight cap);
* ``by_route``: ``{route: {path, requests, ok, failed}}`` for routes ``1b``, ``3b``, ``ab-test``;
* ``by_model``: ``{model: {pool, requests, latency_ms: {count, mean, p50, p95, p99, max},
  expected_latency_ms: [lo, hi] or null, p50_in_expected: bool or null, prefix_cache: {hit_rate,
  hit_tokens, query_tokens}, cached_prompt_share}}``: ``requests`` counts successful answers by the model
  that served them (so A/B requests count under the drawn model); ``cached_prompt_share`` is the share of
  prompt tokens the responses' ``usage.prompt_tokens_details.cached_tokens`` reported as cached;
* ``by_replica``: ``{address: {name, pool, model, requests, picker_picks, engine_requests,
  prefix_cache_hit_rate}}``: ``requests`` from ``x-gateway-upstream-host``, ``picker_picks`` from the
  picker's ``extproc_endpoint_picks_total``, ``engine_requests`` from the replica's
  ``vllm:request_success_total``;
* ``ab_split``: ``{route, path, weights: {pool: weight}, target_share: {pool: share}, requests (all
  successful A/B answers), independent_requests, served: {pool: n}, observed_share: {pool: share},
  ci95: {pool: [lo, hi]}, target_in_ci95: {pool: bool}, pool_source: {source: n}, mismatches,
  sticky: {header, users, requests, consistent_users, users_by_pool: {pool: n}}}``;
* ``routing_overhead``: ``{target_ms (10), source ("x-gateway-routing-us" or
  "client-minus-upstream-service-time" or null), count, p50_ms, p95_ms, p99_ms, mean_ms, p95_below_target,
  picker_decision_ms: {count, mean, p50, p95}, envoy_ms: {downstream_p50, downstream_p95,
  upstream_p50: {pool: ms}, upstream_p95: {pool: ms}}}``;
* ``models_endpoint``: ``{status, models}`` of ``GET /v1/models`` through the gateway;
* ``expected``: the write-up's figures: ``{latency_ms: {pool: [lo, hi]}, routing_overhead_ms, ab_split}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import html
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from extproc import stats
from extproc.local import promtext, up
from extproc.local.prometheus import Prometheus, PrometheusMissing, find_prometheus, start_prometheus
from extproc.local.stack import PoolSpec, Stack
from extproc.names import POOL_RESPONSE_HEADER, ROUTING_US_HEADER, UPSTREAM_HOST_HEADER

AB_ROUTE = "ab-test"
AB_WEIGHTS = {"1b": 70, "3b": 30}
STICKY_HEADER = "x-user-id"
SPLIT_SETTINGS: dict[str, Any] = {
    "splits": [
        {
            "name": AB_ROUTE,
            "backends": [{"pool": pool, "weight": weight} for pool, weight in AB_WEIGHTS.items()],
            "sticky_header": STICKY_HEADER,
        }
    ]
}

# The write-up's "Expected Results".
EXPECTED_LATENCY_MS: dict[str, tuple[float, float]] = {"1b": (50.0, 100.0), "3b": (100.0, 200.0)}
ROUTING_TARGET_MS = 10.0

# Envoy's own header: how long the upstream took (ms), the fallback for the routing overhead.
UPSTREAM_SERVICE_TIME_HEADER = "x-envoy-upstream-service-time"

PHASE_SHARES = (("path-routing", 0.15), ("ab-split", 0.25), ("load-test", 0.60))
MAX_IN_FLIGHT = 64
REQUEST_TIMEOUT_S = 30.0
DRAIN_S = 10.0
DEFAULT_DURATION_S = 60.0
DESCRIPTION = (
    "The multi-model demo: the local gateway (simulated 1B and 3B pools, the picker, Envoy) with a 70/30 A/B split, "
    "the write-up's three traffic scenarios (path routing, A/B split, load test) and a summary of what was measured."
)


def _say(*parts: object) -> None:
    """Print a line now; if stdout is gone (``extproc demo | head``), carry on silently: stopping the
    children must never fail on a broken pipe."""
    try:
        print(*parts, flush=True)
    except OSError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


# ----- the workload ---------------------------------------------------------------------------


_TENANTS = (
    ("Acme Retail", "order tracking, returns and loyalty points", "a friendly, concise"),
    ("Globex Bank", "card disputes, transfers and account security", "a precise, formal"),
    ("Initech Cloud", "billing, quotas and incident status", "a patient, technical"),
)
_TOPICS = (
    "identity verification",
    "refund windows",
    "escalation to a human agent",
    "personal data",
    "service hours",
    "tone and language",
    "links and attachments",
    "outages and incidents",
    "pricing questions",
    "complaints",
    "accessibility",
    "legal requests",
)
_QUESTIONS = (
    "Where is my latest order and when will it arrive?",
    "I was charged twice this month, can you check what happened?",
    "How do I reset my password without access to my old phone?",
    "Can I change the delivery address of an order that has already shipped?",
    "What does the error message 'quota exceeded' mean for my account?",
    "Please summarise what we discussed so far in two sentences.",
    "Is there an ongoing incident affecting the European region?",
    "How many loyalty points do I need for free shipping?",
)


def system_prompt(tenant: int) -> str:
    """A tenant's long system prompt (~2 KB, ~500 tokens): every conversation of the tenant starts with it."""
    name, scope, voice = _TENANTS[tenant % len(_TENANTS)]
    lines = [
        f"You are the customer support assistant of {name}. You help customers with {scope}. "
        f"Answer in {voice} voice, in the customer's language, and never invent facts about an account.",
    ]
    for i, topic in enumerate(_TOPICS, 1):
        lines.append(
            f"Policy {i} ({topic}): follow the {name} handbook section {i}.{tenant + 1} on {topic}; if the "
            f"customer's request is not covered, say so and offer to open a ticket for the {topic} team."
        )
    return "\n".join(lines)


@dataclass
class Request:
    route: str  # a pool name or the A/B route
    kind: str  # hello, ab, ab-sticky, conversation
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    on_done: Callable[[dict[str, Any] | None], None] | None = None

    @property
    def path(self) -> str:
        return f"/v1/{self.route}/chat/completions"


@dataclass
class Conversation:
    id: int
    tenant: int
    messages: list[dict[str, str]]
    turns_left: int
    busy: bool = False


class Workload:
    """Makes the requests of the three scenarios; conversations remember their turns."""

    def __init__(self, models: dict[str, str], rng: random.Random, conversations_per_pool: int = 6) -> None:
        self.models = models  # pool -> served model name
        self.rng = rng
        self.ab_count = 0
        self.users = [f"user-{n}" for n in rng.sample(range(1000, 10000), 8)]
        self._next_tenant = 0
        self._conversations_started = 0
        self.conversations: dict[str, list[Conversation]] = {
            pool: [self._new_conversation() for _ in range(conversations_per_pool)] for pool in models
        }

    def _new_conversation(self) -> Conversation:
        tenant = self._next_tenant % len(_TENANTS)
        self._next_tenant += 1
        self._conversations_started += 1
        return Conversation(
            id=self._conversations_started,
            tenant=tenant,
            messages=[{"role": "system", "content": system_prompt(tenant)}],
            turns_left=self.rng.randint(3, 6),
        )

    def hello(self, pool: str) -> Request:
        """The write-up's curl body for a pool: ``{"model": ..., "messages": [... "Hello from 1B model!"}]}``."""
        content = f"Hello from {pool.upper()} model!"
        return Request(pool, "hello", {"model": self.models[pool], "messages": [{"role": "user", "content": content}]})

    def ab(self, sticky: bool = False) -> Request:
        """The write-up's A/B body: {"model": "auto", ... "Test A/B routing #i"}; optionally as one of the users."""
        self.ab_count += 1
        body = {"model": "auto", "messages": [{"role": "user", "content": f"Test A/B routing #{self.ab_count}"}]}
        if not sticky:
            return Request(AB_ROUTE, "ab", body)
        user = self.rng.choice(self.users)
        return Request(AB_ROUTE, "ab-sticky", body, {STICKY_HEADER: user}, user=user)

    def conversation_turn(self, pool: str) -> Request:
        idle = [c for c in self.conversations[pool] if not c.busy]
        if idle:
            conv = self.rng.choice(idle)
        else:  # every conversation is waiting for an answer: a one-off question of a tenant
            conv = self._new_conversation()
            conv.turns_left = 1
        question = self.rng.choice(_QUESTIONS)
        conv.messages.append({"role": "user", "content": f"{question} (customer {conv.id})"})
        conv.busy = True
        messages = list(conv.messages)

        def done(answer: dict[str, Any] | None) -> None:
            conv.busy = False
            if answer is None:
                conv.messages.pop()  # the turn failed: ask something else next time
                return
            content = ""
            with contextlib.suppress(KeyError, IndexError, TypeError):
                content = str(answer["choices"][0]["message"]["content"])
            conv.messages.append({"role": "assistant", "content": content})
            conv.turns_left -= 1
            if conv.turns_left <= 0 and conv in self.conversations[pool]:
                self.conversations[pool][self.conversations[pool].index(conv)] = self._new_conversation()

        return Request(pool, "conversation", {"model": self.models[pool], "messages": messages}, on_done=done)


@dataclass
class Phase:
    name: str
    title: str
    duration: float
    next_request: Callable[[], Request]


def make_phases(workload: Workload, duration: float, rng: random.Random) -> list[Phase]:
    pools = list(workload.models)
    counter = {"i": 0}

    def path_routing() -> Request:
        counter["i"] += 1
        return workload.hello(pools[counter["i"] % len(pools)])

    def ab_split() -> Request:
        counter["i"] += 1
        return workload.ab(sticky=counter["i"] % 4 == 0)

    load_mix: list[tuple[float, Callable[[], Request]]] = []
    for pool in pools:
        load_mix.append((0.35, functools.partial(workload.conversation_turn, pool)))
        load_mix.append((0.05, functools.partial(workload.hello, pool)))
    load_mix.append((0.20, workload.ab))
    weights = [w for w, _ in load_mix]

    def load_test() -> Request:
        return rng.choices([f for _, f in load_mix], weights)[0]()

    shares = dict(PHASE_SHARES)
    return [
        Phase(
            "path-routing",
            "path routing: the write-up's bodies to /v1/1b/chat/completions and /v1/3b/chat/completions",
            duration * shares["path-routing"],
            path_routing,
        ),
        Phase(
            "ab-split",
            f'A/B split: "model": "auto" to /v1/{AB_ROUTE}/chat/completions '
            f"({' / '.join(f'{p} {w}%' for p, w in AB_WEIGHTS.items())}; 1 in 4 with {STICKY_HEADER})",
            duration * shares["ab-split"],
            ab_split,
        ),
        Phase(
            "load-test",
            "load test: multi-turn conversations of 3 tenants on both pools, plus single requests and A/B traffic",
            duration * shares["load-test"],
            load_test,
        ),
    ]


# ----- sending ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    phase: str
    route: str
    kind: str
    start: float  # seconds since the traffic started
    latency_ms: float
    status: int
    model: str | None = None
    pool: str | None = None
    pool_source: str | None = None
    replica: str | None = None
    routing_us: float | None = None
    upstream_ms: float | None = None
    user: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    mismatch: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class PhaseRecord:
    name: str
    title: str
    start: float
    end: float = 0.0


class Traffic:
    """Open-loop sender: ``rate`` requests/s for each phase in turn, with a status line every few seconds."""

    def __init__(
        self,
        gateway: str,
        *,
        rate: float,
        pool_of_model: dict[str, str],
        pool_of_replica: dict[str, str],
        stopping: Callable[[], bool],
        status_every: float = 3.0,
    ) -> None:
        self.gateway = gateway
        self.rate = rate
        self.pool_of_model = pool_of_model
        self.pool_of_replica = pool_of_replica
        self.stopping = stopping
        self.status_every = status_every
        self.outcomes: list[Outcome] = []
        self.phases: list[PhaseRecord] = []
        self.sent = 0
        self.not_sent = 0
        self.cancelled = 0
        self.interrupted = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._t0 = 0.0
        self._phase = ""
        self._session: aiohttp.ClientSession | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    async def run(self, phases: Sequence[Phase]) -> None:
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._session = session
            self._t0 = time.monotonic()
            status = asyncio.create_task(self._status_loop())
            try:
                for i, phase in enumerate(phases, 1):
                    if self.stopping():
                        break
                    self._phase = phase.name
                    self.phases.append(PhaseRecord(phase.name, phase.title, self.elapsed()))
                    _say(f"[{self.elapsed():6.1f}s] phase {i}/{len(phases)} ({phase.duration:.0f} s): {phase.title}")
                    await self._run_phase(phase)
                    self.phases[-1].end = self.elapsed()
                await self._drain()
            finally:
                status.cancel()
                for task in list(self._in_flight):
                    task.cancel()
                if self._in_flight:
                    await asyncio.gather(*self._in_flight, return_exceptions=True)
                with contextlib.suppress(asyncio.CancelledError):
                    await status
                if self.phases and not self.phases[-1].end:
                    self.phases[-1].end = self.elapsed()
            self.interrupted = self.stopping()
            self._print_status()

    async def _run_phase(self, phase: Phase) -> None:
        interval = 1.0 / self.rate
        start = time.monotonic()
        end = start + phase.duration
        n = 0
        while not self.stopping():
            now = time.monotonic()
            due = start + n * interval
            if due >= end:
                return
            if due > now:
                await asyncio.sleep(min(due - now, 0.1))
                continue
            n += 1
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                self.not_sent += 1  # the gateway is not keeping up: do not pile on
                continue
            task = asyncio.create_task(self._send(phase.name, phase.next_request()))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_S
        while self._in_flight and not self.stopping() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _send(self, phase: str, request: Request) -> None:
        assert self._session is not None
        self.sent += 1
        outcome = Outcome(phase, request.route, request.kind, self.elapsed(), 0.0, 0, user=request.user)
        answer: dict[str, Any] | None = None
        t0 = time.perf_counter()
        try:
            async with self._session.post(
                self.gateway + request.path,
                data=orjson.dumps(request.body),
                headers={"Content-Type": "application/json", **request.headers},
            ) as response:
                raw = await response.read()
                outcome.status = response.status
                headers = response.headers
        except asyncio.CancelledError:
            self.cancelled += 1
            if request.on_done:
                request.on_done(None)
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome.latency_ms = (time.perf_counter() - t0) * 1000
            outcome.error = f"{type(exc).__name__}: {exc}"[:200]
            self.outcomes.append(outcome)
            if request.on_done:
                request.on_done(None)
            return
        outcome.latency_ms = (time.perf_counter() - t0) * 1000
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if outcome.status == 200 and isinstance(parsed, dict):
            answer = parsed
            self._read_answer(outcome, parsed, headers)
        else:
            message = raw[:200].decode(errors="replace")
            with contextlib.suppress(KeyError, TypeError):
                message = str(parsed["error"]["message"])[:200]  # type: ignore[index]
            outcome.error = f"HTTP {outcome.status}: {message}"
        self.outcomes.append(outcome)
        if request.on_done:
            request.on_done(answer)

    def _read_answer(self, outcome: Outcome, answer: dict[str, Any], headers: Any) -> None:
        outcome.model = answer.get("model") if isinstance(answer.get("model"), str) else None
        usage = answer.get("usage") or {}
        with contextlib.suppress(TypeError, ValueError):
            outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            outcome.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        replica = headers.get(UPSTREAM_HOST_HEADER)
        outcome.replica = replica or None
        header_pool = headers.get(POOL_RESPONSE_HEADER)
        header_pool = header_pool if header_pool in self.pool_of_model.values() else None  # Envoy writes "-"
        model_pool = self.pool_of_model.get(outcome.model or "")
        replica_pool = self.pool_of_replica.get(replica or "")
        for source, pool in (("x-gateway-pool", header_pool), ("model", model_pool), ("upstream-host", replica_pool)):
            if pool:
                outcome.pool, outcome.pool_source = pool, source
                break
        known = {p for p in (header_pool, model_pool, replica_pool) if p}
        outcome.mismatch = len(known) > 1
        with contextlib.suppress(ValueError, TypeError):
            outcome.routing_us = float(headers.get(ROUTING_US_HEADER))
        with contextlib.suppress(ValueError, TypeError):
            outcome.upstream_ms = float(headers.get(UPSTREAM_SERVICE_TIME_HEADER))

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.status_every)
            self._print_status()

    def _print_status(self) -> None:
        now = self.elapsed()
        window = [o for o in self.outcomes if o.start + o.latency_ms / 1000 >= now - self.status_every]
        ok = sum(o.ok for o in self.outcomes)
        _say(
            f"[{now:6.1f}s] {self._phase:<12} sent {self.sent:5d}  ok {ok:5d}  failed {len(self.outcomes) - ok:3d}"
            f"  in flight {len(self._in_flight):2d}  {len(window) / self.status_every:5.1f} req/s"
        )


# ----- metrics of the processes --------------------------------------------------------------------


@dataclass
class Snapshot:
    """Counters of every process at one moment."""

    sims: dict[str, dict[str, float]] = field(default_factory=dict)  # replica address -> sample -> value
    picker: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    envoy: dict[str, list[float]] = field(default_factory=dict)  # histogram -> cumulative quantiles
    envoy_quantiles: list[float] = field(default_factory=list)


_SIM_SAMPLES = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:request_success_total",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
)


async def _get_text(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url) as response:
            return await response.text() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def snapshot(stack: Stack) -> Snapshot:
    snap = Snapshot()
    replicas = [r for rs in stack.sims.values() for r in rs]
    envoy_url = f"http://127.0.0.1:{stack.admin_port}/stats?format=json&usedonly&filter=rq_time$"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        texts = await asyncio.gather(
            *(_get_text(session, f"{r.base}/metrics") for r in replicas),
            _get_text(session, stack.metrics_url),
            _get_text(session, envoy_url),
        )
    for replica, text in zip(replicas, texts[: len(replicas)], strict=True):
        snap.sims[replica.address] = promtext.sum_samples(text or "", _SIM_SAMPLES)
    snap.picker = promtext.samples(texts[-2] or "")
    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
        for item in orjson.loads(texts[-1] or b"{}").get("stats", []):
            histograms = item.get("histograms") if isinstance(item, dict) else None
            if not histograms:
                continue
            snap.envoy_quantiles = [float(q) for q in histograms.get("supported_quantiles", [])]
            for h in histograms.get("computed_quantiles", []):
                snap.envoy[h["name"]] = [v.get("cumulative") for v in h["values"]]
    return snap


async def models_endpoint(gateway: str) -> dict[str, Any]:
    """``GET /v1/models`` through the gateway: which models it says it serves."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{gateway}/v1/models") as response,
        ):
            status = response.status
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"status": 0, "models": [], "error": str(exc)}
    models: list[str] = []
    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        models = [str(m["id"]) for m in orjson.loads(body)["data"]]
    return {"status": status, "models": sorted(models)}


# ----- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """``q`` in 0..100; None when there are no values (the JSON summary has no NaN)."""
    return stats.percentile(values, q / 100.0) if values else None


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``(le, count)`` buckets; ``q`` in 0..1."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def _latency_stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "mean": _round(sum(values) / len(values)) if values else None,
        "p50": _round(percentile(values, 50)),
        "p95": _round(percentile(values, 95)),
        "p99": _round(percentile(values, 99)),
        "max": _round(max(values)) if values else None,
    }


# ----- the summary --------------------------------------------------------------------------------


@dataclass
class RunInfo:
    gateway: str
    rate: float
    seed: int
    pools: dict[str, str]  # pool -> model
    replicas: dict[str, tuple[str, str]]  # address -> (pool, name)


def summarize(
    traffic: Traffic, before: Snapshot, after: Snapshot, info: RunInfo, models: dict[str, Any]
) -> dict[str, Any]:
    outcomes = traffic.outcomes
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    errors: list[str] = []
    for o in failed:
        message = o.error or f"HTTP {o.status}"
        if message not in errors and len(errors) < 5:
            errors.append(message)
    duration = max((p.end for p in traffic.phases), default=0.0)

    phases = []
    for record in traffic.phases:
        mine = [o for o in outcomes if o.phase == record.name]
        n_ok = sum(o.ok for o in mine)
        phases.append(
            {
                "name": record.name,
                "title": record.title,
                "start_s": _round(record.start, 2),
                "duration_s": _round(record.end - record.start, 2),
                "requests": len(mine),
                "ok": n_ok,
                "failed": len(mine) - n_ok,
            }
        )

    by_route: dict[str, Any] = {}
    for route in [*info.pools, AB_ROUTE]:
        mine = [o for o in outcomes if o.route == route]
        n_ok = sum(o.ok for o in mine)
        by_route[route] = {
            "path": f"/v1/{route}/chat/completions",
            "requests": len(mine),
            "ok": n_ok,
            "failed": len(mine) - n_ok,
        }

    # Prefix cache and engine counters: the increase over the run, per replica and per pool.
    def delta(address: str, name: str) -> float:
        return after.sims.get(address, {}).get(name, 0.0) - before.sims.get(address, {}).get(name, 0.0)

    pool_hits: Counter[str] = Counter()
    pool_queries: Counter[str] = Counter()
    for address, (pool, _name) in info.replicas.items():
        pool_hits[pool] += delta(address, "vllm:prefix_cache_hits_total")
        pool_queries[pool] += delta(address, "vllm:prefix_cache_queries_total")

    by_model: dict[str, Any] = {}
    for pool, model in info.pools.items():
        served = [o for o in ok if o.pool == pool]
        latencies = [o.latency_ms for o in served]
        stats = _latency_stats(latencies)
        expected = EXPECTED_LATENCY_MS.get(pool)
        prompt = sum(o.prompt_tokens for o in served)
        by_model[model] = {
            "pool": pool,
            "requests": len(served),
            "latency_ms": stats,
            "expected_latency_ms": list(expected) if expected else None,
            "p50_in_expected": (expected[0] <= stats["p50"] <= expected[1])
            if expected and stats["p50"] is not None
            else None,
            "prefix_cache": {
                "hit_rate": _round(pool_hits[pool] / pool_queries[pool], 4) if pool_queries[pool] else None,
                "hit_tokens": int(pool_hits[pool]),
                "query_tokens": int(pool_queries[pool]),
            },
            "cached_prompt_share": _round(sum(o.cached_tokens for o in served) / prompt, 4) if prompt else None,
        }

    picks_before = _picker_picks(before)
    picks_after = _picker_picks(after)
    replica_requests = Counter(o.replica for o in ok if o.replica)
    by_replica: dict[str, Any] = {}
    for address, (pool, name) in info.replicas.items():
        queries = delta(address, "vllm:prefix_cache_queries_total")
        by_replica[address] = {
            "name": name,
            "pool": pool,
            "model": info.pools[pool],
            "requests": replica_requests.get(address, 0),
            "picker_picks": int(picks_after.get(address, 0) - picks_before.get(address, 0)),
            "engine_requests": int(delta(address, "vllm:request_success_total")),
            "prefix_cache_hit_rate": _round(delta(address, "vllm:prefix_cache_hits_total") / queries, 4)
            if queries
            else None,
        }

    return {
        "version": 1,
        "interrupted": traffic.interrupted,
        "gateway": info.gateway,
        "rate_target": info.rate,
        "duration_s": _round(duration, 2),
        "seed": info.seed,
        "phases": phases,
        "requests": {
            "sent": traffic.sent,
            "ok": len(ok),
            "failed": len(failed),
            "failed_by_status": {str(k): v for k, v in sorted(Counter(o.status for o in failed).items())},
            "errors": errors,
            "not_sent": traffic.not_sent,
            "cancelled": traffic.cancelled,
        },
        "by_route": by_route,
        "by_model": by_model,
        "by_replica": by_replica,
        "ab_split": _ab_summary(outcomes, info),
        "routing_overhead": _overhead_summary(ok, before, after, info),
        "models_endpoint": models,
        "expected": {
            "latency_ms": {pool: list(r) for pool, r in EXPECTED_LATENCY_MS.items()},
            "routing_overhead_ms": ROUTING_TARGET_MS,
            "ab_split": dict(AB_WEIGHTS),
        },
    }


def _picker_picks(snap: Snapshot) -> dict[str, float]:
    picks: dict[str, float] = defaultdict(float)
    for name, labels, value in snap.picker:
        if name == "extproc_endpoint_picks_total":
            picks[labels.get("endpoint", "")] += value
    return picks


def _ab_summary(outcomes: Sequence[Outcome], info: RunInfo) -> dict[str, Any]:
    ab = [o for o in outcomes if o.route == AB_ROUTE and o.ok and o.pool]
    independent = [o for o in ab if o.user is None]
    served = Counter(o.pool for o in independent)
    n = len(independent)
    total_weight = sum(AB_WEIGHTS.values())
    observed: dict[str, float | None] = {}
    ci: dict[str, list[float] | None] = {}
    inside: dict[str, bool | None] = {}
    for pool, weight in AB_WEIGHTS.items():
        observed[pool] = _round(served[pool] / n, 4) if n else None
        interval = wilson_interval(served[pool], n)
        ci[pool] = [round(interval[0], 4), round(interval[1], 4)] if interval else None
        inside[pool] = (interval[0] <= weight / total_weight <= interval[1]) if interval else None
    users: dict[str, set[str]] = defaultdict(set)
    sticky = [o for o in ab if o.user is not None]
    for o in sticky:
        users[o.user or ""].add(o.pool or "")
    consistent = [next(iter(p)) for p in users.values() if len(p) == 1]
    return {
        "route": AB_ROUTE,
        "path": f"/v1/{AB_ROUTE}/chat/completions",
        "weights": dict(AB_WEIGHTS),
        "target_share": {pool: round(w / total_weight, 4) for pool, w in AB_WEIGHTS.items()},
        "requests": len(ab),
        "independent_requests": n,
        "served": {pool: served[pool] for pool in AB_WEIGHTS},
        "observed_share": observed,
        "ci95": ci,
        "target_in_ci95": inside,
        "pool_source": dict(Counter(o.pool_source for o in ab if o.pool_source)),
        "mismatches": sum(o.mismatch for o in ab),
        "sticky": {
            "header": STICKY_HEADER,
            "users": len(users),
            "requests": len(sticky),
            "consistent_users": len(consistent),
            "users_by_pool": {pool: consistent.count(pool) for pool in AB_WEIGHTS},
        },
    }


def _decision_buckets(snap: Snapshot) -> dict[float, float]:
    buckets: dict[float, float] = defaultdict(float)
    for name, labels, value in snap.picker:
        if name == "extproc_decision_duration_seconds_bucket":
            buckets[float(labels["le"])] += value
    return buckets


def _overhead_summary(ok: Sequence[Outcome], before: Snapshot, after: Snapshot, info: RunInfo) -> dict[str, Any]:
    header = [o.routing_us / 1000 for o in ok if o.routing_us is not None]
    outside = [o.latency_ms - o.upstream_ms for o in ok if o.upstream_ms is not None]
    if ok and len(header) >= 0.9 * len(ok):
        source, values = "x-gateway-routing-us", header
    elif outside:
        source, values = "client-minus-upstream-service-time", [max(0.0, v) for v in outside]
    else:
        source, values = None, []
    b0, b1 = _decision_buckets(before), _decision_buckets(after)
    buckets = [(le, b1[le] - b0.get(le, 0.0)) for le in b1]
    count = max((c for _, c in buckets), default=0.0)
    decision_sum = sum(v for n, _, v in after.picker if n == "extproc_decision_duration_seconds_sum") - sum(
        v for n, _, v in before.picker if n == "extproc_decision_duration_seconds_sum"
    )

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 4)

    def envoy_q(name: str, q: float) -> float | None:
        values = after.envoy.get(name)
        if not values or q not in after.envoy_quantiles:
            return None
        value = values[after.envoy_quantiles.index(q)]
        return None if value is None else round(float(value), 3)

    p95 = _round(percentile(values, 95))
    return {
        "target_ms": ROUTING_TARGET_MS,
        "source": source,
        "count": len(values),
        "p50_ms": _round(percentile(values, 50)),
        "p95_ms": p95,
        "p99_ms": _round(percentile(values, 99)),
        "mean_ms": _round(sum(values) / len(values)) if values else None,
        "p95_below_target": None if p95 is None else p95 < ROUTING_TARGET_MS,
        "picker_decision_ms": {
            "count": int(count),
            "mean": ms(decision_sum / count) if count else None,
            "p50": ms(histogram_quantile(buckets, 0.5)) if count else None,
            "p95": ms(histogram_quantile(buckets, 0.95)) if count else None,
        },
        "envoy_ms": {
            "downstream_p50": envoy_q("http.gateway.downstream_rq_time", 50),
            "downstream_p95": envoy_q("http.gateway.downstream_rq_time", 95),
            "upstream_p50": {p: envoy_q(f"cluster.pool-{p}.upstream_rq_time", 50) for p in info.pools},
            "upstream_p95": {p: envoy_q(f"cluster.pool-{p}.upstream_rq_time", 95) for p in info.pools},
        },
    }


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as plain text (what the demo prints), from the JSON summary alone."""
    r = s["requests"]
    head = "summary" + (" (interrupted)" if s["interrupted"] else "")
    out = [
        f"== {head}: {s['duration_s']:.1f} s of traffic at {s['rate_target']:g} req/s: {r['sent']} requests, "
        f"{r['ok']} ok, {r['failed']} failed ==",
        "",
        "requests per route (phases: " + ", ".join(f"{p['name']} {p['requests']}" for p in s["phases"]) + "):",
    ]
    for route in s["by_route"].values():
        out.append(f"  {route['path']:<32} {route['requests']:6d}  ({route['failed']} failed)")
    out += ["", "requests per model (the model that answered) and per replica:"]
    for model, m in s["by_model"].items():
        replicas = [x for x in s["by_replica"].items() if x[1]["pool"] == m["pool"]]
        parts = ", ".join(f"{x['name']} {x['requests']}" for _, x in replicas)
        out.append(f"  {model:<16} {m['requests']:6d}  ({parts})")

    ab = s["ab_split"]
    out += [
        "",
        f"A/B split on {ab['path']}: {ab['independent_requests']} answers without {ab['sticky']['header']}"
        f" (of {ab['requests']} A/B answers)",
    ]
    for pool in ab["weights"]:
        ci = ab["ci95"][pool]
        verdict = {True: "target inside the interval", False: "target OUTSIDE the interval", None: ""}
        out.append(
            f"  {pool:<4} {ab['served'][pool]:5d}  observed {_pct(ab['observed_share'][pool])}"
            f"  95% CI [{_pct(ci[0] if ci else None)}, {_pct(ci[1] if ci else None)}]"
            f"  target {_pct(ab['target_share'][pool], 0)}  {verdict[ab['target_in_ci95'][pool]]}"
        )
    st = ab["sticky"]
    if st["users"]:
        by_pool = ", ".join(f"{n} on {p}" for p, n in st["users_by_pool"].items())
        out.append(
            f"  sticky {st['header']}: {st['requests']} requests from {st['users']} users; "
            f"{st['consistent_users']}/{st['users']} always got the same pool ({by_pool})"
        )
    if ab["mismatches"]:
        out.append(f"  {ab['mismatches']} answers whose model and replica disagree")
    ab_route = s["by_route"].get(ab["route"], {})
    if ab_route.get("requests") and not ab["requests"]:
        out.append(f"  no A/B request succeeded ({ab_route['failed']} failed): see the errors at the end")

    out += ["", f"latency, client-side end to end (ms):  {'p50':>7} {'p95':>7} {'p99':>7}   expected (write-up)"]
    for model, m in s["by_model"].items():
        lat = m["latency_ms"]
        exp = m["expected_latency_ms"]
        verdict = {True: "p50 in range", False: "p50 OUT of range", None: ""}[m["p50_in_expected"]]
        exp_text = f"~{exp[0]:g}-{exp[1]:g} ms  {verdict}" if exp else ""
        out.append(f"  {model:<36} {_num(lat['p50']):>7} {_num(lat['p95']):>7} {_num(lat['p99']):>7}   {exp_text}")

    ov = s["routing_overhead"]
    what = {
        "x-gateway-routing-us": "Envoy's x-gateway-routing-us per request: from the last request byte in\n"
        "  to the first byte upstream (ext_proc round trip with the pick, re-route, upstream connection)",
        "client-minus-upstream-service-time": "client e2e minus Envoy's x-envoy-upstream-service-time\n"
        "  (Envoy + ext_proc + the client's HTTP stack; 1 ms resolution)",
        None: "not measured",
    }[ov["source"]]
    verdict = {True: "p95 below target", False: "p95 ABOVE target", None: ""}[ov["p95_below_target"]]
    dec = ov["picker_decision_ms"]
    env = ov["envoy_ms"]
    out += [
        "",
        f"gateway routing overhead (ms): p50 {_num(ov['p50_ms'], 2)}  p95 {_num(ov['p95_ms'], 2)}"
        f"  target sub-{ov['target_ms']:g} ms  {verdict}",
        f"  measured as {what}",
        f"  the picker's decision alone: p50 {_num(dec['p50'], 3)}  p95 {_num(dec['p95'], 3)}"
        f"  mean {_num(dec['mean'], 3)} ({dec['count']} decisions)",
    ]
    if env["downstream_p50"] is not None:
        ups = ", ".join(f"{p} {_num(v)}" for p, v in env["upstream_p50"].items())
        out.append(f"  Envoy's histograms, p50: downstream {_num(env['downstream_p50'])}, upstream {ups}")

    out += ["", "prefix-cache hit rate (simulators' /metrics, tokens, summed per pool):"]
    for model, m in s["by_model"].items():
        pc = m["prefix_cache"]
        out.append(
            f"  {model:<16} {_pct(pc['hit_rate']):>6}  ({pc['hit_tokens']} of {pc['query_tokens']} prompt tokens;"
            f" responses' cached_tokens: {_pct(m['cached_prompt_share'])})"
        )

    me = s["models_endpoint"]
    out += ["", f"GET /v1/models through the gateway: HTTP {me['status']}: {', '.join(me['models']) or '-'}"]
    out.append(f"failed requests: {r['failed']}" + (f" {r['failed_by_status']}" if r["failed"] else ""))
    out += [f"  {e}" for e in r["errors"]]
    if r["not_sent"]:
        out.append(f"not sent (over {MAX_IN_FLIGHT} in flight): {r['not_sent']}")
    return "\n".join(line.rstrip() for line in out)


# ----- the report -----------------------------------------------------------------------------------


_POOL_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
_ROUTE_COLOURS = {"ab-test": "#9467bd"}


def _colours(summary: dict[str, Any]) -> dict[str, str]:
    pools = [m["pool"] for m in summary["by_model"].values()]
    colours = {pool: _POOL_COLOURS[i % len(_POOL_COLOURS)] for i, pool in enumerate(pools)}
    return {**colours, **_ROUTE_COLOURS}


def write_report(summary: dict[str, Any], outcomes: Sequence[Outcome], directory: Path) -> list[Path]:
    """PNG charts and an index.html showing them with the summary; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"font.size": 11, "axes.spines.top": False, "axes.spines.right": False})
    colours = _colours(summary)
    models = summary["by_model"]
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = directory / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. requests per model and per replica
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 3]})
    names = list(models)
    counts = [models[m]["requests"] for m in names]
    bars = left.bar(names, counts, color=[colours[models[m]["pool"]] for m in names])
    left.bar_label(bars, padding=2)
    left.set_title("Requests per model (model that answered)")
    left.set_ylabel("successful requests")
    left.margins(y=0.15)
    replicas = summary["by_replica"]
    labels = [f"{r['name']}\n{addr}" for addr, r in replicas.items()]
    bars = right.bar(
        labels, [r["requests"] for r in replicas.values()], color=[colours[r["pool"]] for r in replicas.values()]
    )
    right.bar_label(bars, padding=2)
    right.set_title("Requests per replica (x-gateway-upstream-host)")
    right.tick_params(axis="x", labelsize=9)
    right.margins(y=0.15)
    save(fig, "requests.png")

    # 2. latency distributions
    fig, ax = plt.subplots(figsize=(10, 5))
    all_lat = [o.latency_ms for o in outcomes if o.ok and o.pool]
    top = percentile(all_lat, 99.5) or 1.0
    bins = [i * top / 60 for i in range(61)]
    for model, m in models.items():
        pool = m["pool"]
        lat = [min(o.latency_ms, top) for o in outcomes if o.ok and o.pool == pool]
        exp = m["expected_latency_ms"]
        if exp:
            ax.axvspan(exp[0], exp[1], color=colours[pool], alpha=0.08)
            ax.text(
                (exp[0] + exp[1]) / 2, 1.0, f"expected {pool.upper()}\n~{exp[0]:g}-{exp[1]:g} ms",
                transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=9, color=colours[pool],
            )  # fmt: skip
        if lat:
            p50, p95 = m["latency_ms"]["p50"], m["latency_ms"]["p95"]
            ax.hist(
                lat, bins=bins, histtype="stepfilled", alpha=0.5, color=colours[pool],
                label=f"{model} ({len(lat)} requests): p50 {p50:.0f} ms, p95 {p95:.0f} ms",
            )  # fmt: skip
            ax.axvline(p50, color=colours[pool], lw=1.5)
            ax.axvline(p95, color=colours[pool], lw=1.2, ls="--")
    ax.set_title("Client-side end-to-end latency per model (solid line: p50, dashed: p95)")
    ax.set_xlabel("ms")
    ax.set_ylabel("requests")
    ax.set_xlim(left=0)
    ax.margins(y=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9, frameon=False)
    save(fig, "latency.png")

    # 3. A/B share with its confidence interval
    ab = summary["ab_split"]
    pools = list(ab["weights"])
    fig, ax = plt.subplots(figsize=(9, 1.2 + 1.1 * len(pools)))
    for i, pool in enumerate(pools):
        share = ab["observed_share"][pool]
        target = ab["target_share"][pool]
        ax.barh(i, target, color="#dddddd", height=0.5, label="configured weight" if i == 0 else None)
        text = f"{ab['served'][pool]} answers: {_pct(share)}"
        if share is not None:
            lo, hi = ab["ci95"][pool]
            ax.errorbar(
                share, i, xerr=[[share - lo], [hi - share]], fmt="o", color=colours.get(pool, "black"),
                capsize=6, ms=8, lw=2, label="observed share, 95% Wilson interval" if i == 0 else None,
            )  # fmt: skip
            text += f" (95% CI {_pct(lo)} - {_pct(hi)}), target {_pct(target, 0)}"
        ax.text(0.005, i + 0.3, text, va="bottom", fontsize=9)
    ax.set_yticks(range(len(pools)), [f"pool {p}" for p in pools])
    ax.set_ylim(-0.5, len(pools) - 0.1)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(f"A/B split on /v1/{ab['route']}: {ab['independent_requests']} requests without {STICKY_HEADER}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=9, frameon=False)
    save(fig, "ab_split.png")

    # 4. prefix-cache hit rate per model
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    rates = [models[m]["prefix_cache"]["hit_rate"] or 0.0 for m in names]
    bars = ax.bar(names, rates, color=[colours[models[m]["pool"]] for m in names])
    ax.bar_label(bars, labels=[f"{100 * r:.1f}%" for r in rates], padding=2)
    ax.set_ylim(0, 1.1)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title("Prefix-cache hit rate per model (prompt tokens)")
    save(fig, "cache_hit_rate.png")

    # 5. routing overhead
    ov = summary["routing_overhead"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    if ov["source"] == "x-gateway-routing-us":
        values = [o.routing_us / 1000 for o in outcomes if o.ok and o.routing_us is not None]
    else:
        values = [max(0.0, o.latency_ms - o.upstream_ms) for o in outcomes if o.ok and o.upstream_ms is not None]
    if values:
        cap = max(ROUTING_TARGET_MS * 1.2, percentile(values, 99.5) or 0.0)
        ax.hist([min(v, cap) for v in values], bins=60, range=(0, cap), color="#7f7f7f", alpha=0.8)
        ax.axvline(ROUTING_TARGET_MS, color="#d62728", lw=2, label=f"target: sub-{ROUTING_TARGET_MS:g} ms")
        ax.axvline(ov["p50_ms"], color="black", lw=1.5, label=f"p50 {ov['p50_ms']:.2f} ms")
        ax.axvline(ov["p95_ms"], color="black", lw=1.2, ls="--", label=f"p95 {ov['p95_ms']:.2f} ms")
        ax.legend(loc="center right", fontsize=9, frameon=False)
        ax.set_xlim(0, cap * 1.02)
    ax.set_title(f"Gateway routing overhead per request ({ov['source'] or 'not measured'})")
    ax.set_xlabel("ms (anything longer is counted in the last bar)")
    ax.set_ylabel("requests")
    save(fig, "routing_overhead.png")

    # 6. completed requests per second, per route, with the phases
    fig, ax = plt.subplots(figsize=(11, 3.8))
    end = max((o.start + o.latency_ms / 1000 for o in outcomes), default=1.0)
    seconds = math.ceil(end) + 1
    for route in summary["by_route"]:
        per_second = [0] * seconds
        for o in outcomes:
            if o.route == route:
                per_second[int(o.start + o.latency_ms / 1000)] += 1
        ax.plot(range(seconds), per_second, label=f"/v1/{route}", color=colours.get(route), lw=1.6)
    for phase in summary["phases"]:
        start = phase["start_s"] or 0.0
        ax.axvline(start, color="#aaaaaa", lw=1, ls=":")
        ax.text(start + 0.3, 0.98, phase["name"], transform=ax.get_xaxis_transform(), va="top", fontsize=9)
    ax.set_xlabel("seconds since the traffic started")
    ax.set_ylabel("requests / s")
    ax.set_title("Traffic per route")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    save(fig, "traffic.png")

    index = directory / "index.html"
    index.write_text(_html(summary, [p.name for p in written]))
    written.append(index)
    return written


def _html(summary: dict[str, Any], images: Iterable[str]) -> str:
    e = html.escape

    def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    models = summary["by_model"]
    ab = summary["ab_split"]
    ov = summary["routing_overhead"]
    r = summary["requests"]
    sections = [
        "<h2>Requests</h2>",
        table(
            ["route", "requests", "failed"],
            [(x["path"], x["requests"], x["failed"]) for x in summary["by_route"].values()],
        ),
        table(
            ["replica", "pool", "requests", "picker picks", "prefix-cache hit rate"],
            [
                (f"{x['name']} ({a})", x["pool"], x["requests"], x["picker_picks"], _pct(x["prefix_cache_hit_rate"]))
                for a, x in summary["by_replica"].items()
            ],
        ),
        "<h2>Per model</h2>",
        table(
            ["model", "requests", "p50 ms", "p95 ms", "expected ms", "prefix-cache hit rate"],
            [
                (
                    m,
                    x["requests"],
                    _num(x["latency_ms"]["p50"]),
                    _num(x["latency_ms"]["p95"]),
                    f"~{x['expected_latency_ms'][0]:g}-{x['expected_latency_ms'][1]:g}"
                    if x["expected_latency_ms"]
                    else "-",
                    _pct(x["prefix_cache"]["hit_rate"]),
                )
                for m, x in models.items()
            ],
        ),
        "<h2>A/B split</h2>",
        table(
            ["pool", "answers", "observed", "95% CI (Wilson)", "target"],
            [
                (
                    p,
                    ab["served"][p],
                    _pct(ab["observed_share"][p]),
                    f"{_pct(ab['ci95'][p][0])} - {_pct(ab['ci95'][p][1])}" if ab["ci95"][p] else "-",
                    _pct(ab["target_share"][p], 0),
                )
                for p in ab["weights"]
            ],
        ),
        "<h2>Gateway routing overhead</h2>",
        table(
            ["source", "p50 ms", "p95 ms", "target", "picker decision p50 ms"],
            [
                (
                    ov["source"] or "-",
                    _num(ov["p50_ms"], 2),
                    _num(ov["p95_ms"], 2),
                    f"sub-{ov['target_ms']:g} ms",
                    _num(ov["picker_decision_ms"]["p50"], 3),
                )
            ],
        ),
        f"<p>{r['sent']} requests sent, {r['ok']} ok, {r['failed']} failed.</p>",
    ]
    figures = "".join(f'<figure><img src="{e(name)}" alt="{e(name)}"></figure>' for name in images)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>extproc demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>extproc demo: multi-model gateway</h1>
<p>Gateway {e(summary["gateway"])}, {summary["duration_s"]} s of traffic at {summary["rate_target"]:g} req/s.</p>
{"".join(sections)}
<h2>Charts</h2>
{figures}
<h2>Summary as printed</h2>
<pre>{e(format_summary(summary))}</pre>
</body></html>
"""


# ----- the command --------------------------------------------------------------------------------


class _Signals:
    """SIGINT and SIGTERM only set a flag that the traffic and the idle loop poll, so stopping the children is
    never cut short. While the gateway starts, a first Ctrl-C lets the start finish (a few seconds) and then
    stops everything, leaving no half-started process; a second one aborts the start at once
    (KeyboardInterrupt: start_stack stops what it had started)."""

    def __init__(self) -> None:
        self.requested = False
        self.starting = True
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, _sig: int, _frame: object) -> None:
        self.requested = True
        self.count += 1
        if self.starting and self.count == 2:
            raise KeyboardInterrupt


def curl_lines(gateway_port: int) -> str:
    base = f"http://localhost:{gateway_port}"
    return f"""try it yourself (the write-up's commands, on this gateway):
  # 1B model
  curl -s -X POST "{base}/v1/1b/chat/completions" -H "Content-Type: application/json" \\
    -d '{{"model": "llama-3-2-1b", "messages": [{{"role": "user", "content": "Hello from 1B model!"}}]}}'
  # 3B model
  curl -s -X POST "{base}/v1/3b/chat/completions" -H "Content-Type: application/json" \\
    -d '{{"model": "llama-3-2-3b", "messages": [{{"role": "user", "content": "Hello from 3B model!"}}]}}'
  # A/B split (70/30): the "model" field of each answer says which model served it
  for i in {{1..10}}; do
    curl -s -X POST "{base}/v1/{AB_ROUTE}/chat/completions" -H "Content-Type: application/json" \\
      -d '{{"model": "auto", "messages": [{{"role": "user", "content": "Test A/B routing #'$i'"}}]}}' | \\
      python3 -c 'import json, sys; print(json.load(sys.stdin)["model"])'
  done
  # every model behind the gateway
  curl -s {base}/v1/models"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    up.add_port_arguments(p)
    up.add_prometheus_arguments(p)
    p.add_argument(
        "--duration",
        type=float,
        help=f"seconds of traffic, then exit (default: {DEFAULT_DURATION_S:g} s of traffic, "
        "then keep the gateway up until Ctrl-C)",
    )
    p.add_argument("--rate", type=float, default=30.0, help="requests per second, in total (open loop)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the summary as JSON here")
    p.add_argument("--report", type=Path, metavar="DIR", help="write PNG charts and index.html here (matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (Envoy's A/B draws are its own)")
    p.add_argument("--status-every", type=float, default=3.0, help="seconds between status lines")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="the multi-model demo: the local gateway with a 70/30 A/B split, three traffic scenarios, a summary",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.status_every <= 0 or (args.duration is not None and args.duration <= 0):
        print("extproc demo: error: --rate, --duration and --status-every must be positive", file=sys.stderr)
        return 2
    if args.report is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("extproc demo: error: --report needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
    try:
        if args.prometheus:
            find_prometheus()  # a missing binary stops the demo before anything starts
        up.check_ports_free(up.gateway_ports(args))
    except (up.PortTaken, PrometheusMissing) as exc:
        print(f"extproc demo: error: {exc}", file=sys.stderr)
        return 2

    from extproc.local.stack import start_stack

    pools: tuple[PoolSpec, ...] = up.DEFAULT_POOLS
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="extproc-demo-"))
    stack: Stack | None = None
    with _Signals() as signals:
        try:
            replicas = sum(p.replicas for p in pools)
            _say(f"starting {replicas} simulated vLLM replicas, the ext_proc and Envoy (logs in {log_dir}) ...")
            stack = start_stack(
                log_dir,
                pools,
                settings=SPLIT_SETTINGS,
                gateway_port=args.port,
                admin_port=args.admin_port,
                extproc_port=args.extproc_port,
                metrics_port=args.metrics_port,
            )
            prometheus = None
            if args.prometheus:  # inside the start: a Ctrl-C now is handled as during the stack's start
                _say("starting Prometheus ...")
                prometheus = start_prometheus(stack, log_dir, args.prometheus_port)
                prometheus.wait_targets_up()
            signals.starting = False
            if signals.requested:
                _say("interrupted while starting")
                return 130
            return _demo(stack, args, signals, prometheus)
        except KeyboardInterrupt:
            _say("start aborted")
            return 130
        except (RuntimeError, OSError) as exc:  # a process did not start: its log tail is in the message
            print(f"extproc demo: error: {exc}", file=sys.stderr)
            return 1
        finally:
            signals.starting = False
            if stack is not None:
                _say("stopping ...")
                stack.stop()
                _say("stopped every process the demo started")


def _demo(stack: Stack, args: argparse.Namespace, signals: _Signals, prometheus: Prometheus | None = None) -> int:
    _say(up.describe(stack).split("\ntry:")[0])  # its curl examples come at the end, with the A/B route
    weights = " / ".join(f"{p} {w}%" for p, w in AB_WEIGHTS.items())
    _say(f"  A/B split /v1/{AB_ROUTE}/...: {weights}, sticky on {STICKY_HEADER}")
    if prometheus is not None:
        _say(prometheus.describe(stack))
    duration = DEFAULT_DURATION_S if args.duration is None else args.duration
    models = {spec.name: spec.model for spec in up.DEFAULT_POOLS}
    for name in models:
        pool = stack.config.pool(name)
        if pool is not None:
            models[name] = pool.served_name
    replicas = {r.address: (pool, f"{pool}-{i}") for pool, rs in stack.sims.items() for i, r in enumerate(rs)}
    info = RunInfo(stack.gateway, args.rate, args.seed, models, replicas)
    rng = random.Random(args.seed)
    workload = Workload(models, rng)
    traffic = Traffic(
        stack.gateway,
        rate=args.rate,
        pool_of_model={m: p for p, m in models.items()},
        pool_of_replica={a: p for a, (p, _n) in replicas.items()},
        stopping=lambda: signals.requested,
        status_every=args.status_every,
    )
    _say(f"sending {duration:g} s of traffic at {args.rate:g} req/s; Ctrl-C stops everything")

    async def scenarios() -> tuple[Snapshot, Snapshot, dict[str, Any]]:
        listed = await models_endpoint(stack.gateway)
        before = await snapshot(stack)
        await traffic.run(make_phases(workload, duration, rng))
        return before, await snapshot(stack), listed

    before, after, listed = asyncio.run(scenarios())
    summary = summarize(traffic, before, after, info, listed)
    _say("")
    _say(format_summary(summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
        _say(f"summary JSON: {args.json}")
    if args.report is not None and not signals.requested:
        files = write_report(summary, traffic.outcomes, args.report)
        _say(f"report: {files[-1]} ({len(files) - 1} charts)")
    if summary["interrupted"] or signals.requested:
        return 130
    if args.duration is None:
        _say("")
        _say(curl_lines(stack.gateway_port))
        _say(f"Envoy stats: http://localhost:{stack.admin_port}/stats/prometheus   picker: {stack.metrics_url}")
        if prometheus is not None:
            _say(f"Prometheus: http://localhost:{prometheus.port} (stops with the gateway)")
        _say("the gateway keeps running; Ctrl-C stops everything")
        while not signals.requested:
            time.sleep(0.2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="extproc demo",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
