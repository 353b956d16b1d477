"""Filters: which endpoints may serve a request, and what to do when none may."""

from __future__ import annotations

from extproc.scheduling.framework import OnEmpty, SchedulingContext, register_filter
from extproc.scheduling.types import EndpointState


@register_filter("healthy")
class Healthy:
    """Endpoints whose latest scrape succeeded and is recent.

    If none is fresh (the scraper is down, or every pod is slow to answer /metrics) routing blindly
    beats refusing everything: fail open, as Envoy does when the picker itself is down.
    """

    on_empty = OnEmpty.FAIL_OPEN
    empty_reason = "no endpoint has a fresh scrape"

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]:
        now, stale_after = ctx.now, ctx.stale_after
        return [e for e in candidates if e.fresh(now, stale_after)]


@register_filter("subset")
class Subset:
    """The GIE candidate-subset hint: if the request carries one, only those endpoints (else 503)."""

    on_empty = OnEmpty.REFUSE
    empty_reason = "no endpoint in the subset hint"

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]:
        subset = ctx.request.subset
        if subset is None:
            return candidates
        return [e for e in candidates if e.address in subset]


def saturated(endpoint: EndpointState, queue_threshold: float, kv_cache_threshold: float) -> bool:
    """The scraped queue or KV-cache use at or above its threshold.

    ``pending`` (requests sent since the last scrape) is left out on purpose: most of them are already
    running or done by the next scrape, and at a few hundred requests per second per endpoint they
    alone would cross any small threshold and turn every endpoint "saturated" between two scrapes.
    """
    return endpoint.waiting >= queue_threshold or endpoint.kv_usage >= kv_cache_threshold


@register_filter("not_saturated")
class NotSaturated:
    """Endpoints with room, so that affinity never piles work onto an overloaded pod.

    When every endpoint is saturated: 429 if ``shed_when_saturated`` (let the client back off),
    otherwise route anyway and let the scorers pick the least bad one.
    """

    on_empty = OnEmpty.SHED
    empty_reason = "every endpoint is saturated"

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]:
        q, kv = ctx.queue_threshold, ctx.kv_cache_threshold
        return [e for e in candidates if not saturated(e, q, kv)]
