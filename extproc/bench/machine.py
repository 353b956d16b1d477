"""The machine a benchmark ran on: CPU model, cores, and a reference speed, printed with every result.

Absolute times move 2x and more between machines of the same size; the reference loop (pure Python,
single-threaded, the kind of work the picker does) says how fast this one is, so figures from two machines
can be compared through it, and ratios between rows of one run hold on either.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def reference_loop_ns(rounds: int = 5, iterations: int = 200_000) -> float:
    """Nanoseconds per iteration of a fixed loop of dict, arithmetic and string work (best of ``rounds``)."""
    best = float("inf")
    for _ in range(rounds):
        table: dict[int, str] = {}
        start = time.perf_counter_ns()
        for i in range(iterations):
            key = (i * 2654435761) & 0xFFFF
            table[key] = table.get(key, "")[:8] + "x"
        best = min(best, (time.perf_counter_ns() - start) / iterations)
    return best


def describe() -> dict[str, object]:
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "reference_loop_ns": round(reference_loop_ns(), 1)}


def summary_line(info: dict[str, object]) -> str:
    return f"machine: {info['cpu']}, {info['cores']} cores, reference loop {info['reference_loop_ns']} ns/iteration"
