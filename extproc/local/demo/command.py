"""The ``extproc demo`` command: start the local gateway, run the scenarios, print the summary, stop by PID.

The start and the stop are `extproc up`'s (`up.run_gateway`); Ctrl-C and SIGTERM are only flags
(`StopSignals`), polled by the traffic and the idle loop, so stopping the children is never cut short.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extproc.cli import DefaultsHelp
from extproc.local import up
from extproc.local.multi_model import AB_ROUTE, POOLS
from extproc.local.terminal import StopSignals, say

if TYPE_CHECKING:
    from extproc.local.demo.snapshots import Snapshot
    from extproc.local.prometheus import Prometheus
    from extproc.local.stack import Stack

DEFAULT_DURATION_S = 60.0
DESCRIPTION = (
    "The multi-model demo: the local gateway (simulated 1B and 3B pools, the picker, Envoy) with a 70/30 A/B split, "
    "the write-up's three traffic scenarios (path routing, A/B split, load test) and a summary of what was measured."
)


def curl_lines(gateway_port: int) -> str:
    base = f"http://localhost:{gateway_port}"
    return f"""try it yourself (the write-up's commands, on this gateway):
  # 1B model
  curl -s -X POST "{base}/v1/1b/chat/completions" -H "Content-Type: application/json" \\
    -d '{{"model": "llama-3-2-1b", "messages": [{{"role": "user", "content": "Hello from 1B model!"}}]}}'
  # 3B model
  curl -s -X POST "{base}/v1/3b/chat/completions" -H "Content-Type: application/json" \\
    -d '{{"model": "llama-3-2-3b", "messages": [{{"role": "user", "content": "Hello from 3B model!"}}]}}'
  # A/B split (70/30): the "model" field of each answer says which model served it
  for i in {{1..10}}; do
    curl -s -X POST "{base}/v1/{AB_ROUTE}/chat/completions" -H "Content-Type: application/json" \\
      -d '{{"model": "auto", "messages": [{{"role": "user", "content": "Test A/B routing #'$i'"}}]}}' | \\
      python3 -c 'import json, sys; print(json.load(sys.stdin)["model"])'
  done
  # every model behind the gateway
  curl -s {base}/v1/models"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    up.add_port_arguments(p)
    up.add_prometheus_arguments(p)
    p.add_argument(
        "--duration",
        type=float,
        help=f"seconds of traffic, then exit (default: {DEFAULT_DURATION_S:g} s of traffic, "
        "then keep the gateway up until Ctrl-C)",
    )
    p.add_argument("--rate", type=float, default=30.0, help="requests per second, in total (open loop)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the summary as JSON here")
    p.add_argument("--report", type=Path, metavar="DIR", help="write PNG charts and index.html here (matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload (Envoy's A/B draws are its own)")
    p.add_argument("--status-every", type=float, default=3.0, help="seconds between status lines")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="the multi-model demo: the local gateway with a 70/30 A/B split, three traffic scenarios, a summary",
        description=DESCRIPTION,
        formatter_class=DefaultsHelp,
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.rate <= 0 or args.status_every <= 0 or (args.duration is not None and args.duration <= 0):
        print("extproc demo: error: --rate, --duration and --status-every must be positive", file=sys.stderr)
        return 2
    if args.report is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("extproc demo: error: --report needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
    try:
        up.check_before_start(args)  # a missing Prometheus binary or a taken port stops the demo before anything starts
    except up.START_REFUSALS as exc:
        print(f"extproc demo: error: {exc}", file=sys.stderr)
        return 2

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="extproc-demo-"))
    return up.run_gateway(args, log_dir, None, functools.partial(_demo, args), command="demo", who="the demo")


def _demo(args: argparse.Namespace, stack: Stack, prometheus: Prometheus | None, signals: StopSignals) -> int:
    # What runs where, the A/B split and Prometheus; its curl examples come at the end, after the summary.
    say(up.describe(stack, prometheus).split("\ntry:")[0])
    # Imported here: aiohttp, orjson and the summary only when the demo really runs, not for `extproc --help`.
    import orjson

    from extproc.local.demo.report import write_report
    from extproc.local.demo.snapshots import models_endpoint, snapshot
    from extproc.local.demo.summary import RunInfo, summarize
    from extproc.local.demo.summary_text import format_summary
    from extproc.local.demo.traffic import Traffic
    from extproc.local.demo.workload import Workload, make_phases

    duration = DEFAULT_DURATION_S if args.duration is None else args.duration
    models = {spec.name: spec.model for spec in POOLS}
    for name in models:
        pool = stack.config.pool(name)
        if pool is not None:
            models[name] = pool.served_name
    replicas = {r.address: (pool, f"{pool}-{i}") for pool, rs in stack.sims.items() for i, r in enumerate(rs)}
    info = RunInfo(stack.gateway, args.rate, args.seed, models, replicas)
    rng = random.Random(args.seed)
    workload = Workload(models, rng)
    traffic = Traffic(
        stack.gateway,
        rate=args.rate,
        pool_of_model={m: p for p, m in models.items()},
        pool_of_replica={a: p for a, (p, _n) in replicas.items()},
        stopping=lambda: signals.requested,
        status_every=args.status_every,
    )
    say(f"sending {duration:g} s of traffic at {args.rate:g} req/s; Ctrl-C stops everything")

    async def scenarios() -> tuple[Snapshot, Snapshot, dict[str, Any]]:
        listed = await models_endpoint(stack.gateway)
        before = await snapshot(stack)
        await traffic.run(make_phases(workload, duration, rng))
        return before, await snapshot(stack), listed

    before, after, listed = asyncio.run(scenarios())
    summary = summarize(traffic, before, after, info, listed)
    say("")
    say(format_summary(summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
        say(f"summary JSON: {args.json}")
    if args.report is not None and not signals.requested:
        files = write_report(summary, traffic.outcomes, args.report)
        say(f"report: {files[-1]} ({len(files) - 1} charts)")
    if summary["interrupted"] or signals.requested:
        return 130
    if args.duration is None:
        say("")
        say(curl_lines(stack.gateway_port))
        say(f"Envoy stats: http://localhost:{stack.admin_port}/stats/prometheus   picker: {stack.metrics_url}")
        if prometheus is not None:
            say(f"Prometheus: http://localhost:{prometheus.port} (stops with the gateway)")
        say("the gateway keeps running; Ctrl-C stops everything")
        signals.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="extproc demo",
        description=DESCRIPTION,
        formatter_class=DefaultsHelp,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))
