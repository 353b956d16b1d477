"""What a run measures: the policies (as ``scheduler:`` sections), the rates per workload, and the cells."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from extproc.bench.workloads import WORKLOADS
from extproc.config import DEFAULT_SCORERS

# The precise scorer's params on the benchmark's simulators: each publishes its KV events on its HTTP port + 1
# and answers replays on + 2 (extproc/local/stack.py's KV_EVENTS_PORT_OFFSET, KV_REPLAY_PORT_OFFSET).
PRECISE_PARAMS: dict[str, Any] = {"port_offset": 1, "replay_port_offset": 2, "min_blocks": 16}
PRECISE_SCORER = "precise_prefix"


def _default_scorers_with(name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The default scorers with ``prefix`` replaced by ``name`` (with ``params``) at the same weight."""
    return [
        {"name": name, "weight": w, "params": params} if n == "prefix" else {"name": n, "weight": w}
        for n, w in DEFAULT_SCORERS
    ]


def _precise_scorers(**params: Any) -> list[dict[str, Any]]:
    """The default scorers with ``prefix`` replaced by ``precise_prefix`` (with ``params``) at the same weight."""
    return _default_scorers_with(PRECISE_SCORER, {**PRECISE_PARAMS, **params})


# The policies of extproc/scheduling/scheduler.py's docstring, as `scheduler:` sections.
# "default" is the empty section: whatever the code's defaults are when the benchmark runs; "precise" is the
# default with its approximate prefix scorer replaced by the KV-event one (its filters and picker: the defaults);
# "approximate_fixed" is the default with the approximate index bounded by a fixed number of blocks per endpoint
# (16,384) instead of the endpoint's KV capacity, as GIE's prefix plugin bounds its index (a fixed LRU per server).
POLICIES: dict[str, dict[str, Any]] = {
    "random": {"filters": ["subset", "healthy"], "scorers": [], "picker": "random"},
    "round_robin": {"filters": ["subset", "healthy"], "scorers": [], "picker": "round_robin"},
    "least_queue": {"scorers": [{"name": "queue", "weight": 1}]},
    "prefix_only": {"filters": ["subset", "healthy"], "scorers": [{"name": "prefix", "weight": 1}]},
    "default": {},
    "precise": {"scorers": _precise_scorers()},
    "approximate_fixed": {"scorers": _default_scorers_with("prefix", {"capacity_aware": False})},
}
LOCAL_TOKENIZER_POLICY = "precise_local"  # offered with --tokenizer
QUICK_POLICIES = ("random", "round_robin", "least_queue", "prefix_only", "default")
QUICK_WORKLOADS = WORKLOADS  # --quick without --workloads: the four original workloads

# Simulated requests per second, about 30 %, 70 % and 120 % of what round robin sustains on each
# workload (4 replicas, 4,096 blocks each, 16 output tokens); measured with this benchmark, see the docs.
DEFAULT_RATES: dict[str, tuple[float, ...]] = {
    "tenants": (15.0, 32.0, 55.0),
    "multiturn": (18.0, 40.0, 70.0),
    "random": (25.0, 60.0, 100.0),
    "hot": (25.0, 55.0, 95.0),
    "multitenant": (40.0, 90.0, 130.0),  # round robin sustains ~170, the host keeps up to ~150: capped below
    "pressure": (10.0, 25.0, 42.0),  # round robin sustains ~35
}
QUICK_RATE_INDEX = 1  # --quick: the middle rate only
# Requests per cell at least (without --min-requests): `pressure` draws 256 Zipf tenants, and a cell must be long
# enough for the tail to come back after its eviction; at 1,000 (300 of them warm-up) ~12 % of the measured
# requests are still a tenant's first (35 % at the usual 240).
MIN_REQUESTS: dict[str, int] = {"pressure": 1000}


@dataclass(frozen=True)
class Cell:
    workload: str
    rate: float
    policy: str


def uses_kv_events(sections: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether any of the policies scores with ``precise_prefix`` (then the simulators publish KV events)."""
    return any(
        isinstance(s, Mapping) and s.get("name") == PRECISE_SCORER
        for section in sections.values()
        for s in section.get("scorers") or []
    )


def select(value: str | None, known: Sequence[str], what: str) -> list[str]:
    """The names of a comma list option (all of ``known`` without one); an unknown name stops the run."""
    if not value:
        return list(known)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def policy_sections(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The selected policies' ``scheduler:`` sections, with ``--policy-config`` ones added or replacing."""
    sections = dict(POLICIES)
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer is not None:  # `precise` tokenizing with the model's files here instead of asking the engines
        sections[LOCAL_TOKENIZER_POLICY] = {"scorers": _precise_scorers(tokenizer=str(tokenizer))}
    extra: list[str] = []
    for item in args.policy_config:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SystemExit(f"--policy-config {item!r}: expected NAME=YAML or NAME=@FILE")
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        try:
            section = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise SystemExit(f"--policy-config {name}: not valid YAML: {exc}") from None
        if not isinstance(section, dict):
            raise SystemExit(f"--policy-config {name}: the scheduler section must be a mapping")
        sections[name] = section
        extra.append(name)
    selected = select(args.policies, list(sections), "policy")
    if args.policies is None and args.quick:
        selected = [p for p in QUICK_POLICIES if p in sections]
    selected += [n for n in extra if n not in selected]
    return {n: sections[n] for n in selected}, selected


def add_plan_options(p: argparse.ArgumentParser, rate_unit: str) -> None:
    """The options of a benchmark run in cells of a workload at a rate (read by `plan_rates` and the cells)."""
    p.add_argument("--warmup-share", type=float, default=0.3, help="leading share of each cell's requests not measured")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--seed", type=int, default=1, help="seed of every workload (arrivals and prompts)")
    p.add_argument(
        "--rates",
        action="append",
        default=[],
        metavar="[WORKLOAD=]R1,R2,...",
        help=f"{rate_unit}; without WORKLOAD= for every workload; repeatable",
    )


def plan_rates(
    args: argparse.Namespace, workloads: Sequence[str], defaults: Mapping[str, Sequence[float]] = DEFAULT_RATES
) -> dict[str, list[float]]:
    """Req/s per workload: the ``defaults`` (``--quick``: the middle one), then ``--rates``."""
    out = {w: [defaults[w][QUICK_RATE_INDEX]] if args.quick else list(defaults[w]) for w in workloads}
    for item in args.rates:
        target, sep, values = item.rpartition("=")
        try:
            rates = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--rates {item!r}: rates must be numbers, e.g. 20,45,75") from None
        if not rates or any(r <= 0 for r in rates):
            raise SystemExit(f"--rates {item!r}: give at least one positive rate")
        for w in [target] if sep else workloads:
            if w not in out:
                raise SystemExit(f"--rates {item!r}: {w!r} is not a selected workload")
            out[w] = rates
    return out
