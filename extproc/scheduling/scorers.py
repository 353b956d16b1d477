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
