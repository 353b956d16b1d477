"""`extproc bench overhead`: what the picker adds to a request, next to the transport floor.

Three gateways over the same simulated pool, measured in one run, one after the other:

- ``direct``: Envoy -> simulator, no ext_proc filter;
- ``noop``: Envoy -> a do-nothing ext_proc (same grpc.aio stack) -> simulator: the transport floor;
- ``extproc``: Envoy -> `extproc serve` -> simulator.

Each gets the same open-loop load (a fixed request rate, ~4 KB chat bodies from a few tenants that share
system prompts), and then a closed-loop run measures how many requests per second one ext_proc process
sustains and its CPU time per request. The picker's CPU is split in two: its background work (scraping
every endpoint, measured while no request arrives) and the request path (the rest), because the
background share per request grows on a slower machine, where fewer requests share it. Ratios between
the rows hold on a noisy machine; absolute times do not, so the machine's reference speed is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import yaml

from extproc.bench import machine
from extproc.bench.loadgen import LoadResult, closed_loop
from extproc.cli import DefaultsHelp
from extproc.local.procs import Child, free_port

MODEL = "bench-model"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "overhead",
        help="latency the picker adds over Envoy alone and over a no-op ext_proc; picker throughput",
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of open-loop load per gateway")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the open-loop time is split into")
    p.add_argument("--throughput-duration", type=float, default=8.0, help="seconds of closed-loop load")
    p.add_argument("--connections", type=int, default=32, help="closed-loop connections")
    p.add_argument("--replicas", type=int, default=4, help="simulated endpoints in the pool")
    p.add_argument("--body-bytes", type=int, default=4096, help="approximate chat body size")
    p.add_argument("--idle", type=float, default=5.0, help="seconds the ext_procs' background CPU is measured for")
    p.add_argument(
        "--settings",
        metavar="YAML",
        help="extra configuration sections for the picker, e.g. '{scrape: {interval: 0.1}}' or "
        "'{scrape: {only_needed_series: false}}' (what the scrape costs both sides)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


def _bodies(n: int, size: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    tenants = ["".join(rng.choice(string.ascii_letters + " ") for _ in range(size - 600)) for _ in range(8)]
    out = []
    for i in range(n):
        question = "".join(rng.choice(string.ascii_letters + " ") for _ in range(400))
        body = {
            "model": MODEL,
            "max_tokens": 4,
            "messages": [
                {"role": "system", "content": tenants[i % len(tenants)]},
                {"role": "user", "content": f"{i}: {question}"},
            ],
        }
        out.append(orjson.dumps(body))
    return out


async def open_loop(url: str, bodies: list[bytes], rate: float, duration: float) -> LoadResult:
    """Send at a fixed rate regardless of how fast answers come (no coordinated omission)."""
    result = LoadResult()
    total = int(rate * duration)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()

        async def one(i: int) -> None:
            scheduled = start + i / rate
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError:
                status = 0
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == 200:
                result.ok += 1
                result.latencies.append(time.monotonic() - scheduled)
            else:
                result.failed += 1

        tasks = []
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        result.elapsed = time.monotonic() - start
        result.completed_all = total
    return result


def _idle_cpu(process: Child, seconds: float) -> float:
    """CPU seconds per second the process spends with no request arriving (its background work)."""
    before = process.cpu_seconds()
    time.sleep(seconds)
    return (process.cpu_seconds() - before) / seconds


def _without_ext_proc(bootstrap: dict[str, Any]) -> dict[str, Any]:
    from extproc.envoy.bootstrap import EXT_PROC_FILTER, connection_managers

    for manager in connection_managers(bootstrap):
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != EXT_PROC_FILTER]
    return bootstrap


def run(args: argparse.Namespace) -> int:
    # Envoy's typed config classes take a second to import: only when this benchmark runs.
    from extproc.envoy.bootstrap import build_bootstrap
    from extproc.envoy.run import start_envoy
    from extproc.local.stack import PoolSpec, start_stack

    log_dir = Path(tempfile.mkdtemp(prefix="extproc-bench-overhead-"))
    bodies = _bodies(512, args.body_bytes)
    info = machine.describe()
    print(machine.summary_line(info), flush=True)
    print(f"logs in {log_dir}", flush=True)
    settings = yaml.safe_load(args.settings) if args.settings else None
    if settings is not None and not isinstance(settings, dict):
        raise SystemExit("--settings: expected a mapping of configuration sections, e.g. '{scrape: {interval: 0.1}}'")
    stack = start_stack(
        log_dir,
        [PoolSpec("bench", MODEL, args.replicas, ("--time-scale", "0"))],
        settings=settings,
        bootstrap_options={"message_timeout_ms": 1000},
    )
    noop: Child | None = None
    extra_envoys: list[Child] = []
    results: dict[str, Any] = {
        "machine": info,
        "rate": args.rate,
        "duration": args.duration,
        "body_bytes": len(bodies[0]),
    }
    try:
        noop_address = f"127.0.0.1:{free_port()}"
        noop = Child(
            "noop-extproc", [sys.executable, "-m", "extproc.bench.noop_extproc", "--listen", noop_address], log_dir
        )
        with grpc.insecure_channel(noop_address) as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
        gateways = {"extproc": stack.gateway}
        for name, ext_proc in (("direct", None), ("noop", noop_address)):
            port, admin = free_port(), free_port()
            bootstrap = build_bootstrap(
                stack.config,
                listen=f"127.0.0.1:{port}",
                admin=f"127.0.0.1:{admin}",
                ext_proc=ext_proc or stack.config.server.listen,
                message_timeout_ms=1000,
            )
            if ext_proc is None:
                bootstrap = _without_ext_proc(bootstrap)
            extra_envoys.append(start_envoy(bootstrap, log_dir, admin, name=f"envoy-{name}"))
            gateways[name] = f"http://127.0.0.1:{port}"
        path = "/v1/chat/completions"
        rounds = max(1, args.rounds)
        print(
            f"open loop: {args.rate:g} req/s, {rounds} interleaved rounds of {args.duration / rounds:g}s per gateway, "
            f"{len(bodies[0])}-byte bodies"
        )
        print(f"{'gateway':<10}{'ok':>7}{'failed':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
        for name in ("direct", "noop", "extproc"):
            asyncio.run(open_loop(gateways[name] + path, bodies, args.rate, 1.0))  # warm-up
        outcomes = {name: LoadResult() for name in ("direct", "noop", "extproc")}
        for _ in range(rounds):
            # Interleaving the gateways spreads any drift of the machine over all three alike.
            for name, total in outcomes.items():
                part = asyncio.run(open_loop(gateways[name] + path, bodies, args.rate, args.duration / rounds))
                total.ok += part.ok
                total.failed += part.failed
                total.latencies += part.latencies
        latency: dict[str, dict[str, float]] = {}
        for name, outcome in outcomes.items():
            row = {
                "ok": outcome.ok,
                "failed": outcome.failed,
                "p50_ms": outcome.percentile(0.5) * 1e3,
                "p90_ms": outcome.percentile(0.9) * 1e3,
                "p99_ms": outcome.percentile(0.99) * 1e3,
            }
            latency[name] = row
            print(
                f"{name:<10}{row['ok']:>7}{row['failed']:>8}{row['p50_ms']:>9.2f}{row['p90_ms']:>9.2f}"
                f"{row['p99_ms']:>9.2f}",
                flush=True,
            )
        added = {
            name: {q: latency[name][q] - latency["direct"][q] for q in ("p50_ms", "p99_ms")}
            for name in ("noop", "extproc")
        }
        ratio = added["extproc"]["p50_ms"] / added["noop"]["p50_ms"] if added["noop"]["p50_ms"] > 0 else float("nan")
        print(
            f"added over direct: noop p50 {added['noop']['p50_ms']:.2f} ms, p99 {added['noop']['p99_ms']:.2f} ms; "
            f"extproc p50 {added['extproc']['p50_ms']:.2f} ms, p99 {added['extproc']['p99_ms']:.2f} ms; "
            f"extproc/noop added p50 = {ratio:.2f}x",
            flush=True,
        )
        results["latency"] = latency
        results["added"] = added
        results["extproc_over_noop_added_p50"] = ratio

        assert stack.extproc is not None
        processes = {"noop": noop, "extproc": stack.extproc}
        replicas = [r.child for r in stack.sims["bench"]]
        replicas_before = sum(c.cpu_seconds() for c in replicas)
        started = time.monotonic()
        background = {name: _idle_cpu(process, args.idle) for name, process in processes.items()}
        # The replicas serve the picker's scrapes meanwhile (and nothing else): what scraping costs them.
        replicas_idle = (sum(c.cpu_seconds() for c in replicas) - replicas_before) / (time.monotonic() - started)
        print(
            f"background CPU with no traffic ({args.idle:g}s): "
            + ", ".join(f"{name} {cpu * 1e3:.1f} ms/s" for name, cpu in background.items())
            + f" (the picker scrapes {args.replicas} endpoints every {stack.config.scrape.interval:g}s); "
            f"the {args.replicas} replicas serving those scrapes {replicas_idle * 1e3:.1f} ms/s",
            flush=True,
        )
        results["replicas_background_cpu_seconds_per_second"] = replicas_idle
        print(f"closed loop: {args.connections} connections for {args.throughput_duration:g}s")
        print(
            f"{'gateway':<10}{'req/s':>9}{'failed':>8}{'CPU us/req':>12}{'background':>12}{'request path':>14}"
            f"{'1-core req/s':>14}"
        )
        throughput: dict[str, dict[str, float]] = {}
        for name, process in processes.items():
            cpu_before, wall_before = process.cpu_seconds(), time.monotonic()
            outcome = asyncio.run(
                closed_loop(
                    gateways[name] + path,
                    lambda i: bodies[i % len(bodies)],
                    connections=args.connections,
                    duration=args.throughput_duration,
                    warmup=1.0,
                )
            )
            requests = max(1, outcome.completed_all)
            cpu = (process.cpu_seconds() - cpu_before) / requests
            share = background[name] * (time.monotonic() - wall_before) / requests
            path_cpu = max(0.0, cpu - share)
            throughput[name] = {
                "rate": outcome.rate,
                "failed": outcome.failed,
                "cpu_us_per_request": cpu * 1e6,
                "background_us_per_request": share * 1e6,
                "request_path_us_per_request": path_cpu * 1e6,
                "one_core_capacity": 1 / cpu if cpu else float("nan"),
            }
            row = throughput[name]
            print(
                f"{name:<10}{row['rate']:>9.0f}{row['failed']:>8}{row['cpu_us_per_request']:>12.0f}"
                f"{row['background_us_per_request']:>12.0f}{row['request_path_us_per_request']:>14.0f}"
                f"{row['one_core_capacity']:>14.0f}",
                flush=True,
            )
        floor = throughput["noop"]["request_path_us_per_request"]
        path_ratio = throughput["extproc"]["request_path_us_per_request"] / floor if floor else float("nan")
        print(f"request-path CPU, extproc / noop: {path_ratio:.2f}x (the machine-independent figure)", flush=True)
        results["background_cpu_seconds_per_second"] = background
        results["extproc_over_noop_request_path_cpu"] = path_ratio
        results["throughput"] = throughput
    finally:
        for child in extra_envoys:
            child.stop()
        if noop is not None:
            noop.stop()
        stack.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
