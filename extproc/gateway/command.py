"""``extproc serve``: run the endpoint picker for a configuration file, or check that file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the ext_proc endpoint picker",
        description="Run the Envoy ext_proc endpoint picker: gRPC ExternalProcessor, health, /metrics.",
    )
    p.add_argument("--config", required=True, help="YAML configuration (see examples/config.yaml)")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from extproc.config import ConfigError, load_config
    from extproc.scheduling.scheduler import Scheduler

    try:
        config = load_config(args.config)
        Scheduler.from_config(config)  # unknown plugins and bad plugin params fail here, not on a request
    except ConfigError as exc:
        print(f"extproc serve: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: valid ({len(config.pools)} pools)")
        return 0
    from extproc.gateway.server import run as serve

    return serve(config, Path(args.config))
