"""CPU time of process trees from /proc: what a router costs the host, whatever it forks or threads.

A router may be one process (sglang-router and vllm-router run their Rust core inside the Python launcher),
or several (Envoy and the picker); counting each root with every live descendant, plus what reaped children
used (``cutime``/``cstime``), charges a router for all of its work and nothing else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _table() -> dict[int, tuple[int, float]]:
    """Every live process: pid -> (parent pid, user + system seconds of it and its reaped children)."""
    out: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # After the command name in parentheses: state, ppid, ..., utime (12th), stime, cutime, cstime.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICKS)
    return out


def tree_seconds(roots: Mapping[str, list[int]]) -> dict[str, float]:
    """For each name, the CPU seconds (user + system) of its root pids and all their descendants, so far."""
    table = _table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    out = {}
    for name, pids in roots.items():
        total, todo, seen = 0.0, list(pids), set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in table:
                continue
            seen.add(pid)
            total += table[pid][1]
            todo += children.get(pid, [])
        out[name] = total
    return out
