"""`extproc dashboards`: the four Grafana dashboards of the write-up, generated from this one module.

The dashboards are Python data rather than hand-edited JSON so that every query can be listed
(`panel_queries`), parsed by ``promtool`` and run against a real Prometheus in tests, and so that the
committed JSON under ``grafana/dashboards`` can be checked for staleness. Each dashboard has a single
template variable, the Prometheus data source (default uid ``prometheus``, as provisioned from
``grafana/provisioning``), so every expression is evaluable as is once ``$__rate_interval`` is substituted.

Dashboards (file name: title):

* ``gateway-traffic-distribution.json``: Gateway Traffic Distribution
* ``multi-model-performance-comparison.json``: Multi-Model Performance Comparison
* ``resource-utilization-by-model.json``: Resource Utilization by Model
* ``ab-test-traffic-analysis.json``: A/B Test Traffic Analysis

See docs/dashboards.md for the panels and how to open them.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Json = dict[str, Any]

DATASOURCE: Json = {"type": "prometheus", "uid": "${datasource}"}
DEFAULT_DATASOURCE_UID = "prometheus"
RATE = "$__rate_interval"
GRID_WIDTH = 24
SCHEMA_VERSION = 39
TAG = "extproc-router"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "grafana" / "dashboards"

# Selectors shared by several panels.
POOL_CLUSTERS = 'envoy_cluster_name=~"pool-.*"'
GATEWAY_HCM = 'envoy_http_conn_manager_prefix="gateway"'
GATEWAY_VHOST = 'envoy_virtual_host="gateway"'
SPLIT_ROUTES = 'route=~".+-split"'
ROUTED = 'outcome=~"picked|fallback"'


@dataclass(frozen=True)
class PanelQuery:
    """One panel query, ready to send to Prometheus (``$__rate_interval`` already substituted)."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str


@dataclass(frozen=True)
class Query:
    """A PromQL expression and its Grafana legend template."""

    expr: str
    legend: str = ""


# ---------------------------------------------------------------------------------------------------------
# PromQL helpers: keep the long expressions readable and the rate window uniform.


def _sel(metric: str, selector: str = "") -> str:
    return f"{metric}{{{selector}}}" if selector else metric


def _rate(metric: str, selector: str = "") -> str:
    return f"rate({_sel(metric, selector)}[{RATE}])"


def _sum_rate(metric: str, by: str = "", selector: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} ({_rate(metric, selector)})"


def _quantile(q: float, histogram: str, by: str, selector: str = "") -> str:
    return f"histogram_quantile({q}, {_sum_rate(histogram + '_bucket', f'le, {by}', selector)})"


def _mean(histogram: str, by: str = "", selector: str = "") -> str:
    """Mean of a histogram over the window: rate of the sum over rate of the count."""
    return f"{_sum_rate(histogram + '_sum', by, selector)} / {_sum_rate(histogram + '_count', by, selector)}"


def _or_zero_like(expr: str, by: str, denominator: str) -> str:
    """``expr``, or 0 for each ``by`` group of ``denominator`` where ``expr`` has no series (lazy counters)."""
    return f"({expr} or (0 * sum by ({by}) ({denominator})))"


# ---------------------------------------------------------------------------------------------------------
# Panel builders. Grid positions are filled in by `_layout`; ids and refIds too.


def _targets(queries: Sequence[Query]) -> list[Json]:
    return [
        {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "range": True,
            "refId": string.ascii_uppercase[i],
        }
        for i, q in enumerate(queries)
    ]


def _panel(kind: str, title: str, description: str, w: int, h: int, queries: Sequence[Query]) -> Json:
    panel: Json = {
        "type": kind,
        "title": title,
        "description": description,
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
    }
    if queries:
        panel["datasource"] = DATASOURCE
        panel["targets"] = _targets(queries)
    return panel


def _defaults(unit: str, min_: float | None, max_: float | None, decimals: int | None) -> Json:
    defaults: Json = {
        "color": {"mode": "palette-classic"},
        "unit": unit,
        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if decimals is not None:
        defaults["decimals"] = decimals
    return defaults


def _override_ref(ref_id: str, **properties: Any) -> Json:
    return {
        "matcher": {"id": "byFrameRefID", "options": ref_id},
        "properties": [{"id": key.replace("__", "."), "value": value} for key, value in properties.items()],
    }


DASHED = {"fill": "dash", "dash": [10, 10]}


def timeseries(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    min_: float | None = 0,
    max_: float | None = None,
    overrides: Sequence[Json] = (),
    stack: bool = False,
) -> Json:
    """A line chart with a table legend (mean and last), the workhorse of every dashboard."""
    panel = _panel("timeseries", title, description, w, h, queries)
    defaults = _defaults(unit, min_, max_, None)
    defaults["custom"] = {
        "drawStyle": "line",
        "fillOpacity": 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    panel["fieldConfig"] = {"defaults": defaults, "overrides": list(overrides)}
    panel["options"] = {
        "legend": {"calcs": ["mean", "lastNotNull"], "displayMode": "table", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel


def _reduce(calc: str) -> Json:
    return {"calcs": [calc], "fields": "", "values": False}


def stat(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str = "short",
    w: int = 6,
    h: int = 6,
    decimals: int | None = None,
) -> Json:
    """Big numbers for the figures the write-up quotes (latest value over the range)."""
    panel = _panel("stat", title, description, w, h, queries)
    panel["fieldConfig"] = {"defaults": _defaults(unit, None, None, decimals), "overrides": []}
    panel["options"] = {
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": _reduce("lastNotNull"),
        "textMode": "value_and_name",
        "wideLayout": True,
    }
    return panel


def bargauge(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str = "percentunit",
    w: int = 8,
    h: int = 8,
    min_: float = 0,
    max_: float = 1,
) -> Json:
    """Horizontal bars: side-by-side comparison of a few values on one scale (e.g. share vs weight)."""
    panel = _panel("bargauge", title, description, w, h, queries)
    panel["fieldConfig"] = {"defaults": _defaults(unit, min_, max_, 1), "overrides": []}
    panel["options"] = {
        "displayMode": "basic",
        "minVizHeight": 16,
        "minVizWidth": 8,
        "namePlacement": "left",
        "orientation": "horizontal",
        "reduceOptions": _reduce("lastNotNull"),
        "showUnfilled": True,
        "sizing": "auto",
        "valueMode": "color",
    }
    return panel


def piechart(title: str, description: str, queries: Sequence[Query], *, w: int = 8, h: int = 8) -> Json:
    """A donut of the mean rate of each series over the shown range: the share of each slice."""
    panel = _panel("piechart", title, description, w, h, queries)
    panel["fieldConfig"] = {"defaults": _defaults("reqps", None, None, None), "overrides": []}
    panel["options"] = {
        "displayLabels": ["percent"],
        "legend": {"displayMode": "table", "placement": "right", "showLegend": True, "values": ["percent"]},
        "pieType": "donut",
        "reduceOptions": _reduce("mean"),
        "tooltip": {"mode": "single", "sort": "none"},
    }
    return panel


def text(content: str, *, title: str = "About this dashboard", h: int = 4) -> Json:
    """A markdown note at the top: what the dashboard answers and where its numbers come from."""
    panel = _panel("text", title, "", GRID_WIDTH, h, ())
    panel["options"] = {"mode": "markdown", "content": content.strip() + "\n"}
    return panel


def _layout(panels: Iterable[Json]) -> list[Json]:
    """Flow panels left to right, wrapping at the grid width, so positions never overlap; number them."""
    placed: list[Json] = []
    x = y = row_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        grid = panel["gridPos"]
        if x + grid["w"] > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        grid["x"], grid["y"] = x, y
        x += grid["w"]
        row_height = max(row_height, grid["h"])
        panel["id"] = panel_id
        placed.append(panel)
    return placed


def _dashboard(uid: str, title: str, description: str, panels: Iterable[Json], tags: Sequence[str]) -> Json:
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "asDropdown": True,
                "icon": "external link",
                "includeVars": True,
                "keepTime": True,
                "tags": [TAG],
                "targetBlank": False,
                "title": "extproc-router dashboards",
                "type": "dashboards",
            }
        ],
        "panels": _layout(panels),
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": [TAG, *tags],
        "templating": {
            "list": [
                {
                    "current": {"selected": True, "text": "Prometheus", "value": DEFAULT_DATASOURCE_UID},
                    "hide": 0,
                    "includeAll": False,
                    "label": "Data source",
                    "multi": False,
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "skipUrlSync": False,
                    "type": "datasource",
                }
            ]
        },
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# ---------------------------------------------------------------------------------------------------------
# The dashboards.


def _traffic() -> Json:
    requests = "extproc_requests_total"
    return _dashboard(
        "extproc-traffic",
        "Gateway Traffic Distribution",
        "Where the gateway's requests go: per pool and model, per route, per outcome and per endpoint.",
        [
            text(
                """
Where requests go, as the **picker** (`extproc_*`, job `extproc`) and **Envoy** (`envoy_*`, job `envoy`) count them.
The picker counts every request it decided (`outcome` = `picked`, `fallback` while failing open, or the HTTP status
it answered itself); Envoy counts what reached each pool cluster (`pool-<pool>`) and route (`<split>-split`,
`<pool>-by-path`, `<pool>-by-header`, `default`). Rates use `$__rate_interval`. See `docs/dashboards.md`.
"""
            ),
            piechart(
                "Request share by model (picker)",
                "Share of the requests the picker routed (picked or fallback), per served model, averaged over the "
                "shown range. From extproc_requests_total.",
                [Query(_sum_rate(requests, "model", ROUTED), "{{model}}")],
            ),
            timeseries(
                "Requests by pool and model (picker)",
                "Requests per second the picker handled, per pool and model (all outcomes). From "
                "extproc_requests_total.",
                [Query(_sum_rate(requests, "pool, model"), "{{pool}} / {{model}}")],
                unit="reqps",
                w=16,
            ),
            timeseries(
                "Requests by route (picker)",
                "Requests per second per Envoy route as the picker saw it: <split>-split, <pool>-by-path, "
                "<pool>-by-header, or by-model when the pool came from the body's model. From extproc_requests_total.",
                [Query(_sum_rate(requests, "route"), "{{route}}")],
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Requests by outcome (picker)",
                "Requests per second per outcome: picked, fallback (routed while failing open) or the HTTP status "
                "the picker answered itself (400, 404, 413, 429, 503). From extproc_requests_total.",
                [Query(_sum_rate(requests, "outcome"), "{{outcome}}")],
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Envoy requests per pool cluster, by status class",
                "Upstream requests per second Envoy sent to each pool cluster, by response status class. From "
                "envoy_cluster_upstream_rq_xx.",
                [
                    Query(
                        _sum_rate(
                            "envoy_cluster_upstream_rq_xx",
                            "envoy_cluster_name, envoy_response_code_class",
                            POOL_CLUSTERS,
                        ),
                        "{{envoy_cluster_name}} {{envoy_response_code_class}}xx",
                    )
                ],
                unit="reqps",
            ),
            timeseries(
                "Envoy requests per route, by status class",
                "Upstream requests per second per route of the gateway's virtual host, by response status class. "
                "From envoy_vhost_route_upstream_rq_xx.",
                [
                    Query(
                        _sum_rate(
                            "envoy_vhost_route_upstream_rq_xx", "envoy_route, envoy_response_code_class", GATEWAY_VHOST
                        ),
                        "{{envoy_route}} {{envoy_response_code_class}}xx",
                    )
                ],
                unit="reqps",
            ),
            timeseries(
                "Gateway responses by status class (Envoy downstream)",
                "Responses per second the gateway listener sent to clients, by status class, including the answers "
                "the picker gave itself (4xx/5xx without an upstream). From envoy_http_downstream_rq_xx.",
                [
                    Query(
                        _sum_rate("envoy_http_downstream_rq_xx", "envoy_response_code_class", GATEWAY_HCM),
                        "{{envoy_response_code_class}}xx",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Picks per endpoint",
                "Requests per second the picker sent to each vLLM endpoint (ip:port): how evenly the scheduler "
                "spreads load inside a pool. From extproc_endpoint_picks_total.",
                [Query(_sum_rate("extproc_endpoint_picks_total", "pool, endpoint"), "{{pool}} {{endpoint}}")],
                unit="reqps",
            ),
            timeseries(
                "ext_proc streams: failures, timeouts and fail-open",
                "Envoy's ext_proc stream counters on the gateway listener (streams started, failed, message "
                "timeouts, and requests let through by failure_mode_allow) next to the picker's fallback count. "
                "Anything but zero in the last four means requests were routed without a pick.",
                [
                    Query(_sum_rate("envoy_http_ext_proc_streams_started", "", GATEWAY_HCM), "streams started"),
                    Query(
                        f"{_sum_rate('envoy_http_ext_proc_streams_failed', '', GATEWAY_HCM)} or vector(0)",
                        "streams failed",
                    ),
                    Query(
                        f"{_sum_rate('envoy_http_ext_proc_message_timeouts', '', GATEWAY_HCM)} or vector(0)",
                        "message timeouts",
                    ),
                    Query(
                        f"{_sum_rate('envoy_http_ext_proc_failure_mode_allowed', '', GATEWAY_HCM)} or vector(0)",
                        "failure mode allowed (fail-open)",
                    ),
                    Query(_sum_rate(requests, "", 'outcome="fallback"') + " or vector(0)", "picker fallback"),
                ],
                unit="reqps",
            ),
            timeseries(
                "Requested vs served model (Inference Extension metrics)",
                "Requests per second by the model asked for (model_name, may be auto) and the model that served "
                "(target_model_name), and errors by code, under the Gateway API Inference Extension names that "
                "existing dashboards use. From inference_objective_request_total and "
                "inference_objective_request_error_total (0 until an error happens).",
                [
                    Query(
                        _sum_rate("inference_objective_request_total", "model_name, target_model_name"),
                        "{{model_name}} -> {{target_model_name}}",
                    ),
                    Query(
                        _sum_rate(
                            "inference_objective_request_error_total", "model_name, target_model_name, error_code"
                        )
                        + " or vector(0)",
                        "errors {{model_name}} -> {{target_model_name}} {{error_code}}",
                    ),
                ],
                unit="reqps",
            ),
        ],
        ["traffic"],
    )


def _performance() -> Json:
    e2e = "vllm:e2e_request_latency_seconds"
    ttft = "vllm:time_to_first_token_seconds"
    itl = "vllm:inter_token_latency_seconds"
    envoy_upstream = "envoy_cluster_upstream_rq_time"
    gateway_before_upstream = (
        f"({_mean('envoy_http_downstream_rq_time', '', GATEWAY_HCM)}) - ({_mean(envoy_upstream, '', POOL_CLUSTERS)})"
    )
    return _dashboard(
        "extproc-performance",
        "Multi-Model Performance Comparison",
        "Llama-3.2-1B vs Llama-3.2-3B: latency, time to first token, throughput, and what the gateway adds.",
        [
            text(
                """
The write-up expects **1B: ~50-100 ms** and **3B: ~100-200 ms** per request and **sub-10 ms** of gateway overhead.
Model latencies come from vLLM's own histograms (job `vllm`, per `model_name`), upstream times from Envoy (ms), and
the picker's decision time from `extproc_decision_duration_seconds`. Quantiles are over `$__rate_interval`.
vLLM's own buckets are coarse at these speeds (end to end starts at 0.3 s, inter-token at 10 ms), so quantiles below
the first bucket are interpolated and look alike for both models: **the means** (sum / count) are exact.
"""
            ),
            stat(
                "Mean end-to-end latency by model (vLLM)",
                "Mean request latency inside vLLM (queue + prefill + decode) over $__rate_interval, per served model: "
                "exact, unlike quantiles interpolated in vLLM's coarse buckets. From vllm:e2e_request_latency_seconds "
                "(_sum / _count).",
                [Query(_mean(e2e, "model_name"), "{{model_name}}")],
                unit="s",
                w=24,
                h=5,
            ),
            timeseries(
                "End-to-end latency p50 / p95 / p99 and mean by model (vLLM)",
                "Request latency inside vLLM per served model, from arrival to the last token. vLLM's first bucket "
                "is 0.3 s, so quantiles below it are linear interpolations; the mean (D) is exact. From "
                "vllm:e2e_request_latency_seconds.",
                [
                    *(
                        Query(_quantile(q, e2e, "model_name"), f"{{{{model_name}}}} p{int(q * 100)}")
                        for q in (0.5, 0.95, 0.99)
                    ),
                    Query(_mean(e2e, "model_name"), "{{model_name}} mean"),
                ],
                unit="s",
            ),
            timeseries(
                "Time to first token p50 / p95 by model (vLLM)",
                "Time from arrival to the first output token per served model (queue + prefill). From "
                "vllm:time_to_first_token_seconds.",
                [Query(_quantile(q, ttft, "model_name"), f"{{{{model_name}}}} p{int(q * 100)}") for q in (0.5, 0.95)],
                unit="s",
            ),
            timeseries(
                "Inter-token latency p50 / p95 and mean by model (vLLM)",
                "Time between consecutive output tokens per served model: the decode step time, which grows with "
                "model size and batch size. vLLM's first bucket is 10 ms, so quantiles below it are interpolated; the "
                "mean (C) is exact. From vllm:inter_token_latency_seconds.",
                [
                    *(
                        Query(_quantile(q, itl, "model_name"), f"{{{{model_name}}}} p{int(q * 100)}")
                        for q in (0.5, 0.95)
                    ),
                    Query(_mean(itl, "model_name"), "{{model_name}} mean"),
                ],
                unit="s",
            ),
            timeseries(
                "Tokens per second by model (vLLM)",
                "Prompt (prefill) and generated (decode) tokens per second, per served model. From "
                "vllm:prompt_tokens_total and vllm:generation_tokens_total.",
                [
                    Query(_sum_rate("vllm:generation_tokens_total", "model_name"), "{{model_name}} generated"),
                    Query(_sum_rate("vllm:prompt_tokens_total", "model_name"), "{{model_name}} prompt"),
                ],
                unit="short",
            ),
            timeseries(
                "Envoy upstream time p95 per pool",
                "95th percentile of the time from Envoy sending a request to a pool cluster to the end of its "
                "response, as Envoy measures it (ms; includes the network to the model server). From "
                "envoy_cluster_upstream_rq_time.",
                [
                    Query(
                        _quantile(0.95, envoy_upstream, "envoy_cluster_name", POOL_CLUSTERS),
                        "{{envoy_cluster_name}} p95",
                    )
                ],
                unit="ms",
                w=8,
            ),
            timeseries(
                "Gateway time before upstream (mean, Envoy)",
                "Time the ext_proc adds per request as Envoy measures it. Envoy has no ext_proc latency histogram, so "
                "this is a MEAN DIFFERENCE, not a per-request histogram: the mean downstream request time of the "
                "gateway listener minus the mean upstream time of the pool clusters (ms), i.e. body buffering, the "
                "ext_proc round trip with the pick, and routing. From envoy_http_downstream_rq_time and "
                "envoy_cluster_upstream_rq_time. The picker's own share is in the panel to the right.",
                [Query(gateway_before_upstream, "downstream - upstream (mean)")],
                unit="ms",
                min_=None,
                w=8,
            ),
            timeseries(
                "Picker decision time p50 / p99",
                "The picker's own per-request time to parse the body and pick an endpoint, per pool (a part of the "
                "gateway time in the panel to the left). From extproc_decision_duration_seconds.",
                [
                    Query(_quantile(q, "extproc_decision_duration_seconds", "pool"), f"{{{{pool}}}} p{int(q * 100)}")
                    for q in (0.5, 0.99)
                ],
                unit="s",
                w=8,
            ),
        ],
        ["performance"],
    )


GPU_DESCRIPTION = (
    "GPU utilisation (percent, left axis) per model from the DCGM exporter's DCGM_FI_DEV_GPU_UTIL, averaged over "
    "the model's GPUs; this assumes your scrape config relabels a model_name label onto each GPU's series from the "
    "pod it serves. Fallback: where DCGM_FI_DEV_GPU_UTIL is absent (the simulator has no GPU) the query falls back "
    "to 100 x vLLM's KV-cache usage per model, so on the simulator this panel shows KV-cache use (%) and running "
    "requests (right axis, from vllm:num_requests_running) instead of GPU utilisation."
)


def _resources() -> Json:
    kv = "vllm:kv_cache_usage_perc"
    hit_rate = (
        f"{_sum_rate('vllm:prefix_cache_hits_total', 'model_name')}"
        f" / {_sum_rate('vllm:prefix_cache_queries_total', 'model_name')}"
    )
    return _dashboard(
        "extproc-resources",
        "Resource Utilization by Model",
        "GPU (or, on the simulator, KV-cache) use, queues and prefix-cache hit rates per model, and the picker's view.",
        [
            text(
                """
Per-model resources from vLLM (job `vllm`, labels `model_name` and `instance` per pod) and, on real clusters, the DCGM
exporter's GPU utilisation. The bottom rows are **the picker's view**: the `extproc_endpoint_*` gauges are what the
scheduler last scraped from each endpoint (`ip:port`), with their age; the prefix index is the picker's own.
"""
            ),
            timeseries(
                "GPU utilisation per model (simulator: KV-cache use and running requests instead)",
                GPU_DESCRIPTION,
                [
                    Query(
                        f"avg by (model_name) (DCGM_FI_DEV_GPU_UTIL) or (100 * avg by (model_name) ({kv}))",
                        "{{model_name}} GPU % (KV-cache % on the simulator)",
                    ),
                    Query("sum by (model_name) (vllm:num_requests_running)", "{{model_name}} running requests"),
                ],
                unit="percent",
                overrides=[_override_ref("B", unit="short", custom__axisPlacement="right")],
            ),
            timeseries(
                "KV-cache use per pod (vLLM)",
                "Share of each pod's KV-cache blocks in use (0-100 %), per pod (instance) and model. From "
                "vllm:kv_cache_usage_perc.",
                [Query(f"max by (instance, model_name) ({kv})", "{{model_name}} {{instance}}")],
                unit="percentunit",
                max_=1,
            ),
            timeseries(
                "Running and waiting requests per model (vLLM)",
                "Requests in the running batch and in the waiting queue, summed over each model's pods. From "
                "vllm:num_requests_running and vllm:num_requests_waiting.",
                [
                    Query("sum by (model_name) (vllm:num_requests_running)", "{{model_name}} running"),
                    Query("sum by (model_name) (vllm:num_requests_waiting)", "{{model_name}} waiting"),
                ],
            ),
            timeseries(
                "Prefix-cache hit rate per model (vLLM)",
                "Share of queried prompt tokens found in vLLM's prefix cache, per model (tokens, as vLLM counts "
                "them). From vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total.",
                [Query(hit_rate, "{{model_name}}")],
                unit="percentunit",
                max_=1,
            ),
            stat(
                "Fresh endpoints per pool (picker)",
                "Endpoints per pool whose last metrics scrape by the picker succeeded and is fresh. From "
                "extproc_endpoint_up.",
                [Query("sum by (pool) (extproc_endpoint_up)", "{{pool}}")],
                w=6,
                h=8,
                decimals=0,
            ),
            timeseries(
                "Picker's view: requests per endpoint",
                "Waiting, running and pending (picked but not yet reported by the server) requests per endpoint, as "
                "the scheduler scores them. From extproc_endpoint_waiting_requests, _running_requests and "
                "_pending_requests.",
                [
                    Query("max by (pool, endpoint) (extproc_endpoint_waiting_requests)", "{{endpoint}} waiting"),
                    Query("max by (pool, endpoint) (extproc_endpoint_running_requests)", "{{endpoint}} running"),
                    Query("max by (pool, endpoint) (extproc_endpoint_pending_requests)", "{{endpoint}} pending"),
                ],
                w=9,
            ),
            timeseries(
                "Picker's view: KV-cache use per endpoint",
                "KV-cache use per endpoint as the scheduler last scraped it, and the pool average under the "
                "Inference Extension name. From extproc_endpoint_kv_cache_usage_ratio and "
                "inference_pool_average_kv_cache_utilization.",
                [
                    Query("max by (pool, endpoint) (extproc_endpoint_kv_cache_usage_ratio)", "{{pool}} {{endpoint}}"),
                    Query("max by (name) (inference_pool_average_kv_cache_utilization)", "{{name}} pool average"),
                ],
                unit="percentunit",
                max_=1,
                w=9,
            ),
            timeseries(
                "Picker's scrapes: age per endpoint",
                "Seconds since the picker's last successful metrics scrape of each endpoint: how stale the view "
                "above is. From extproc_endpoint_scrape_age_seconds.",
                [Query("max by (pool, endpoint) (extproc_endpoint_scrape_age_seconds)", "{{pool}} {{endpoint}}")],
                unit="s",
                w=8,
            ),
            timeseries(
                "Prefix index size per pool (picker)",
                "Blocks in the picker's prefix index per pool (prompt prefixes it remembers per endpoint), and the "
                "index size under the Inference Extension name. From extproc_prefix_index_blocks and "
                "inference_extension_prefix_indexer_size.",
                [
                    Query("max by (pool) (extproc_prefix_index_blocks)", "{{pool}} blocks"),
                    Query("max(inference_extension_prefix_indexer_size)", "indexer size (all pools)"),
                ],
                w=8,
            ),
            timeseries(
                "Prefix match ratio per pool (picker)",
                "Mean share of a request's prompt blocks the picker found in its prefix index for the endpoint it "
                "picked, per pool. From inference_extension_prefix_indexer_hit_ratio (histogram, 0-1).",
                [Query(_mean("inference_extension_prefix_indexer_hit_ratio", "name"), "{{name}}")],
                unit="percentunit",
                max_=1,
                w=8,
            ),
            timeseries(
                "Shared state: Redis and replication lag (pickers with state.backend: redis)",
                "Whether each picker replica reaches Redis (1 = its last command succeeded), and the p50/p99 time "
                "from another replica publishing a pick to this one applying it. From extproc_state_redis_up and "
                "extproc_state_replication_lag_seconds. Empty with state.backend: local.",
                [
                    Query("max by (instance) (extproc_state_redis_up)", "{{instance}} Redis up"),
                    Query(_quantile(0.5, "extproc_state_replication_lag_seconds", "instance"), "{{instance}} lag p50"),
                    Query(_quantile(0.99, "extproc_state_replication_lag_seconds", "instance"), "{{instance}} lag p99"),
                ],
                unit="s",
                overrides=[_override_ref("A", unit="short", custom__axisPlacement="right")],
                w=12,
            ),
            timeseries(
                "Shared state: picks published, applied, dropped and rejected per second",
                "Per picker replica: its picks written to Redis, the other replicas' picks applied, picks lost while "
                "Redis was away (the outbox was full), and stream entries skipped as corrupt or foreign. From "
                "extproc_state_*_total.",
                [
                    Query(_sum_rate("extproc_state_published_picks_total", "instance"), "{{instance}} published"),
                    Query(_sum_rate("extproc_state_applied_picks_total", "instance"), "{{instance}} applied"),
                    Query(_sum_rate("extproc_state_dropped_picks_total", "instance"), "{{instance}} dropped"),
                    Query(_sum_rate("extproc_state_rejected_records_total", "instance"), "{{instance}} rejected"),
                ],
                unit="reqps",
                w=12,
            ),
            timeseries(
                "Precise prefix: KV events indexed per second and index size (precise_prefix)",
                "Per endpoint: blocks its engine reported stored and evicted (vLLM KV-cache events) that the "
                "picker indexed, and the blocks the index holds for it (bounded by the endpoint's KV capacity). "
                "From extproc_kv_events_blocks_*_total and extproc_precise_prefix_index_blocks. Empty without "
                "the precise_prefix scorer.",
                [
                    Query(_sum_rate("extproc_kv_events_blocks_stored_total", "endpoint"), "{{endpoint}} stored/s"),
                    Query(_sum_rate("extproc_kv_events_blocks_removed_total", "endpoint"), "{{endpoint}} removed/s"),
                    Query("max by (endpoint) (extproc_precise_prefix_index_blocks)", "{{endpoint}} index blocks"),
                ],
                unit="short",
                overrides=[_override_ref("C", custom__axisPlacement="right")],
                w=12,
            ),
            timeseries(
                "Precise prefix: event streams live, lag, gaps and replays",
                "Per endpoint: 1 while its event stream is connected and in sequence (else it is scored on the "
                "approximate index), the lag from the engine's batch timestamp to indexing, and sequence gaps "
                "and replays per second. From extproc_precise_prefix_live, extproc_kv_events_lag_seconds, "
                "extproc_kv_events_gaps_total and extproc_kv_events_replays_total.",
                [
                    Query("max by (endpoint) (extproc_precise_prefix_live)", "{{endpoint}} live"),
                    Query("max by (endpoint) (extproc_kv_events_lag_seconds)", "{{endpoint}} lag"),
                    Query(_sum_rate("extproc_kv_events_gaps_total", "endpoint"), "{{endpoint}} gaps/s"),
                    Query(_sum_rate("extproc_kv_events_replays_total", "endpoint"), "{{endpoint}} replays/s"),
                ],
                unit="short",
                w=12,
            ),
        ],
        ["resources"],
    )


def _share(cumulative: bool) -> str:
    """Each split arm's share of its route's routed requests; cumulative since start, or over the window."""
    selector = f"{SPLIT_ROUTES}, {ROUTED}"
    metric = "extproc_requests_total"
    if cumulative:
        part = f"sum by (route, pool) ({metric}{{{selector}}})"
        whole = f"sum by (route) ({metric}{{{selector}}})"
    else:
        part, whole = _sum_rate(metric, "route, pool", selector), _sum_rate(metric, "route", selector)
    return f"{part} / on (route) group_left {whole}"


AB_SHARE_TITLE = "Observed share per arm vs configured weight"


def _ab_test() -> Json:
    requests = "extproc_requests_total"
    weight = Query("max by (route, pool) (extproc_split_weight_ratio)", "{{route}} {{pool}} configured")
    split_total = _rate(requests, SPLIT_ROUTES)
    refused = _sum_rate(requests, "pool", f'{SPLIT_ROUTES}, outcome!~"picked|fallback"')
    cluster_5xx = _sum_rate(
        "envoy_cluster_upstream_rq_xx", "envoy_cluster_name", f'{POOL_CLUSTERS}, envoy_response_code_class="5"'
    )
    cluster_total = _rate("envoy_cluster_upstream_rq_total", POOL_CLUSTERS)
    split_vhost = f'{GATEWAY_VHOST}, envoy_route=~".+-split"'
    return _dashboard(
        "extproc-ab-test",
        "A/B Test Traffic Analysis",
        "Does the traffic split do what it is configured to do? Observed share per arm vs weight, latency and errors.",
        [
            text(
                """
A split route (`/v1/<split>/...`, Envoy route `<split>-split`) draws a pool per request by weight; the picker then
picks the endpoint and counts the request under `route="<split>-split"` and the drawn `pool`. The top row compares
the observed share of each arm with its configured weight (`extproc_split_weight_ratio`); sticky users
(`x-user-id`) keep their arm, so with few users the share deviates more. Latency and errors compare the arms.
"""
            ),
            bargauge(
                AB_SHARE_TITLE,
                "Cumulative share of each arm in its split route's routed requests (picked or fallback) since the "
                "picker started (A), next to the configured weight (B). From extproc_requests_total and "
                "extproc_split_weight_ratio.",
                [Query(_share(cumulative=True), "{{route}} {{pool}} observed"), weight],
                w=8,
                h=9,
            ),
            timeseries(
                "Observed share per arm over time (windowed)",
                "Each arm's share of its split route's routed requests over $__rate_interval (solid) against the "
                "configured weight (dashed). Short windows are noisy at low rates. From extproc_requests_total and "
                "extproc_split_weight_ratio.",
                [Query(_share(cumulative=False), "{{route}} {{pool}} observed"), weight],
                unit="percentunit",
                max_=1,
                w=16,
                h=9,
                overrides=[_override_ref("B", custom__lineStyle=DASHED)],
            ),
            timeseries(
                "Requests per arm (picker)",
                "Requests per second on split routes, per drawn pool and outcome. From extproc_requests_total.",
                [Query(f"sum by (route, pool, outcome) ({split_total})", "{{route}} {{pool}} {{outcome}}")],
                unit="reqps",
                stack=True,
            ),
            timeseries(
                "Split route requests (Envoy)",
                "Upstream requests per second on each split route as Envoy counts them (both arms together). From "
                "envoy_vhost_route_upstream_rq_total.",
                [
                    Query(
                        _sum_rate("envoy_vhost_route_upstream_rq_total", "envoy_route", split_vhost), "{{envoy_route}}"
                    )
                ],
                unit="reqps",
            ),
            timeseries(
                "Latency per arm (p95 and mean)",
                "95th percentile latency per model in vLLM (A; all routes, so arms compare like for like), per pool "
                "cluster in Envoy (B; upstream time, all routes), of each split route as a whole (C), and the exact "
                "vLLM mean per model (D; vLLM's buckets start at 0.3 s, so A is interpolated below that). Seconds. "
                "From vllm:e2e_request_latency_seconds, envoy_cluster_upstream_rq_time and "
                "envoy_vhost_route_upstream_rq_time.",
                [
                    Query(_quantile(0.95, "vllm:e2e_request_latency_seconds", "model_name"), "{{model_name}} vLLM p95"),
                    Query(
                        _quantile(0.95, "envoy_cluster_upstream_rq_time", "envoy_cluster_name", POOL_CLUSTERS)
                        + " / 1000",
                        "{{envoy_cluster_name}} Envoy upstream p95",
                    ),
                    Query(
                        f"{_quantile(0.95, 'envoy_vhost_route_upstream_rq_time', 'envoy_route', split_vhost)} / 1000",
                        "{{envoy_route}} route p95",
                    ),
                    Query(_mean("vllm:e2e_request_latency_seconds", "model_name"), "{{model_name}} vLLM mean"),
                ],
                unit="s",
            ),
            timeseries(
                "Error ratio per arm",
                "Share of split-route requests per drawn pool that the picker answered itself with an error (A), "
                "and share of 5xx responses per pool cluster in Envoy (B; all routes). 0 while nothing fails. From "
                "extproc_requests_total and envoy_cluster_upstream_rq_xx / _total.",
                [
                    Query(
                        f"{_or_zero_like(refused, 'pool', split_total)} / sum by (pool) ({split_total})",
                        "{{pool}} picker errors",
                    ),
                    Query(
                        f"{_or_zero_like(cluster_5xx, 'envoy_cluster_name', cluster_total)}"
                        f" / sum by (envoy_cluster_name) ({cluster_total})",
                        "{{envoy_cluster_name}} upstream 5xx",
                    ),
                ],
                unit="percentunit",
            ),
        ],
        ["ab-test"],
    )


def build_dashboards() -> dict[str, Json]:
    """Every dashboard, by file name; built fresh each call so callers may modify the result."""
    return {
        "gateway-traffic-distribution.json": _traffic(),
        "multi-model-performance-comparison.json": _performance(),
        "resource-utilization-by-model.json": _resources(),
        "ab-test-traffic-analysis.json": _ab_test(),
    }


def _all_panels(panels: Iterable[Json]) -> Iterator[Json]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", ()))


def panel_queries(
    dashboards: Mapping[str, Json] | Iterable[Json] | None = None, rate_interval: str = "1m"
) -> list[PanelQuery]:
    """Every panel query of ``dashboards`` (default: all), with ``$__rate_interval`` set to ``rate_interval``."""
    if dashboards is None:
        dashboards = build_dashboards()
    boards = dashboards.values() if isinstance(dashboards, Mapping) else dashboards
    return [
        PanelQuery(board["title"], panel["title"], target["refId"], target["expr"].replace(RATE, rate_interval))
        for board in boards
        for panel in _all_panels(board.get("panels", ()))
        for target in panel.get("targets", ())
    ]


def render(dashboard: Json) -> str:
    """The committed form: sorted keys, indent 2, trailing newline, so regenerating gives a minimal diff."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_dashboards(directory: Path) -> list[Path]:
    """Write every dashboard's JSON into ``directory`` (created if needed); return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, dashboard in build_dashboards().items():
        path = directory / name
        path.write_text(render(dashboard), encoding="utf-8")
        written.append(path)
    return written


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"directory to write the JSON files to (default: the repository's grafana/dashboards, {DEFAULT_OUT})",
    )


def run(args: argparse.Namespace) -> int:
    out: Path | None = args.out
    if out is None:
        if not DEFAULT_OUT.is_dir():
            print(
                f"extproc dashboards: error: {DEFAULT_OUT} does not exist (not a source checkout?): pass --out DIR",
                file=sys.stderr,
            )
            return 2
        out = DEFAULT_OUT
    for path in write_dashboards(out):
        print(path)
    return 0


DESCRIPTION = (
    "Write the four Grafana dashboards (traffic distribution, multi-model performance, resource utilization, "
    "A/B test) as JSON files, generated from extproc/dashboards.py."
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dashboards", help="write the Grafana dashboards' JSON files", description=DESCRIPTION)
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="extproc dashboards", description=DESCRIPTION)
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
