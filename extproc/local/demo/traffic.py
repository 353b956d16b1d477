"""Sending the demo's traffic: an open-loop sender at a fixed rate, one `Outcome` per request.

Each outcome records what the client saw: status, end-to-end time, the answering model and the headers
Envoy adds (the replica, the pool, the routing time), which is all the summary needs from the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from extproc.local.demo.workload import Phase, Request
from extproc.local.terminal import say
from extproc.names import POOL_RESPONSE_HEADER, ROUTING_US_HEADER, UPSTREAM_HOST_HEADER

# Envoy's own header: how long the upstream took (ms), the fallback for the routing overhead.
UPSTREAM_SERVICE_TIME_HEADER = "x-envoy-upstream-service-time"

MAX_IN_FLIGHT = 64
REQUEST_TIMEOUT_S = 30.0
DRAIN_S = 10.0


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
                    say(f"[{self.elapsed():6.1f}s] phase {i}/{len(phases)} ({phase.duration:.0f} s): {phase.title}")
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
        say(
            f"[{now:6.1f}s] {self._phase:<12} sent {self.sent:5d}  ok {ok:5d}  failed {len(self.outcomes) - ok:3d}"
            f"  in flight {len(self._in_flight):2d}  {len(window) / self.status_every:5.1f} req/s"
        )
