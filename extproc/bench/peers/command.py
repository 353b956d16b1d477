"""The command: its options, then the run (each cell on fresh replicas, tables, checks, files)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from extproc.cli import DefaultsHelp


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bench peers` and `bench replicas`: the same machinery, other default routers and workloads."""
    from extproc.bench.peers.plan import PEER_WORKLOADS, REPLICA_WORKLOADS
    from extproc.bench.peers.routers import PEER_ROUTERS, QUICK_ROUTERS, REPLICA_ROUTERS, ROUTERS

    p = sub.add_parser(
        "peers",
        help="the gateway against sglang-router and vllm-router on the same fresh simulators, measured at the client",
        formatter_class=DefaultsHelp,
    )
    p.add_argument(
        "--routers",
        help=f"comma list of {', '.join(ROUTERS)} (default: {', '.join(PEER_ROUTERS)}; --quick: "
        f"{', '.join(QUICK_ROUTERS)}); a peer that is not installed is skipped, saying so",
    )
    p.add_argument("--workloads", help=f"comma list (default: all of {', '.join(PEER_WORKLOADS)})")
    _options(p)
    r = sub.add_parser(
        "replicas",
        help="one picker against two behind the same Envoy, without and with shared state (Redis), on fresh simulators",
        formatter_class=DefaultsHelp,
    )
    r.add_argument(
        "--routers",
        help=f"comma list of {', '.join(ROUTERS)} (default: {', '.join(REPLICA_ROUTERS)}); extproc-x2-redis "
        "starts its own redis-server (Debian: apt-get install redis-server)",
    )
    r.add_argument("--workloads", help=f"comma list (default: {', '.join(REPLICA_WORKLOADS)})")
    _options(r)


def _options(p: argparse.ArgumentParser) -> None:
    from extproc.bench.peers.plan import DEFAULT_RATES
    from extproc.bench.peers.routers import PROGRAMS
    from extproc.bench.routing.plan import add_plan_options
    from extproc.sim.config import PRESETS

    defaults = "; ".join(f"{w} {','.join(f'{r:g}' for r in rs)}" for w, rs in DEFAULT_RATES.items())
    add_plan_options(p, f"offered req/s (defaults: {defaults})")
    p.add_argument("--replicas", type=int, default=4, help="simulated replicas behind every router")
    p.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS), help="the simulators' latency preset")
    p.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=1000,
        help="KV blocks (16 tokens) per replica: 1000 holds about a third of the multitenant working set",
    )
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="the simulators' wall seconds per simulated second (1: real time)"
    )
    for flag, kind, text in (  # options without a fixed default: their help says what happens without them
        ("--duration", float, "seconds of arrivals per cell (default 20, --quick 5)"),
        ("--min-requests", int, "at least this many requests per cell (default 300, --quick 60)"),
        ("--json", Path, "write every cell and the checks here"),
        ("--out", Path, "directory for peers.json, peers.md and the PNG charts"),
        ("--log-dir", Path, "every process's log, a directory per cell (default: a new temporary one)"),
    ):
        p.add_argument(flag, type=kind, help=text)
    p.add_argument(
        "--gateway-settings",
        metavar="YAML",
        help="extra top-level configuration sections for both extproc routers, e.g. '{scrape: {interval: 1.0}}'",
    )
    p.add_argument(
        "--policy",
        metavar="NAME=YAML",
        action="append",
        default=[],
        help="also run the gateway as router extproc:NAME with this scheduler section (repeatable), e.g. "
        "'prefix_only={filters: [subset, healthy], scorers: [{name: prefix}]}'; a mapping with a top-level key "
        "(scheduler, scrape, limits, server) is taken as those sections, e.g. 'slow={scrape: {interval: 0.2}}'",
    )
    for kind, program in PROGRAMS.items():
        p.add_argument(
            f"--{kind}-router", metavar="PATH", help=f"the {program} command (default: beside python, or on PATH)"
        )
    p.add_argument("--quick", action="store_true", help="CI smoke run: the middle rate, four routers, short cells")
    p.add_argument(
        "--calibrate",
        metavar="ROUTER",
        nargs="?",
        const="sglang-round_robin",
        help="instead of the comparison, find each workload's capacity under ROUTER (a round robin) and print "
        "rates at 30/60/90 %% of it",
    )
    p.set_defaults(func=run)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))  # h:mm:ss


def _settings(args: argparse.Namespace, programs: dict[str, str]) -> Any:
    """The run's fixed settings from the options (checked), as a `cell.CellSettings`."""
    import yaml

    from extproc.bench.peers.cell import CellSettings
    from extproc.bench.peers.routers import SimSetup

    if args.replicas < 1 or args.time_scale <= 0 or not 0 <= args.warmup_share < 1 or args.max_tokens < 1:
        raise SystemExit("--replicas >= 1, --time-scale > 0, 0 <= --warmup-share < 1 and --max-tokens >= 1")
    gateway = yaml.safe_load(args.gateway_settings) if args.gateway_settings else {}
    if not isinstance(gateway, dict):
        raise SystemExit("--gateway-settings: expected a mapping of configuration sections, e.g. '{scrape: {...}}'")
    return CellSettings(
        setup=SimSetup(args.replicas, args.preset, args.num_gpu_blocks, args.time_scale, args.seed),
        duration=args.duration if args.duration is not None else (5.0 if args.quick else 20.0),
        min_requests=args.min_requests if args.min_requests is not None else (60 if args.quick else 300),
        warmup_share=args.warmup_share,
        max_tokens=args.max_tokens,
        seed=args.seed,
        programs=programs,
        gateway_settings=gateway,
    )


def run(args: argparse.Namespace) -> int:
    """The comparison or the calibration; Ctrl-C or SIGTERM stops every process it started (exit 130)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the run as Ctrl-C does
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted: every process the run started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """Every (workload, rate, router) cell, then the tables, the checks and the files."""
    from extproc.bench.peers import plan
    from extproc.bench.peers.calibrate import calibrate
    from extproc.bench.peers.cell import progress, run_cell
    from extproc.bench.peers.checks import done_when
    from extproc.bench.peers.report import save, text_report
    from extproc.bench.routing.plan import select
    from extproc.bench.workloads import describe

    t0 = time.monotonic()
    specs, programs, skipped = plan.routers(args)
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", flush=True)
    settings = _settings(args, programs)
    bench = getattr(args, "bench", "peers")
    if args.workloads is None and bench == "replicas":
        args.workloads = ",".join(plan.REPLICA_WORKLOADS)
    workloads = select(args.workloads, plan.PEER_WORKLOADS, "workload")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"extproc-bench-{bench}-"))
    if args.calibrate:
        return calibrate(args, settings, workloads, log_dir)
    if not specs:
        raise SystemExit("no router to run: every selected router was skipped")
    rates = plan.rates(args, workloads)
    cells = [(w, r, spec) for w in workloads for r in rates[w] for spec in specs]
    expected = [settings.seconds(r) for _, r, _ in cells]
    print(
        f"{bench} benchmark: {len(cells)} cells ({len(workloads)} workloads x their rates x {len(specs)} routers) of "
        f"{settings.duration:g} s and at least {settings.min_requests} requests, each on {args.replicas} new "
        f"replicas ({args.preset}, {args.num_gpu_blocks} KV blocks, time scale {args.time_scale:g}); logs in {log_dir}",
        flush=True,
    )
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    options = sys.argv[sys.argv.index(bench) + 1 :] if bench in sys.argv else sys.argv[1:]
    setup.update(
        bench=bench,
        command=" ".join([f"extproc bench {bench}", *options]),
        duration=settings.duration,
        min_requests=settings.min_requests,
        rates=rates,
        workloads={w: describe(w, args.max_tokens) for w in workloads},
        routers={
            s.name: {"kind": s.kind, "policy": s.policy, "scheduler": s.scheduler, "settings": s.settings}
            for s in specs
        },
        peers=plan.versions(programs),
        host={"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
    )
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for i, (workload, rate, spec) in enumerate(cells, 1):
        started = time.monotonic()
        try:
            rows.append(run_cell(settings, spec, workload, rate, log_dir / f"{i:03d}-{workload}-{rate:g}-{spec.name}"))
            line = progress(rows[-1])
        except RuntimeError as exc:  # a router that did not start: say so, go on with the others
            failed.append({"workload": workload, "rate": rate, "router": spec.name, "error": str(exc)})
            line = f"{workload} {rate:g} req/s {spec.name}: did not start ({str(exc).splitlines()[0]})"
        now = time.monotonic()
        eta = sum(expected[i:]) * (now - t0) / sum(expected[:i])  # at the pace so far
        print(
            f"[cell {i}/{len(cells)}] {line}; cell {now - started:.1f}s, elapsed {_clock(now - t0)}, ETA {_clock(eta)}",
            flush=True,
        )

    checks = done_when(rows)
    print(text_report(rows, checks))
    setup["host"]["loadavg_after"] = os.getloadavg()
    result = {"setup": setup, "skipped": skipped, "failed_cells": failed, "cells": rows, "checks": checks}
    result["wall_seconds"] = time.monotonic() - t0
    written = save(result, args.json, args.out)
    if written:
        print("wrote " + ", ".join(str(path) for path in written))
    print(f"total wall time {result['wall_seconds']:.1f}s ({_clock(result['wall_seconds'])})", flush=True)
    return 1 if failed else 0
