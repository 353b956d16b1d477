"""What a run measures: the routers that are installed among those asked for, the workloads, the rates."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from extproc.bench.peers.routers import (
    INSTALL_HINT,
    PEER_ROUTERS,
    PROGRAMS,
    QUICK_ROUTERS,
    REPLICA_ROUTERS,
    ROUTERS,
    RouterSpec,
    find_program,
)
from extproc.bench.routing.plan import plan_rates, select
from extproc.bench.workloads import WORKLOADS

PEER_WORKLOADS: Sequence[str] = (*WORKLOADS, "multitenant")
REPLICA_WORKLOADS: Sequence[str] = ("tenants", "multiturn", "hot", "multitenant")  # shared prefixes: `bench replicas`

# Offered req/s per workload: about 30, 60 and 90 % of what round robin (sglang-router's) sustains there with
# the defaults (4 replicas of llama-3.2-1b, 1,000 KV blocks each, time scale 1, 16 output tokens, streaming),
# found with `extproc bench peers --calibrate` on the 2-core development machine (docs/peers.md). --quick runs
# the middle one.
DEFAULT_RATES: dict[str, tuple[float, ...]] = {
    "tenants": (9.0, 18.0, 27.0),  # round robin keeps up to ~30 req/s
    "multiturn": (11.0, 22.0, 33.0),  # ~37
    "random": (22.0, 44.0, 65.0),  # ~73
    "hot": (14.0, 28.0, 42.0),  # ~47
    "multitenant": (22.0, 44.0, 65.0),  # ~73
}


def routers(args: argparse.Namespace) -> tuple[list[RouterSpec], dict[str, str], dict[str, str]]:
    """The routers to run, each peer's command, and the skipped ones with the reason."""
    if getattr(args, "bench", "peers") == "replicas":
        names = list(REPLICA_ROUTERS)
    else:
        names = list(QUICK_ROUTERS if args.quick else PEER_ROUTERS)
    if args.routers:
        names = select(args.routers, list(ROUTERS), "router")
    programs = {kind: path for kind in PROGRAMS if (path := find_program(kind, getattr(args, f"{kind}_router")))}
    chosen, skipped = [], {}
    for name in names:
        spec = ROUTERS[name]
        if spec.kind == "extproc" or spec.kind in programs:
            chosen.append(spec)
        else:
            skipped[name] = (
                f"{PROGRAMS[spec.kind]} is not installed: {INSTALL_HINT} (or give its path with --{spec.kind}-router)"
            )
    return chosen + policy_variants(args.policy), programs, skipped


SETTINGS_KEYS = ("scheduler", "scrape", "limits", "server")  # a --policy mapping holding one is whole settings


def policy_variants(items: Sequence[str]) -> list[RouterSpec]:
    """``--policy NAME=YAML``: the gateway again, as router ``extproc:NAME``, with that ``scheduler`` section
    (to compare policies of the picker side by side with the peers, in one run), or with those top-level
    sections when the mapping names one (``{scrape: {interval: 0.1}}``: the default policy, scraped less)."""
    import yaml

    out = []
    for item in items:
        name, sep, text = item.partition("=")
        section = yaml.safe_load(text) if sep else None
        if not name.strip() or not isinstance(section, dict):
            raise SystemExit(
                f"--policy {item!r}: expected NAME={{filters: ..., scorers: ..., picker: ...}} (a scheduler "
                "section) or NAME={scrape: ..., scheduler: ...} (top-level sections)"
            )
        label = name.strip()
        if any(key in section for key in SETTINGS_KEYS):
            scheduler = section.get("scheduler")
            others = {k: v for k, v in section.items() if k != "scheduler"}
            out.append(RouterSpec(f"extproc:{label}", "extproc", label, scheduler, others))
        else:
            out.append(RouterSpec(f"extproc:{label}", "extproc", label, section))
    return out


def rates(args: argparse.Namespace, workloads: Sequence[str]) -> dict[str, list[float]]:
    """The default rates of ``workloads`` (``--quick``: the middle one), replaced where ``--rates`` says."""
    return plan_rates(args, workloads, DEFAULT_RATES)


def versions(programs: dict[str, str]) -> dict[str, Any]:
    """Which peer packages ran (for the JSON): their installed versions, where the metadata is found."""
    out: dict[str, Any] = {}
    for kind, path in programs.items():
        version: str | None = None  # unknown for a program from another environment
        if Path(path).parent == Path(sys.executable).parent:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(PROGRAMS[kind])
        out[PROGRAMS[kind]] = {"program": path, "version": version}
    return out
