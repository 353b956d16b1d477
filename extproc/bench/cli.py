"""`extproc bench ...`: one subcommand per benchmark module, each registered by its own `add_parser`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmarks (results go to stdout and optionally JSON)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    from extproc.bench import decision, fuzz, kv_ingest, overhead, picker_load, sim_throughput, soak, tokenize
    from extproc.bench.peers import command as peers
    from extproc.bench.routing import command as routing

    sim_throughput.add_parser(bench)
    decision.add_parser(bench)
    overhead.add_parser(bench)
    routing.add_parser(bench)
    peers.add_parser(bench)
    picker_load.add_parser(bench)
    fuzz.add_parser(bench)
    kv_ingest.add_parser(bench)
    soak.add_parser(bench)
    tokenize.add_parser(bench)
