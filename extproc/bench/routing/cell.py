"""One cell: a workload sent open-loop through the gateway at its arrival times, and its summary."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from extproc.bench.workloads import Workload
from extproc.local import promtext
from extproc.names import PICKED_HEADER, UPSTREAM_HOST_HEADER
from extproc.stats import percentile

# The simulators' counters read before and after the measured window; the gauges tell when the pool is idle.
COUNTERS = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:num_preemptions_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)


@dataclass
class Outcome:
    index: int
    key: str = ""  # the tenant or session whose prefix the request shares
    status: int = 0
    ttft_ms: float = math.nan
    queue_ms: float = math.nan
    e2e_ms: float = math.nan
    host: str = ""
    picked: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    scheduled: float = 0.0  # wall, from the cell's start
    sent: float = 0.0
    done: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not math.isnan(self.ttft_ms)


@dataclass
class CellRun:
    outcomes: list[Outcome] = field(default_factory=list)
    before: dict[str, dict[str, float]] = field(default_factory=dict)  # at the first measured request
    after: dict[str, dict[str, float]] = field(default_factory=dict)


async def scrape_all(
    session: aiohttp.ClientSession, bases: Sequence[str], names: Sequence[str] = COUNTERS
) -> dict[str, dict[str, float]]:
    """Each replica's ``names``, summed over their label sets, read at the same moment."""

    async def one(base: str) -> tuple[str, dict[str, float]]:
        async with session.get(f"{base}/metrics") as response:
            return base, promtext.sum_samples(await response.text(), names)

    return dict(await asyncio.gather(*(one(b) for b in bases)))


async def send_cell(url: str, workload: Workload, scale: float, warmup: int, bases: Sequence[str]) -> CellRun:
    """Send ``workload`` open-loop at its arrival times (simulated seconds x ``scale`` = wall seconds)."""
    run = CellRun()
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.monotonic()

        async def one(index: int) -> None:
            outcome = Outcome(index, scheduled=workload.arrivals[index] * scale)
            run.outcomes.append(outcome)
            turn = workload.next(index)
            outcome.key = turn.key
            content: str | None = None
            outcome.sent = time.monotonic() - start
            try:
                async with session.post(url, data=turn.body, headers=headers) as response:
                    raw = await response.read()
                    outcome.status = response.status
                    h = response.headers
                    outcome.host = h.get(UPSTREAM_HOST_HEADER, "")
                    outcome.picked = h.get(PICKED_HEADER, "")
                    if response.status == 200:
                        outcome.ttft_ms = float(h.get("x-sim-ttft-ms", "nan"))
                        outcome.queue_ms = float(h.get("x-sim-queue-ms", "nan"))
                        outcome.e2e_ms = float(h.get("x-sim-e2e-ms", "nan"))
                        answer = orjson.loads(raw)
                        usage = answer.get("usage") or {}
                        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        outcome.cached_tokens = int(
                            (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                        )
                        content = answer["choices"][0]["message"]["content"]
                    else:
                        outcome.error = raw[:200].decode(errors="replace")
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"[:200]
            outcome.done = time.monotonic() - start
            workload.answered(turn, content if outcome.ok else None)

        async def measure_from() -> None:
            run.before = await scrape_all(session, bases)

        await open_loop(workload.arrivals, start, scale, warmup, one, measure_from)
        run.after = await scrape_all(session, bases)
    run.outcomes.sort(key=lambda o: o.index)
    return run


async def open_loop(
    arrivals: Sequence[float],
    start: float,
    scale: float,
    warmup: int,
    one: Callable[[int], Awaitable[None]],
    measure_from: Callable[[], Awaitable[None]],
) -> None:
    """Start ``one(i)`` at ``start + arrivals[i] x scale`` (monotonic wall seconds), whether or not earlier ones
    are done (open loop); await ``measure_from()`` just before request ``warmup``; return when all are done."""
    tasks = []
    for i, at in enumerate(arrivals):
        delay = start + at * scale - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if i == warmup:
            await measure_from()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


def picker_metrics(url: str) -> dict[str, Any]:
    """The picker's view of the cell so far (its whole life: it restarts with every cell), from ``url``.

    The KV-event streams (``extproc_kv_events_*``: summed over endpoints, lag the largest), the prompts
    tokenized (``extproc_render_*``, ``extproc_tokenize_*``: cache hits, engine renders, errors, seconds waited,
    prompts tokenized here with the model's files and the seconds that took), the precise scorer
    (live endpoints, indexed blocks, requests it scored on events and the share of their prompt it expected
    the pick to hold) and the approximate prefix index (requests and the share it expected).
    """
    try:
        with urllib.request.urlopen(url, timeout=5.0) as response:
            page = response.read().decode()
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    totals: dict[str, float] = {}
    lag = 0.0
    for name, labels, value in promtext.samples(page):
        if name == "extproc_kv_events_lag_seconds":
            lag = max(lag, value)
        elif name == "extproc_render_requests_total":
            totals[f"render_{labels.get('result', '')}"] = value
        elif name == "extproc_render_seconds_total":
            totals["render_seconds"] = value
        elif name == "extproc_tokenize_seconds_total":
            totals["render_tokenize_seconds"] = value
        elif name.startswith(("extproc_kv_events_", "extproc_precise_prefix_", "inference_extension_prefix_")):
            totals[name] = totals.get(name, 0.0) + value
    out: dict[str, Any] = {"kv_events_lag_max_s": lag}
    for key in ("connected", "batches", "blocks_stored", "blocks_removed", "gaps", "replays", "restarts", "malformed"):
        out[f"kv_events_{key}"] = totals.get(
            f"extproc_kv_events_{key}_total", totals.get(f"extproc_kv_events_{key}", 0.0)
        )
    for key in ("hit", "miss", "error", "seconds", "local", "local_error", "tokenize_seconds"):
        out[f"render_{key}"] = totals.get(f"render_{key}", 0.0)
    out["precise_live_endpoints"] = totals.get("extproc_precise_prefix_live", 0.0)
    out["precise_index_blocks"] = totals.get("extproc_precise_prefix_index_blocks", 0.0)
    for key, family in (
        ("precise", "extproc_precise_prefix_hit_ratio"),
        ("approximate", "inference_extension_prefix_indexer_hit_ratio"),
    ):
        count = totals.get(f"{family}_count", 0.0)
        out[f"{key}_scored"] = count
        out[f"{key}_expected_hit"] = totals.get(f"{family}_sum", 0.0) / count if count else math.nan
    return out


def summarize(
    run: CellRun, warmup: int, scale: float, replicas: Sequence[str], capacity_tokens: int | None = None
) -> dict[str, Any]:
    """The cell's measured requests as numbers; ``capacity_tokens`` (the pool's KV cache) gives ``kv_turnover``."""
    measured = [o for o in run.outcomes if o.index >= warmup]
    ok = [o for o in measured if o.ok]
    ttft = [o.ttft_ms for o in ok]
    e2e = [o.e2e_ms for o in ok]
    delta = {
        name: sum(run.after[b][name] - run.before.get(b, run.after[b])[name] for b in run.after)
        for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:num_preemptions_total")
    }
    queries = delta["vllm:prefix_cache_queries_total"]
    prefilled = queries - delta["vllm:prefix_cache_hits_total"]  # prompt tokens not found in a cache
    per_replica = {r: 0 for r in replicas}
    for o in ok:
        per_replica[o.host] = per_replica.get(o.host, 0) + 1
    mean_served = len(ok) / max(1, len(replicas))
    window = (max(o.done for o in measured) - min(o.sent for o in measured)) if measured else 0.0
    prompt = sum(o.prompt_tokens for o in ok)
    statuses: dict[str, int] = {}
    for o in measured:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    missed = sum(1 for o in ok if o.host != o.picked.split(",", 1)[0])
    # Wall time a request spent beyond what the engine accounts for (times the scale): the gateway, the client
    # and any lag of a simulator behind its scaled clock on a busy host.
    overhead = [(o.done - o.sent) * 1e3 - o.e2e_ms * scale for o in ok]
    lag = [(o.sent - o.scheduled) * 1e3 for o in measured]
    # Measured requests whose tenant or session had not been sent before in this cell: a cache miss for
    # every policy (the caches start empty), so the hit rate a policy can reach is bounded by the rest.
    seen: set[str] = set()
    first = 0
    for o in run.outcomes:
        if o.key not in seen:
            seen.add(o.key)
            first += o.index >= warmup
    cold = first / len(measured) if measured else math.nan
    return {
        "requests": len(run.outcomes),
        "measured": len(measured),
        "ok": len(ok),
        "failed": len(measured) - len(ok),
        "failed_warmup": sum(1 for o in run.outcomes if o.index < warmup and not o.ok),
        "statuses": statuses,
        "errors": sorted({o.error for o in measured if o.error})[:5],
        "ttft_mean_ms": sum(ttft) / len(ttft) if ttft else math.nan,
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p90_ms": percentile(ttft, 0.9),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "e2e_p50_ms": percentile(e2e, 0.5),
        "e2e_p99_ms": percentile(e2e, 0.99),
        "queue_mean_ms": sum(o.queue_ms for o in ok) / len(ok) if ok else math.nan,
        "throughput_rps": len(ok) / (window / scale) if window > 0 else math.nan,
        "hit_rate": delta["vllm:prefix_cache_hits_total"] / queries if queries > 0 else math.nan,
        "hit_rate_responses": sum(o.cached_tokens for o in ok) / prompt if prompt else math.nan,
        "imbalance": max(per_replica.values()) / mean_served if ok else math.nan,
        "per_replica": per_replica,
        "preemptions": delta["vllm:num_preemptions_total"],
        "prefilled_tokens": prefilled,
        # How many times over the pool's KV cache the measured window prefilled: once the caches are full (the
        # warm-up fills them on the shared-prefix workloads), every prefilled block evicts one.
        "kv_turnover": prefilled / capacity_tokens if capacity_tokens else math.nan,
        "first_use_share": cold,
        "picker_bypassed": missed,
        "host_overhead_p50_ms": percentile(overhead, 0.5),
        "host_overhead_p99_ms": percentile(overhead, 0.99),
        "send_lag_p99_ms": percentile(lag, 0.99),
        "wall_seconds": window,
    }
