"""``extproc serve``: run the endpoint picker for a configuration file, or check that file."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from extproc.config import ConfigError, load_config
    from extproc.scheduling.scheduler import Scheduler

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # config warnings (moved keys) show here
    try:
        config = load_config(args.config)
        scheduler = Scheduler.from_config(config)  # unknown plugins and bad plugin params fail here, not on a request
    except ConfigError as exc:
        print(f"extproc serve: {exc}", file=sys.stderr)
        return 2
    if args.check:
        effective = {**config.model_dump(mode="json"), "scheduler": scheduler.effective_settings()}
        print(f"{args.config}: valid ({len(config.pools)} pools); the configuration as it would run:")
        print(yaml.safe_dump(effective, sort_keys=False, width=120), end="")
        return 0
    from extproc.gateway.app import run as serve

    return serve(config, Path(args.config))
