"""Filters: which endpoints may serve a request, and what to do when none may."""

from __future__ import annotations

from extproc.datalayer.endpoint import EndpointState
from extproc.scheduling.framework import OnEmpty, SchedulingContext, register_filter


@register_filter("healthy")
class Healthy:
    """Endpoints whose latest scrape succeeded and is recent (``EndpointState.fresh``; the data layer's
    ``scrape.stale_after`` says how recent).

    If none is fresh (the scraper is down, or every pod is slow to answer /metrics) routing blindly
    beats refusing everything: fail open, as Envoy does when the picker itself is down.
    """

    on_empty = OnEmpty.FAIL_OPEN
    empty_status = 503
    empty_reason = "no endpoint has a fresh scrape"

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]:
        now = ctx.now
        return [e for e in candidates if e.fresh(now)]


@register_filter("subset")
class Subset:
    """The GIE candidate-subset hint: if the request carries one, only those endpoints (else 503)."""

    on_empty = OnEmpty.REFUSE
    empty_status = 503
    empty_reason = "no endpoint in the subset hint"

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]:
        subset = ctx.request.subset
        if subset is None:
            return candidates
        return [e for e in candidates if e.address in subset]


def _threshold(name: str, value: object, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if upper is not None and not 0 < value <= upper:
        raise ValueError(f"{name} must be above 0 and at most {upper}, got {value!r}")
    return float(value)


@register_filter("not_saturated")
class NotSaturated:
    """Endpoints with room, so that affinity never piles work onto an overloaded pod.

    An endpoint is saturated when its scraped queue reaches ``queue_threshold`` or its KV-cache use
    reaches ``kv_cache_threshold`` (5 and 0.95; GIE's are 5 and 0.8). vLLM's KV use counts the blocks of
    running requests only, so a few long prompts fill it: with 3,000-token prompts, five running requests on
    a 1,000-block replica reach 0.8, and a threshold there takes the replica holding a tenant's prefix out
    of the choice whenever it serves that tenant, which sends the tenant's next requests to replicas that
    must recompute it (docs/peers.md, tuning log: with prefix weight 4, 0.95 raised the hit rate on uniform
    tenants by 1-3 points, TTFT no worse).

    ``pending`` (requests sent since the last scrape) is left out on purpose: most of them are already
    running or done by the next scrape, and at a few hundred requests per second per endpoint they alone
    would cross any small threshold and turn every endpoint "saturated" between two scrapes.

    When every endpoint is saturated: 429 if ``shed`` (let the client back off), otherwise route anyway
    and let the scorers pick the least bad one.
    """

    empty_status = 429
    empty_reason = "every endpoint is saturated"

    def __init__(self, queue_threshold: float = 5, kv_cache_threshold: float = 0.95, shed: bool = False) -> None:
        self.queue_threshold = _threshold("queue_threshold", queue_threshold)
        self.kv_cache_threshold = _threshold("kv_cache_threshold", kv_cache_threshold, upper=1.0)
        if not isinstance(shed, bool):
            raise ValueError(f"shed must be true or false, got {shed!r}")
        self.shed = shed
        self.on_empty = OnEmpty.REFUSE if shed else OnEmpty.BYPASS

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]:
        q, kv = self.queue_threshold, self.kv_cache_threshold
        return [e for e in candidates if e.waiting < q and e.kv_usage < kv]
