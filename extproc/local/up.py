"""`extproc up`: the local gateway on a laptop, no GPU: simulated 1B and 3B pools, the picker, Envoy.

It runs until Ctrl-C (or ``--duration``), then stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

from extproc.local.procs import port_free
from extproc.local.prometheus import Prometheus, PrometheusError, PrometheusMissing, find_prometheus, start_prometheus
from extproc.local.stack import PoolSpec, Stack

DEFAULT_POOLS = (
    PoolSpec("1b", "llama-3-2-1b", 2, ("--preset", "llama-3.2-1b")),
    PoolSpec("3b", "llama-3-2-3b", 2, ("--preset", "llama-3.2-3b")),
)


# Prometheus's own default, 9090, is the picker's --metrics-port here; 9091 is the next one.
PROMETHEUS_PORT = 9091


class PortTaken(RuntimeError):
    pass


def check_ports_free(ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Fail before starting anything if a fixed port is in use or given twice, naming the option that moves it."""
    owners: dict[int, str] = {}
    for option, port in ports.items():
        if port in owners:
            raise PortTaken(f"port {port} is given to both {owners[port]} and {option}: choose another with {option}")
        owners[port] = option
    for option, port in ports.items():
        if not port_free(port, host):
            raise PortTaken(f"port {port} on {host} is already in use: choose another with {option}")


def add_port_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8080, help="the gateway (Envoy) port")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port (/stats/prometheus)")
    p.add_argument("--extproc-port", type=int, default=9002, help="the ext_proc gRPC port")
    p.add_argument("--metrics-port", type=int, default=9090, help="the picker's Prometheus port")
    p.add_argument("--log-dir", type=Path, help="where process logs go (default: a new temporary folder)")


def add_prometheus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also run a real Prometheus (the `prometheus` binary) scraping Envoy, the picker and every simulator",
    )
    p.add_argument(
        "--prometheus-port",
        type=int,
        default=PROMETHEUS_PORT,
        help="Prometheus's port with --prometheus (not 9090: that is the picker's --metrics-port)",
    )


def gateway_ports(args: argparse.Namespace) -> dict[str, int]:
    """The fixed ports of the gateway by the option that sets them; --prometheus-port only with --prometheus."""
    ports = {
        "--port": args.port,
        "--admin-port": args.admin_port,
        "--extproc-port": args.extproc_port,
        "--metrics-port": args.metrics_port,
    }
    if getattr(args, "prometheus", False):
        ports["--prometheus-port"] = args.prometheus_port
    return ports


def start_gateway(args: argparse.Namespace, pools: tuple[PoolSpec, ...] = DEFAULT_POOLS) -> Stack:
    from extproc.local.stack import start_stack

    check_ports_free(gateway_ports(args))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="extproc-"))
    replicas = sum(p.replicas for p in pools)
    print(f"starting {replicas} simulated vLLM replicas, the ext_proc and Envoy (logs in {log_dir}) ...", flush=True)
    return start_stack(
        log_dir,
        pools,
        gateway_port=args.port,
        admin_port=args.admin_port,
        extproc_port=args.extproc_port,
        metrics_port=args.metrics_port,
    )


def describe(stack: Stack, prometheus: Prometheus | None = None) -> str:
    lines = [f"gateway: {stack.gateway}"]
    for name, replicas in stack.sims.items():
        pool = stack.config.pool(name)
        models = ", ".join(pool.models) if pool else "?"
        lines.append(f"  pool {name} ({models}): {', '.join(r.address for r in replicas)}")
    lines += [
        f"picker metrics: {stack.metrics_url}",
        f"Envoy stats:    http://127.0.0.1:{stack.admin_port}/stats/prometheus",
        *([prometheus.describe(stack)] if prometheus is not None else []),
        "try:",
        f"  curl -s {stack.gateway}/v1/1b/chat/completions -H 'Content-Type: application/json' \\",
        """    -d '{"model": "llama-3-2-1b", "messages": [{"role": "user", "content": "Hello from 1B model!"}]}'""",
        f"  curl -s {stack.gateway}/v1/chat/completions -H 'Content-Type: application/json' \\",
        """    -d '{"model": "llama-3-2-3b", "messages": [{"role": "user", "content": "Hello from 3B model!"}]}'""",
    ]
    return "\n".join(lines)


def wait_until_stopped(duration: float | None) -> None:
    """Sleep until Ctrl-C, SIGTERM or the end of ``duration``."""
    stop = False

    def handler(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    # SIGINT too, explicitly: a process started from a background shell job inherits SIGINT ignored, and Python
    # then never raises KeyboardInterrupt.
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while not stop and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run the local gateway: simulated 1B and 3B pools, the picker and Envoy, until Ctrl-C",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_port_arguments(p)
    add_prometheus_arguments(p)
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.prometheus:
            find_prometheus()  # a missing binary stops us before anything starts
        stack = start_gateway(args)
    except (PortTaken, PrometheusMissing) as exc:
        print(f"extproc up: error: {exc}", file=sys.stderr)
        return 2
    try:
        prometheus = None
        if args.prometheus:
            print("starting Prometheus ...", flush=True)
            try:
                prometheus = start_prometheus(stack, stack.log_dir, args.prometheus_port)
                prometheus.wait_targets_up()
            except PrometheusError as exc:
                print(f"extproc up: error: {exc}", file=sys.stderr)
                return 1
        print(describe(stack, prometheus), flush=True)
        print("running; Ctrl-C stops everything", flush=True)
        wait_until_stopped(args.duration)
    finally:
        print("stopping ...", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stack.stop()
    return 0
