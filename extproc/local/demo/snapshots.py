"""Snapshots of every process's counters (simulators, picker, Envoy), taken before and after the traffic.

The summary reports what the processes themselves counted over the run (prefix-cache hits, picks,
decision times) as the difference of two snapshots, next to what the client measured.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from extproc.local import promtext
from extproc.local.stack import Stack


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
