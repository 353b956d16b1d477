"""``--report DIR``: PNG charts of a demo run and an index.html showing them with the summary's tables.

matplotlib is imported only here, when a report is asked for; the demo runs without it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from extproc import stats
from extproc.local.demo.summary import ROUTING_TARGET_MS
from extproc.local.demo.summary_text import format_summary, num, pct
from extproc.local.demo.traffic import Outcome
from extproc.local.multi_model import STICKY_HEADER

_POOL_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
_ROUTE_COLOURS = {"ab-test": "#9467bd"}


def _colours(summary: dict[str, Any]) -> dict[str, str]:
    pools = [m["pool"] for m in summary["by_model"].values()]
    colours = {pool: _POOL_COLOURS[i % len(_POOL_COLOURS)] for i, pool in enumerate(pools)}
    return {**colours, **_ROUTE_COLOURS}


def write_report(summary: dict[str, Any], outcomes: Sequence[Outcome], directory: Path) -> list[Path]:
    """PNG charts and an index.html showing them with the summary; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"font.size": 11, "axes.spines.top": False, "axes.spines.right": False})
    colours = _colours(summary)
    models = summary["by_model"]
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = directory / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. requests per model and per replica
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 3]})
    names = list(models)
    counts = [models[m]["requests"] for m in names]
    bars = left.bar(names, counts, color=[colours[models[m]["pool"]] for m in names])
    left.bar_label(bars, padding=2)
    left.set_title("Requests per model (model that answered)")
    left.set_ylabel("successful requests")
    left.margins(y=0.15)
    replicas = summary["by_replica"]
    labels = [f"{r['name']}\n{addr}" for addr, r in replicas.items()]
    bars = right.bar(
        labels, [r["requests"] for r in replicas.values()], color=[colours[r["pool"]] for r in replicas.values()]
    )
    right.bar_label(bars, padding=2)
    right.set_title("Requests per replica (x-gateway-upstream-host)")
    right.tick_params(axis="x", labelsize=9)
    right.margins(y=0.15)
    save(fig, "requests.png")

    # 2. latency distributions
    fig, ax = plt.subplots(figsize=(10, 5))
    all_lat = [o.latency_ms for o in outcomes if o.ok and o.pool]
    top = stats.percentile(all_lat, 0.995) if all_lat else 1.0
    bins = [i * top / 60 for i in range(61)]
    for model, m in models.items():
        pool = m["pool"]
        lat = [min(o.latency_ms, top) for o in outcomes if o.ok and o.pool == pool]
        exp = m["expected_latency_ms"]
        if exp:
            ax.axvspan(exp[0], exp[1], color=colours[pool], alpha=0.08)
            ax.text(
                (exp[0] + exp[1]) / 2, 1.0, f"expected {pool.upper()}\n~{exp[0]:g}-{exp[1]:g} ms",
                transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=9, color=colours[pool],
            )  # fmt: skip
        if lat:
            p50, p95 = m["latency_ms"]["p50"], m["latency_ms"]["p95"]
            ax.hist(
                lat, bins=bins, histtype="stepfilled", alpha=0.5, color=colours[pool],
                label=f"{model} ({len(lat)} requests): p50 {p50:.0f} ms, p95 {p95:.0f} ms",
            )  # fmt: skip
            ax.axvline(p50, color=colours[pool], lw=1.5)
            ax.axvline(p95, color=colours[pool], lw=1.2, ls="--")
    ax.set_title("Client-side end-to-end latency per model (solid line: p50, dashed: p95)")
    ax.set_xlabel("ms")
    ax.set_ylabel("requests")
    ax.set_xlim(left=0)
    ax.margins(y=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9, frameon=False)
    save(fig, "latency.png")

    # 3. A/B share with its confidence interval
    ab = summary["ab_split"]
    pools = list(ab["weights"])
    fig, ax = plt.subplots(figsize=(9, 1.2 + 1.1 * len(pools)))
    for i, pool in enumerate(pools):
        share = ab["observed_share"][pool]
        target = ab["target_share"][pool]
        ax.barh(i, target, color="#dddddd", height=0.5, label="configured weight" if i == 0 else None)
        text = f"{ab['served'][pool]} answers: {pct(share)}"
        if share is not None:
            lo, hi = ab["ci95"][pool]
            ax.errorbar(
                share, i, xerr=[[share - lo], [hi - share]], fmt="o", color=colours.get(pool, "black"),
                capsize=6, ms=8, lw=2, label="observed share, 95% Wilson interval" if i == 0 else None,
            )  # fmt: skip
            text += f" (95% CI {pct(lo)} - {pct(hi)}), target {pct(target, 0)}"
        ax.text(0.005, i + 0.3, text, va="bottom", fontsize=9)
    ax.set_yticks(range(len(pools)), [f"pool {p}" for p in pools])
    ax.set_ylim(-0.5, len(pools) - 0.1)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(f"A/B split on /v1/{ab['route']}: {ab['independent_requests']} requests without {STICKY_HEADER}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=9, frameon=False)
    save(fig, "ab_split.png")

    # 4. prefix-cache hit rate per model
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    rates = [models[m]["prefix_cache"]["hit_rate"] or 0.0 for m in names]
    bars = ax.bar(names, rates, color=[colours[models[m]["pool"]] for m in names])
    ax.bar_label(bars, labels=[f"{100 * r:.1f}%" for r in rates], padding=2)
    ax.set_ylim(0, 1.1)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title("Prefix-cache hit rate per model (prompt tokens)")
    save(fig, "cache_hit_rate.png")

    # 5. routing overhead
    ov = summary["routing_overhead"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    if ov["source"] == "x-gateway-routing-us":
        values = [o.routing_us / 1000 for o in outcomes if o.ok and o.routing_us is not None]
    else:
        values = [max(0.0, o.latency_ms - o.upstream_ms) for o in outcomes if o.ok and o.upstream_ms is not None]
    if values:
        cap = max(ROUTING_TARGET_MS * 1.2, stats.percentile(values, 0.995))
        ax.hist([min(v, cap) for v in values], bins=60, range=(0, cap), color="#7f7f7f", alpha=0.8)
        ax.axvline(ROUTING_TARGET_MS, color="#d62728", lw=2, label=f"target: sub-{ROUTING_TARGET_MS:g} ms")
        ax.axvline(ov["p50_ms"], color="black", lw=1.5, label=f"p50 {ov['p50_ms']:.2f} ms")
        ax.axvline(ov["p95_ms"], color="black", lw=1.2, ls="--", label=f"p95 {ov['p95_ms']:.2f} ms")
        ax.legend(loc="center right", fontsize=9, frameon=False)
        ax.set_xlim(0, cap * 1.02)
    ax.set_title(f"Gateway routing overhead per request ({ov['source'] or 'not measured'})")
    ax.set_xlabel("ms (anything longer is counted in the last bar)")
    ax.set_ylabel("requests")
    save(fig, "routing_overhead.png")

    # 6. completed requests per second, per route, with the phases
    fig, ax = plt.subplots(figsize=(11, 3.8))
    end = max((o.start + o.latency_ms / 1000 for o in outcomes), default=1.0)
    seconds = math.ceil(end) + 1
    for route in summary["by_route"]:
        per_second = [0] * seconds
        for o in outcomes:
            if o.route == route:
                per_second[int(o.start + o.latency_ms / 1000)] += 1
        ax.plot(range(seconds), per_second, label=f"/v1/{route}", color=colours.get(route), lw=1.6)
    for phase in summary["phases"]:
        start = phase["start_s"] or 0.0
        ax.axvline(start, color="#aaaaaa", lw=1, ls=":")
        ax.text(start + 0.3, 0.98, phase["name"], transform=ax.get_xaxis_transform(), va="top", fontsize=9)
    ax.set_xlabel("seconds since the traffic started")
    ax.set_ylabel("requests / s")
    ax.set_title("Traffic per route")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    save(fig, "traffic.png")

    index = directory / "index.html"
    index.write_text(_html(summary, [p.name for p in written]))
    written.append(index)
    return written


def _html(summary: dict[str, Any], images: Iterable[str]) -> str:
    e = html.escape

    def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    models = summary["by_model"]
    ab = summary["ab_split"]
    ov = summary["routing_overhead"]
    r = summary["requests"]
    sections = [
        "<h2>Requests</h2>",
        table(
            ["route", "requests", "failed"],
            [(x["path"], x["requests"], x["failed"]) for x in summary["by_route"].values()],
        ),
        table(
            ["replica", "pool", "requests", "picker picks", "prefix-cache hit rate"],
            [
                (f"{x['name']} ({a})", x["pool"], x["requests"], x["picker_picks"], pct(x["prefix_cache_hit_rate"]))
                for a, x in summary["by_replica"].items()
            ],
        ),
        "<h2>Per model</h2>",
        table(
            ["model", "requests", "p50 ms", "p95 ms", "expected ms", "prefix-cache hit rate"],
            [
                (
                    m,
                    x["requests"],
                    num(x["latency_ms"]["p50"]),
                    num(x["latency_ms"]["p95"]),
                    f"~{x['expected_latency_ms'][0]:g}-{x['expected_latency_ms'][1]:g}"
                    if x["expected_latency_ms"]
                    else "-",
                    pct(x["prefix_cache"]["hit_rate"]),
                )
                for m, x in models.items()
            ],
        ),
        "<h2>A/B split</h2>",
        table(
            ["pool", "answers", "observed", "95% CI (Wilson)", "target"],
            [
                (
                    p,
                    ab["served"][p],
                    pct(ab["observed_share"][p]),
                    f"{pct(ab['ci95'][p][0])} - {pct(ab['ci95'][p][1])}" if ab["ci95"][p] else "-",
                    pct(ab["target_share"][p], 0),
                )
                for p in ab["weights"]
            ],
        ),
        "<h2>Gateway routing overhead</h2>",
        table(
            ["source", "p50 ms", "p95 ms", "target", "picker decision p50 ms"],
            [
                (
                    ov["source"] or "-",
                    num(ov["p50_ms"], 2),
                    num(ov["p95_ms"], 2),
                    f"sub-{ov['target_ms']:g} ms",
                    num(ov["picker_decision_ms"]["p50"], 3),
                )
            ],
        ),
        f"<p>{r['sent']} requests sent, {r['ok']} ok, {r['failed']} failed.</p>",
    ]
    figures = "".join(f'<figure><img src="{e(name)}" alt="{e(name)}"></figure>' for name in images)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>extproc demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>extproc demo: multi-model gateway</h1>
<p>Gateway {e(summary["gateway"])}, {summary["duration_s"]} s of traffic at {summary["rate_target"]:g} req/s.</p>
{"".join(sections)}
<h2>Charts</h2>
{figures}
<h2>Summary as printed</h2>
<pre>{e(format_summary(summary))}</pre>
</body></html>
"""
