"""The picker's own Prometheus metrics, served on their own port."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from extproc.config import parse_host_port

# Decisions take tens of microseconds; the buckets must resolve that.
DECISION_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
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


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "extproc_requests",
            "Requests the picker handled, by pool, model and outcome (picked, fallback, or an HTTP status).",
            ["pool", "model", "outcome"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "extproc_decision_duration_seconds",
            "Time to parse a request and pick its endpoint, per request.",
            ["pool"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.picks = Counter(
            "extproc_endpoint_picks", "Requests sent to each endpoint (as the pick).", ["pool", "endpoint"], registry=r
        )

        # labels() costs a lock and a tuple hash per call; the request path reuses the children.
        self._decision_children: dict[str, Any] = {}
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self._pick_children: dict[tuple[str, str], Any] = {}

    def decided(self, pool: str, seconds: float) -> None:
        child = self._decision_children.get(pool)
        if child is None:
            child = self._decision_children[pool] = self.decision_seconds.labels(pool)
        child.observe(seconds)

    def routed(self, pool: str, model: str, endpoint: str, fail_open: bool) -> None:
        self._count_request(pool, model, "fallback" if fail_open else "picked")
        key = (pool, endpoint)
        child = self._pick_children.get(key)
        if child is None:
            child = self._pick_children[key] = self.picks.labels(pool, endpoint)
        child.inc()

    def refused(self, pool: str, model: str, status: int) -> None:
        self._count_request(pool, model, str(status))

    def _count_request(self, pool: str, model: str, outcome: str) -> None:
        key = (pool, model, outcome)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(pool, model, outcome)
        child.inc()

    def serve(self, listen: str) -> None:
        host, port = parse_host_port(listen, "metrics_listen")
        start_http_server(port, addr=host, registry=self.registry)
