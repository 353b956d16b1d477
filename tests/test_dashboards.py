"""The Grafana dashboards: the committed JSON is current, well formed, and every query is valid PromQL.

Whether each query returns data is checked against a real Prometheus elsewhere; these tests need no stack.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import cli
from extproc.local.dashboards import (
    AB_SHARE_TITLE,
    DEFAULT_OUT,
    build_dashboards,
    panel_queries,
    render,
    write_dashboards,
)

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = REPO / "grafana" / "dashboards"
PROVISIONING = REPO / "grafana" / "provisioning"
TITLES = {
    "extproc-traffic": "Gateway Traffic Distribution",
    "extproc-performance": "Multi-Model Performance Comparison",
    "extproc-resources": "Resource Utilization by Model",
    "extproc-ab-test": "A/B Test Traffic Analysis",
}
# Labels whose values are unbounded (one series per request, user or trace): never in a dashboard query.
PER_REQUEST_LABEL = re.compile(r"(request|trace|span|session|user|conversation)[_-]?id", re.IGNORECASE)
STALE = "grafana/dashboards is out of date with extproc/dashboards.py: run `extproc dashboards`"

Json = dict[str, Any]


def _panels() -> list[tuple[Json, Json]]:
    return [(board, panel) for board in build_dashboards().values() for panel in board["panels"]]


def _panel(title: str) -> Json:
    matches = [panel for _board, panel in _panels() if panel["title"] == title]
    assert len(matches) == 1, title
    return matches[0]


def test_default_out_is_the_repository_directory() -> None:
    assert DEFAULT_OUT == DASHBOARD_DIR


def test_committed_json_is_what_the_generator_writes(tmp_path: Path) -> None:
    generated = build_dashboards()
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(generated), STALE
    for path in write_dashboards(tmp_path):
        assert (DASHBOARD_DIR / path.name).read_bytes() == path.read_bytes(), f"{path.name}: {STALE}"


def test_rendering_is_deterministic_and_ends_with_a_newline() -> None:
    first, second = build_dashboards(), build_dashboards()
    for name, board in first.items():
        assert render(board) == render(second[name])
        assert render(board).endswith("}\n")


def test_four_dashboards_with_the_write_up_titles_and_unique_uids() -> None:
    boards = list(build_dashboards().values())
    assert {b["uid"]: b["title"] for b in boards} == TITLES
    assert len({b["uid"] for b in boards}) == len(boards)
    for board in boards:
        assert 30 <= board["schemaVersion"] <= 45


def test_the_only_template_variable_is_the_datasource_defaulting_to_the_provisioned_uid() -> None:
    for board in build_dashboards().values():
        (variable,) = board["templating"]["list"]
        assert variable["name"] == "datasource" and variable["type"] == "datasource"
        assert variable["query"] == "prometheus"
        assert variable["current"]["value"] == "prometheus"


def test_every_panel_has_a_title_a_position_and_queries_with_unique_ref_ids() -> None:
    for board, panel in _panels():
        where = f"{board['title']} / {panel.get('title')!r}"
        assert panel.get("title"), where
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), where
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
        if panel["type"] == "text":
            assert panel["options"]["content"].strip(), where
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        targets = panel["targets"]
        assert targets, where
        assert all(t["expr"].strip() for t in targets), where
        assert all(t["datasource"] == panel["datasource"] for t in targets), where
        ref_ids = [t["refId"] for t in targets]
        assert len(set(ref_ids)) == len(ref_ids), where
    for board in build_dashboards().values():
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids), board["title"]
        assert 6 <= sum(p["type"] != "text" for p in board["panels"]) <= 14, board["title"]  # two screenfuls at most


def test_no_panel_overlaps_another() -> None:
    def cells(panel: Json) -> set[tuple[int, int]]:
        g = panel["gridPos"]
        return set(itertools.product(range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])))

    for board in build_dashboards().values():
        for a, b in itertools.combinations(board["panels"], 2):
            assert not cells(a) & cells(b), f"{board['title']}: {a['title']!r} overlaps {b['title']!r}"


def test_panel_queries_cover_every_target_and_substitute_the_rate_interval() -> None:
    queries = panel_queries(rate_interval="2m")
    assert len(queries) == sum(len(p.get("targets", ())) for _b, p in _panels())
    assert all("$__" not in q.expr and "${" not in q.expr for q in queries)
    assert any("[2m]" in q.expr for q in queries)
    assert {q.dashboard for q in queries} == set(TITLES.values())
    # Every rate() uses the dashboard's rate window, never a fixed one.
    for board, panel in _panels():
        for target in panel.get("targets", ()):
            windows = re.findall(r"\[([^\]]+)\]", target["expr"])
            assert all(w == "$__rate_interval" for w in windows), (board["title"], panel["title"], windows)


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (it comes with Prometheus: `sudo apt-get install prometheus`)")
    queries = panel_queries()
    rules = {
        "groups": [
            {
                "name": "extproc-dashboards",
                "rules": [{"record": f"extproc_dashboard_query_{i}", "expr": q.expr} for i, q in enumerate(queries)],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(queries)} rules found" in result.stdout


def test_no_query_uses_a_per_request_label() -> None:
    for q in panel_queries():
        assert not PER_REQUEST_LABEL.search(q.expr), (q.dashboard, q.panel, q.expr)


def test_gpu_panel_falls_back_to_kv_cache_use_and_says_so() -> None:
    (panel,) = [p for _b, p in _panels() if "DCGM_FI_DEV_GPU_UTIL" in " ".join(t["expr"] for t in p.get("targets", ()))]
    assert "GPU" in panel["title"] and "simulator" in panel["title"].lower()
    description = panel["description"].lower()
    assert "fallback" in description and "kv-cache" in description and "running requests" in description
    assert "model_name" in panel["description"]  # the relabelling it assumes
    gpu, running = panel["targets"]
    assert " or " in gpu["expr"] and "vllm:kv_cache_usage_perc" in gpu["expr"]
    assert "vllm:num_requests_running" in running["expr"]


def test_ab_dashboard_compares_observed_share_with_configured_weight() -> None:
    board = build_dashboards()["ab-test-traffic-analysis.json"]
    (panel,) = [p for p in board["panels"] if p["title"] == AB_SHARE_TITLE]
    targets = {t["refId"]: t["expr"] for t in panel["targets"]}
    assert 'route=~".+-split"' in targets["A"] and "group_left" in targets["A"] and "rate(" not in targets["A"]
    assert "extproc_split_weight_ratio" in targets["B"]
    (query,) = [q for q in panel_queries() if q.panel == AB_SHARE_TITLE and q.ref_id == "A"]
    assert query.dashboard == "A/B Test Traffic Analysis"


def test_gateway_time_panel_explains_it_is_a_mean_difference() -> None:
    panel = _panel("Gateway time before upstream (mean, Envoy)")
    assert "mean difference" in panel["description"].lower()
    assert "not a per-request histogram" in panel["description"]
    (target,) = panel["targets"]
    assert (
        "envoy_http_downstream_rq_time_sum" in target["expr"] and "envoy_cluster_upstream_rq_time_sum" in target["expr"]
    )


def test_error_counter_queries_fall_back_to_zero() -> None:
    # inference_objective_request_error_total has no series until an error happens.
    for q in panel_queries():
        if "inference_objective_request_error_total" in q.expr:
            assert "or vector(0)" in q.expr, q


def test_panel_titles_are_unique_per_dashboard() -> None:
    for board in build_dashboards().values():
        titles = Counter(p["title"] for p in board["panels"])
        assert max(titles.values()) == 1, titles


def test_cli_writes_the_dashboards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dashboards", "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(build_dashboards())
    assert "gateway-traffic-distribution.json" in capsys.readouterr().out


def test_provisioning_points_at_the_dashboards_and_the_prometheus_uid() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text(encoding="utf-8"))
    (source,) = datasources["datasources"]
    assert (source["name"], source["uid"], source["type"]) == ("Prometheus", "prometheus", "prometheus")
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "extproc.yaml").read_text(encoding="utf-8"))
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["folder"] == "extproc-router"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
