"""`extproc bench routing`: does the default scorer beat simple policies on routing quality?

One pool of simulated Llama-3.2-1B replicas behind Envoy and `extproc serve`. For every workload, rate
and policy (a "cell") the ext_proc is restarted with that policy's ``scheduler:`` section, every replica's
prefix cache is emptied and the pool is left idle; then an open-loop Poisson stream of non-streaming chat
completions is sent through the gateway. The first share of each cell warms the caches up and is not
measured. Latencies are the simulator's own (``x-sim-ttft-ms``, ``x-sim-e2e-ms``: simulated milliseconds,
whatever ``--time-scale`` and the host's load), the prefix-cache hit rate is the simulators' own token
counters over the measured window, and the replica that served each request is Envoy's
``x-gateway-upstream-host``.

Why these settings (see docs/routing-benchmark.md):

- ``--num-gpu-blocks 4096`` (65,536 tokens per replica): the shared-prefix workloads' working sets
  (48 tenants x ~3,000 tokens = 144k tokens; 64 chat sessions ~120k tokens) are about twice one replica's
  cache, while a quarter of them fits in one with room to spare. So a policy that spreads a prefix over
  every replica thrashes the LRU, and one that keeps each prefix on one replica hits.
- ``--time-scale 0.5``: the simulators run at twice real time, so a cell of 12 simulated seconds takes 6
  wall seconds and the full run fits in 10 minutes, while the highest wall rate stays where Python
  keeps up on two cores (each cell reports a keep-up figure). The picker's scrape interval is scaled with
  it (25 ms wall = 50 ms simulated, the default), so the picker sees the engines as often, in simulated
  time, as it would in real time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import yaml

from extproc.bench.workloads import MODEL, WORKLOADS, Workload, describe, make_workload
from extproc.local import promtext
from extproc.names import PICKED_HEADER, UPSTREAM_HOST_HEADER
from extproc.stats import percentile

if TYPE_CHECKING:
    from extproc.local.stack import Stack

# The policies of extproc/scheduling/scheduler.py's docstring, as `scheduler:` sections.
# "default" is the empty section: whatever the code's defaults are when the benchmark runs.
POLICIES: dict[str, dict[str, Any]] = {
    "random": {"filters": ["subset", "healthy"], "scorers": [], "picker": "random"},
    "round_robin": {"filters": ["subset", "healthy"], "scorers": [], "picker": "round_robin"},
    "least_queue": {"scorers": [{"name": "queue", "weight": 1}]},
    "prefix_only": {"filters": ["subset", "healthy"], "scorers": [{"name": "prefix", "weight": 1}]},
    "default": {},
}
QUICK_POLICIES = ("random", "round_robin", "least_queue", "prefix_only", "default")

# Simulated requests per second, about 30 %, 70 % and 120 % of what round robin sustains on each
# workload (4 replicas, 4,096 blocks each, 16 output tokens); measured with this benchmark, see the docs.
DEFAULT_RATES: dict[str, tuple[float, ...]] = {
    "tenants": (15.0, 32.0, 55.0),
    "multiturn": (18.0, 40.0, 70.0),
    "random": (25.0, 60.0, 100.0),
    "hot": (25.0, 55.0, 95.0),
}
QUICK_RATE_INDEX = 1  # --quick: the middle rate only

# Metrics the tables show, in order: (key, label, format).
ROWS: tuple[tuple[str, str, str], ...] = (
    ("ttft_mean_ms", "TTFT mean ms", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"),
    ("ttft_p90_ms", "TTFT p90 ms", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.1f}"),
    ("e2e_p50_ms", "e2e p50 ms", "{:.1f}"),
    ("e2e_p99_ms", "e2e p99 ms", "{:.1f}"),
    ("queue_mean_ms", "queue mean ms", "{:.1f}"),
    ("throughput_rps", "throughput req/s", "{:.1f}"),
    ("hit_rate", "prefix hit rate", "{:.1%}"),
    ("first_use_share", "first use of prefix", "{:.1%}"),
    ("imbalance", "imbalance max/mean", "{:.2f}"),
    ("preemptions", "preemptions", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None (options whose default the help text explains)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "routing",
        help="routing quality: the default scorer against random, round robin, least queue and prefix only",
        formatter_class=_Help,
    )
    p.add_argument("--replicas", type=int, default=4, help="simulated replicas in the pool")
    p.add_argument(
        "--num-gpu-blocks", type=int, default=4096, help="KV blocks (16 tokens) per replica: 4096 = 65,536 tokens"
    )
    p.add_argument("--time-scale", type=float, default=0.5, help="wall seconds per simulated second")
    p.add_argument(
        "--scrape-interval",
        type=float,
        help="the picker's scrape interval in wall seconds (default: 50 ms of simulated time, i.e. 0.05 x time scale)",
    )
    p.add_argument("--duration", type=float, help="simulated seconds of arrivals per cell (default 12, --quick 6)")
    p.add_argument(
        "--min-requests",
        type=int,
        help="longer cells at low rates: at least this many requests (default 240, --quick 150)",
    )
    p.add_argument("--warmup-share", type=float, default=0.3, help="leading share of each cell's requests not measured")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--seed", type=int, default=1, help="seed of every workload (arrivals and prompts)")
    p.add_argument("--workloads", help=f"comma list of workloads (default: all of {', '.join(WORKLOADS)})")
    p.add_argument("--policies", help=f"comma list of policies (default: all of {', '.join(POLICIES)})")
    p.add_argument(
        "--policy-config",
        action="append",
        default=[],
        metavar="NAME=YAML",
        help="add or replace a policy: its scheduler section as inline YAML, or @FILE "
        "(e.g. 'tuned={scorers: [{name: queue, weight: 3}, {name: prefix, weight: 3}]}'); it joins --policies",
    )
    p.add_argument(
        "--candidate", default="default", help="the policy the target check holds to the targets (for tuning runs)"
    )
    p.add_argument(
        "--rates",
        action="append",
        default=[],
        metavar="[WORKLOAD=]R1,R2,...",
        help="simulated req/s; without WORKLOAD= for every workload; repeatable",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke run: the middle rate only, shorter cells")
    p.add_argument("--json", type=Path, help="write every cell and the target check here")
    p.add_argument("--out", type=Path, help="directory for routing.json, routing.md and the PNG charts")
    p.add_argument("--log-dir", type=Path, help="process logs (default: a new temporary directory)")
    p.set_defaults(func=run)


# ----- the plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    workload: str
    rate: float
    policy: str


def _split(value: str | None, known: Sequence[str], what: str) -> list[str]:
    if not value:
        return list(known)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def _policy_sections(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], list[str]]:
    sections = dict(POLICIES)
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
    selected = _split(args.policies, list(sections), "policy")
    if args.policies is None and args.quick:
        selected = [p for p in QUICK_POLICIES if p in sections]
    selected += [n for n in extra if n not in selected]
    return {n: sections[n] for n in selected}, selected


def _rates(args: argparse.Namespace, workloads: Sequence[str]) -> dict[str, list[float]]:
    out = {w: [DEFAULT_RATES[w][QUICK_RATE_INDEX]] if args.quick else list(DEFAULT_RATES[w]) for w in workloads}
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


# ----- talking to the stack ----------------------------------------------------------------------------

_COUNTERS = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:num_preemptions_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def _post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:
        return 0, {}


def _replica_metrics(bases: Sequence[str]) -> dict[str, dict[str, float]]:
    return {base: promtext.sum_samples(_get(f"{base}/metrics").decode(), _COUNTERS) for base in bases}


def _wait_idle(bases: Sequence[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        snapshot = _replica_metrics(bases)
        busy = sum(m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"] for m in snapshot.values())
        if busy == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas still busy after {timeout:.0f}s: {busy:.0f} requests")
        time.sleep(0.05)


def _write_scheduler(stack: Stack, section: dict[str, Any]) -> dict[str, Any]:
    """Put ``section`` in the stack's config file as ``scheduler:``; return the effective scheduler settings."""
    from extproc.config import ConfigError, parse_config

    data = yaml.safe_load(stack.config_path.read_text())
    data["scheduler"] = section
    try:
        effective = parse_config(data).scheduler.model_dump(mode="json")
    except ConfigError as exc:
        raise SystemExit(f"scheduler section {section!r}: {exc}") from None
    stack.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return effective


def _switch_policy(stack: Stack, section: dict[str, Any], bases: Sequence[str], settle: float) -> dict[str, Any]:
    """Restart the ext_proc with ``section``; leave every replica idle with an empty prefix cache."""
    if stack.extproc is not None:
        stack.extproc.stop()
        stack.extproc = None
    effective = _write_scheduler(stack, section)
    _wait_idle(bases)
    stack.start_extproc()
    # Envoy reconnects to the new ext_proc on the next request: probe until the picker answers (a prompt
    # shorter than one block, so it leaves nothing in any cache or prefix index).
    probe = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})
    deadline = time.monotonic() + 20
    while True:
        status, headers = _post(stack.gateway + "/v1/chat/completions", probe)
        if status == 200 and headers.get(PICKED_HEADER, "-") not in ("", "-"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the picker did not answer through Envoy (last status {status})")
        time.sleep(0.05)
    _wait_idle(bases)
    for base in bases:
        _post(f"{base}/reset_prefix_cache", b"")
    time.sleep(settle)  # a few fresh scrapes of the idle pool
    return effective


# ----- one cell ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    key: str = ""  # the tenant or session whose prefix the request shares
    status: int = 0
    ttft_ms: float = math.nan
    queue_ms: float = math.nan
    e2e_ms: float = math.nan
    host: str = ""
    picked: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    scheduled: float = 0.0  # wall, from the cell's start
    sent: float = 0.0
    done: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not math.isnan(self.ttft_ms)


@dataclass
class CellRun:
    outcomes: list[Outcome] = field(default_factory=list)
    before: dict[str, dict[str, float]] = field(default_factory=dict)  # at the first measured request
    after: dict[str, dict[str, float]] = field(default_factory=dict)


async def _scrape_all(session: aiohttp.ClientSession, bases: Sequence[str]) -> dict[str, dict[str, float]]:
    async def one(base: str) -> tuple[str, dict[str, float]]:
        async with session.get(f"{base}/metrics") as response:
            return base, promtext.sum_samples(await response.text(), _COUNTERS)

    return dict(await asyncio.gather(*(one(b) for b in bases)))


async def send_cell(url: str, workload: Workload, scale: float, warmup: int, bases: Sequence[str]) -> CellRun:
    """Send ``workload`` open-loop at its arrival times (simulated seconds x ``scale`` = wall seconds)."""
    run = CellRun()
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.monotonic()

        async def one(index: int) -> None:
            outcome = Outcome(index, scheduled=workload.arrivals[index] * scale)
            run.outcomes.append(outcome)
            turn = workload.next(index)
            outcome.key = turn.key
            content: str | None = None
            outcome.sent = time.monotonic() - start
            try:
                async with session.post(url, data=turn.body, headers=headers) as response:
                    raw = await response.read()
                    outcome.status = response.status
                    h = response.headers
                    outcome.host = h.get(UPSTREAM_HOST_HEADER, "")
                    outcome.picked = h.get(PICKED_HEADER, "")
                    if response.status == 200:
                        outcome.ttft_ms = float(h.get("x-sim-ttft-ms", "nan"))
                        outcome.queue_ms = float(h.get("x-sim-queue-ms", "nan"))
                        outcome.e2e_ms = float(h.get("x-sim-e2e-ms", "nan"))
                        answer = orjson.loads(raw)
                        usage = answer.get("usage") or {}
                        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        outcome.cached_tokens = int(
                            (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                        )
                        content = answer["choices"][0]["message"]["content"]
                    else:
                        outcome.error = raw[:200].decode(errors="replace")
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"[:200]
            outcome.done = time.monotonic() - start
            workload.answered(turn, content if outcome.ok else None)

        tasks = []
        for i, at in enumerate(workload.arrivals):
            delay = start + at * scale - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == warmup:
                run.before = await _scrape_all(session, bases)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        run.after = await _scrape_all(session, bases)
    run.outcomes.sort(key=lambda o: o.index)
    return run


def summarize(run: CellRun, warmup: int, scale: float, replicas: Sequence[str]) -> dict[str, Any]:
    measured = [o for o in run.outcomes if o.index >= warmup]
    ok = [o for o in measured if o.ok]
    ttft = [o.ttft_ms for o in ok]
    e2e = [o.e2e_ms for o in ok]
    delta = {
        name: sum(run.after[b][name] - run.before.get(b, run.after[b])[name] for b in run.after)
        for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:num_preemptions_total")
    }
    queries = delta["vllm:prefix_cache_queries_total"]
    per_replica = {r: 0 for r in replicas}
    for o in ok:
        per_replica[o.host] = per_replica.get(o.host, 0) + 1
    mean_served = len(ok) / max(1, len(replicas))
    window = (max(o.done for o in measured) - min(o.sent for o in measured)) if measured else 0.0
    prompt = sum(o.prompt_tokens for o in ok)
    statuses: dict[str, int] = {}
    for o in measured:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    missed = sum(1 for o in ok if o.host != o.picked.split(",", 1)[0])
    # Wall time a request spent beyond what the engine accounts for (times the scale): the gateway, the client
    # and any lag of a simulator behind its scaled clock on a busy host.
    overhead = [(o.done - o.sent) * 1e3 - o.e2e_ms * scale for o in ok]
    lag = [(o.sent - o.scheduled) * 1e3 for o in measured]
    # Measured requests whose tenant or session had not been sent before in this cell: a cache miss for
    # every policy (the caches start empty), so the hit rate a policy can reach is bounded by the rest.
    seen: set[str] = set()
    first = 0
    for o in run.outcomes:
        if o.key not in seen:
            seen.add(o.key)
            first += o.index >= warmup
    cold = first / len(measured) if measured else math.nan
    return {
        "requests": len(run.outcomes),
        "measured": len(measured),
        "ok": len(ok),
        "failed": len(measured) - len(ok),
        "failed_warmup": sum(1 for o in run.outcomes if o.index < warmup and not o.ok),
        "statuses": statuses,
        "errors": sorted({o.error for o in measured if o.error})[:5],
        "ttft_mean_ms": sum(ttft) / len(ttft) if ttft else math.nan,
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p90_ms": percentile(ttft, 0.9),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "e2e_p50_ms": percentile(e2e, 0.5),
        "e2e_p99_ms": percentile(e2e, 0.99),
        "queue_mean_ms": sum(o.queue_ms for o in ok) / len(ok) if ok else math.nan,
        "throughput_rps": len(ok) / (window / scale) if window > 0 else math.nan,
        "hit_rate": delta["vllm:prefix_cache_hits_total"] / queries if queries > 0 else math.nan,
        "hit_rate_responses": sum(o.cached_tokens for o in ok) / prompt if prompt else math.nan,
        "imbalance": max(per_replica.values()) / mean_served if ok else math.nan,
        "per_replica": per_replica,
        "preemptions": delta["vllm:num_preemptions_total"],
        "first_use_share": cold,
        "picker_bypassed": missed,
        "host_overhead_p50_ms": percentile(overhead, 0.5),
        "host_overhead_p99_ms": percentile(overhead, 0.99),
        "send_lag_p99_ms": percentile(lag, 0.99),
        "wall_seconds": window,
    }


# ----- the target check --------------------------------------------------------------------------------


def target_check(cells: Sequence[dict[str, Any]], candidate: str = "default") -> list[dict[str, Any]]:
    """The brief's targets for ``candidate``, one row per (check, workload, rate); n/a when a policy is missing."""
    by = {(c["workload"], c["rate"], c["policy"]): c for c in cells}
    rates = sorted({(c["workload"], c["rate"]) for c in cells})
    checks: list[dict[str, Any]] = []

    def add(workload: str, rate: float, name: str, num: str, den: str, metric: str, op: str, bound: float) -> None:
        a, b = by.get((workload, rate, num)), by.get((workload, rate, den))
        row: dict[str, Any] = {"workload": workload, "rate": rate, "check": name, "bound": bound, "op": op}
        if a is None or b is None or not (a[metric] > 0 and b[metric] > 0):
            row.update(value=math.nan, passed=None)
        else:
            value = a[metric] / b[metric]
            row.update(value=value, passed=value <= bound if op == "<=" else value >= bound)
        checks.append(row)

    c = candidate
    for workload, rate in rates:
        if workload in ("tenants", "multiturn"):
            add(workload, rate, f"{c} TTFT mean / round_robin's <= 0.5", c, "round_robin", "ttft_mean_ms", "<=", 0.5)
            add(workload, rate, f"{c} TTFT mean / least_queue's <= 0.8", c, "least_queue", "ttft_mean_ms", "<=", 0.8)
            add(workload, rate, f"{c} hit rate / prefix_only's >= 0.9", c, "prefix_only", "hit_rate", ">=", 0.9)
        elif workload == "random":
            add(workload, rate, f"{c} TTFT mean / least_queue's <= 1.05", c, "least_queue", "ttft_mean_ms", "<=", 1.05)
            add(workload, rate, f"{c} TTFT mean / round_robin's <= 1", c, "round_robin", "ttft_mean_ms", "<=", 1.0)
        elif workload == "hot":
            add(workload, rate, f"prefix_only TTFT p99 / {c}'s >= 2", "prefix_only", c, "ttft_p99_ms", ">=", 2.0)
    return checks


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else "PASS" if passed else "FAIL"


def target_summary(checks: Sequence[dict[str, Any]]) -> list[str]:
    """One line per check: the value at each rate and which rates pass."""
    lines = []
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in checks:
        seen.setdefault((row["workload"], row["check"]), []).append(row)
    for (workload, check), rows in seen.items():
        parts = [f"{r['rate']:g}: {r['value']:.2f} {_verdict(r['passed'])}" for r in rows]
        passed = [f"{r['rate']:g}" for r in rows if r["passed"]]
        failed = [f"{r['rate']:g}" for r in rows if r["passed"] is False]
        tail = f"pass at {', '.join(passed) or 'none'}" + (f"; fail at {', '.join(failed)}" if failed else "")
        lines.append(f"{workload:<10} {check:<44} {'; '.join(parts)}  ({tail})")
    return lines


# ----- tables and charts -------------------------------------------------------------------------------


def _fmt(fmt: str, value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def _groups(cells: Sequence[dict[str, Any]]) -> Iterator[tuple[str, float, list[dict[str, Any]]]]:
    order: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for c in cells:
        order.setdefault((c["workload"], c["rate"]), []).append(c)
    for (workload, rate), group in order.items():
        yield workload, rate, group


def text_tables(cells: Sequence[dict[str, Any]]) -> str:
    out = []
    for workload, rate, group in _groups(cells):
        policies = [c["policy"] for c in group]
        width = max(12, *(len(p) + 2 for p in policies))
        out.append(f"\n{workload} @ {rate:g} req/s (simulated)")
        out.append(f"{'':<20}" + "".join(f"{p:>{width}}" for p in policies))
        for key, label, fmt in ROWS:
            out.append(f"{label:<20}" + "".join(f"{_fmt(fmt, c[key]):>{width}}" for c in group))
    return "\n".join(out)


def markdown(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        "# Routing benchmark results",
        "",
        f"`{setup['command']}`: {setup['replicas']} replicas of `{setup['preset']}` with "
        f"{setup['num_gpu_blocks']} KV blocks ({setup['num_gpu_blocks'] * 16:,} tokens) each, time scale "
        f"{setup['time_scale']:g}, {setup['duration']:g} simulated seconds per cell, first "
        f"{setup['warmup_share']:.0%} of each cell not measured, {setup['max_tokens']} output tokens. "
        "Latencies in simulated milliseconds (the simulators' `x-sim-*` headers); rates and throughput in "
        f"simulated requests per second. Wall time {result['wall_seconds']:.0f} s.",
    ]
    for workload, rate, group in _groups(result["cells"]):
        lines += ["", f"### {workload} @ {rate:g} req/s", ""]
        lines.append("| | " + " | ".join(c["policy"] for c in group) + " |")
        lines.append("| --- |" + " ---: |" * len(group))
        for key, label, fmt in ROWS:
            lines.append(f"| {label} | " + " | ".join(_fmt(fmt, c[key]) for c in group) + " |")
    lines += ["", f"## Target check ({result['candidate']})", "", "| workload | rate | check | value | verdict |"]
    lines.append("| --- | ---: | --- | ---: | --- |")
    for row in result["targets"]:
        lines.append(
            f"| {row['workload']} | {row['rate']:g} | {row['check']} | {_fmt('{:.2f}', row['value'])} | "
            f"{_verdict(row['passed'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(cells: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    for workload in workloads:
        mine = [c for c in cells if c["workload"] == workload]
        policies = list(dict.fromkeys(c["policy"] for c in mine))
        rates = sorted({c["rate"] for c in mine})
        by = {(c["policy"], c["rate"]): c for c in mine}
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for key, ax, title in (
            ("ttft_mean_ms", axes[0], "TTFT mean (simulated ms)"),
            ("ttft_p99_ms", axes[1], "TTFT p99 (simulated ms)"),
        ):
            for policy in policies:
                ys = [by[(policy, r)][key] if (policy, r) in by else math.nan for r in rates]
                ax.plot(rates, ys, marker="o", label=policy)
            ax.set_yscale("log")
            ax.set_xlabel("offered rate (simulated req/s)")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        ax = axes[2]
        width = 0.8 / max(1, len(policies))
        for i, policy in enumerate(policies):
            xs = [j + i * width for j in range(len(rates))]
            ys = [by[(policy, r)]["hit_rate"] if (policy, r) in by else math.nan for r in rates]
            ax.bar(xs, ys, width, label=policy)
        ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(rates))], [f"{r:g}" for r in rates])
        ax.set_ylim(0, 1.15)
        ax.legend(fontsize=7, ncol=len(policies), loc="upper center")
        ax.set_xlabel("offered rate (simulated req/s)")
        ax.set_title("prefix-cache hit rate (tokens)")
        ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"routing benchmark: {workload}")
        fig.tight_layout()
        path = out / f"routing-{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _clean(value: Any) -> Any:
    """NaN -> None, so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# ----- run ---------------------------------------------------------------------------------------------


def _minutes(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run(args: argparse.Namespace) -> int:
    from extproc.local.stack import PoolSpec, start_stack

    t0 = time.monotonic()
    if args.replicas < 1 or args.time_scale <= 0 or not 0 <= args.warmup_share < 1 or args.max_tokens < 1:
        raise SystemExit("--replicas >= 1, --time-scale > 0, 0 <= --warmup-share < 1 and --max-tokens >= 1")
    workloads = _split(args.workloads, WORKLOADS, "workload")
    sections, policies = _policy_sections(args)
    rates = _rates(args, workloads)
    duration = args.duration if args.duration is not None else (6.0 if args.quick else 12.0)
    min_requests = args.min_requests if args.min_requests is not None else (150 if args.quick else 240)
    scale = args.time_scale
    scrape = args.scrape_interval if args.scrape_interval is not None else 0.05 * scale
    plan = [Cell(w, r, p) for w in workloads for r in rates[w] for p in policies]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="extproc-bench-routing-"))
    argv = sys.argv[sys.argv.index("routing") + 1 :] if "routing" in sys.argv else sys.argv[1:]
    command = " ".join(["extproc bench routing", *argv])
    print(
        f"routing benchmark: {len(workloads)} workloads x {sum(len(rates[w]) for w in workloads) // len(workloads)} "
        f"rates x {len(policies)} policies = {len(plan)} cells of {duration:g} simulated s "
        f"({duration * scale:g} s wall, at least {min_requests} requests); {args.replicas} replicas, "
        f"{args.num_gpu_blocks} KV blocks each, time scale {scale:g}; logs in {log_dir}",
        flush=True,
    )

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    sim_args = (
        "--preset", "llama-3.2-1b", "--num-gpu-blocks", str(args.num_gpu_blocks), "--time-scale", str(scale),
        "--seed", str(args.seed),
    )  # fmt: skip
    stack = None
    interrupted = False
    cells: list[dict[str, Any]] = []
    effective: dict[str, dict[str, Any]] = {}
    try:
        stack = start_stack(
            log_dir,
            [PoolSpec("bench", MODEL, args.replicas, sim_args)],
            settings={"scrape": {"interval": scrape}},
            with_extproc=False,
            bootstrap_options={"message_timeout_ms": 1000},
        )
        replicas = [r.address for r in stack.sims["bench"]]
        bases = [r.base for r in stack.sims["bench"]]
        url = stack.gateway + "/v1/chat/completions"
        print(f"stack up in {time.monotonic() - t0:.1f}s", flush=True)
        run_start = time.monotonic()
        expected_done = 0.0
        expected = [max(min_requests / c.rate, duration) * scale + 1.0 for c in plan]
        expected_total = sum(expected)
        for i, cell in enumerate(plan, 1):
            cell_start = time.monotonic()
            count = max(20, min_requests, round(cell.rate * duration))
            workload = make_workload(cell.workload, args.seed, cell.rate, count, args.max_tokens)
            effective[cell.policy] = _switch_policy(stack, sections[cell.policy], bases, settle=max(0.2, 4 * scrape))
            warmup = int(count * args.warmup_share)
            result = asyncio.run(send_cell(url, workload, scale, warmup, bases))
            row = {"workload": cell.workload, "rate": cell.rate, "policy": cell.policy}
            row.update(summarize(result, warmup, scale, replicas))
            cells.append(row)
            expected_done += expected[i - 1]
            elapsed = time.monotonic() - run_start
            eta = elapsed / expected_done * (expected_total - expected_done)
            print(
                f"[cell {i}/{len(plan)}] {cell.workload} {cell.rate:g} req/s {cell.policy}: "
                f"TTFT mean {_fmt('{:.1f}', row['ttft_mean_ms'])} p99 {_fmt('{:.1f}', row['ttft_p99_ms'])} ms, "
                f"hit {_fmt('{:.0%}', row['hit_rate'])}, imbalance {_fmt('{:.2f}', row['imbalance'])}, "
                f"failed {row['failed']}, host overhead p50 {_fmt('{:.1f}', row['host_overhead_p50_ms'])} ms; "
                f"cell {time.monotonic() - cell_start:.1f}s, elapsed {_minutes(time.monotonic() - t0)}, "
                f"ETA {_minutes(eta)}",
                flush=True,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if stack is not None:
            stack.stop()
        signal.signal(signal.SIGTERM, previous)
    if interrupted:
        print(f"interrupted after {len(cells)} of {len(plan)} cells; every process stopped", file=sys.stderr)
        return 130

    print(text_tables(cells))
    candidate = args.candidate if args.candidate in policies else "default"
    checks = target_check(cells, candidate)
    print(f"\ntarget check ({candidate}):")
    for line in target_summary(checks):
        print("  " + line)
    wall = time.monotonic() - t0
    result = {
        "setup": {
            "command": command.strip(),
            "replicas": args.replicas,
            "preset": "llama-3.2-1b",
            "num_gpu_blocks": args.num_gpu_blocks,
            "time_scale": scale,
            "scrape_interval_wall_s": scrape,
            "duration": duration,
            "min_requests": min_requests,
            "warmup_share": args.warmup_share,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
            "quick": args.quick,
            "rates": rates,
            "workloads": {w: describe(w, args.max_tokens) for w in workloads},
            "policies": {p: {"section": sections[p], "effective": effective.get(p)} for p in policies},
        },
        "candidate": candidate,
        "cells": cells,
        "targets": checks,
        "wall_seconds": wall,
    }
    clean = _clean(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(clean, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "routing.json").write_text(json.dumps(clean, indent=2))
        (args.out / "routing.md").write_text(markdown(result))
        paths = plot(cells, args.out)
        print(f"wrote {args.out / 'routing.json'}, {args.out / 'routing.md'} and {len(paths)} charts")
    print(f"total wall time {wall:.1f}s ({_minutes(wall)})", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run without the `extproc bench` wiring: ``python -m extproc.bench.routing [options]``."""
    parser = argparse.ArgumentParser(prog="extproc bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    add_parser(sub)
    args = parser.parse_args(["routing", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
