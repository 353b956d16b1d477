"""Load scorers: how lightly loaded each candidate is, in [0, 1] (1 = best). Prefix affinity is in ``prefix/``."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.datalayer.endpoint import EndpointState
from extproc.scheduling.framework import SchedulingContext, register_scorer


def _fewer_is_better(values: Sequence[float]) -> list[float]:
    """Min/max normalisation as in GIE: the smallest value scores 1, the largest 0, all 1 when equal."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


@register_scorer("queue")
class QueueScorer:
    """Shorter queue is better: requests waiting at the last scrape plus those sent there since."""

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        return _fewer_is_better([e.waiting + e.pending for e in candidates])


@register_scorer("running")
class RunningScorer:
    """Fewer running requests is better (a proxy for decode batch size, i.e. inter-token latency)."""

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        return _fewer_is_better([e.running for e in candidates])


@register_scorer("kv_cache")
class KVCacheScorer:
    """More free KV cache is better: 1 - utilisation."""

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        return [1.0 - u if 0.0 <= u <= 1.0 else float(u < 0.0) for u in (e.kv_usage for e in candidates)]


@register_scorer("load")
class LoadScorer:
    """Fewer requests in flight is better, on an absolute scale: the queue, the batch and the picks since.

    In flight = waiting + running (as last scraped) + pending (sent since). Unlike ``queue``'s min/max
    normalisation, where one request more than the least loaded candidate already costs the full weight,
    a candidate loses ``(in_flight - least) / scale`` of it (at most all): a difference of a request or two
    between replicas costs little, so it does not outweigh a cached prefix, while a replica ``scale``
    requests busier than the least loaded one loses the whole weight.
    """

    def __init__(self, scale: float = 8.0) -> None:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0:
            raise ValueError(f"scale must be a number above 0, got {scale!r}")
        self.scale = float(scale)

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        loads = [e.waiting + e.running + e.pending for e in candidates]
        least, scale = min(loads), self.scale
        return [max(0.0, 1.0 - (load - least) / scale) for load in loads]
