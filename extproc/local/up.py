"""`extproc up`: the local gateway on a laptop, no GPU: simulated 1B and 3B pools, the picker, Envoy.

The gateway is the write-up's (`extproc.local.multi_model`: path and model routing, the 70/30 A/B split),
the same one `extproc demo` sends its traffic to. ``--config FILE`` runs the picker and Envoy for a user's own
configuration instead, in front of the model servers the file names. It runs until Ctrl-C, SIGTERM or
``--duration``, then stops every process it started, by PID.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extproc.cli import DefaultsHelp
from extproc.config import ConfigError, parse_host_port
from extproc.local.multi_model import POOLS, SPLIT_SETTINGS
from extproc.local.procs import port_free
from extproc.local.prometheus import Prometheus, PrometheusMissing, find_prometheus, start_prometheus
from extproc.local.stack import Stack, local_address, start_picker_and_envoy, start_stack
from extproc.local.terminal import StopSignals, say

if TYPE_CHECKING:
    from extproc.config import Config, Pool

# Prometheus's own default, 9090, is the picker's --metrics-port here; 9091 is the next one.
PROMETHEUS_PORT = 9091

# With --config the picker listens where the file says: these options would contradict it.
FILE_DECIDES = {"--extproc-port": "server.listen", "--metrics-port": "server.metrics_listen"}

DESCRIPTION = (
    "Run the local gateway until Ctrl-C: two simulated Llama-3.2-1B and two simulated Llama-3.2-3B replicas, "
    "the picker and Envoy, with path routing (/v1/1b/..., /v1/3b/...), model routing (/v1/chat/completions) "
    "and the 70/30 A/B split /v1/ab-test/... sticky on x-user-id. With --config FILE: the picker "
    "(`extproc serve --config FILE`, on the file's server.listen and server.metrics_listen) and Envoy "
    "generated from the same file, on --port and --admin-port, in front of the model servers the file names; "
    "no simulators."
)


class PortTaken(RuntimeError):
    """A fixed port is in use or given twice; the message names the option (or file field) that moves it."""


class UsageError(ValueError):
    """Options that contradict each other; the message says which and what to do instead."""


class _Given(argparse.Action):
    """Store the value and remember the option was given, so --config can refuse what its file decides."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = (*getattr(namespace, "given", ()), self.option_strings[0])


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
    """The gateway's fixed ports and --log-dir, shared by `extproc up` and `extproc demo`."""
    p.add_argument("--port", type=int, default=8080, help="the gateway (Envoy) port")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port (/stats/prometheus)")
    p.add_argument("--extproc-port", type=int, default=9002, action=_Given, help="the ext_proc gRPC port")
    p.add_argument("--metrics-port", type=int, default=9090, action=_Given, help="the picker's Prometheus port")
    p.add_argument("--log-dir", type=Path, help="where process logs go (default: a new temporary folder)")


def add_prometheus_arguments(p: argparse.ArgumentParser) -> None:
    """--prometheus and its port, shared by `extproc up` and `extproc demo`."""
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="also run a real Prometheus (the `prometheus` binary) scraping Envoy, the picker and every simulator "
        "(with --config: every static endpoint of the file)",
    )
    p.add_argument(
        "--prometheus-port",
        type=int,
        default=PROMETHEUS_PORT,
        help="Prometheus's port with --prometheus (not 9090: that is the picker's --metrics-port)",
    )


def gateway_ports(args: argparse.Namespace, config: Config | None = None) -> dict[str, int]:
    """The fixed ports of the gateway by what sets them: options, or with ``config`` the file's server fields;
    --prometheus-port only with --prometheus."""
    ports = {"--port": args.port, "--admin-port": args.admin_port}
    if config is None:
        ports |= {"--extproc-port": args.extproc_port, "--metrics-port": args.metrics_port}
    else:
        for field, listen in (("listen", config.server.listen), ("metrics_listen", config.server.metrics_listen)):
            if not listen.startswith("unix:"):
                ports[f"server.{field} in {args.config}"] = parse_host_port(listen)[1]
    if getattr(args, "prometheus", False):
        ports["--prometheus-port"] = args.prometheus_port
    return ports


# What `check_before_start` raises: the command says why and exits 2, with nothing started.
START_REFUSALS = (ConfigError, UsageError, PortTaken, PrometheusMissing)


def check_before_start(args: argparse.Namespace) -> Config | None:
    """Refuse the start before any process runs or any folder is made: a bad --config file or option, a missing
    Prometheus binary with --prometheus, a taken port. Returns the --config file's configuration (None without)."""
    config = load_user_config(args)
    if getattr(args, "prometheus", False):
        find_prometheus()
    check_ports_free(gateway_ports(args, config))
    return config


def load_user_config(args: argparse.Namespace) -> Config | None:
    """The file of ``--config``, checked as `extproc serve` checks it (None without --config).

    Raises UsageError for options the file decides and ConfigError for an invalid file.
    """
    if getattr(args, "config", None) is None:
        return None
    refused = [option for option in FILE_DECIDES if option in getattr(args, "given", ())]
    if refused:
        fields = " and ".join(FILE_DECIDES[option] for option in refused)
        raise UsageError(
            f"{' and '.join(refused)} cannot be used with --config: the picker listens where {args.config} says; "
            f"set {fields} in {args.config} instead"
        )
    from extproc.gateway.command import check_config

    return check_config(args.config)[0]


def start_gateway(args: argparse.Namespace, log_dir: Path, config: Config | None = None) -> Stack:
    """Start the gateway ``args`` ask for: the write-up's simulated stack, or the picker and Envoy of ``config``."""
    if config is not None:
        say(f"starting the picker (extproc serve --config {args.config}) and Envoy (logs in {log_dir}) ...")
        stack = Stack(log_dir, config, Path(args.config), gateway_port=args.port, admin_port=args.admin_port)
        listen = config.server.listen
        ext_proc = {} if listen.startswith("unix:") else {"ext_proc": local_address(listen)}
        return start_picker_and_envoy(stack, bootstrap_options=ext_proc)
    replicas = sum(p.replicas for p in POOLS)
    say(f"starting {replicas} simulated vLLM replicas, the ext_proc and Envoy (logs in {log_dir}) ...")
    return start_stack(
        log_dir,
        POOLS,
        settings=SPLIT_SETTINGS,
        gateway_port=args.port,
        admin_port=args.admin_port,
        extproc_port=args.extproc_port,
        metrics_port=args.metrics_port,
    )


def _endpoints(pool: Pool) -> str:
    if pool.endpoints.static is not None:
        return ", ".join(pool.endpoints.static)
    dns = pool.endpoints.dns
    return f"DNS {dns.name}:{dns.port}" if dns else "?"


def _hello(pool: Pool) -> str:
    return f"Hello from {pool.name.upper()} model!"


def _curl(url: str, model: str, content: str) -> list[str]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}]})
    return [f"  curl -s {url} -H 'Content-Type: application/json' \\", f"    -d '{body}'"]


def describe(stack: Stack, prometheus: Prometheus | None = None) -> str:
    """What runs where, then ``curl`` commands to try (the demo prints the part before "try:")."""
    config = stack.config
    lines = [f"gateway: {stack.gateway}"]
    lines += [f"  pool {pool.name} ({', '.join(pool.models)}): {_endpoints(pool)}" for pool in config.pools]
    lines += [
        f"picker metrics: {stack.metrics_url}",
        f"Envoy stats:    http://127.0.0.1:{stack.admin_port}/stats/prometheus",
    ]
    for split in config.splits:
        total = sum(b.weight for b in split.backends)
        weights = " / ".join(f"{b.pool} {100 * b.weight / total:.3g}%" for b in split.backends)
        sticky = f", sticky on {split.sticky_header}" if split.sticky_header else ""
        lines.append(f"  A/B split /v1/{split.name}/...: {weights}{sticky}")
    if prometheus is not None:
        lines.append(prometheus.describe(stack))
    # The write-up's commands: by path to the first pool, by model to the last, and each split.
    first, last = config.pools[0], config.pools[-1]
    lines.append("try:")
    lines += _curl(f"{stack.gateway}/v1/{first.name}/chat/completions", first.served_name, _hello(first))
    lines += _curl(f"{stack.gateway}/v1/chat/completions", last.served_name, _hello(last))
    for split in config.splits:
        lines += _curl(f"{stack.gateway}/v1/{split.name}/chat/completions", "auto", "Test A/B routing #1")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run the local gateway: simulated 1B and 3B pools, the picker and Envoy, until Ctrl-C",
        description=DESCRIPTION,
        formatter_class=DefaultsHelp,
    )
    add_port_arguments(p)
    add_prometheus_arguments(p)
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="run the gateway for your own configuration file instead: the picker on the file's server.listen "
        "and server.metrics_listen (so not with --extproc-port or --metrics-port) and Envoy on --port and "
        "--admin-port, in front of the file's endpoints; no simulators",
    )
    p.set_defaults(func=run)


def run_gateway(
    args: argparse.Namespace,
    log_dir: Path,
    config: Config | None,
    body: Callable[[Stack, Prometheus | None, StopSignals], int],
    *,
    command: str,
    who: str,
) -> int:
    """Start the gateway (and Prometheus with --prometheus), run ``body`` while it is up, then stop every process
    by PID whatever happened: the one start and stop of `extproc up` and `extproc demo`. Exit status: ``body``'s,
    130 when interrupted while starting, 1 when a process did not start."""
    stack: Stack | None = None
    with StopSignals() as signals:
        try:
            stack = start_gateway(args, log_dir, config)
            prometheus = None
            if args.prometheus:  # inside the start: a Ctrl-C now is handled as during the stack's start
                say("starting Prometheus ...")
                prometheus = start_prometheus(stack, log_dir, args.prometheus_port)
                prometheus.wait_targets_up()
            signals.starting = False
            if signals.requested:
                say("interrupted while starting")
                return 130
            return body(stack, prometheus, signals)
        except KeyboardInterrupt:
            say("start aborted")
            return 130
        except (RuntimeError, OSError) as exc:  # a process did not start: its log tail is in the message
            print(f"extproc {command}: error: {exc}", file=sys.stderr)
            return 1
        finally:
            signals.starting = False
            if stack is not None:
                say("stopping ...")
                stack.stop()
                say(f"stopped every process {who} started")


def _serve(args: argparse.Namespace, stack: Stack, prometheus: Prometheus | None, signals: StopSignals) -> int:
    say(describe(stack, prometheus))
    say("running; Ctrl-C stops everything")
    signals.wait(args.duration)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        config = check_before_start(args)
    except START_REFUSALS as exc:
        where = f"{args.config}: " if isinstance(exc, ConfigError) and str(args.config) not in str(exc) else ""
        print(f"extproc up: error: {where}{exc}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="extproc-"))
    return run_gateway(args, log_dir, config, functools.partial(_serve, args), command="up", who="extproc up")
