"""The target checks: ratios and differences between policies' cells, against the briefs' bounds.

The default policy (or ``--candidate``) against the baselines, and, when the run has it, the ``precise``
policy (the KV-event prefix scorer) against ``default`` (the capacity-aware approximate prefix scorer) and,
when that is in the run too, against ``approximate_fixed`` (the approximate index with a fixed bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

PRECISE, APPROXIMATE = "precise", "default"  # the KV-event prefix scorer's policy and the approximate one's
APPROXIMATE_FIXED = "approximate_fixed"  # the approximate index bounded by a fixed block count, not the capacity
PRESSURE = "pressure"
# Eviction is heavy in a `pressure` cell where the default re-prefilled at least this share of the measured
# prompt tokens although their prefix had been sent before in the cell (`recomputed_share`).
HEAVY_EVICTION = 0.2

Cells = Mapping[tuple[str, float, str], dict[str, Any]]


def recomputed_share(cell: Mapping[str, Any]) -> float:
    """Prompt tokens prefilled again: 1 - hit rate - first-use share (requests of a prefix new to the cell).

    With each prefix kept on one replica (the default's affinity) this is the eviction: what the replica had
    held and no longer did. It overstates it by each request's own question (about 1 % on ``pressure``).
    """
    return float(1.0 - cell["hit_rate"] - cell["first_use_share"])


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def compare(
    by: Cells,
    workload: str,
    rate: float,
    name: str,
    num: str,
    den: str,
    metric: str,
    op: str,
    bound: float,
    kind: str = "ratio",
) -> dict[str, Any]:
    """One check row: ``num``'s ``metric`` over (``kind`` "ratio") or minus ("diff") ``den``'s, against ``bound``."""
    a, b = by.get((workload, rate, num)), by.get((workload, rate, den))
    row: dict[str, Any] = {"workload": workload, "rate": rate, "check": name, "bound": bound, "op": op, "kind": kind}
    x = a[metric] if a is not None else None
    y = b[metric] if b is not None else None
    if not (_finite(x) and _finite(y)) or (kind == "ratio" and min(x, y) <= 0):  # a ratio needs two positives
        row.update(value=math.nan, passed=None)
    else:
        value = x / y if kind == "ratio" else x - y
        row.update(value=value, passed=value <= bound if op == "<=" else value >= bound)
    return row


def target_check(cells: Sequence[dict[str, Any]], candidate: str = "default") -> list[dict[str, Any]]:
    """The targets, one row per (check, workload, rate); n/a when a policy is missing.

    ``candidate`` is held to the default policy's targets; a run with the ``precise`` policy adds
    `precise_check`'s rows.
    """
    by = {(c["workload"], c["rate"], c["policy"]): c for c in cells}
    checks: list[dict[str, Any]] = []
    c = candidate
    for workload, rate in sorted({(c["workload"], c["rate"]) for c in cells}):
        specs: list[tuple[str, str, str, str, str, float]] = []
        if workload in ("tenants", "multiturn"):
            specs += [
                (f"{c} TTFT mean / round_robin's <= 0.5", c, "round_robin", "ttft_mean_ms", "<=", 0.5),
                (f"{c} TTFT mean / least_queue's <= 0.8", c, "least_queue", "ttft_mean_ms", "<=", 0.8),
                (f"{c} hit rate / prefix_only's >= 0.9", c, "prefix_only", "hit_rate", ">=", 0.9),
            ]
        elif workload == "random":
            specs += [
                (f"{c} TTFT mean / least_queue's <= 1.05", c, "least_queue", "ttft_mean_ms", "<=", 1.05),
                (f"{c} TTFT mean / round_robin's <= 1", c, "round_robin", "ttft_mean_ms", "<=", 1.0),
            ]
        elif workload == "hot":
            specs.append((f"prefix_only TTFT p99 / {c}'s >= 2", "prefix_only", c, "ttft_p99_ms", ">=", 2.0))
        checks += [compare(by, workload, rate, *spec) for spec in specs]
    if any(cell["policy"] == PRECISE for cell in cells):
        checks += precise_check(cells)
    return checks


def precise_check(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The precise prefix scorer (policy ``precise``) against each approximate one in the run.

    The baselines: ``default`` and, when run, ``approximate_fixed``. On ``pressure``: the baseline's TTFT p90 /
    precise's >= 2 at the run's highest rate and >= 1 at the others; precise's hit rate - the baseline's >= 0.10
    where eviction is heavy (the baseline's cell re-prefilled at least ``HEAVY_EVICTION`` of its prompt tokens,
    `recomputed_share`; n/a with a note elsewhere). On every other workload: precise's TTFT mean / the
    baseline's <= 1.05 and its hit rate - the baseline's >= -0.01.
    """
    policies = {c["policy"] for c in cells}
    rows: list[dict[str, Any]] = []
    for baseline in (APPROXIMATE, APPROXIMATE_FIXED):
        if baseline == APPROXIMATE or baseline in policies:
            rows += _precise_against(cells, baseline)
    return rows


def _precise_against(cells: Sequence[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    by = {(c["workload"], c["rate"], c["policy"]): c for c in cells}
    top = max((c["rate"] for c in cells if c["workload"] == PRESSURE), default=None)
    rows: list[dict[str, Any]] = []
    for workload, rate in sorted({(c["workload"], c["rate"]) for c in cells}):
        if workload != PRESSURE:
            name = f"{PRECISE} TTFT mean / {base}'s <= 1.05"
            rows.append(compare(by, workload, rate, name, PRECISE, base, "ttft_mean_ms", "<=", 1.05))
            name = f"{PRECISE} hit rate - {base}'s >= -0.01"
            rows.append(compare(by, workload, rate, name, PRECISE, base, "hit_rate", ">=", -0.01, "diff"))
            continue
        if rate == top:
            name = f"{base} TTFT p90 / {PRECISE}'s >= 2 (top rate)"
            rows.append(compare(by, workload, rate, name, base, PRECISE, "ttft_p90_ms", ">=", 2.0))
        else:
            name = f"{base} TTFT p90 / {PRECISE}'s >= 1"
            rows.append(compare(by, workload, rate, name, base, PRECISE, "ttft_p90_ms", ">=", 1.0))
        name = f"{PRECISE} hit rate - {base}'s >= 0.10 (heavy eviction)"
        row = compare(by, workload, rate, name, PRECISE, base, "hit_rate", ">=", 0.10, "diff")
        baseline = by.get((workload, rate, base))
        if baseline is not None and _finite(baseline["hit_rate"]) and _finite(baseline["first_use_share"]):
            share = recomputed_share(baseline)
            row["recomputed_share"] = share
            if share < HEAVY_EVICTION:
                row["passed"] = None
                row["note"] = f"eviction not heavy: {base} re-prefilled {share:.0%} < {HEAVY_EVICTION:.0%}"
        rows.append(row)
    return rows


def verdict(passed: bool | None) -> str:
    """PASS, FAIL, or n/a when a policy the check compares was not run (or the check does not apply)."""
    return "n/a" if passed is None else "PASS" if passed else "FAIL"


def value_text(row: Mapping[str, Any]) -> str:
    """The row's value: a ratio as 0.00, a difference with its sign; "-" without one. A third decimal where two
    would print the bound itself (0.997 against >= 1 shows as 0.997, not a failing 1.00)."""
    value = row["value"]
    if not _finite(value):
        return "-"
    sign = "+" if row.get("kind") == "diff" else ""
    digits = 3 if f"{value:.2f}" == f"{row['bound']:.2f}" and value != row["bound"] else 2
    return f"{value:{sign}.{digits}f}"


def target_summary(checks: Sequence[dict[str, Any]]) -> list[str]:
    """One line per check: the value at each rate and which rates pass."""
    lines = []
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in checks:
        seen.setdefault((row["workload"], row["check"]), []).append(row)
    for (workload, check), rows in seen.items():
        parts = [
            f"{r['rate']:g}: {value_text(r)} {verdict(r['passed'])}" + (f" ({r['note']})" if r.get("note") else "")
            for r in rows
        ]
        passed = [f"{r['rate']:g}" for r in rows if r["passed"]]
        failed = [f"{r['rate']:g}" for r in rows if r["passed"] is False]
        tail = f"pass at {', '.join(passed) or 'none'}" + (f"; fail at {', '.join(failed)}" if failed else "")
        lines.append(f"{workload:<11} {check:<54} {'; '.join(parts)}  ({tail})")
    return lines
