"""The results for people: text tables, the Markdown report, the PNG charts, and JSON without NaN."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from extproc.bench.routing.targets import value_text, verdict

# Metrics the tables show, in order: (key, label, format).
ROWS: tuple[tuple[str, str, str], ...] = (
    ("ttft_mean_ms", "TTFT mean ms", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"),
    ("ttft_p90_ms", "TTFT p90 ms", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.1f}"),
    ("e2e_p50_ms", "e2e p50 ms", "{:.1f}"),
    ("e2e_p99_ms", "e2e p99 ms", "{:.1f}"),
    ("queue_mean_ms", "queue mean ms", "{:.1f}"),
    ("throughput_rps", "throughput req/s", "{:.1f}"),
    ("hit_rate", "prefix hit rate", "{:.1%}"),
    ("first_use_share", "first use of prefix", "{:.1%}"),
    ("imbalance", "imbalance max/mean", "{:.2f}"),
    ("preemptions", "preemptions", "{:.0f}"),
    ("kv_turnover", "KV turnover x cache", "{:.2f}"),
    ("failed", "failed", "{:.0f}"),
)


def show(fmt: str, value: Any) -> str:
    """``value`` formatted for a table; "-" where a cell has no value (NaN, or null in JSON read back)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _groups(cells: Sequence[dict[str, Any]]) -> Iterator[tuple[str, float, list[dict[str, Any]]]]:
    order: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in cells:
        order.setdefault((c["workload"], c["rate"]), []).append(c)
    for (workload, rate), group in order.items():
        yield workload, rate, group


def text_tables(cells: Sequence[dict[str, Any]]) -> str:
    out = []
    for workload, rate, group in _groups(cells):
        policies = [c["policy"] for c in group]
        width = max(12, *(len(p) + 2 for p in policies))
        out.append(f"\n{workload} @ {rate:g} req/s (simulated)")
        out.append(f"{'':<20}" + "".join(f"{p:>{width}}" for p in policies))
        for key, label, fmt in ROWS:
            out.append(f"{label:<20}" + "".join(f"{show(fmt, c[key]):>{width}}" for c in group))
    return "\n".join(out)


def markdown(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        "# Routing benchmark results",
        "",
        f"`{setup['command']}`: {setup['replicas']} replicas of `{setup['preset']}` with "
        f"{setup['num_gpu_blocks']} KV blocks ({setup['num_gpu_blocks'] * 16:,} tokens) each, time scale "
        f"{setup['time_scale']:g}, {setup['duration']:g} simulated seconds per cell{_floors(setup)}, first "
        f"{setup['warmup_share']:.0%} of each cell not measured, {setup['max_tokens']} output tokens. "
        "Latencies in simulated milliseconds (the simulators' `x-sim-*` headers); rates and throughput in "
        f"simulated requests per second. Wall time {result['wall_seconds']:.0f} s."
        + (
            " Every simulator published KV-cache events (ZMQ) for every policy of the run."
            if setup.get("kv_events")
            else ""
        ),
    ]
    for workload, rate, group in _groups(result["cells"]):
        lines += ["", f"### {workload} @ {rate:g} req/s", ""]
        lines.append("| | " + " | ".join(c["policy"] for c in group) + " |")
        lines.append("| --- |" + " ---: |" * len(group))
        for key, label, fmt in ROWS:
            lines.append(f"| {label} | " + " | ".join(show(fmt, c[key]) for c in group) + " |")
    lines += precise_view(result["cells"])
    lines += ["", f"## Target check ({result['candidate']})", "", "| workload | rate | check | value | verdict |"]
    lines.append("| --- | ---: | --- | ---: | --- |")
    for row in result["targets"]:
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(
            f"| {row['workload']} | {row['rate']:g} | {row['check']} | {value_text(row)} | "
            f"{verdict(row['passed'])}{note} |"
        )
    return "\n".join(lines) + "\n"


def _floors(setup: dict[str, Any]) -> str:
    """ " (at least N requests; W M)": the cells' request floors, where the setup has them."""
    if "min_requests" not in setup:
        return ""
    more = [f"{w} {n}" for w, n in (setup.get("min_requests_per_workload") or {}).items() if n != setup["min_requests"]]
    return f" (at least {setup['min_requests']} requests" + (f"; {', '.join(more)}" if more else "") + ")"


def precise_view(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: what the picker saw in each cell where a KV-event stream was followed (none: nothing)."""
    rows = [c for c in cells if (c.get("picker") or {}).get("kv_events_connected")]
    if not rows:
        return []
    lines = [
        "",
        "### The precise scorer's view (the picker's metrics, whole cell)",
        "",
        "| workload | rate | policy | streams live | scored on events | expected hit (events) | expected hit "
        "(approximate) | measured hit rate | blocks stored | blocks removed | gaps | lag max ms | render errors | "
        "tokenized by engine / here | tokens ms per request |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in rows:
        p = c["picker"]
        lines.append(
            f"| {c['workload']} | {c['rate']:g} | {c['policy']} | {p['precise_live_endpoints']:.0f} | "
            f"{show('{:.0%}', p['precise_scored'] / max(1, c['requests']))} | "
            f"{show('{:.1%}', p['precise_expected_hit'])} | {show('{:.1%}', p['approximate_expected_hit'])} | "
            f"{show('{:.1%}', c['hit_rate'])} | {p['kv_events_blocks_stored']:.0f} | "
            f"{p['kv_events_blocks_removed']:.0f} | {p['kv_events_gaps']:.0f} | {p['kv_events_lag_max_s'] * 1e3:.0f} | "
            f"{p.get('render_error', 0):.0f} | {p.get('render_miss', 0):.0f} / {p.get('render_local', 0):.0f} | "
            f"{(p.get('render_seconds', 0) + p.get('render_tokenize_seconds', 0)) * 1e3 / max(1, c['requests']):.2f} |"
        )
    return lines


def plot(cells: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    for workload in workloads:
        mine = [c for c in cells if c["workload"] == workload]
        policies = list(dict.fromkeys(c["policy"] for c in mine))
        rates = sorted({c["rate"] for c in mine})
        by = {(c["policy"], c["rate"]): c for c in mine}
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for key, ax, title in (
            ("ttft_mean_ms", axes[0], "TTFT mean (simulated ms)"),
            ("ttft_p99_ms", axes[1], "TTFT p99 (simulated ms)"),
        ):
            for policy in policies:
                ys = [by[(policy, r)][key] if (policy, r) in by else math.nan for r in rates]
                ax.plot(rates, ys, marker="o", label=policy)
            ax.set_yscale("log")
            ax.set_xlabel("offered rate (simulated req/s)")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        ax = axes[2]
        width = 0.8 / max(1, len(policies))
        for i, policy in enumerate(policies):
            xs = [j + i * width for j in range(len(rates))]
            ys = [by[(policy, r)]["hit_rate"] if (policy, r) in by else math.nan for r in rates]
            ax.bar(xs, ys, width, label=policy)
        ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(rates))], [f"{r:g}" for r in rates])
        ax.set_ylim(0, 1.15)
        ax.legend(fontsize=7, ncol=len(policies), loc="upper center")
        ax.set_xlabel("offered rate (simulated req/s)")
        ax.set_title("prefix-cache hit rate (tokens)")
        ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"routing benchmark: {workload}")
        fig.tight_layout()
        path = out / f"routing-{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def json_safe(value: Any) -> Any:
    """NaN -> None, so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
