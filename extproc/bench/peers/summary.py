"""One cell's figures: the client's latency distributions, the replicas' counters, the router's CPU."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from extproc.bench.peers.stream import SERVED, StreamRun, counter_deltas, cpu_deltas
from extproc.stats import percentile

LATENCIES = ("ttft", "itl", "e2e")
GATEWAY_PARTS = ("envoy", "picker")
STATS = (("mean", math.nan), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def distribution(name: str, values: Sequence[float]) -> dict[str, float]:
    """``{name}_mean_ms``, ``_p50_ms``, ``_p90_ms``, ``_p99_ms`` (extproc.stats.percentile); NaN for no values."""
    out = {}
    for stat, q in STATS:
        if stat == "mean":
            out[f"{name}_mean_ms"] = sum(values) / len(values) if values else math.nan
        else:
            out[f"{name}_{stat}_ms"] = percentile(values, q)
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def summarize(run: StreamRun, warmup: int, parts: Sequence[str]) -> dict[str, Any]:
    """The measured requests (index >= ``warmup``) of ``run``; ``parts`` are the router's process groups."""
    measured = [t for t in run.timings if t.index >= warmup]
    ok = [t for t in measured if t.ok]
    row: dict[str, Any] = {"requests": len(run.timings), "measured": len(measured), "ok": len(ok)}
    row["failed"] = len(measured) - len(ok)
    row["failed_warmup"] = sum(1 for t in run.timings if t.index < warmup and not t.ok)
    statuses: dict[str, int] = {}
    for t in measured:
        statuses[str(t.status)] = statuses.get(str(t.status), 0) + 1
    row["statuses"] = statuses
    row["errors"] = sorted({t.error for t in measured if t.error})[:5]
    for name in LATENCIES:
        row.update(distribution(name, [v for t in ok if not math.isnan(v := getattr(t, f"{name}_ms"))]))

    window = max(t.done for t in measured) - min(t.sent for t in measured) if measured else 0.0
    row["throughput_rps"] = _ratio(len(ok), window)
    row["send_lag_p99_ms"] = percentile([(t.sent - t.scheduled) * 1e3 for t in measured], 0.99)
    # From the last arrival to the last answer: about one request's e2e when the pool keeps up, a backlog when not.
    row["drain_seconds"] = max(t.done for t in measured) - max(t.scheduled for t in measured) if measured else math.nan
    hits = sum(counter_deltas(run, "vllm:prefix_cache_hits_total").values())
    row["hit_rate"] = _ratio(hits, sum(counter_deltas(run, "vllm:prefix_cache_queries_total").values()))
    row["hit_rate_responses"] = _ratio(sum(t.cached_tokens for t in ok), sum(t.prompt_tokens for t in ok))
    served = counter_deltas(run, SERVED)
    row["per_replica"] = served
    row["imbalance"] = _ratio(max(served.values(), default=0.0), sum(served.values()) / max(1, len(served)))
    row["preemptions"] = sum(counter_deltas(run, "vllm:num_preemptions_total").values())
    # Requests Envoy sent elsewhere than the picker said (the gateway only: its fallback when the picker is late).
    gateway = [t for t in ok if t.picked]
    row["picker_bypassed"] = sum(1 for t in gateway if t.host != t.picked.split(",", 1)[0]) if gateway else None

    cpu = cpu_deltas(run)
    per_request = {k: _ratio(v * 1e3, len(measured)) for k, v in cpu.items()}
    row["cpu_ms_per_request"] = sum(per_request[p] for p in parts) if measured else math.nan
    row["cpu_parts_ms_per_request"] = {p: per_request[p] for p in parts}
    for p in GATEWAY_PARTS:  # the same keys in every row, NaN for a peer (one process)
        row[f"cpu_{p}_ms_per_request"] = per_request.get(p, math.nan)
    row["replicas_cpu_ms_per_request"] = per_request.get("replicas", math.nan)
    row["wall_seconds"] = window
    return row
