"""The results for people: a table per (workload, rate) as text and Markdown, the report, one chart per workload."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extproc.bench.peers.checks import check_lines, figure
from extproc.bench.routing.report import json_safe, show
from extproc.bench.routing.targets import verdict

# What each table shows, in order: (key, label, format). Latencies are the client's wall milliseconds.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("ttft_mean_ms", "TTFT mean ms", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"),
    ("ttft_p90_ms", "TTFT p90 ms", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.1f}"),
    ("itl_mean_ms", "ITL mean ms", "{:.2f}"),
    ("itl_p99_ms", "ITL p99 ms", "{:.2f}"),
    ("e2e_mean_ms", "e2e mean ms", "{:.1f}"),
    ("e2e_p99_ms", "e2e p99 ms", "{:.1f}"),
    ("throughput_rps", "throughput req/s", "{:.1f}"),
    ("hit_rate", "prefix hit rate", "{:.1%}"),
    ("imbalance", "imbalance max/mean", "{:.2f}"),
    ("cpu_ms_per_request", "router CPU ms/req", "{:.2f}"),
    ("cpu_envoy_ms_per_request", "  Envoy CPU ms/req", "{:.2f}"),
    ("cpu_picker_ms_per_request", "  picker CPU ms/req", "{:.2f}"),
    ("replicas_cpu_ms_per_request", "replicas CPU ms/req", "{:.2f}"),
    ("send_lag_p99_ms", "send lag p99 ms", "{:.1f}"),
    ("drain_seconds", "drain s", "{:.2f}"),
    ("failed", "failed", "{:.0f}"),
)
# The charts: (key, title, log scale).
PANELS = (
    ("ttft_mean_ms", "TTFT mean (ms)", True),
    ("ttft_p99_ms", "TTFT p99 (ms)", True),
    ("hit_rate", "prefix-cache hit rate (tokens)", False),
    ("cpu_ms_per_request", "router CPU per request (ms)", False),
)


def groups(cells: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Cells by (workload, rate), in the order they were run."""
    out: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for cell in cells:
        out.setdefault((cell["workload"], cell["rate"]), []).append(cell)
    return out


def table(group: Sequence[dict[str, Any]], markdown: bool = False) -> list[str]:
    """One (workload, rate): a column per router, a line per figure of ``ROWS``."""
    names = [c["router"] for c in group]
    if markdown:
        head = ["| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        return head + [
            f"| {label.strip()} | " + " | ".join(show(f, c[k]) for c in group) + " |" for k, label, f in ROWS
        ]
    width = max(12, *(len(n) + 2 for n in names))
    head = [f"{'':<22}" + "".join(f"{n:>{width}}" for n in names)]
    return head + [f"{label:<22}" + "".join(f"{show(f, c[k]):>{width}}" for c in group) for k, label, f in ROWS]


def text_report(cells: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]]) -> str:
    out = []
    for (workload, rate), group in groups(cells).items():
        out += ["", f"{workload} @ {rate:g} req/s", *table(group)]
    out += ["", "done-when checks (PASS/FAIL, value against bound, ours vs theirs):"]
    out += ["  " + line for line in check_lines(checks)] or ["  none apply to the routers run"]
    return "\n".join(out)


def markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    settings = {
        "command": f"`{s['command']}`",
        "replicas": f"{s['replicas']} x `{s['preset']}`, {s['num_gpu_blocks']} KV blocks "
        f"({s['num_gpu_blocks'] * 16:,} tokens) each, new for every router and cell, time scale {s['time_scale']:g}",
        "cells": f"{s['duration']:g} s of Poisson arrivals (at least {s['min_requests']} requests), the first "
        f"{s['warmup_share']:.0%} not measured; streaming chat, {s['max_tokens']} output tokens",
        "figures": "the client's wall milliseconds; CPU is user + system time of each router's process tree over "
        "the measured window, per measured request",
        "host": f"{s['host']['cpus']} CPUs, load average {s['host']['loadavg_before'][0]:.2f} before the run",
        "wall time": f"{result['wall_seconds']:.0f} s",
    }
    settings.update({f"skipped `{name}`": reason for name, reason in result["skipped"].items()})
    title = "Replicas" if result["setup"].get("bench") == "replicas" else "Peer routers"
    lines = [f"# {title} benchmark results", "", *(f"- {k}: {v}" for k, v in settings.items())]
    for (workload, rate), group in groups(result["cells"]).items():
        lines += ["", f"### {workload} @ {rate:g} req/s", "", *table(group, markdown=True)]
    lines += ["", "## Done-when checks", "", "| workload | rate | check | value | bound | ours vs theirs | verdict |"]
    lines.append("| --- | ---: | --- | ---: | --- | --- | --- |")
    for row in result["checks"]:
        value = show("{:.3f}", row["value"])
        sides = f"{figure(row['ours'], row['check'])} vs {figure(row['theirs'], row['check'])}"
        lines.append(
            f"| {row['workload']} | {row['rate']:g} | {row['check']} | {value} | {row['op']} {row['bound']:g} "
            f"| {sides} | {verdict(row['passed'])} |"
        )
    return "\n".join(lines) + "\n"


def _figure(plt: Any, workload: str, cells: Sequence[dict[str, Any]], stem: str) -> Any:
    """One workload's chart: a panel per figure of ``PANELS``, a line per router, the offered rate across."""
    by = {(c["router"], c["rate"]): c for c in cells}
    rates = sorted({rate for _, rate in by})
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2))
    for ax, (key, title, log) in zip(axes, PANELS, strict=True):
        for router in dict.fromkeys(router for router, _ in by):
            values = [by[(router, r)][key] if (router, r) in by else None for r in rates]
            ax.plot(rates, [math.nan if v is None else v for v in values], marker="o", label=router)
        ax.set(title=title, xlabel="offered rate (req/s)", yscale="log" if log else "linear")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{'peer routers' if stem == 'peers' else stem}: {workload}")
    fig.tight_layout()
    return fig


def plot(cells: Sequence[dict[str, Any]], out: Path, stem: str = "peers") -> list[Path]:
    """``STEM-WORKLOAD.png`` for each workload run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = dict.fromkeys(c["workload"] for c in cells)
    figures = {
        out / f"{stem}-{w}.png": _figure(plt, w, [c for c in cells if c["workload"] == w], stem) for w in workloads
    }
    for path, fig in figures.items():
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return list(figures)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as standard JSON (NaN as null) at ``path``, its directory made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2))
    return path


def save(result: dict[str, Any], json_path: Path | None, out: Path | None) -> list[Path]:
    """The run's files: ``json_path``; under ``out`` STEM.json, STEM.md and the charts (STEM: peers or
    replicas, the benchmark's name). The paths written."""
    stem = result["setup"].get("bench", "peers")
    written = [write_json(path, result) for path in (json_path, out and out / f"{stem}.json") if path]
    if out:
        (out / f"{stem}.md").write_text(markdown(result))
        written += [out / f"{stem}.md", *plot(result["cells"], out, stem)]
    return written
