"""The four dashboards against the demo stack and a real Prometheus: every panel query returns data.

The demo's gateway (two 1B and two 3B simulated replicas, the picker, Envoy with the 70/30 split) gets a
mix of traffic; then every PromQL expression of every panel is evaluated through Prometheus's HTTP API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import shutil
import time
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from extproc.local.dashboards import AB_SHARE_TITLE, panel_queries
from extproc.local.multi_model import AB_ROUTE, AB_WEIGHTS, POOLS, SPLIT_SETTINGS
from extproc.local.prometheus import Prometheus, start_prometheus
from extproc.local.redis import start_redis
from extproc.local.stack import Stack, start_stack
from tests.helpers import prometheus_missing

AB_REQUESTS = 3000  # 70/30 draws: standard error 0.84 points, so the 3-point check is a 3.6-sigma band


MISSING = prometheus_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


PRECISE_SCORERS = [
    {"name": "queue", "weight": 2},
    {"name": "kv_cache", "weight": 2},
    {"name": "precise_prefix", "weight": 4, "params": {"port_offset": 1, "replay_port_offset": 2}},
]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Prometheus, dict[str, int]]]:
    log_dir = tmp_path_factory.mktemp("observability")
    # Two pickers sharing their picks through a real redis-server, so the shared-state panels have data too;
    # without redis-server, one picker (and those panels are checked to be the only empty ones).
    redis = None
    settings, pickers = dict(SPLIT_SETTINGS), 1
    if shutil.which("redis-server"):
        redis, url = start_redis(log_dir)
        settings["state"] = {"backend": "redis", "url": url}
        pickers = 2
    # The simulators publish KV events and the pickers score with precise_prefix, so its panels have data too
    # (its embedded approximate index fills the prefix panels as the default scorer would).
    settings["scheduler"] = {"scorers": PRECISE_SCORERS}
    pools = [dataclasses.replace(pool, kv_events=True) for pool in POOLS]
    stack = start_stack(log_dir, pools, settings=settings, pickers=pickers)
    if redis is not None:
        stack.extras.append(redis)
    try:
        prometheus = start_prometheus(stack, log_dir)
        prometheus.wait_targets_up(timeout=30)
        statuses = asyncio.run(_traffic(stack))
        # Envoy publishes histograms at its 5 s stats flush; then one more scrape.
        _wait_for(prometheus, 'envoy_cluster_upstream_rq_time_count{envoy_cluster_name="pool-3b"}', 20)
        time.sleep(2 * prometheus.scrape_interval + 0.5)
        yield stack, prometheus, statuses
    finally:
        stack.stop()


def _wait_for(prometheus: Prometheus, expr: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prometheus.query(expr):
            return
        time.sleep(0.5)
    raise AssertionError(f"{expr} never showed up in Prometheus")


def _chat(model: str, text: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8})


async def _traffic(stack: Stack) -> dict[str, int]:
    """The demo's three kinds of traffic plus a few errors; returns a count per (kind, status)."""
    system = "You are the support assistant of an online shop. " * 40
    jobs: list[tuple[str, str, bytes]] = []
    for i in range(AB_REQUESTS):
        jobs.append(("ab", f"/v1/{AB_ROUTE}/chat/completions", _chat("auto", f"A/B question {i}")))
    for pool, model in (("1b", "llama-3-2-1b"), ("3b", "llama-3-2-3b")):
        for i in range(150):
            jobs.append((pool, f"/v1/{pool}/chat/completions", _chat(model, f"{system} question {i % 10}")))
    for i in range(50):
        jobs.append(("model", "/v1/chat/completions", _chat("llama-3-2-3b", f"by model {i}")))
    for i in range(10):
        jobs.append(("unknown", "/v1/chat/completions", _chat(f"no-such-model-{i}", "hi")))
        jobs.append(("bad", "/v1/1b/chat/completions", b"{not json"))
    jobs.sort(key=lambda job: hash(job[2]))  # interleave the kinds
    counts: dict[str, int] = {}
    queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            kind, path, body = queue.get_nowait()
            async with session.post(stack.gateway + path, data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                key = f"{kind} {r.status}"
                counts[key] = counts.get(key, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(worker(session) for _ in range(48)))
    return counts


def test_every_target_is_scraped(observed: tuple[Stack, Prometheus, dict[str, int]]) -> None:
    _stack, prometheus, statuses = observed
    assert statuses == {
        "ab 200": AB_REQUESTS,
        "1b 200": 150,
        "3b 200": 150,
        "model 200": 50,
        "unknown 404": 10,
        "bad 400": 10,
    }
    jobs = {t["labels"]["job"] for t in prometheus.targets() if t["health"] == "up"}
    assert jobs == {"envoy", "extproc", "vllm"}


def test_every_panel_query_returns_data(observed: tuple[Stack, Prometheus, dict[str, int]]) -> None:
    _stack, prometheus, _statuses = observed
    queries = panel_queries(rate_interval="2m")
    assert len({q.dashboard for q in queries}) == 4
    empty = []
    for q in queries:
        result = prometheus.query(q.expr)
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            if q.panel.startswith("Shared state") and shutil.which("redis-server") is None:
                continue  # pickers with state.backend: redis only; this run has one picker on local state
            empty.append(f"{q.dashboard} / {q.panel} / {q.ref_id}: {q.expr} -> {result}")
    assert not empty, f"{len(empty)} of {len(queries)} panel queries returned no data:\n" + "\n".join(empty)


def test_ab_dashboard_shows_the_configured_split(observed: tuple[Stack, Prometheus, dict[str, int]]) -> None:
    _stack, prometheus, _statuses = observed
    (share,) = [q for q in panel_queries(rate_interval="2m") if q.panel == AB_SHARE_TITLE and q.ref_id == "A"]
    observed_share = {r["metric"]["pool"]: float(r["value"][1]) for r in prometheus.query(share.expr)}
    weight = AB_WEIGHTS["1b"] / sum(AB_WEIGHTS.values())
    assert abs(observed_share["1b"] - weight) <= 0.03, observed_share
    assert observed_share["1b"] + observed_share["3b"] == pytest.approx(1.0)
    (configured,) = [q for q in panel_queries(rate_interval="2m") if q.panel == AB_SHARE_TITLE and q.ref_id == "B"]
    weights = {r["metric"]["pool"]: float(r["value"][1]) for r in prometheus.query(configured.expr)}
    assert weights == {"1b": pytest.approx(0.7), "3b": pytest.approx(0.3)}
