"""One cell: a router in front of fresh simulators, one workload at one rate through it, its figures, all stopped.

Fresh means new processes: every router starts on replicas that have never served a request, so no router
inherits another's cache, counters, connections or a backlog still draining. Restarting four simulators
costs about 1.5 s (the gateway with Envoy and the picker about 3.5 s), small beside a cell, and unlike
``POST /reset_prefix_cache`` it leaves nothing to trust about what the previous router left behind.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.bench.peers.routers import RouterSpec, SimSetup, log_problems, start_router
from extproc.bench.peers.stream import send_stream_cell
from extproc.bench.peers.summary import summarize
from extproc.bench.routing.report import show
from extproc.bench.workloads import make_workload


@dataclass(frozen=True)
class CellSettings:
    """What stays the same for every cell of a run."""

    setup: SimSetup
    duration: float  # seconds of arrivals
    min_requests: int
    warmup_share: float
    max_tokens: int
    seed: int
    programs: dict[str, str] = field(default_factory=dict)  # peer kind -> its command
    gateway_settings: dict[str, Any] = field(default_factory=dict)  # extra config sections for the gateway

    def count(self, rate: float) -> int:
        return max(20, self.min_requests, round(rate * self.duration))

    def seconds(self, rate: float) -> float:
        """About how long a cell at ``rate`` takes: its arrivals plus starting and stopping (for the ETA)."""
        return self.count(rate) / rate + 5.0


def run_cell(settings: CellSettings, spec: RouterSpec, workload: str, rate: float, log_dir: Path) -> dict[str, Any]:
    """``workload`` at ``rate`` req/s through ``spec`` on new replicas; the cell's row (see summary.summarize)."""
    count = settings.count(rate)
    stream = make_workload(workload, settings.seed, rate, count, settings.max_tokens)
    warmup = int(count * settings.warmup_share)
    running = start_router(spec, settings.setup, log_dir, settings.programs, settings.gateway_settings)
    try:
        url = f"{running.url}/v1/chat/completions"
        run = asyncio.run(send_stream_cell(url, stream, warmup, running.bases, running.cpu))
    finally:
        running.stop()
    row: dict[str, Any] = {"workload": workload, "rate": rate, "router": spec.name}
    row.update(summarize(run, warmup, list(running.parts)))
    row["router_log"] = log_problems([child.log_path for child in running.parts.values()])
    return row


def progress(row: dict[str, Any]) -> str:
    """The cell's headline figures, for the line printed as each cell ends."""
    return (
        f"{row['workload']} {row['rate']:g} req/s {row['router']}: TTFT mean {show('{:.1f}', row['ttft_mean_ms'])} "
        f"p99 {show('{:.1f}', row['ttft_p99_ms'])} ms, ITL {show('{:.2f}', row['itl_mean_ms'])} ms, "
        f"hit {show('{:.1%}', row['hit_rate'])}, CPU {show('{:.2f}', row['cpu_ms_per_request'])} ms/req, "
        f"throughput {show('{:.1f}', row['throughput_rps'])} req/s, failed {row['failed']}"
    )
