"""``--calibrate``: how many req/s round robin sustains on each workload here, and the rates that follow from it.

The comparison's rates are fractions (30, 60, 90 %) of round robin's capacity, so a cell means the same load on
a faster or slower host. Capacity is found the way an operator would: the same cells as the comparison, at
rates rising by a quarter each step, until one does not keep up. A rate keeps up when every request is
answered, the last answer comes at most ``DRAIN_SLACK`` seconds plus twice the lowest rate's e2e p99 after the
last arrival (a pool that falls behind builds a backlog that grows with the cell), and queueing has at most
doubled the mean TTFT of the lowest rate (``TTFT_GROWTH``): past that knee the wait grows much faster than the
rate, and short cells measure the mean far more steadily than the throughput. The capacity is the last rate
that kept up, so it is known to within a step.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extproc.bench.peers.cell import CellSettings, progress, run_cell
from extproc.bench.peers.plan import DEFAULT_RATES
from extproc.bench.peers.report import write_json
from extproc.bench.peers.routers import INSTALL_HINT, PROGRAMS, ROUTERS

FIRST_RATE = 4.0
STEP = 1.25
LAST_RATE = 400.0
SHARES = (0.3, 0.6, 0.9)
DRAIN_SLACK = 0.5  # seconds
TTFT_GROWTH = 2.0


def keeps_up(row: dict[str, Any], lowest: dict[str, Any]) -> str:
    """Why the cell did not keep up ("" when it did)."""
    if row["failed"] or row["failed_warmup"]:
        return f"{row['failed'] + row['failed_warmup']} requests failed"
    drain = DRAIN_SLACK + 2 * lowest["e2e_p99_ms"] / 1e3
    if not row["drain_seconds"] <= drain:
        return f"the last answer came {row['drain_seconds']:.2f} s after the last arrival (> {drain:.2f} s)"
    if not row["ttft_mean_ms"] <= TTFT_GROWTH * lowest["ttft_mean_ms"]:
        lowest_ms = lowest["ttft_mean_ms"]
        return f"TTFT mean {row['ttft_mean_ms']:.0f} ms > {TTFT_GROWTH:g}x the lowest rate's {lowest_ms:.0f} ms"
    return ""


def _rates(capacity: float) -> list[float]:
    """30/60/90 % of ``capacity``, to two significant digits (a setting people can read and type)."""
    return [float(f"{share * capacity:.2g}") for share in SHARES]


def calibrate(args: argparse.Namespace, settings: CellSettings, workloads: Sequence[str], log_dir: Path) -> int:
    """Step each workload's rate up under ``--calibrate``'s router; print its capacity and the rates to use."""
    name = args.calibrate
    if name not in ROUTERS:
        raise SystemExit(f"--calibrate {name}: not a router; choose from {', '.join(ROUTERS)}")
    spec = ROUTERS[name]
    if spec.kind != "extproc" and spec.kind not in settings.programs:
        missing = PROGRAMS[spec.kind]
        raise SystemExit(f"--calibrate {name}: {missing} is not installed: {INSTALL_HINT} (or calibrate extproc-rr)")
    found: dict[str, Any] = {}
    for workload in workloads:
        rate, lowest, kept, why, rows = FIRST_RATE, None, math.nan, "", []
        while rate <= LAST_RATE:
            row = run_cell(settings, spec, workload, rate, log_dir / f"calibrate-{workload}-{rate:g}")
            rows.append(row)
            lowest = lowest or row
            why = keeps_up(row, lowest)
            print(f"[calibrate] {progress(row)}{': ' + why if why else ''}", flush=True)
            if why:
                break
            kept = rate
            rate = round(rate * STEP, 1)
        found[workload] = {"capacity_rps": kept, "stopped_because": why, "rates": _rates(kept), "cells": rows}
        print(f"[calibrate] {workload}: round robin keeps up to {kept:g} req/s; rates {_rates(kept)}", flush=True)
    print("\ncapacity under " + name + " and the rates at 30/60/90 % of it (current defaults in brackets):")
    for workload, f in found.items():
        print(f"  {workload:<12} {f['capacity_rps']:>6g} req/s -> {f['rates']}  [{list(DEFAULT_RATES[workload])}]")
    print("as options: " + " ".join(f"--rates {w}={','.join(f'{r:g}' for r in f['rates'])}" for w, f in found.items()))
    for path in (args.json, args.out and args.out / "calibration.json"):
        if path:
            print(f"wrote {write_json(path, {'router': name, 'workloads': found})}")
    return 0
