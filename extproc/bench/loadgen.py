"""A small closed-loop HTTP load generator: N connections, each sending back to back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from extproc.stats import percentile


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    completed_all: int = 0  # warm-up included, for per-request cost over the whole run

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        """Latency in seconds at ``q`` (0..1), as every percentile of the project (`extproc.stats.percentile`)."""
        return percentile(self.latencies, q)


async def closed_loop(
    url: str,
    body: Callable[[int], bytes],
    *,
    connections: int,
    duration: float,
    warmup: float = 0.0,
) -> LoadResult:
    """POST ``body(i)`` to ``url`` from ``connections`` workers for ``warmup + duration`` seconds.

    Only requests that start after the warm-up are counted.
    """
    result = LoadResult()
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    headers = {"Content-Type": "application/json"}
    counter = 0
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = measure_from + duration
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal counter
            while True:
                t0 = time.monotonic()
                if t0 >= stop_at:
                    return
                counter += 1
                try:
                    async with session.post(url, data=body(counter), headers=headers) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status = 0
                t1 = time.monotonic()
                result.completed_all += 1
                if t0 < measure_from:
                    continue
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200:
                    result.ok += 1
                    result.latencies.append(t1 - t0)
                else:
                    result.failed += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    result.elapsed = max(1e-9, min(time.monotonic(), stop_at + 5.0) - measure_from)
    return result
