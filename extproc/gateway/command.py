"""``extproc serve``: run the endpoint picker for a configuration file, or check that file."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extproc.config import Config
    from extproc.scheduling.scheduler import Scheduler

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the ext_proc endpoint picker",
        description="Run the Envoy ext_proc endpoint picker: gRPC ExternalProcessor, health, /metrics.",
    )
    p.add_argument("--config", required=True, help="YAML configuration (see examples/config.yaml)")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration, print it as it would run (every default and plugin param filled in), exit",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="picker processes on the same gRPC port (SO_REUSEPORT), worker i's metrics on the metrics port + i; "
        "they share what they learn only with state.backend: redis (default: 1)",
    )
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by --workers
    p.set_defaults(func=run)


def check_config(path: str | Path) -> tuple[Config, Scheduler]:
    """Load a configuration file and build its scheduler, as the picker would: every error (the file, a plugin
    name, a plugin's params) raises ConfigError here, at start, never on a request."""
    from extproc.config import load_config
    from extproc.scheduling.scheduler import Scheduler

    config = load_config(path)
    if config.state.backend == "redis":  # the URL's form and the password's source, checked without connecting
        from extproc.state.connect import client

        client(config.state)
    return config, Scheduler.from_config(config)


def run(args: argparse.Namespace) -> int:
    import yaml

    from extproc.config import ConfigError

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # config warnings (moved keys) show here
    try:
        config, scheduler = check_config(args.config)
    except ConfigError as exc:
        print(f"extproc serve: {exc}", file=sys.stderr)
        return 2
    if args.check:
        effective = {**config.model_dump(mode="json"), "scheduler": scheduler.effective_settings()}
        print(f"{args.config}: valid ({len(config.pools)} pools); the configuration as it would run:")
        print(yaml.safe_dump(effective, sort_keys=False, width=120), end="")
        return 0
    from extproc.gateway.workers import check_workers, metrics_listen, supervise

    problem = check_workers(config, args.workers)
    if problem:
        print(f"extproc serve: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1 and args.worker_index is None:
        return supervise(config, Path(args.config), args.workers)
    from extproc.gateway.app import run as serve

    if args.worker_index is None:
        return serve(config, Path(args.config))
    server = config.server.model_copy(update={"metrics_listen": metrics_listen(config, args.worker_index)})
    return serve(config.model_copy(update={"server": server}), Path(args.config), reuse_port=True)
