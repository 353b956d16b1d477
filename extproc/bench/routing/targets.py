"""The target check: ratios between the candidate policy and the baselines, against the brief's bounds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def target_check(cells: Sequence[dict[str, Any]], candidate: str = "default") -> list[dict[str, Any]]:
    """The brief's targets for ``candidate``, one row per (check, workload, rate); n/a when a policy is missing."""
    by = {(c["workload"], c["rate"], c["policy"]): c for c in cells}
    rates = sorted({(c["workload"], c["rate"]) for c in cells})
    checks: list[dict[str, Any]] = []

    def add(workload: str, rate: float, name: str, num: str, den: str, metric: str, op: str, bound: float) -> None:
        a, b = by.get((workload, rate, num)), by.get((workload, rate, den))
        row: dict[str, Any] = {"workload": workload, "rate": rate, "check": name, "bound": bound, "op": op}
        if a is None or b is None or not (a[metric] > 0 and b[metric] > 0):
            row.update(value=math.nan, passed=None)
        else:
            value = a[metric] / b[metric]
            row.update(value=value, passed=value <= bound if op == "<=" else value >= bound)
        checks.append(row)

    c = candidate
    for workload, rate in rates:
        if workload in ("tenants", "multiturn"):
            add(workload, rate, f"{c} TTFT mean / round_robin's <= 0.5", c, "round_robin", "ttft_mean_ms", "<=", 0.5)
            add(workload, rate, f"{c} TTFT mean / least_queue's <= 0.8", c, "least_queue", "ttft_mean_ms", "<=", 0.8)
            add(workload, rate, f"{c} hit rate / prefix_only's >= 0.9", c, "prefix_only", "hit_rate", ">=", 0.9)
        elif workload == "random":
            add(workload, rate, f"{c} TTFT mean / least_queue's <= 1.05", c, "least_queue", "ttft_mean_ms", "<=", 1.05)
            add(workload, rate, f"{c} TTFT mean / round_robin's <= 1", c, "round_robin", "ttft_mean_ms", "<=", 1.0)
        elif workload == "hot":
            add(workload, rate, f"prefix_only TTFT p99 / {c}'s >= 2", "prefix_only", c, "ttft_p99_ms", ">=", 2.0)
    return checks


def verdict(passed: bool | None) -> str:
    """PASS, FAIL, or n/a when a policy the check compares was not run."""
    return "n/a" if passed is None else "PASS" if passed else "FAIL"


def target_summary(checks: Sequence[dict[str, Any]]) -> list[str]:
    """One line per check: the value at each rate and which rates pass."""
    lines = []
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in checks:
        seen.setdefault((row["workload"], row["check"]), []).append(row)
    for (workload, check), rows in seen.items():
        parts = [f"{r['rate']:g}: {r['value']:.2f} {verdict(r['passed'])}" for r in rows]
        passed = [f"{r['rate']:g}" for r in rows if r["passed"]]
        failed = [f"{r['rate']:g}" for r in rows if r["passed"] is False]
        tail = f"pass at {', '.join(passed) or 'none'}" + (f"; fail at {', '.join(failed)}" if failed else "")
        lines.append(f"{workload:<10} {check:<44} {'; '.join(parts)}  ({tail})")
    return lines
