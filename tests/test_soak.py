"""`extproc bench soak`: a short run through the real gateway writes its files, and the judging logic."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from extproc.bench.soak import (
    BAD_KINDS,
    Recorder,
    SoakRequest,
    Traffic,
    diagnose_memory,
    judge,
    late_series,
    warmup_seconds,
)
from tests.helpers import TAG_VARIABLE, run_tagged, tagged

TIMEOUT = 120.0  # the run is 15 s; the stack's start and stop, and a busy shared machine, take the rest


def test_short_soak_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_VARIABLE: tag}
    argv = [sys.executable, "-m", "extproc", "bench", "soak", "--duration", "15", "--rate", "15", "--window", "5"]
    argv += ["--sample-interval", "1", "--bad-share", "0.1", "--out", str(out), "--log-dir", str(tmp_path / "logs")]
    result = run_tagged(argv, env, tag, TIMEOUT)
    # 0: every criterion passed, 1: one failed (a 15 s run on a shared machine may); anything else is a crash.
    assert result.returncode in (0, 1), f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    time.sleep(0.5)
    assert tagged(tag) == [], "the soak left processes running"
    assert "[  3/3]" in result.stdout and "rate sustained" in result.stdout

    data = json.loads((out / "soak.json").read_text())
    assert [w["index"] for w in data["windows"]] == [0, 1, 2]
    assert data["setup"]["warmup"] == 1.5 and not data["interrupted"]
    totals = data["totals"]
    assert totals["sent"] == 225 and totals["ok"] > 150
    assert not totals["errors"], data["error_examples"]  # 15 req/s is far below what the stack sustains
    assert set(totals["expected_4xx"]) <= {"400", "404", "413"} and sum(totals["expected_4xx"].values()) > 5
    kinds = data["kinds"]
    assert any(k.startswith("ab-split/") for k in kinds) and any(k.endswith("/stream/unique") for k in kinds)
    loaded = [s for s in data["samples"] if s["phase"] == "load"]
    assert len(loaded) >= 12 and data["samples"][-1]["phase"] == "after"
    for key in ("picker_rss_mb", "picker_fds", "envoy_rss_mb", "envoy_fds", "picker_series", "prefix_blocks"):
        assert all(s.get(key) is not None for s in loaded), key
    assert loaded[-1]["prefix_blocks"] > 0 and loaded[-1]["picker_cpu_pct"] >= 0
    names = [c["name"] for c in data["criteria"]]
    assert len(names) == 4 and any("errors" in n for n in names) and any("p99" in n for n in names)
    assert data["passed"] == all(c["passed"] for c in [*data["criteria"], data["validity"]])
    assert (result.returncode == 0) == data["passed"]
    assert data["memory"]["findings"] and data["memory"]["prefix_bound"] == 4 * 16384
    assert data["load_average"]["before"] and data["load_average"]["after"]

    md = (out / "soak.md").read_text()
    assert "| criterion | result | measured |" in md and "| window |" in md and "soak.png" in md
    png = (out / "soak.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def _sample(t: float, picker: float, envoy: float = 50.0, phase: str = "load") -> dict[str, Any]:
    return {"t": t, "phase": phase, "picker_rss_mb": picker, "envoy_rss_mb": envoy, "prefix_blocks": 10 * t}


def _window(index: int, p99: float | None, errors: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "start": 60.0 * index,
        "end": 60.0 * (index + 1),
        "sent": 600,
        "e2e_p99_ms": p99,
        "errors": errors or {},
        "expected_4xx": {"400": 5},
    }


def _by_name(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"].split(" ")[0] + (" errors" if "errors" in c["name"] else ""): c for c in checks}


def test_judge_rss_growth_is_measured_from_the_end_of_the_warm_up() -> None:
    # Fast growth inside the warm-up (the index filling) does not count; 5 % after it passes, 20 % fails.
    samples = [_sample(t, 60 + (30 if t >= 120 else t / 4) + 0.05 * max(0, t - 120) / 16) for t in range(0, 1801, 5)]
    windows = [_window(i, 100.0) for i in range(30)]
    checks = _by_name(judge(samples, windows, warmup=120.0))
    assert checks["picker"]["passed"] and 0.0 < checks["picker"]["value"] < 0.10
    assert checks["Envoy"]["passed"] and checks["Envoy"]["value"] == 0.0
    grown = [{**s, "picker_rss_mb": s["picker_rss_mb"] * (1 + 0.2 * s["t"] / 1800)} for s in samples]
    checks = _by_name(judge(grown, windows, warmup=120.0))
    assert not checks["picker"]["passed"] and checks["picker"]["value"] > 0.10
    # The sample taken after the drain (idle) is not the end of the run.
    idle = [*samples, _sample(1810, 500.0, phase="after")]
    assert _by_name(judge(idle, windows, warmup=120.0))["picker"]["passed"]
    assert not _by_name(judge([], windows, warmup=120.0))["picker"]["passed"]  # not measured: no pass


def test_judge_counts_errors_but_not_expected_4xx_and_compares_p99() -> None:
    samples = [_sample(t, 80.0) for t in range(0, 601, 5)]
    windows = [_window(i, 200.0 if i < 2 else 100.0) for i in range(10)]  # the warm-up windows do not count
    checks = _by_name(judge(samples, windows, warmup=120.0))
    assert checks["0 errors"]["passed"] and checks["0 errors"]["value"] == 0
    assert "400: 50" in checks["0 errors"]["detail"]
    assert checks["p99"]["passed"] and checks["p99"]["value"] == 0.0 and "window 3" in checks["p99"]["detail"]
    windows[9] = _window(9, 125.0, {"502": 2, "TimeoutError": 1})
    checks = _by_name(judge(samples, windows, warmup=120.0))
    assert not checks["0 errors"]["passed"] and checks["0 errors"]["value"] == 3
    assert not checks["p99"]["passed"] and abs(checks["p99"]["value"] - 0.25) < 1e-9
    windows[9] = _window(9, 81.0)  # faster by 19 %: within 20 %
    assert _by_name(judge(samples, windows, warmup=120.0))["p99"]["passed"]
    windows[9] = _window(9, 75.0)  # faster by 25 %: the criterion is "within 20 %" both ways
    assert not _by_name(judge(samples, windows, warmup=120.0))["p99"]["passed"]
    # A partial last window is not compared when a whole one exists.
    partial = [*windows[:9], {**_window(9, 500.0), "end": 545.0}]
    assert "window 9" in _by_name(judge(samples, partial, warmup=120.0))["p99"]["detail"]


def test_warmup_and_recorder_classify_expected_4xx_apart_from_errors() -> None:
    assert warmup_seconds(1800) == 120.0 and warmup_seconds(600) == 60.0 and warmup_seconds(15) == 1.5
    recorder = Recorder(duration=15.0, window=5.0)
    good = SoakRequest("by-model/chat/json/shared", "/v1/chat/completions", b"{}", {}, False, 200)
    bad = SoakRequest("bad/unknown_model", "/v1/chat/completions", b"{}", {}, False, 404)
    for t, request, status, problem in (
        (1.0, good, 200, ""),
        (2.0, bad, 404, ""),  # expected
        (6.0, bad, 200, ""),  # a bad request that got through: an error
        (7.0, good, 200, "truncated stream"),
        (14.0, good, 503, ""),
        (20.0, good, 0, "TimeoutError"),  # after the end: the last window
    ):
        recorder.sent(t, 0.0)
        recorder.done(request, t, status, 0.01, None, problem, "")
    summaries = [recorder.close(i) for i in range(3)]
    assert summaries[0]["ok"] == 1 and summaries[0]["expected_4xx"] == {"404": 1} and not summaries[0]["errors"]
    assert summaries[1]["errors"] == {"200": 1, "200 truncated stream": 1}
    assert summaries[2]["errors"] == {"503": 1, "TimeoutError": 1} and summaries[2]["e2e_p99_ms"] is None
    assert recorder.in_flight == 0 and len(recorder.error_examples) == 4


def test_traffic_is_deterministic_and_mixed() -> None:
    a, b = Traffic(seed=3, bad_share=0.05, max_body_bytes=1000), Traffic(seed=3, bad_share=0.05, max_body_bytes=1000)
    first = [a.next(i) for i in range(2000)]
    assert first == [b.next(i) for i in range(2000)]
    kinds = {r.kind for r in first}
    for part in ("1b-path/", "3b-path/", "ab-split/", "by-model/", "/chat/", "/completions/", "/stream/", "/json/"):
        assert any(part in k for k in kinds), part
    assert {r.expect for r in first} == {200, *(status for _, status in BAD_KINDS.values())}
    assert all(r.headers.get("x-user-id") for r in first if r.kind.startswith("ab-split/"))
    too_large = [r for r in first if r.kind == "bad/too_large"]
    assert too_large and all(len(r.body) > 1000 for r in too_large)
    unique = [orjson.loads(r.body) for r in first if r.kind.endswith("/unique")]
    heads = {(u.get("prompt") or u["messages"][-1]["content"])[:64] for u in unique}
    assert len(heads) == len(unique)  # unique from their first block (64 characters) on


def test_memory_findings_name_the_prefix_index_and_late_series() -> None:
    samples = [
        {"t": float(t), "phase": "load", "picker_rss_mb": 70 + min(t, 600) / 20, "prefix_blocks": min(t, 600) * 100.0}
        for t in range(0, 1801, 30)
    ]
    seen = {"a{}": 0.0, 'b{x="1"}': 100.0, 'b{x="2"}': 1500.0}
    late = late_series(seen, 120.0, 1800.0)
    assert late["after_warmup"] == 1 and late["second_half"] == 1 and late["by_metric"] == {"b": 1}
    memory = diagnose_memory(samples, 120.0, 65536, 250.0, {"picker": seen})
    assert "a few late label combinations" in "\n".join(memory["findings"])  # one late series is no trend
    seen |= {f'b{{x="{i}"}}': 1500.0 + i for i in range(3, 6)}
    memory = diagnose_memory(samples, 120.0, 65536, 250.0, {"picker": seen})
    text = "\n".join(memory["findings"])
    assert "bound 65,536" in text and "prefix index still filling" in text and "RSS flat over the second half" in text
    assert "possibly unbounded" in text
