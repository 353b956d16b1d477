"""The picker's own Prometheus metrics, served on their own port.

Two kinds, kept apart because they cost differently:

- per-request counters and histograms (`Telemetry`), updated on the request path through cached label
  children, a few hundred nanoseconds each;
- the state the scheduler works on (endpoint load, scrape health, configured split weights, and what each
  scheduling plugin exports about itself, e.g. the prefix index), read only when Prometheus scrapes
  (`StateCollector`), so the request path pays nothing for it and endpoints that leave their pool leave
  the output with them.

Where the Gateway API Inference Extension's picker exports the same figure, the GIE name and labels are
used (``inference_objective_*``, ``inference_pool_*``, ``inference_extension_prefix_indexer_*``), so its
dashboards carry over; everything else is ``extproc_*``. Every label value comes from configuration or
from the endpoint set (pools, served models, Envoy route names, endpoint addresses, HTTP statuses): never
from a prompt or a client's free text, so the series count stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from extproc import names
from extproc.config import parse_host_port
from extproc.gateway.context import BY_MODEL_ROUTE
from extproc.tls import CertificateFiles, serve_https

if TYPE_CHECKING:
    from extproc.config import Config
    from extproc.datalayer.scrape import ScrapeStats
    from extproc.datalayer.table import EndpointTable
    from extproc.scheduling.scheduler import Scheduler

# Decisions take tens of microseconds; the buckets must resolve that.
DECISION_BUCKETS = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.000075,
    0.0001,
    0.00015,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)


def route_label(route_name: str | None) -> str:
    """The ``route`` label of a request: Envoy's route name, except the pre-decision default route."""
    if not route_name or route_name == names.DEFAULT_ROUTE:
        return BY_MODEL_ROUTE
    return route_name


class Telemetry:
    """Per-request metrics. Children are cached: ``labels()`` costs a lock and a tuple hash per call."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "extproc_requests",
            "Requests the picker handled, by pool, served model, Envoy route and outcome "
            "(picked, fallback = routed while failing open, or the HTTP status the picker answered with).",
            ["pool", "model", "route", "outcome"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "extproc_decision_duration_seconds",
            "Time to parse a request and pick its endpoint (body parse, prompt hashing, scheduling).",
            ["pool"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.picks = Counter(
            "extproc_endpoint_picks", "Requests sent to each endpoint (as the pick).", ["pool", "endpoint"], registry=r
        )
        self.objective_requests = Counter(
            "inference_objective_request",
            "Routed requests by the model asked for and the model served (GIE name).",
            ["model_name", "target_model_name"],
            registry=r,
        )
        self.objective_errors = Counter(
            "inference_objective_request_error",
            "Requests the picker refused, by model and HTTP status (GIE name).",
            ["model_name", "target_model_name", "error_code"],
            registry=r,
        )
        self.plugin_errors = Counter(
            "extproc_plugin_errors",
            "Requests on which a scheduling plugin raised (routed by load instead), by the plugin's configured name.",
            ["plugin"],
            registry=r,
        )
        self.late_replies = Counter(
            "extproc_late_replies",
            "Replies written to an ext_proc stream its client (Envoy) had just ended, refused by gRPC: a race with a "
            "departing client, nothing lost; a steady rate means Envoy gives up on the picker (message_timeout).",
            registry=r,
        )
        self._decision_children: dict[str, Any] = {}
        self._request_children: dict[tuple[str, str, str, str], Any] = {}
        self._pick_children: dict[tuple[str, str], Any] = {}
        self._objective_children: dict[tuple[str, str], Any] = {}

    def decided(self, pool: str, seconds: float) -> None:
        child = self._decision_children.get(pool)
        if child is None:
            child = self._decision_children[pool] = self.decision_seconds.labels(pool)
        child.observe(seconds)

    def routed(
        self,
        pool: str,
        asked: str,
        model: str,
        route: str,
        endpoint: str,
        fail_open: bool,
    ) -> None:
        """A routed request: ``asked`` is the model the client named (a served one, ``auto`` or ""), ``model`` the
        model served."""
        self._count_request(pool, model, route, "fallback" if fail_open else "picked")
        key = (pool, endpoint)
        child = self._pick_children.get(key)
        if child is None:
            child = self._pick_children[key] = self.picks.labels(pool, endpoint)
        child.inc()
        objective_key = (asked, model)
        child = self._objective_children.get(objective_key)
        if child is None:
            child = self._objective_children[objective_key] = self.objective_requests.labels(asked, model)
        child.inc()

    def refused(self, pool: str, asked: str, model: str, route: str, status: int) -> None:
        """A request the picker answered itself (the error path: no child cache needed)."""
        code = str(status)
        self._count_request(pool, model, route, code)
        self.objective_errors.labels(asked, model, code).inc()

    def plugin_failed(self, plugin: str) -> None:
        """A scheduling plugin raised on a request (the error path: no child cache needed)."""
        self.plugin_errors.labels(plugin).inc()

    def forget_endpoint(self, address: str) -> None:
        """Drop an endpoint's series once it left every pool: pod addresses churn, series must not pile up."""
        for key in [k for k in self._pick_children if k[1] == address]:
            del self._pick_children[key]
            self.picks.remove(*key)

    def _count_request(self, pool: str, model: str, route: str, outcome: str) -> None:
        key = (pool, model, route, outcome)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(pool, model, route, outcome)
        child.inc()

    def watch(self, collector: StateCollector) -> None:
        self.registry.register(collector)

    def serve(self, listen: str, tls: CertificateFiles | None = None) -> None:
        """Serve /metrics on ``listen``: plaintext, or over TLS following ``tls``'s files (server.tls)."""
        host, port = parse_host_port(listen, "metrics_listen")
        try:
            if tls is None:
                start_http_server(port, addr=host, registry=self.registry)
            else:
                serve_https(host, port, make_wsgi_app(self.registry), tls)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None


SCRAPE_RESULTS = ("timeout", "connect", "status", "parse")


class StateCollector:
    """What the scheduler sees, read at Prometheus scrape time (on the metrics server's thread).

    It only reads: plain attribute reads and ``list()`` copies of dicts the event loop owns, which the GIL
    keeps consistent enough for a gauge.
    """

    def __init__(
        self,
        config: Config,
        table: EndpointTable,
        scrape_stats: dict[str, ScrapeStats],
        scheduler: Scheduler,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._table = table
        self._scrape_stats = scrape_stats
        self._scheduler = scheduler
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        labels = ["pool", "endpoint"]
        waiting = GaugeMetricFamily(
            "extproc_endpoint_waiting_requests", "Requests waiting at the endpoint, as last scraped.", labels=labels
        )
        running = GaugeMetricFamily(
            "extproc_endpoint_running_requests", "Requests running at the endpoint, as last scraped.", labels=labels
        )
        pending = GaugeMetricFamily(
            "extproc_endpoint_pending_requests",
            "Requests the picker sent to the endpoint since its last scrape.",
            labels=labels,
        )
        kv = GaugeMetricFamily(
            "extproc_endpoint_kv_cache_usage_ratio", "KV-cache use (0-1), as last scraped.", labels=labels
        )
        up = GaugeMetricFamily(
            "extproc_endpoint_up", "1 if the endpoint's latest scrape succeeded and is fresh, else 0.", labels=labels
        )
        age = GaugeMetricFamily(
            "extproc_endpoint_scrape_age_seconds", "Seconds since the endpoint's last good scrape.", labels=labels
        )
        scrapes = CounterMetricFamily(
            "extproc_endpoint_scrapes",
            "Scrapes of the endpoint's /metrics by result (success, timeout, connect, status, parse; shared: "
            "skipped, another replica's scrape had just arrived).",
            labels=[*labels, "result"],
        )
        per_pod_queue = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size",
            "Requests waiting at each endpoint of the pool (GIE name).",
            labels=["name", "model_server_pod"],
        )
        ready = GaugeMetricFamily("inference_pool_ready_pods", "Fresh endpoints (GIE name).", labels=["name"])
        avg_queue = GaugeMetricFamily(
            "inference_pool_average_queue_size", "Mean waiting requests over the pool (GIE name).", labels=["name"]
        )
        avg_kv = GaugeMetricFamily(
            "inference_pool_average_kv_cache_utilization", "Mean KV-cache use of the pool (GIE name).", labels=["name"]
        )
        stats = dict(list(self._scrape_stats.items()))
        members: dict[str, list[str]] = {}
        for pool in self._table.pools():
            states = self._table.pool_endpoints(pool)
            members[pool] = [e.address for e in states]
            fresh = 0
            for e in states:
                values = [pool, e.address]
                waiting.add_metric(values, e.waiting)
                running.add_metric(values, e.running)
                pending.add_metric(values, e.pending)
                kv.add_metric(values, e.kv_usage)
                is_fresh = e.fresh(now)
                fresh += is_fresh
                up.add_metric(values, 1.0 if is_fresh else 0.0)
                if e.scraped_at is not None:
                    age.add_metric(values, max(0.0, now - e.scraped_at))
                per_pod_queue.add_metric([pool, e.address], e.waiting)
                s = stats.get(e.address)
                if s is not None:
                    scrapes.add_metric([*values, "success"], s.successes)
                    scrapes.add_metric([*values, "shared"], s.shared)
                    by_kind = dict(s.errors_by_kind)
                    for result in SCRAPE_RESULTS:
                        scrapes.add_metric([*values, result], by_kind.get(result, 0))
            ready.add_metric([pool], fresh)
            if states:
                avg_queue.add_metric([pool], sum(e.waiting for e in states) / len(states))
                avg_kv.add_metric([pool], sum(e.kv_usage for e in states) / len(states))
        weights = GaugeMetricFamily(
            "extproc_split_weight_ratio",
            "Configured share (0-1) of each arm of a weighted split route.",
            labels=["route", "pool"],
        )
        for split in self._config.splits:
            total = sum(b.weight for b in split.backends) or 1
            route = names.split_route_name(split.name)
            for backend in split.backends:
                weights.add_metric([route, backend.pool], backend.weight / total)
        yield from (waiting, running, pending, kv, up, age, scrapes, per_pod_queue, ready, avg_queue, avg_kv)
        yield weights
        yield from self._scheduler.collect_metrics(members)
