"""The command: its options, then the run (stack up, every cell, tables, target check, files)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extproc.bench.routing.cell import picker_metrics, send_cell, summarize
from extproc.bench.routing.plan import (
    MIN_REQUESTS,
    POLICIES,
    QUICK_WORKLOADS,
    Cell,
    add_plan_options,
    plan_rates,
    policy_sections,
    select,
    uses_kv_events,
)
from extproc.bench.routing.report import json_safe, markdown, plot, show, text_tables
from extproc.bench.routing.switch import switch_policy
from extproc.bench.routing.targets import target_check, target_summary
from extproc.bench.workloads import MODEL, ROUTING_WORKLOADS, describe, make_workload
from extproc.cli import DefaultsHelp


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "routing",
        help="routing quality: the default scorer against random, round robin, least queue, prefix only and the "
        "KV-event (precise) prefix scorer",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--replicas", type=int, default=4, help="simulated replicas in the pool")
    p.add_argument(
        "--num-gpu-blocks", type=int, default=4096, help="KV blocks (16 tokens) per replica: 4096 = 65,536 tokens"
    )
    p.add_argument("--time-scale", type=float, default=0.5, help="wall seconds per simulated second")
    p.add_argument(
        "--scrape-interval",
        type=float,
        help="the picker's scrape interval in wall seconds (default: 50 ms of simulated time, i.e. 0.05 x time scale)",
    )
    p.add_argument("--duration", type=float, help="simulated seconds of arrivals per cell (default 12, --quick 6)")
    p.add_argument(
        "--min-requests",
        type=int,
        help="longer cells at low rates: at least this many requests, every workload (default 240, --quick 150; "
        + ", ".join(f"{w} {n}" for w, n in MIN_REQUESTS.items())
        + ")",
    )
    add_plan_options(p, "simulated req/s")
    p.add_argument(
        "--workloads",
        help=f"comma list of workloads (default: all of {', '.join(ROUTING_WORKLOADS)}; "
        f"--quick: {', '.join(QUICK_WORKLOADS)})",
    )
    p.add_argument(
        "--policies",
        help=f"comma list of policies (default: all of {', '.join(POLICIES)}); with precise (or any policy scoring "
        "with precise_prefix) every simulator of the run publishes KV-cache events",
    )
    p.add_argument(
        "--policy-config",
        action="append",
        default=[],
        metavar="NAME=YAML",
        help="add or replace a policy: its scheduler section as inline YAML, or @FILE "
        "(e.g. 'tuned={scorers: [{name: queue, weight: 3}, {name: prefix, weight: 3}]}'); it joins --policies",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="a model directory (tokenizer.json and chat template) every simulator tokenizes with, or 'example' "
        "(a small BPE trained at start, written to the log directory); adds the policy precise_local: precise "
        "tokenizing with the same files in the picker instead of asking the engines",
    )
    p.add_argument(
        "--candidate", default="default", help="the policy the target check holds to the targets (for tuning runs)"
    )
    p.add_argument("--quick", action="store_true", help="CI smoke run: the middle rate only, shorter cells")
    p.add_argument("--json", type=Path, help="write every cell and the target check here")
    p.add_argument("--out", type=Path, help="directory for routing.json, routing.md and the PNG charts")
    p.add_argument("--log-dir", type=Path, help="process logs (default: a new temporary directory)")
    p.set_defaults(func=run)


def _minutes(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run(args: argparse.Namespace) -> int:
    """Every cell of the plan on one stack; Ctrl-C or SIGTERM stops every process it started (exit 130)."""
    from extproc.local.stack import PoolSpec, start_stack

    t0 = time.monotonic()
    if args.replicas < 1 or args.time_scale <= 0 or not 0 <= args.warmup_share < 1 or args.max_tokens < 1:
        raise SystemExit("--replicas >= 1, --time-scale > 0, 0 <= --warmup-share < 1 and --max-tokens >= 1")
    workloads = select(args.workloads, ROUTING_WORKLOADS, "workload")
    if args.workloads is None and args.quick:
        workloads = list(QUICK_WORKLOADS)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="extproc-bench-routing-"))
    if args.tokenizer is not None:  # the picker's own check of the files, before any process starts
        from extproc.bench.workloads import write_workload_tokenizer
        from extproc.hf_tokenizer import HfTokenizer, TokenizerError

        try:
            if args.tokenizer == "example":
                args.tokenizer = str(write_workload_tokenizer(log_dir / "tokenizer", args.seed))
            HfTokenizer.load(args.tokenizer)
        except TokenizerError as exc:
            raise SystemExit(f"--tokenizer: {exc}") from None
    sections, policies = policy_sections(args)
    kv_events = uses_kv_events(sections)
    rates = plan_rates(args, workloads)
    duration = args.duration if args.duration is not None else (6.0 if args.quick else 12.0)
    min_requests = args.min_requests if args.min_requests is not None else (150 if args.quick else 240)
    floors = {
        w: min_requests if args.min_requests is not None else max(min_requests, MIN_REQUESTS.get(w, 0))
        for w in workloads
    }
    scale = args.time_scale
    scrape = args.scrape_interval if args.scrape_interval is not None else 0.05 * scale
    plan = [Cell(w, r, p) for w in workloads for r in rates[w] for p in policies]
    argv = sys.argv[sys.argv.index("routing") + 1 :] if "routing" in sys.argv else sys.argv[1:]
    command = " ".join(["extproc bench routing", *argv])
    print(
        f"routing benchmark: {len(workloads)} workloads x {sum(len(rates[w]) for w in workloads) // len(workloads)} "
        f"rates x {len(policies)} policies = {len(plan)} cells of {duration:g} simulated s "
        f"({duration * scale:g} s wall, at least {min_requests} requests{_floor_note(floors, min_requests)}); "
        f"{args.replicas} replicas, "
        f"{args.num_gpu_blocks} KV blocks each, time scale {scale:g}; logs in {log_dir}",
        flush=True,
    )
    if kv_events:
        print(
            "KV-cache events: every simulator publishes them (ZMQ on its port + 1, replay + 2) for every policy "
            "of this run, since a policy scores with precise_prefix",
            flush=True,
        )
    capacity = args.replicas * args.num_gpu_blocks * 16

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    sim_args = (
        "--preset", "llama-3.2-1b", "--num-gpu-blocks", str(args.num_gpu_blocks), "--time-scale", str(scale),
        "--seed", str(args.seed), *(("--tokenizer", args.tokenizer) if args.tokenizer else ()),
    )  # fmt: skip
    stack = None
    interrupted = False
    cells: list[dict[str, Any]] = []
    effective: dict[str, dict[str, Any]] = {}
    try:
        stack = start_stack(
            log_dir,
            [PoolSpec("bench", MODEL, args.replicas, sim_args, kv_events=kv_events)],
            settings={"scrape": {"interval": scrape}},
            with_extproc=False,
            bootstrap_options={"message_timeout_ms": 1000},
        )
        replicas = [r.address for r in stack.sims["bench"]]
        bases = [r.base for r in stack.sims["bench"]]
        url = stack.gateway + "/v1/chat/completions"
        print(f"stack up in {time.monotonic() - t0:.1f}s", flush=True)
        run_start = time.monotonic()
        expected_done = 0.0
        expected = [max(floors[c.workload] / c.rate, duration) * scale + 1.0 for c in plan]
        expected_total = sum(expected)
        for i, cell in enumerate(plan, 1):
            cell_start = time.monotonic()
            count = max(20, floors[cell.workload], round(cell.rate * duration))
            workload = make_workload(cell.workload, args.seed, cell.rate, count, args.max_tokens)
            effective[cell.policy] = switch_policy(stack, sections[cell.policy], bases, settle=max(0.2, 4 * scrape))
            warmup = int(count * args.warmup_share)
            result = asyncio.run(send_cell(url, workload, scale, warmup, bases))
            row = {"workload": cell.workload, "rate": cell.rate, "policy": cell.policy}
            row.update(summarize(result, warmup, scale, replicas, capacity))
            if stack.extproc is not None:
                # The picker restarts for the next cell (its log file too): keep its view of this one.
                row["picker"] = picker_metrics(stack.metrics_url)
                shutil.copyfile(stack.extproc.log_path, log_dir / f"extproc-cell{i:03d}-{cell.policy}.log")
            cells.append(row)
            expected_done += expected[i - 1]
            elapsed = time.monotonic() - run_start
            eta = elapsed / expected_done * (expected_total - expected_done)
            print(
                f"[cell {i}/{len(plan)}] {cell.workload} {cell.rate:g} req/s {cell.policy}: "
                f"TTFT mean {show('{:.1f}', row['ttft_mean_ms'])} p99 {show('{:.1f}', row['ttft_p99_ms'])} ms, "
                f"hit {show('{:.0%}', row['hit_rate'])}, imbalance {show('{:.2f}', row['imbalance'])}, "
                f"failed {row['failed']}, host overhead p50 {show('{:.1f}', row['host_overhead_p50_ms'])} ms"
                f"{_precise_note(row)}; "
                f"cell {time.monotonic() - cell_start:.1f}s, elapsed {_minutes(time.monotonic() - t0)}, "
                f"ETA {_minutes(eta)}",
                flush=True,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if stack is not None:
            stack.stop()
        signal.signal(signal.SIGTERM, previous)
    if interrupted:
        print(f"interrupted after {len(cells)} of {len(plan)} cells; every process stopped", file=sys.stderr)
        return 130

    print(text_tables(cells))
    candidate = args.candidate if args.candidate in policies else "default"
    checks = target_check(cells, candidate)
    print(f"\ntarget check ({candidate}):")
    for line in target_summary(checks):
        print("  " + line)
    wall = time.monotonic() - t0
    result = {
        "setup": {
            "command": command.strip(),
            "replicas": args.replicas,
            "preset": "llama-3.2-1b",
            "num_gpu_blocks": args.num_gpu_blocks,
            "time_scale": scale,
            "scrape_interval_wall_s": scrape,
            "duration": duration,
            "min_requests": min_requests,
            "min_requests_per_workload": floors,
            "warmup_share": args.warmup_share,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "quick": args.quick,
            "kv_events": kv_events,
            "rates": rates,
            "workloads": {w: describe(w, args.max_tokens) for w in workloads},
            "policies": {p: {"section": sections[p], "effective": effective.get(p)} for p in policies},
        },
        "candidate": candidate,
        "cells": cells,
        "targets": checks,
        "wall_seconds": wall,
    }
    clean = json_safe(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(clean, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "routing.json").write_text(json.dumps(clean, indent=2))
        (args.out / "routing.md").write_text(markdown(result))
        paths = plot(cells, args.out)
        print(f"wrote {args.out / 'routing.json'}, {args.out / 'routing.md'} and {len(paths)} charts")
    print(f"total wall time {wall:.1f}s ({_minutes(wall)})", flush=True)
    return 0


def _floor_note(floors: dict[str, int], min_requests: int) -> str:
    """The workloads whose cells are held to more requests than ``min_requests`` (``MIN_REQUESTS``)."""
    more = [f"{w} {n}" for w, n in floors.items() if n != min_requests]
    return f"; {', '.join(more)}" if more else ""


def _precise_note(row: dict[str, Any]) -> str:
    """How the precise scorer saw the cell, from the picker's metrics (empty for other policies)."""
    picker = row.get("picker") or {}
    if not picker.get("precise_live_endpoints") and not picker.get("kv_events_connected"):
        return ""
    share = picker["precise_scored"] / max(1, row["requests"])
    return (
        f", precise: {picker['precise_live_endpoints']:.0f} live, {share:.0%} of requests scored on events, "
        f"{picker['kv_events_blocks_stored']:.0f} blocks stored / {picker['kv_events_blocks_removed']:.0f} removed, "
        f"{picker.get('render_error', 0):.0f} render errors"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run without the `extproc bench` wiring: ``python -m extproc.bench.routing [options]``."""
    parser = argparse.ArgumentParser(prog="extproc bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    add_parser(sub)
    args = parser.parse_args(["routing", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
