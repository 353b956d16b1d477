"""The ``extproc`` command: one subcommand per room, each registered the same way.

Every module in ``COMMANDS`` exposes ``add_parser(sub)``, which adds its subcommand and sets ``func``
(called with the parsed arguments, returns the exit status). Those modules stay cheap to import: what a
command needs at run time (Envoy's typed configuration, aiohttp servers, matplotlib) is imported inside
its ``func``, so ``extproc sim`` does not pay for ``extproc envoy-config``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = (
    "extproc.local.demo",  # demo
    "extproc.local.up",  # up
    "extproc.gateway.command",  # serve
    "extproc.envoy.command",  # envoy-config
    "extproc.local.dashboards",  # dashboards
    "extproc.local.certs",  # certs
    "extproc.sim.cli",  # sim
    "extproc.bench.cli",  # bench ...
)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every command's help formatter: an option's default in its help, unless the default is None
    (then the help text says what happens without the option)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc", description="Envoy ext_proc endpoint picker for vLLM, and its vLLM simulator."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
