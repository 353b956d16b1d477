"""The demo's summary as one JSON-ready dict: from the traffic's outcomes and two snapshots of the processes.

What is printed, written with ``--json`` and tabled in the ``--report`` is read from this dict alone, so
they never disagree.

Where each figure comes from:

* requests, latencies and the A/B counts: the load generator itself, per response: the HTTP status, the
  wall time from sending the request to reading the whole answer (client-side end to end), the body's
  ``model`` and the headers Envoy adds (``x-gateway-upstream-host``: the replica; ``x-gateway-pool``
  when the gateway sends it);
* which pool served an A/B request: ``x-gateway-pool`` if present, else the response's ``model``, else
  the replica's pool; a response whose model and replica disagree counts as a mismatch;
* the A/B share: only requests *without* ``x-user-id`` (independent draws), with a Wilson score 95%
  interval; sticky users are reported separately (how many always got the same pool);
* routing overhead: ``x-gateway-routing-us``, which Envoy fills per request with the time from the last
  byte of the request to the first byte sent upstream (``%COMMON_DURATION(DS_RX_END:US_TX_BEG:us)%``): the
  ext_proc round trip with the pick, the route re-evaluation and getting an upstream connection. Without
  that header: the client-side end to end minus Envoy's ``x-envoy-upstream-service-time`` (everything but
  the model server: Envoy, the ext_proc and the client's own HTTP stack; 1 ms resolution, so an upper
  bound). Both come with the picker's own decision time (``extproc_decision_duration_seconds``, from its
  ``/metrics``) and the p50/p95 of Envoy's downstream and upstream request-time histograms;
* prefix-cache hit rate: ``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`` from every
  simulator's ``/metrics``, the increase over the run summed per pool (tokens, as vLLM counts them).

JSON (``--json PATH``), stable keys; times in ms, shares in 0..1, ``null`` where nothing was measured:

* ``version`` (1), ``interrupted`` (bool), ``gateway`` (URL), ``rate_target`` (req/s), ``duration_s``
  (traffic time), ``seed``;
* ``phases``: list of ``{name, title, start_s, duration_s, requests, ok, failed}`` (``name``: ``path-routing``,
  ``ab-split``, ``load-test``);
* ``requests``: ``{sent, ok, failed, failed_by_status: {status: n}, errors: [first distinct messages],
  not_sent, cancelled}`` (status ``0`` = no HTTP answer; ``not_sent``: the generator's in-flight cap);
* ``by_route``: ``{route: {path, requests, ok, failed}}`` for routes ``1b``, ``3b``, ``ab-test``;
* ``by_model``: ``{model: {pool, requests, latency_ms: {count, mean, p50, p95, p99, max},
  expected_latency_ms: [lo, hi] or null, p50_in_expected: bool or null, prefix_cache: {hit_rate,
  hit_tokens, query_tokens}, cached_prompt_share}}``: ``requests`` counts successful answers by the model
  that served them (so A/B requests count under the drawn model); ``cached_prompt_share`` is the share of
  prompt tokens the responses' ``usage.prompt_tokens_details.cached_tokens`` reported as cached;
* ``by_replica``: ``{address: {name, pool, model, requests, picker_picks, engine_requests,
  prefix_cache_hit_rate}}``: ``requests`` from ``x-gateway-upstream-host``, ``picker_picks`` from the
  picker's ``extproc_endpoint_picks_total``, ``engine_requests`` from the replica's
  ``vllm:request_success_total``;
* ``ab_split``: ``{route, path, weights: {pool: weight}, target_share: {pool: share}, requests (all
  successful A/B answers), independent_requests, served: {pool: n}, observed_share: {pool: share},
  ci95: {pool: [lo, hi]}, target_in_ci95: {pool: bool}, pool_source: {source: n}, mismatches,
  sticky: {header, users, requests, consistent_users, users_by_pool: {pool: n}}}``;
* ``routing_overhead``: ``{target_ms (10), source ("x-gateway-routing-us" or
  "client-minus-upstream-service-time" or null), count, p50_ms, p95_ms, p99_ms, mean_ms, p95_below_target,
  picker_decision_ms: {count, mean, p50, p95}, envoy_ms: {downstream_p50, downstream_p95,
  upstream_p50: {pool: ms}, upstream_p95: {pool: ms}}}``;
* ``models_endpoint``: ``{status, models}`` of ``GET /v1/models`` through the gateway;
* ``expected``: the write-up's figures: ``{latency_ms: {pool: [lo, hi]}, routing_overhead_ms, ab_split}``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extproc import stats
from extproc.local.demo.snapshots import Snapshot
from extproc.local.demo.traffic import Outcome, Traffic
from extproc.local.multi_model import AB_ROUTE, AB_WEIGHTS, STICKY_HEADER

# The write-up's "Expected Results".
EXPECTED_LATENCY_MS: dict[str, tuple[float, float]] = {"1b": (50.0, 100.0), "3b": (100.0, 200.0)}
ROUTING_TARGET_MS = 10.0


def _round(value: float | None, digits: int = 3) -> float | None:
    """Rounded for the JSON; None for nothing measured (None, or NaN: `stats.percentile` of no values)."""
    return None if value is None or math.isnan(value) else round(value, digits)


def _latency_stats(values: Sequence[float]) -> dict[str, Any]:
    """Count, mean, p50/p95/p99 and max of ``values`` (ms); None for each when there are none."""
    return {
        "count": len(values),
        "mean": _round(sum(values) / len(values)) if values else None,
        "p50": _round(stats.percentile(values, 0.5)),
        "p95": _round(stats.percentile(values, 0.95)),
        "p99": _round(stats.percentile(values, 0.99)),
        "max": _round(max(values)) if values else None,
    }


@dataclass
class RunInfo:
    gateway: str
    rate: float
    seed: int
    pools: dict[str, str]  # pool -> model
    replicas: dict[str, tuple[str, str]]  # address -> (pool, name)


def summarize(
    traffic: Traffic, before: Snapshot, after: Snapshot, info: RunInfo, models: dict[str, Any]
) -> dict[str, Any]:
    outcomes = traffic.outcomes
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    errors: list[str] = []
    for o in failed:
        message = o.error or f"HTTP {o.status}"
        if message not in errors and len(errors) < 5:
            errors.append(message)
    duration = max((p.end for p in traffic.phases), default=0.0)

    phases = []
    for record in traffic.phases:
        mine = [o for o in outcomes if o.phase == record.name]
        n_ok = sum(o.ok for o in mine)
        phases.append(
            {
                "name": record.name,
                "title": record.title,
                "start_s": _round(record.start, 2),
                "duration_s": _round(record.end - record.start, 2),
                "requests": len(mine),
                "ok": n_ok,
                "failed": len(mine) - n_ok,
            }
        )

    by_route: dict[str, Any] = {}
    for route in [*info.pools, AB_ROUTE]:
        mine = [o for o in outcomes if o.route == route]
        n_ok = sum(o.ok for o in mine)
        by_route[route] = {
            "path": f"/v1/{route}/chat/completions",
            "requests": len(mine),
            "ok": n_ok,
            "failed": len(mine) - n_ok,
        }

    # Prefix cache and engine counters: the increase over the run, per replica and per pool.
    def delta(address: str, name: str) -> float:
        return after.sims.get(address, {}).get(name, 0.0) - before.sims.get(address, {}).get(name, 0.0)

    pool_hits: Counter[str] = Counter()
    pool_queries: Counter[str] = Counter()
    for address, (pool, _name) in info.replicas.items():
        pool_hits[pool] += delta(address, "vllm:prefix_cache_hits_total")
        pool_queries[pool] += delta(address, "vllm:prefix_cache_queries_total")

    by_model: dict[str, Any] = {}
    for pool, model in info.pools.items():
        served = [o for o in ok if o.pool == pool]
        latencies = [o.latency_ms for o in served]
        latency = _latency_stats(latencies)
        expected = EXPECTED_LATENCY_MS.get(pool)
        prompt = sum(o.prompt_tokens for o in served)
        by_model[model] = {
            "pool": pool,
            "requests": len(served),
            "latency_ms": latency,
            "expected_latency_ms": list(expected) if expected else None,
            "p50_in_expected": (expected[0] <= latency["p50"] <= expected[1])
            if expected and latency["p50"] is not None
            else None,
            "prefix_cache": {
                "hit_rate": _round(pool_hits[pool] / pool_queries[pool], 4) if pool_queries[pool] else None,
                "hit_tokens": int(pool_hits[pool]),
                "query_tokens": int(pool_queries[pool]),
            },
            "cached_prompt_share": _round(sum(o.cached_tokens for o in served) / prompt, 4) if prompt else None,
        }

    picks_before = _picker_picks(before)
    picks_after = _picker_picks(after)
    replica_requests = Counter(o.replica for o in ok if o.replica)
    by_replica: dict[str, Any] = {}
    for address, (pool, name) in info.replicas.items():
        queries = delta(address, "vllm:prefix_cache_queries_total")
        by_replica[address] = {
            "name": name,
            "pool": pool,
            "model": info.pools[pool],
            "requests": replica_requests.get(address, 0),
            "picker_picks": int(picks_after.get(address, 0) - picks_before.get(address, 0)),
            "engine_requests": int(delta(address, "vllm:request_success_total")),
            "prefix_cache_hit_rate": _round(delta(address, "vllm:prefix_cache_hits_total") / queries, 4)
            if queries
            else None,
        }

    return {
        "version": 1,
        "interrupted": traffic.interrupted,
        "gateway": info.gateway,
        "rate_target": info.rate,
        "duration_s": _round(duration, 2),
        "seed": info.seed,
        "phases": phases,
        "requests": {
            "sent": traffic.sent,
            "ok": len(ok),
            "failed": len(failed),
            "failed_by_status": {str(k): v for k, v in sorted(Counter(o.status for o in failed).items())},
            "errors": errors,
            "not_sent": traffic.not_sent,
            "cancelled": traffic.cancelled,
        },
        "by_route": by_route,
        "by_model": by_model,
        "by_replica": by_replica,
        "ab_split": _ab_summary(outcomes, info),
        "routing_overhead": _overhead_summary(ok, before, after, info),
        "models_endpoint": models,
        "expected": {
            "latency_ms": {pool: list(r) for pool, r in EXPECTED_LATENCY_MS.items()},
            "routing_overhead_ms": ROUTING_TARGET_MS,
            "ab_split": dict(AB_WEIGHTS),
        },
    }


def _picker_picks(snap: Snapshot) -> dict[str, float]:
    picks: dict[str, float] = defaultdict(float)
    for name, labels, value in snap.picker:
        if name == "extproc_endpoint_picks_total":
            picks[labels.get("endpoint", "")] += value
    return picks


def _ab_summary(outcomes: Sequence[Outcome], info: RunInfo) -> dict[str, Any]:
    ab = [o for o in outcomes if o.route == AB_ROUTE and o.ok and o.pool]
    independent = [o for o in ab if o.user is None]
    served = Counter(o.pool for o in independent)
    n = len(independent)
    total_weight = sum(AB_WEIGHTS.values())
    observed: dict[str, float | None] = {}
    ci: dict[str, list[float] | None] = {}
    inside: dict[str, bool | None] = {}
    for pool, weight in AB_WEIGHTS.items():
        observed[pool] = _round(served[pool] / n, 4) if n else None
        interval = stats.wilson_interval(served[pool], n)
        ci[pool] = [round(interval[0], 4), round(interval[1], 4)] if interval else None
        inside[pool] = (interval[0] <= weight / total_weight <= interval[1]) if interval else None
    users: dict[str, set[str]] = defaultdict(set)
    sticky = [o for o in ab if o.user is not None]
    for o in sticky:
        users[o.user or ""].add(o.pool or "")
    consistent = [next(iter(p)) for p in users.values() if len(p) == 1]
    return {
        "route": AB_ROUTE,
        "path": f"/v1/{AB_ROUTE}/chat/completions",
        "weights": dict(AB_WEIGHTS),
        "target_share": {pool: round(w / total_weight, 4) for pool, w in AB_WEIGHTS.items()},
        "requests": len(ab),
        "independent_requests": n,
        "served": {pool: served[pool] for pool in AB_WEIGHTS},
        "observed_share": observed,
        "ci95": ci,
        "target_in_ci95": inside,
        "pool_source": dict(Counter(o.pool_source for o in ab if o.pool_source)),
        "mismatches": sum(o.mismatch for o in ab),
        "sticky": {
            "header": STICKY_HEADER,
            "users": len(users),
            "requests": len(sticky),
            "consistent_users": len(consistent),
            "users_by_pool": {pool: consistent.count(pool) for pool in AB_WEIGHTS},
        },
    }


def _decision_buckets(snap: Snapshot) -> dict[float, float]:
    buckets: dict[float, float] = defaultdict(float)
    for name, labels, value in snap.picker:
        if name == "extproc_decision_duration_seconds_bucket":
            buckets[float(labels["le"])] += value
    return buckets


def _overhead_summary(ok: Sequence[Outcome], before: Snapshot, after: Snapshot, info: RunInfo) -> dict[str, Any]:
    header = [o.routing_us / 1000 for o in ok if o.routing_us is not None]
    outside = [o.latency_ms - o.upstream_ms for o in ok if o.upstream_ms is not None]
    if ok and len(header) >= 0.9 * len(ok):
        source, values = "x-gateway-routing-us", header
    elif outside:
        source, values = "client-minus-upstream-service-time", [max(0.0, v) for v in outside]
    else:
        source, values = None, []
    b0, b1 = _decision_buckets(before), _decision_buckets(after)
    buckets = [(le, b1[le] - b0.get(le, 0.0)) for le in b1]
    count = max((c for _, c in buckets), default=0.0)
    decision_sum = sum(v for n, _, v in after.picker if n == "extproc_decision_duration_seconds_sum") - sum(
        v for n, _, v in before.picker if n == "extproc_decision_duration_seconds_sum"
    )

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 4)

    def envoy_q(name: str, q: float) -> float | None:
        values = after.envoy.get(name)
        if not values or q not in after.envoy_quantiles:
            return None
        value = values[after.envoy_quantiles.index(q)]
        return None if value is None else round(float(value), 3)

    p95 = _round(stats.percentile(values, 0.95))
    return {
        "target_ms": ROUTING_TARGET_MS,
        "source": source,
        "count": len(values),
        "p50_ms": _round(stats.percentile(values, 0.5)),
        "p95_ms": p95,
        "p99_ms": _round(stats.percentile(values, 0.99)),
        "mean_ms": _round(sum(values) / len(values)) if values else None,
        "p95_below_target": None if p95 is None else p95 < ROUTING_TARGET_MS,
        "picker_decision_ms": {
            "count": int(count),
            "mean": ms(decision_sum / count) if count else None,
            "p50": ms(stats.histogram_quantile(buckets, 0.5)) if count else None,
            "p95": ms(stats.histogram_quantile(buckets, 0.95)) if count else None,
        },
        "envoy_ms": {
            "downstream_p50": envoy_q("http.gateway.downstream_rq_time", 50),
            "downstream_p95": envoy_q("http.gateway.downstream_rq_time", 95),
            "upstream_p50": {p: envoy_q(f"cluster.pool-{p}.upstream_rq_time", 50) for p in info.pools},
            "upstream_p95": {p: envoy_q(f"cluster.pool-{p}.upstream_rq_time", 95) for p in info.pools},
        },
    }
