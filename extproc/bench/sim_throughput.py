"""`extproc bench sim`: how many short completions one simulator process serves per second.

The simulator runs with ``--time-scale 0`` (no simulated waiting) pinned to one core; the load
generator runs in this process, pinned to another. Besides the request rate, the simulator's own
CPU time per request is reported: it holds on a noisy machine where the rate does not, and
``1 / cpu_per_request`` is the rate one fully used core would sustain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

import orjson

from extproc.bench.loadgen import closed_loop
from extproc.cli import DefaultsHelp
from extproc.local.procs import free_port, start_sim


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sim",
        help="throughput of one simulator process (time scale 0, short completions)",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per case")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds sent before measuring")
    p.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


def _pin(pid: int, cpu: int) -> bool:
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return False
    os.sched_setaffinity(pid, {cpu})
    return True


def run(args: argparse.Namespace) -> int:
    log_dir = Path(tempfile.mkdtemp(prefix="extproc-bench-sim-"))
    port = free_port()
    sim = start_sim("sim", "bench-model", port, log_dir, "--time-scale", "0")
    results: dict[str, object] = {}
    try:
        pinned = _pin(sim.pid, 0) and _pin(0, 1)
        cases = {
            "chat": (
                f"http://127.0.0.1:{port}/v1/chat/completions",
                lambda i: orjson.dumps(
                    {
                        "model": "bench-model",
                        "messages": [{"role": "user", "content": f"Hello number {i}, how are you today?"}],
                        "max_tokens": args.max_tokens,
                    }
                ),
            ),
            "completion": (
                f"http://127.0.0.1:{port}/v1/completions",
                lambda i: orjson.dumps(
                    {"model": "bench-model", "prompt": f"Say hello to number {i}", "max_tokens": args.max_tokens}
                ),
            ),
        }
        print(
            f"simulator pid {sim.pid} {'pinned to cpu 0, load generator to cpu 1' if pinned else '(not pinned)'}; "
            f"{args.connections} connections, {args.max_tokens} output tokens, {args.duration:g}s per case",
            flush=True,
        )
        print(
            f"{'case':<12}{'req/s':>10}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'sim CPU us/req':>16}{'1-core req/s':>14}"
        )
        for name, (url, body) in cases.items():
            cpu_before = sim.cpu_seconds()
            outcome = asyncio.run(
                closed_loop(url, body, connections=args.connections, duration=args.duration, warmup=args.warmup)
            )
            # CPU is sampled over the warm-up too, so divide by every request of the run.
            cpu = sim.cpu_seconds() - cpu_before
            cpu_per_req = cpu / outcome.completed_all if outcome.completed_all else float("nan")
            row = {
                "rate": outcome.rate,
                "failed": outcome.failed,
                "p50_ms": outcome.percentile(0.5) * 1e3,
                "p99_ms": outcome.percentile(0.99) * 1e3,
                "sim_cpu_us_per_request": cpu_per_req * 1e6,
                "one_core_capacity": 1.0 / cpu_per_req if cpu_per_req else float("nan"),
            }
            results[name] = row
            print(
                f"{name:<12}{row['rate']:>10.0f}{row['failed']:>8}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
                f"{row['sim_cpu_us_per_request']:>16.0f}{row['one_core_capacity']:>14.0f}",
                flush=True,
            )
    finally:
        sim.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
