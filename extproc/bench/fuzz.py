"""`extproc bench fuzz`: random and mutated input against the picker, straight over gRPC or through Envoy.

``--target grpc`` starts `extproc serve` (pool ``a``: simulated replicas, pool ``b``: static endpoints nothing
listens on) and sends it ext_proc streams as no Envoy would: valid requests with mutated headers, bodies,
attributes, subset hints and initial metadata, messages of every oneof kind in any order (body first, trailers
first, two headers), streams that end early, never send a body, are cancelled or lose their connection, huge
header maps, bytes that are no ProcessingRequest, messages above the gRPC limit; then 1,000 idle streams held
open at once. Every stream must get exactly one answer of the right kind per message the server answers
(an ImmediateResponse must be OpenAI-shaped JSON) or end with a clean gRPC status (CANCELLED,
INVALID_ARGUMENT, RESOURCE_EXHAUSTED); an UNKNOWN status (an exception in the servicer) is a crash, a stream
that outlives its deadline a hang.

``--target http`` starts the local gateway (`extproc.local.stack`: Envoy, the picker, simulated 1B and 3B
pools, a 70/30 split) plus an outsider replica in no pool, and sends HTTP requests: malformed JSON, wrong
types for every field, deep nesting, huge and invalid UTF-8 bodies, spoofed routing headers (the picker's,
Envoy's ``x-envoy-*``, the response headers' names), unknown paths and methods. A crash of the picker is
invisible to the client (``failure_mode_allow``), so it is read from Envoy's ext_proc counters
(``streams_failed``, ``failure_mode_allowed``, ``message_timeouts``) and the picker's log; a request served
outside its pool (or by the outsider) is a failure too. Every answer with a status >= 400 is checked for an
OpenAI-shaped JSON body; those that are not are counted by status, source (Envoy, upstream) and path, not
failed on; the picker's own refusals (its metrics, by status) must all be among the JSON ones.

Both take a baseline after a warm-up and check afterwards that the picker still serves (health, a valid
request) with its open descriptors and threads back near the baseline, and report its RSS before and after.
Exit status 1 on any failure, 0 otherwise. Every input is a function of ``--seed`` and its index, so
``--start I --inputs 1`` replays input I.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from extproc import names
from extproc.cli import DefaultsHelp

if TYPE_CHECKING:
    import aiohttp
    import grpc

    from extproc.local.procs import Child
    from extproc.local.stack import Stack

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
EXT_PROC_NAMESPACE = "envoy.filters.http.ext_proc"  # where Envoy puts the request attributes
MAX_BODY = 256 * 1024  # limits.max_body_bytes of the fuzzed picker
GRPC_LIMIT = 2 * MAX_BODY + 64 * 1024  # its gRPC message limit (Limits.grpc_message_bytes)
CLEAN_ENDS = ("cancelled", "rejected_malformed", "rejected_too_large", "dropped", "short_deadline")
ERROR_KEYS = {"message", "type", "param", "code"}
MESSAGE_TIMEOUT = 0.2  # Envoy's ext_proc message_timeout in the generated bootstrap
RSS_SLACK_MIB = 64
SERIES_GROWTH = 3000  # new samples the picker's /metrics may gain over a run (pools x models x 64 routes x statuses)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fuzz",
        help="random and mutated input against the picker over gRPC, or through Envoy over HTTP",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--target", choices=("grpc", "http"), default="grpc", help="what the inputs go to")
    p.add_argument("--inputs", type=int, default=10_000, help="inputs to send (streams or HTTP requests)")
    p.add_argument("--seed", type=int, default=0, help="every input is a function of the seed and its index")
    p.add_argument("--start", type=int, default=0, help="index of the first input (replay: --start I --inputs 1)")
    p.add_argument("--concurrency", type=int, default=48, help="inputs in flight at once")
    p.add_argument("--deadline", type=float, default=15.0, help="seconds an input may take before it is a hang")
    p.add_argument("--idle-streams", type=int, default=1000, help="grpc: streams held open at once at the end")
    p.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines (0: none)")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.set_defaults(func=run)


@dataclass
class Report:
    """What one fuzz run found: inputs, outcomes, failures, the picker's state before and after."""

    target: str
    inputs: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first failures, by input index
    non_json: Counter[str] = field(default_factory=Counter)  # "status source path: body" of non-JSON errors
    non_json_inputs: dict[str, int] = field(default_factory=dict)  # the first input of each, to replay it
    process: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> rss/fds/threads before, after
    checks: dict[str, bool] = field(default_factory=dict)  # what must hold after the run
    # Inputs the picker answered later than Envoy's message_timeout (200 ms), by strategy; over HTTP: served
    # without a pick (Envoy failed open). Reported, not failed on: on a loaded machine it is CPU starvation.
    slow: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def fail(self, kind: str, index: int, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"input {index}: {kind}: {detail[:300]}")

    @property
    def ok(self) -> bool:
        return not self.failures and all(self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "inputs": self.inputs,
            "seconds": round(self.seconds, 1),
            "ok": self.ok,
            "outcomes": dict(self.outcomes.most_common()),
            "failures": dict(self.failures),
            "examples": self.examples,
            "non_json_errors": dict(self.non_json.most_common()),
            "non_json_first_input": self.non_json_inputs,
            "slow": dict(self.slow.most_common()),
            "process": self.process,
            "checks": self.checks,
            "notes": self.notes,
        }


def run(args: argparse.Namespace) -> int:
    options = Options(
        inputs=args.inputs,
        seed=args.seed,
        start=args.start,
        concurrency=args.concurrency,
        deadline=args.deadline,
        idle_streams=args.idle_streams,
        progress=args.progress,
    )
    fuzz = fuzz_grpc if args.target == "grpc" else fuzz_http
    report = fuzz(options)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


@dataclass(frozen=True)
class Options:
    inputs: int = 2000
    seed: int = 0
    start: int = 0
    concurrency: int = 48
    deadline: float = 15.0
    idle_streams: int = 1000
    progress: float = 10.0
    log_dir: Path | None = None


def print_report(report: Report) -> None:
    rate = report.inputs / report.seconds if report.seconds else 0.0
    print(f"\nfuzz {report.target}: {report.inputs:,} inputs in {report.seconds:.0f} s ({rate:,.0f}/s)")
    print("outcomes:")
    for outcome, count in report.outcomes.most_common():
        print(f"  {outcome:<40}{count:>9,}")
    crashes = report.failures.get("crash", 0)
    print(f"crashes: {crashes}/{report.inputs:,}; hangs: {report.failures.get('hang', 0)}")
    print(f"failures: {dict(report.failures) or 'none'}")
    slow = "served without a pick (Envoy failed open)" if report.target == "http" else "answered after > 200 ms"
    print(f"{slow}: {sum(report.slow.values()):,} {dict(report.slow.most_common()) or ''}")
    for example in report.examples:
        print(f"  {example}")
    if report.target == "http" or report.non_json:
        print(f"error answers (>= 400) that are not OpenAI-shaped JSON: {sum(report.non_json.values()):,}")
        for key, count in report.non_json.most_common():
            print(f"  {count:>7,}  {key} (first: input {report.non_json_inputs.get(key)})")
    for name, figures in report.process.items():
        print(
            f"{name}: RSS {figures['rss_mib_before']:.1f} -> {figures['rss_mib_after']:.1f} MiB "
            f"(peak {figures.get('rss_mib_peak', figures['rss_mib_after']):.1f}), open fds {figures['fds_before']:.0f}"
            f" -> {figures['fds_after']:.0f}, threads {figures['threads_before']:.0f} -> {figures['threads_after']:.0f}"
        )
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report.checks.items()))
    for note in report.notes:
        print(f"note: {note}")
    print("result: " + ("ok" if report.ok else "FAILED"), flush=True)


# ----- the process under test -------------------------------------------------------------------------------


def proc_figures(pid: int) -> dict[str, float]:
    """RSS (MiB), open file descriptors and threads of a live process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


class Watched:
    """A process whose RSS, descriptors and threads are compared before and after the run."""

    def __init__(self, name: str, child: Child) -> None:
        self.name = name
        self.child = child
        self.before: dict[str, float] = {}
        self.peak = 0.0

    def baseline(self) -> None:
        self.before = proc_figures(self.child.pid)
        self.peak = self.before["rss_mib"]

    def sample(self) -> float:
        rss = proc_figures(self.child.pid)["rss_mib"] if self.child.alive() else 0.0
        self.peak = max(self.peak, rss)
        return rss

    async def settle(self, report: Report, fd_slack: int = 8, thread_slack: int = 2, wait: float = 15.0) -> None:
        """Wait (up to ``wait`` s) for descriptors and threads to come back near the baseline; record them and RSS.

        RSS may grow by RSS_SLACK_MIB: the prefix index fills up to its bound (16,384 blocks per endpoint) and the
        allocator keeps what 1,000 idle streams needed; a leak per input grows past it within 100,000 inputs.
        """
        deadline = time.monotonic() + wait
        after = proc_figures(self.child.pid)
        while time.monotonic() < deadline and (
            after["fds"] > self.before["fds"] + fd_slack or after["threads"] > self.before["threads"] + thread_slack
        ):
            await asyncio.sleep(0.2)
            after = proc_figures(self.child.pid)
        self.peak = max(self.peak, after["rss_mib"])
        report.process[self.name] = {
            "rss_mib_before": self.before["rss_mib"],
            "rss_mib_after": after["rss_mib"],
            "rss_mib_peak": self.peak,
            "fds_before": self.before["fds"],
            "fds_after": after["fds"],
            "threads_before": self.before["threads"],
            "threads_after": after["threads"],
        }
        report.checks[f"{self.name}_fds_back"] = after["fds"] <= self.before["fds"] + fd_slack
        report.checks[f"{self.name}_threads_back"] = after["threads"] <= self.before["threads"] + thread_slack
        report.checks[f"{self.name}_rss_bounded"] = after["rss_mib"] <= self.before["rss_mib"] + RSS_SLACK_MIB


def metric_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    import urllib.request

    from extproc.local.promtext import samples

    with urllib.request.urlopen(url, timeout=5) as response:
        return list(samples(response.read().decode()))


async def drive(
    options: Options,
    report: Report,
    one: Callable[[int], Awaitable[None]],
    watched: Sequence[Watched],
) -> None:
    """Run ``one(index)`` for every input, ``options.concurrency`` at a time, printing progress."""
    indices = iter(range(options.start, options.start + options.inputs))
    done = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal done
        for index in indices:
            try:
                await asyncio.wait_for(one(index), options.deadline + 10)
            except TimeoutError:
                report.fail("hang", index, f"no outcome after {options.deadline + 10:.0f} s")
            except Exception as exc:  # the fuzzer's own bug: reported, and the run goes on
                report.fail("fuzzer_error", index, f"{type(exc).__name__}: {exc}")
            done += 1

    async def progress() -> None:
        while options.progress > 0:
            await asyncio.sleep(options.progress)
            rss = ", ".join(f"{w.name} RSS {w.sample():.0f} MiB" for w in watched)
            rate = done / (time.monotonic() - started)
            print(
                f"fuzz {report.target}: {done:,}/{options.inputs:,} inputs ({rate:,.0f}/s), "
                f"failures {sum(report.failures.values())}, {rss}",
                flush=True,
            )

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, options.concurrency))))
    finally:
        reporter.cancel()
    for w in watched:
        w.sample()


def openai_error(content_type: str, body: bytes, status: int) -> bool:
    """Whether ``body`` is the OpenAI error shape the picker answers: {"error": {message, type, param, code}}."""
    if not content_type.startswith("application/json"):
        return False
    try:
        error = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return False
    return (
        isinstance(error, dict)
        and set(error) == ERROR_KEYS
        and isinstance(error["message"], str)
        and isinstance(error["type"], str)
        and error["code"] == status
    )


# ----- random values ----------------------------------------------------------------------------------------

PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "
RAW_TOKENS = (  # JSON-ish tokens orjson cannot write: spliced in as bytes
    b"123456789012345678901234567890",
    b"-",
    b"1e999",
    b"NaN",
    b"Infinity",
    b"tru",
    b'"\\ud800"',
    b'"\\u0000"',
    b'"\xff\xfe"',
    b'"\xed\xa0\x80"',
    b"",
    b"[",
    b"{}}",
)
INSERTS = (b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"{", b"[", b"]", b'"', b"\\", b"\\u", b",", b":", b"\n")


def rand_text(rng: random.Random, n: int) -> str:
    r = rng.random()
    if r < 0.6:
        return "".join(rng.choices(PRINTABLE, k=n))
    if r < 0.9:
        ranges = ((0xA0, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF), (0x20, 0x7E))
        return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))
    return "".join(rng.choice("\x00\x01\n\r\t\x7f\u2028\ufeff") for _ in range(n))


def rand_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.55:
        return rng.choice(
            (
                None,
                True,
                False,
                rng.randint(-5, 5),
                rng.choice((2**31, -(2**63), 2**63 - 1, 0)),
                rng.uniform(-1e6, 1e6),
                rng.choice((1e308, -0.0, 5e-324)),
                rand_text(rng, rng.randint(0, 12)),
                "",
            )
        )
    if r < 0.8:
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rand_text(rng, rng.randint(0, 6)): rand_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def json_paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[Any, ...]]:
    """Every key / index path into ``value`` (up to 5 levels), for field-level mutation."""
    out: list[tuple[Any, ...]] = []
    if depth > 5:
        return out
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out.extend(json_paths(child, (*prefix, key), depth + 1))
    return out


def mutate_fields(rng: random.Random, body: dict[str, Any]) -> bytes:
    """Replace, delete or corrupt 1-3 fields of ``body`` anywhere in it: wrong types for every field."""
    raw_tokens: list[bytes] = []
    for _ in range(rng.randint(1, 3)):
        paths = json_paths(body)
        if not paths:
            break
        path = rng.choice(paths)
        parent: Any = body
        for key in path[:-1]:
            parent = parent[key]
        r = rng.random()
        if r < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif r < 0.3:
            parent[path[-1]] = f"__RAW{len(raw_tokens)}__"
            raw_tokens.append(rng.choice(RAW_TOKENS))
        else:
            parent[path[-1]] = rand_json(rng)
    raw = orjson.dumps(body)
    for i, token in enumerate(raw_tokens):
        raw = raw.replace(f'"__RAW{i}__"'.encode(), token)
    return raw


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    """1-4 byte-level edits: overwrite, insert (invalid UTF-8, structure), delete, truncate, repeat, swap."""
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        if not b:
            b += rng.randbytes(rng.randint(1, 8))
            continue
        i = rng.randrange(len(b))
        op = rng.randrange(6)
        if op == 0:
            b[i] = rng.randrange(256)
        elif op == 1:
            b[i:i] = rng.choice(INSERTS) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            del b[i : i + rng.randint(1, 16)]
        elif op == 3:
            del b[i:]
        elif op == 4:
            b[i:i] = b[i : i + rng.randint(1, 32)] * rng.randint(1, 8)
        else:
            b[i] = ord(rng.choice('{}[]":,'))
    return bytes(b)


def nested(depth: int, opener: bytes = b"[", closer: bytes = b"]", core: bytes = b"1") -> bytes:
    return opener * depth + core + closer * depth


DEPTHS = (20, 200, 254, 255, 256, 300, 480, 500, 700, 999, 1023, 1024, 1025, 4000)


def deep_body(rng: random.Random, model: str) -> tuple[str, bytes]:
    """A body nested ``depth`` levels somewhere: prompt lists, content parts, an extra field, dicts, unbalanced."""
    depth = rng.choice(DEPTHS)
    head = b'{"model": ' + orjson.dumps(model)
    where = rng.randrange(6)
    if where == 0:
        return "/v1/completions", head + b', "prompt": ' + nested(depth) + b"}"
    if where == 1:
        return "/v1/chat/completions", head + b', "messages": [{"role": "user", "content": [' + nested(depth) + b"]}]}"
    if where == 2:  # "auto" and a deep extra field: the model rewrite re-serialises the body
        extra = nested(depth, b'{"a": ', b"}")
        return (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "u", "content": "x"}], "x": ' + extra + b"}",
        )
    if where == 3:
        return "/v1/chat/completions", head + b', "messages": ' + nested(depth) + b"}"
    if where == 4:
        return "/v1/completions", head + b', "prompt": ' + nested(depth, b'{"p": ', b"}", b'"x"') + b"}"
    return "/v1/chat/completions", head + b', "messages": ' + b"[" * depth + b"}"  # unbalanced


ROLES = ("system", "user", "assistant", "tool", "developer", "robot", "")


def chat_body(rng: random.Random, model: str | None) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.7:
            content: Any = rand_text(rng, rng.randint(0, 200))
        elif r < 0.9:
            content = [
                {"type": "text", "text": rand_text(rng, 20)},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + rand_text(rng, 8)}},
            ]
        else:
            content = None
        messages.append({"role": rng.choice(ROLES), "content": content})
    body: dict[str, Any] = {"messages": messages, "max_tokens": rng.randint(1, 8)}
    if model is not None:
        body["model"] = model
    if rng.random() < 0.3:
        body["stream"] = rng.random() < 0.5
    if rng.random() < 0.2:
        body["temperature"] = rng.uniform(0, 2)
    return body


def completion_body(rng: random.Random, model: str | None) -> dict[str, Any]:
    r = rng.random()
    if r < 0.4:
        prompt: Any = rand_text(rng, rng.randint(1, 300))
    elif r < 0.6:
        prompt = [rand_text(rng, 20) for _ in range(rng.randint(1, 4))]
    elif r < 0.8:
        prompt = [rng.randint(0, 50_000) for _ in range(rng.randint(1, 64))]
    else:
        prompt = [[rng.randint(0, 50_000) for _ in range(rng.randint(1, 16))] for _ in range(rng.randint(1, 3))]
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": rng.randint(1, 8)}
    if model is not None:
        body["model"] = model
    return body


def valid_body(rng: random.Random, models: Sequence[str]) -> tuple[str, dict[str, Any]]:
    model = rng.choice([*models, "auto", None])
    if rng.random() < 0.7:
        return "/v1/chat/completions", chat_body(rng, model)
    return "/v1/completions", completion_body(rng, model)


def huge_body(rng: random.Random, model: str, limit: int) -> bytes:
    size = rng.choice((MAX_BODY - 200, MAX_BODY + 10, 2 * MAX_BODY - 200, limit + 100))
    filler = b"x" if rng.random() < 0.7 else b"\xff\xfe"
    head = b'{"model": ' + orjson.dumps(model) + b', "messages": [{"role": "user", "content": "'
    return head + filler * (max(0, size - len(head) - 4) // len(filler)) + b'"}]}'


# ----- gRPC inputs -----------------------------------------------------------------------------------------

REQUEST_KINDS = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
)
ENDINGS = (
    ("close", 0.88),
    ("cancel_midway", 0.035),
    ("abandon", 0.035),
    ("cancel_before_read", 0.02),
    ("short_deadline", 0.01),
    ("drop", 0.02),
)


@dataclass
class GrpcCase:
    index: int
    strategy: str
    messages: list[bytes]
    kinds: list[str | None]  # per message: its oneof kind, None (no kind), "malformed" or "too_large"
    metadata: tuple[tuple[str, str], ...] = ()
    ending: str = "close"
    cancel_after: int = 0  # cancel_midway: after this many answers

    def describe(self) -> str:
        sizes = ",".join(str(len(m)) for m in self.messages)
        return f"{self.strategy} kinds={self.kinds} ending={self.ending} sizes={sizes} metadata={self.metadata}"


class GrpcInputs:
    """Every gRPC input, a function of the seed and its index."""

    STRATEGIES = (
        ("valid", 12),
        ("body_fields", 13),
        ("body_bytes", 10),
        ("deep", 5),
        ("huge", 1),
        ("headers", 12),
        ("many_headers", 2),
        ("lb_metadata", 10),
        ("order", 11),
        ("oneof", 6),
        ("raw", 9),
        ("early_end", 9),
    )

    def __init__(self, seed: int, pools: dict[str, list[str]], models: dict[str, list[str]]) -> None:
        from google.protobuf.struct_pb2 import Struct

        from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep

        self.ep = ep
        self.Struct = Struct
        self.seed = seed
        self.pools = pools
        self.models = [m for ms in models.values() for m in ms]
        self.addresses = [a for members in pools.values() for a in members]
        self._names = [name for name, _ in self.STRATEGIES]
        self._weights = [w for _, w in self.STRATEGIES]

    def case(self, index: int) -> GrpcCase:
        rng = random.Random(self.seed * 1_000_003 + index)
        strategy = rng.choices(self._names, self._weights)[0]
        messages: list[Any] = getattr(self, f"_{strategy}")(rng)
        raw: list[bytes] = []
        kinds: list[str | None] = []
        for message in messages:
            if isinstance(message, bytes):
                raw.append(message)
                kinds.append(self.kind_of(message))
            else:
                data = message.SerializeToString()
                raw.append(data)
                kinds.append("too_large" if len(data) > GRPC_LIMIT else message.WhichOneof("request"))
        ending = rng.choices([e for e, _ in ENDINGS], [w for _, w in ENDINGS])[0]
        if strategy == "early_end":
            ending = rng.choice(("close", "abandon", "cancel_before_read", "cancel_midway", "drop"))
        metadata = self._initial_metadata(rng)
        return GrpcCase(index, strategy, raw, kinds, metadata, ending, rng.randint(0, max(0, len(raw) - 1)))

    def kind_of(self, data: bytes) -> str | None:
        from google.protobuf.message import DecodeError

        if len(data) > GRPC_LIMIT:
            return "too_large"
        try:
            return self.ep.ProcessingRequest.FromString(data).WhichOneof("request")
        except DecodeError:
            return "malformed"

    # ----- pieces

    def headers(
        self,
        rng: random.Random,
        path: str = "/v1/chat/completions",
        method: str = "POST",
        end: bool = False,
        extra: Sequence[tuple[str, str | bytes]] = (),
        kind: str = "request_headers",
    ) -> Any:
        message = self.ep.ProcessingRequest()
        http_headers = getattr(message, kind)
        pairs: list[tuple[str, str | bytes]] = [(":path", path), (":method", method)]
        pairs += [("content-type", "application/json"), (":authority", "gateway")]
        for key, value in [*pairs, *extra]:
            h = http_headers.headers.headers.add()
            h.key = key
            if isinstance(value, bytes):
                h.raw_value = value
            else:
                h.raw_value = value.encode()
        http_headers.end_of_stream = end
        if rng.random() < 0.5:
            self._attributes(rng, message)
        if rng.random() < 0.15:
            self._subset(rng, message)
        return message

    def body(self, data: bytes, end: bool = True, kind: str = "request_body") -> Any:
        message = self.ep.ProcessingRequest()
        getattr(message, kind).body = data
        getattr(message, kind).end_of_stream = end
        return message

    def valid(self, rng: random.Random) -> tuple[str, bytes]:
        path, body = valid_body(rng, self.models)
        return path, orjson.dumps(body)

    def _attributes(self, rng: random.Random, message: Any) -> None:
        values: dict[str, Any] = {}
        if rng.random() < 0.8:
            values[names.CLUSTER_ATTRIBUTE] = rng.choice(
                [*(f"{names.CLUSTER_PREFIX}{p}" for p in self.pools), "pool-zzz", "pool-", "", rand_text(rng, 8)]
            )
        if rng.random() < 0.8:
            values[names.ROUTE_ATTRIBUTE] = rng.choice(
                [names.DEFAULT_ROUTE, "a-by-path", "b-by-header", "ab-split", "", rand_text(rng, 8)]
            )
        if rng.random() < 0.2:
            values[rand_text(rng, 6)] = rand_json(rng)
        if rng.random() < 0.1:  # a name Envoy would send as a string, as another type
            values[names.CLUSTER_ATTRIBUTE] = rand_json(rng)
        namespace = EXT_PROC_NAMESPACE if rng.random() < 0.9 else rand_text(rng, 10)
        message.attributes[namespace].update(values)

    def _subset(self, rng: random.Random, message: Any) -> None:
        addresses = [*self.addresses, "10.9.9.9:80", "garbage", "", "[::1]:1"]
        value = rng.choice(
            (
                rng.sample(self.addresses, rng.randint(1, len(self.addresses))),
                ", ".join(rng.sample(addresses, rng.randint(1, 4))),
                rng.sample(addresses, rng.randint(0, 3)),
                [f"10.{rng.randrange(256)}.{rng.randrange(256)}.1:8000" for _ in range(rng.choice((1, 100, 1000)))],
                rand_json(rng),
                "",
            )
        )
        hint = self.Struct()
        if rng.random() < 0.9:
            hint.update({names.SUBSET_KEY: value})
        else:
            hint.update({rand_text(rng, 5): value})
        namespace = names.SUBSET_NAMESPACE if rng.random() < 0.9 else names.LB_NAMESPACE
        message.metadata_context.filter_metadata[namespace].CopyFrom(hint)

    def _initial_metadata(self, rng: random.Random) -> tuple[tuple[str, str], ...]:
        """gRPC initial metadata: the pool Envoy's route chose (x-pool), sometimes unknown or random, and noise."""
        out: list[tuple[str, str]] = []
        if rng.random() < 0.25:
            value = rng.choice([*self.pools, "zzz", "", "".join(rng.choices(string.ascii_letters + "-_.", k=20))])
            out.append((names.POOL_METADATA, value))
        if rng.random() < 0.05:
            key = "x-fuzz-" + "".join(rng.choices(string.ascii_lowercase, k=5))
            out.append((key, "".join(rng.choices(PRINTABLE, k=rng.randint(0, 30))).strip()))
        return tuple(out)

    # ----- strategies: each returns the stream's messages (protobuf objects, or raw bytes)

    def _valid(self, rng: random.Random) -> list[Any]:
        path, data = self.valid(rng)
        if rng.random() < 0.1:
            return [self.headers(rng, rng.choice(("/v1/models", "/v1/models/fuzz-a", "/health")), "GET", end=True)]
        return [self.headers(rng, path), self.body(data)]

    def _body_fields(self, rng: random.Random) -> list[Any]:
        path, body = valid_body(rng, self.models)
        return [self.headers(rng, path), self.body(mutate_fields(rng, body))]

    def _body_bytes(self, rng: random.Random) -> list[Any]:
        path, data = self.valid(rng)
        r = rng.random()
        if r < 0.75:
            data = mutate_bytes(rng, data)
        elif r < 0.9:
            data = rng.randbytes(rng.randint(0, 300))
        else:
            data = rng.choice((b"", b"null", b"[]", b"{}", b'"x"', b"1", b"\xef\xbb\xbf{}"))
        return [self.headers(rng, path), self.body(data)]

    def _deep(self, rng: random.Random) -> list[Any]:
        path, data = deep_body(rng, rng.choice(self.models))
        return [self.headers(rng, path), self.body(data)]

    def _huge(self, rng: random.Random) -> list[Any]:
        return [self.headers(rng), self.body(huge_body(rng, rng.choice(self.models), GRPC_LIMIT))]

    def _headers(self, rng: random.Random) -> list[Any]:
        r = rng.random()
        if r < 0.25:
            path: str | bytes = rand_text(rng, rng.randint(0, 40))
        elif r < 0.4:
            path = rng.randbytes(rng.randint(0, 40))
        elif r < 0.5:
            path = "/v1/" + "a" * rng.choice((1_000, 10_000, 100_000))
        else:
            path = rng.choice(("/v1/chat/completions?x=1", "/v1/models?x", "", "/", "/v1/../etc", "/v1//chat"))
        method = rng.choice(("POST", "GET", "PUT", "", "DELETE", rand_text(rng, 5)))
        message = self.ep.ProcessingRequest()
        hs = message.request_headers.headers.headers
        for key, value in ((":path", path), (":method", method)):
            if rng.random() < 0.1:
                continue  # missing
            for _ in range(2 if rng.random() < 0.15 else 1):  # sometimes twice
                h = hs.add()
                h.key = key
                if rng.random() < 0.2 and isinstance(value, str):
                    h.value = value  # the string field instead of raw_value
                elif isinstance(value, bytes):
                    h.raw_value = value
                else:
                    h.raw_value = value.encode()
        for _ in range(rng.randint(0, 4)):
            h = hs.add()
            h.key, h.raw_value = rand_text(rng, rng.randint(0, 10)), rng.randbytes(rng.randint(0, 20))
        end = rng.random() < 0.3
        message.request_headers.end_of_stream = end
        if rng.random() < 0.3:
            self._attributes(rng, message)
        out: list[Any] = [message]
        if not end or rng.random() < 0.3:
            out.append(self.body(self.valid(rng)[1]))
        return out

    def _many_headers(self, rng: random.Random) -> list[Any]:
        count = rng.choice((1_000, 3_000, 6_000))
        extra = [(f"x-h-{i}", "v" * rng.randint(1, 40)) for i in range(count)]
        path, data = self.valid(rng)
        return [self.headers(rng, path, extra=extra), self.body(data)]

    def _lb_metadata(self, rng: random.Random) -> list[Any]:
        path, data = self.valid(rng)
        message = self.headers(rng, path)
        self._attributes(rng, message)
        self._subset(rng, message)
        return [message, self.body(data)]

    def _order(self, rng: random.Random) -> list[Any]:
        path, data = self.valid(rng)
        h, b = self.headers(rng, path), self.body(data)
        t = self.ep.ProcessingRequest(request_trailers=self.ep.HttpTrailers())
        fixed = (
            [b, h],
            [t, h, b],
            [h, h, b],
            [h, b, b],
            [h, self.body(data[: len(data) // 2], end=False), self.body(data[len(data) // 2 :])],
            [self.ep.ProcessingRequest(response_headers=self.ep.HttpHeaders()), h, b],
            [h, b, t, *(self._of_kind(rng, k, path, data) for k in REQUEST_KINDS[3:])],
            [self.ep.ProcessingRequest(), h, self.ep.ProcessingRequest(), b],
            [b],
            [t],
        )
        if rng.random() < 0.6:
            return list(rng.choice(fixed))
        return [self._of_kind(rng, rng.choice([*REQUEST_KINDS, None]), path, data) for _ in range(rng.randint(1, 8))]

    def _of_kind(self, rng: random.Random, kind: str | None, path: str, data: bytes) -> Any:
        ep = self.ep
        if kind is None:
            return ep.ProcessingRequest(observability_mode=rng.random() < 0.5)
        if kind.endswith("headers"):
            return self.headers(rng, path, end=rng.random() < 0.2, kind=kind)
        if kind.endswith("body"):
            return self.body(data if rng.random() < 0.7 else mutate_bytes(rng, data), rng.random() < 0.8, kind)
        message = ep.ProcessingRequest()
        trailers = getattr(message, kind).trailers
        for _ in range(rng.randint(0, 3)):
            h = trailers.headers.add()
            h.key, h.raw_value = rand_text(rng, 6), rng.randbytes(6)
        return message

    def _oneof(self, rng: random.Random) -> list[Any]:
        path, data = self.valid(rng)
        ep = self.ep
        r = rng.random()
        if r < 0.3:  # a request's headers as another kind
            first = self.headers(rng, path, kind="response_headers")
        elif r < 0.5:
            first = self.body(data, kind="response_body")
        else:
            first = self.headers(rng, path)
        body = self.body(data, end=rng.random() < 0.7)
        body.request_body.end_of_stream_without_message = rng.random() < 0.3
        body.request_body.grpc_message_compressed = rng.random() < 0.3
        for message in (first, body):
            message.observability_mode = rng.random() < 0.2
            if rng.random() < 0.2:
                message.protocol_config.request_body_mode = rng.randrange(5)
                message.protocol_config.response_body_mode = rng.randrange(5)
                message.protocol_config.send_body_without_waiting_for_header_response = rng.random() < 0.5
        out = [first, body]
        if rng.random() < 0.3:
            out.append(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
        return out

    def _raw(self, rng: random.Random) -> list[Any]:
        path, data = self.valid(rng)
        h = self.headers(rng, path).SerializeToString()
        b = self.body(data).SerializeToString()
        r = rng.random()
        if r < 0.5:
            return [h, mutate_bytes(rng, b)] if rng.random() < 0.5 else [mutate_bytes(rng, h), b]
        if r < 0.7:
            return [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 3))]
        if r < 0.85:
            return [h + b, b + h]  # merged messages: the last oneof wins
        return [h, b + rng.randbytes(rng.randint(1, 20))]

    def _early_end(self, rng: random.Random) -> list[Any]:
        path, data = self.valid(rng)
        return rng.choice(([], [self.headers(rng, path)], [self.headers(rng, path), self.body(data)]))


ALLOWED_ANSWERS = {
    "request_headers": ("request_headers", "immediate_response"),
    "request_body": ("request_body", "immediate_response"),
    **{k: (k,) for k in REQUEST_KINDS[2:]},
}


class GrpcFuzzer:
    """Sends each input as one stream and judges its end."""

    def __init__(
        self, inputs: GrpcInputs, channels: list[grpc.aio.Channel], target: str, deadline: float, report: Report
    ) -> None:
        import grpc

        self.grpc = grpc
        self.ep = inputs.ep
        self.inputs = inputs
        self.channels = channels
        self.target = target
        self.deadline = deadline
        self.report = report
        self.members = {a: pool for pool, members in inputs.pools.items() for a in members}

    async def one_valid(self, index: int) -> None:
        """A plain chat request (no attributes, hints or metadata): it must be routed."""
        rng = random.Random(index)
        case = GrpcCase(index, "valid", [], [])
        headers = self.inputs.headers(rng, "/v1/chat/completions")
        headers.ClearField("attributes")
        headers.ClearField("metadata_context")
        for message in (headers, self.inputs.body(orjson.dumps(chat_body(rng, "fuzz-a")))):
            case.messages.append(message.SerializeToString())
            case.kinds.append(message.WhichOneof("request"))
        await self._run(case, self.channels[index % len(self.channels)])

    async def one(self, index: int) -> None:
        case = self.inputs.case(index)
        if case.ending == "drop":
            async with self.grpc.aio.insecure_channel(self.target) as channel:
                await self._run(case, channel)
        else:
            await self._run(case, self.channels[index % len(self.channels)])

    async def _run(self, case: GrpcCase, channel: grpc.aio.Channel) -> None:
        grpc = self.grpc
        report = self.report
        deadline = rand_deadline(case) if case.ending == "short_deadline" else self.deadline
        call = channel.stream_stream(METHOD)(metadata=case.metadata or None, timeout=deadline)
        answers: list[Any] = []
        ended_by: str | None = None  # a status the input expects ("malformed", "too_large")
        request_complete = False  # the request's last message was answered: the picker has closed the stream
        try:
            if case.ending == "cancel_before_read":
                for message in case.messages[:1]:
                    await call.write(message)
                call.cancel()
                report.outcomes["cancelled"] += 1
                return
            for message, kind in zip(case.messages, case.kinds, strict=True):
                await call.write(message)
                if kind in ("malformed", "too_large"):
                    ended_by = kind
                    break
                if kind is None:
                    continue
                sent = time.monotonic()
                answer = await call.read()
                if time.monotonic() - sent > MESSAGE_TIMEOUT:
                    report.slow[case.strategy] += 1
                if answer is grpc.aio.EOF:
                    code = await call.code()
                    report.fail("violation", case.index, f"stream ended ({code}) before answering {kind}: "
                                f"{case.describe()}")  # fmt: skip
                    return
                problem = self._check(kind, answer, answers)
                if problem:
                    report.fail(problem, case.index, case.describe())
                    call.cancel()
                    return
                if case.ending == "cancel_midway" and len(answers) > case.cancel_after:
                    call.cancel()
                    report.outcomes["cancelled"] += 1
                    return
                if self._request_complete(kind, message):
                    request_complete = True  # the picker ends the stream here: nothing more is sent
                    break
            # abandon: never sends the rest (e.g. the body), the client gives up
            if case.ending == "abandon" and not request_complete:
                await asyncio.sleep(0.001 * (case.index % 20))
                call.cancel()
                report.outcomes["abandoned"] += 1
                return
            if case.ending == "drop":
                await channel.close()
                report.outcomes["dropped"] += 1
                return
            if ended_by is None and not request_complete:
                await call.done_writing()
            extra = await call.read()
            if extra is not grpc.aio.EOF:
                report.fail("violation", case.index, f"an answer nobody asked for: {case.describe()}")
                call.cancel()
                return
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise_status(code, await call.details())
            if ended_by is not None:
                report.fail("unexpected_status", case.index, f"OK after a {ended_by} message: {case.describe()}")
                return
            report.outcomes[self._outcome(case, answers)] += 1
        except Exception as exc:  # a status, or the client's own error once the stream has ended (e.g. a half-close)
            code, details = await status_of(call, exc)
            if code == grpc.StatusCode.OK:
                report.fail("fuzzer_error", case.index, f"{type(exc).__name__}: {exc}: {case.describe()}")
                return
            self._judge_status(case, code, details, ended_by)

    def _request_complete(self, kind: str, raw: bytes) -> bool:
        """Whether ``raw`` was the request's last message (the body's end, or headers without a body), after
        which the picker answers and ends the stream with OK (gateway/server.py)."""
        if kind not in ("request_body", "request_headers"):
            return False
        message = self.ep.ProcessingRequest.FromString(raw)
        return getattr(message, kind).end_of_stream

    def _check(self, kind: str, raw: bytes, answers: list[Any]) -> str | None:
        """What is wrong with the answer ``raw`` to a ``kind`` message (a failure kind), or None."""
        from google.protobuf.message import DecodeError

        try:
            answer = self.ep.ProcessingResponse.FromString(raw)
        except DecodeError:
            return "violation"
        answers.append(answer)
        got = answer.WhichOneof("response")
        if got not in ALLOWED_ANSWERS[kind]:
            return "violation"
        if got == "immediate_response":
            immediate = answer.immediate_response
            content_type = next(
                (o.header.raw_value.decode() for o in immediate.headers.set_headers if o.header.key == "content-type"),
                "",
            )
            status = immediate.status.code
            if status >= 400 and not openai_error(content_type, immediate.body, status):
                return "non_json_error"
        elif answer.HasField("dynamic_metadata"):
            fields = answer.dynamic_metadata.fields[names.LB_NAMESPACE].struct_value.fields
            endpoints = fields[names.DESTINATION_KEY].string_value.split(",")
            pools = {self.members.get(e) for e in endpoints}
            if len(pools) != 1 or None in pools:
                return "escaped_pool"
        return None

    @staticmethod
    def _outcome(case: GrpcCase, answers: list[Any]) -> str:
        for answer in answers:
            if answer.WhichOneof("response") == "immediate_response":
                return f"answered_{answer.immediate_response.status.code}"
        if any(a.HasField("dynamic_metadata") for a in answers):
            return "routed"
        return "passed_through" if answers else "nothing_to_answer"

    def _judge_status(self, case: GrpcCase, code: Any, details: str, ended_by: str | None) -> None:
        grpc, report = self.grpc, self.report
        expected = {
            "malformed": (grpc.StatusCode.INVALID_ARGUMENT, "rejected_malformed"),
            "too_large": (grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected_too_large"),
        }
        if ended_by is not None and code == expected[ended_by][0]:
            report.outcomes[expected[ended_by][1]] += 1
        elif case.ending == "short_deadline" and code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL):
            # A deadline of a few ms can also expire inside the client's own write ("Internal error from Core").
            report.outcomes["short_deadline"] += 1
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            report.fail("hang", case.index, f"no end within {self.deadline:.0f} s: {case.describe()}")
        elif code == grpc.StatusCode.CANCELLED and case.ending in ("drop", "cancel_midway", "abandon"):
            report.outcomes["cancelled"] += 1
        elif code == grpc.StatusCode.UNKNOWN:
            report.fail("crash", case.index, f"{details}: {case.describe()}")
        else:
            report.fail("unexpected_status", case.index, f"{code} {details}: {case.describe()}")


class StatusError(Exception):
    def __init__(self, code: Any, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


def raise_status(code: Any, details: str | None) -> None:
    raise StatusError(code, details or "")


async def status_of(call: Any, exc: BaseException) -> tuple[Any, str]:
    if isinstance(exc, StatusError):
        return exc.code, exc.details
    if hasattr(exc, "code") and callable(exc.code):
        return exc.code(), exc.details() or ""
    return await call.code(), await call.details() or ""


def rand_deadline(case: GrpcCase) -> float:
    return 0.001 + 0.002 * (case.index % 10)


def fuzz_grpc(options: Options) -> Report:
    """Fuzz `extproc serve` over gRPC: ``options.inputs`` streams, then ``options.idle_streams`` idle ones."""
    import yaml

    from extproc.local.procs import Child, SimStart, extproc_argv, free_port, free_port_blocks, start_sims

    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="extproc-fuzz-grpc-"))
    report = Report("grpc")
    children: list[Child] = []
    try:
        ports = free_port_blocks(2)
        children += start_sims(
            [SimStart(f"sim-{i}", "fuzz-a", p, ("--time-scale", "0")) for i, p in enumerate(ports)], log_dir
        )
        sims = [f"127.0.0.1:{p}" for p in ports]
        pools = {"a": sims, "b": [f"127.0.0.1:{free_port()}" for _ in range(2)]}  # b: nothing listens
        models = {"a": ["fuzz-a"], "b": ["fuzz-b", "fuzz-b-alias"]}
        listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config = {
            "server": {"listen": listen, "metrics_listen": metrics, "grace_period": 1},
            "pools": [{"name": p, "models": models[p], "endpoints": {"static": pools[p]}} for p in pools],
            "limits": {"max_body_bytes": MAX_BODY},
        }
        path = log_dir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        picker = Child("extproc", extproc_argv("serve", "--config", str(path)), log_dir)
        children.append(picker)
        picker.wait_http(f"http://{metrics}/metrics")
        print(f"fuzz grpc: extproc serve on {listen} (logs in {log_dir}), {options.inputs:,} inputs, "
              f"seed {options.seed}, concurrency {options.concurrency}", flush=True)  # fmt: skip
        inputs = GrpcInputs(options.seed, pools, models)
        asyncio.run(_fuzz_grpc(options, report, inputs, listen, picker, f"http://{metrics}/metrics"))
        tracebacks = picker.log_path.read_text(errors="replace").count("Traceback")
        report.checks["no_tracebacks_in_log"] = tracebacks == 0
        report.checks["picker_alive"] = picker.alive()
    finally:
        for child in reversed(children):
            child.stop()
    return report


async def _fuzz_grpc(
    options: Options, report: Report, inputs: GrpcInputs, listen: str, picker: Child, metrics_url: str
) -> None:
    import grpc

    options_ = [("grpc.max_send_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(listen, options=options_) for _ in range(4)]
    watched = Watched("picker", picker)
    try:
        fuzzer = GrpcFuzzer(inputs, channels, listen, options.deadline, report)
        warm = Report("grpc")
        warmup = GrpcFuzzer(inputs, channels, listen, options.deadline, warm)
        await asyncio.gather(*(warmup.one_valid(i) for i in range(300)))
        watched.baseline()
        index_before = index_size(metrics_url)
        series_before = len(metric_samples(metrics_url))
        started = time.monotonic()
        await drive(options, report, fuzzer.one, [watched])
        if options.idle_streams:
            await idle_streams(options, report, inputs, channels, listen)
        report.seconds = time.monotonic() - started
        report.inputs = options.inputs + options.idle_streams
        # Afterwards: still serving, and back near the baseline.
        report.checks["health_serving_after"] = await health_serving(channels[0])
        check = Report("grpc")
        await GrpcFuzzer(inputs, channels, listen, options.deadline, check).one_valid(0)
        report.checks["valid_request_routed_after"] = check.outcomes["routed"] == 1
        await watched.settle(report)
        index_after = index_size(metrics_url)
        report.notes.append(
            f"prefix index {index_before:.0f} -> {index_after:.0f} blocks (bounded by the per-endpoint LRU)"
        )
        series_after = len(metric_samples(metrics_url))
        report.notes.append(f"samples on the picker's /metrics {series_before} -> {series_after}")
        # Label values come from configuration, statuses and (at most 64) route names: bounded, whatever the input.
        report.checks["metric_series_bounded"] = series_after <= series_before + SERIES_GROWTH
    finally:
        for channel in channels:
            await channel.close()


async def health_serving(channel: grpc.aio.Channel, timeout: float = 5.0) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    try:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=timeout)
    except Exception:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def index_size(metrics_url: str) -> float:
    return sum(v for n, _labels, v in metric_samples(metrics_url) if n == "inference_extension_prefix_indexer_size")


async def idle_streams(
    options: Options, report: Report, inputs: GrpcInputs, channels: list[grpc.aio.Channel], listen: str
) -> None:
    """Hold ``options.idle_streams`` streams open at once (half sent their headers, half nothing): the server
    must still answer a health check and a valid request; then they end three ways, each within the deadline."""
    import grpc

    ep = inputs.ep
    n = options.idle_streams
    headers = inputs.headers(random.Random(1), "/v1/chat/completions")
    headers.ClearField("attributes")
    headers.ClearField("metadata_context")
    body = inputs.body(orjson.dumps(chat_body(random.Random(2), "fuzz-a")))
    calls = [channels[i % len(channels)].stream_stream(METHOD)(timeout=120) for i in range(n)]

    async def open_one(i: int) -> None:
        if i % 2 == 0:
            await calls[i].write(headers.SerializeToString())
            answer = ep.ProcessingResponse.FromString(await calls[i].read())
            if answer.WhichOneof("response") != "request_headers":
                report.fail("violation", -i, "idle stream: headers answered with " + str(answer.WhichOneof("response")))

    await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(n))), options.deadline * 4)
    started = time.monotonic()
    serving = await health_serving(channels[0])
    check = Report("grpc")
    await GrpcFuzzer(inputs, channels, listen, options.deadline, check).one_valid(1)
    report.checks["serving_with_idle_streams_open"] = serving and check.outcomes["routed"] == 1
    report.notes.append(
        f"{n} idle streams open: a health check and a valid request answered in "
        f"{(time.monotonic() - started) * 1000:.1f} ms"
    )

    async def end_one(i: int) -> None:
        call = calls[i]
        try:
            if i % 3 == 0:
                call.cancel()
                report.outcomes["idle_cancelled"] += 1
                return
            if i % 3 == 1 and i % 2 == 0:  # headers were sent: now the body, then the pick
                await call.write(body.SerializeToString())
                answer = ep.ProcessingResponse.FromString(await call.read())
                if not answer.HasField("dynamic_metadata"):
                    report.fail("violation", -i, "idle stream: the body was not routed")
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF or await call.code() != grpc.StatusCode.OK:
                report.fail("violation", -i, f"idle stream ended with {await call.code()}")
                return
            report.outcomes["idle_then_routed" if i % 3 == 1 and i % 2 == 0 else "idle_closed"] += 1
        except grpc.aio.AioRpcError as exc:
            report.fail("unexpected_status", -i, f"idle stream: {exc.code()} {exc.details()}")

    try:
        await asyncio.wait_for(asyncio.gather(*(end_one(i) for i in range(n))), options.deadline * 4)
    except TimeoutError:
        report.fail("hang", -1, f"idle streams not ended within {options.deadline * 4:.0f} s")


# ----- HTTP inputs -----------------------------------------------------------------------------------------

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FUZZ")
PATH_CHARS = string.ascii_letters + string.digits + "-._~/%!$&'()*+,;=:@"
SPOOF_HEADERS = (
    names.DESTINATION_KEY,
    names.POOL_HEADER,
    names.POOL_METADATA,
    names.SUBSET_KEY,
    names.UPSTREAM_HOST_HEADER,
    names.PICKED_HEADER,
    names.POOL_RESPONSE_HEADER,
    names.ROUTING_US_HEADER,
    "x-envoy-original-path",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-retry-on",
    "x-envoy-max-retries",
    "x-envoy-expected-rq-timeout-ms",
    "x-forwarded-for",
    "x-request-id",
    "x-user-id",
)


@dataclass
class HttpCase:
    index: int
    strategy: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None

    def describe(self) -> str:
        size = len(self.body) if self.body is not None else 0
        head = (self.body or b"")[:80]
        return f"{self.strategy} {self.method} {self.path[:80]} headers={self.headers} body[{size}]={head!r}"


class HttpInputs:
    """Every HTTP input, a function of the seed and its index."""

    STRATEGIES = (
        ("valid", 14),
        ("json_bytes", 12),
        ("wrong_types", 16),
        ("deep", 6),
        ("huge", 1),
        ("invalid_utf8", 6),
        ("spoof", 15),
        ("unknown", 12),
        ("odd_headers", 8),
    )

    def __init__(self, seed: int, pools: dict[str, list[str]], models: dict[str, str], outsider: str) -> None:
        self.seed = seed
        self.pools = pools
        self.models = models
        self.outsider = outsider
        self.model_names = [*models.values()]
        self._names = [name for name, _ in self.STRATEGIES]
        self._weights = [w for _, w in self.STRATEGIES]

    def case(self, index: int) -> HttpCase:
        rng = random.Random(self.seed * 1_000_003 + index)
        strategy = rng.choices(self._names, self._weights)[0]
        method, path, headers, body = getattr(self, f"_{strategy}")(rng)
        return HttpCase(index, strategy, method, path, headers, body)

    def route(self, rng: random.Random, path: str) -> str:
        """``path`` (/v1/...) under one of the gateway's routes: by model, by pool path, or the split."""
        prefix = rng.choice(("", "", "/1b", "/3b", "/ab"))
        return "/v1" + prefix + path.removeprefix("/v1")

    def _valid(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        if rng.random() < 0.1:
            return "GET", rng.choice(("/v1/models", "/v1/1b/models", "/v1/ab/models")), {}, None
        path, body = valid_body(rng, self.model_names)
        return "POST", self.route(rng, path), {"content-type": "application/json"}, orjson.dumps(body)

    def _json_bytes(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        _, path, headers, body = self._valid(rng)
        data = body or b"{}"
        data = mutate_bytes(rng, data) if rng.random() < 0.8 else rng.randbytes(rng.randint(0, 200))
        return "POST", path, headers, data

    def _wrong_types(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        path, body = valid_body(rng, self.model_names)
        return "POST", self.route(rng, path), {"content-type": "application/json"}, mutate_fields(rng, body)

    def _deep(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        path, data = deep_body(rng, rng.choice(self.model_names))
        return "POST", self.route(rng, path), {"content-type": "application/json"}, data

    def _huge(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        data = huge_body(rng, rng.choice(self.model_names), 4 * MAX_BODY)
        return "POST", self.route(rng, "/v1/chat/completions"), {"content-type": "application/json"}, data

    def _invalid_utf8(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        body = chat_body(rng, rng.choice(self.model_names))
        body["messages"][0]["content"] = "__BAD__"
        bad = rng.choice((b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82"))
        data = orjson.dumps(body).replace(b"__BAD__", b"ok " + bad * rng.randint(1, 4) + b" ok")
        return "POST", self.route(rng, "/v1/chat/completions"), {"content-type": "application/json"}, data

    def _spoof(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        method, path, headers, body = self._valid(rng)
        members = [a for m in self.pools.values() for a in m]
        values = [self.outsider, *members, "10.9.9.9:80", "garbage", "", f"{self.outsider},{members[0]}"]
        values += [*self.pools, "zzz", "[::1]:1", "1", "5xx", "10", "/v1/chat/completions"]
        spoofed = dict(headers)
        for name in rng.sample(SPOOF_HEADERS, rng.randint(1, 4)):
            spoofed[name] = rng.choice(values)
        return method, path, spoofed, body

    def _unknown(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        r = rng.random()
        if r < 0.4:
            path = rng.choice(("/", "/v2/chat/completions", "/v1", "/v1/", "/v1/1b/", "/v1/ab/", "/metrics", "/health"))
            path = rng.choice((path, path + "?x=1", "/v1/1b" + path, "/v1/zz" + path))
        elif r < 0.8:
            path = "/" + "".join(rng.choices(PATH_CHARS, k=rng.randint(0, 60)))
            path = path.replace("%", "%25") if rng.random() < 0.5 else path
        else:
            path = "/v1/" + "a" * rng.choice((2_000, 20_000, 70_000))  # Envoy's header limit is 60 KiB
        if path.startswith(("/sim", "//sim")):  # the simulators' own fault-injection API: not for a fuzzer
            path = "/v1/chat/completions"
        method = rng.choice(HTTP_METHODS)
        body = None if method in ("GET", "HEAD", "OPTIONS") or rng.random() < 0.3 else self._valid(rng)[3]
        return method, path, {"content-type": "application/json"}, body

    def _odd_headers(self, rng: random.Random) -> tuple[str, str, dict[str, str], bytes | None]:
        method, path, headers, body = self._valid(rng)
        odd = dict(headers)
        choice = rng.randrange(5)
        if choice == 0:
            odd["content-type"] = rng.choice(("text/plain", "application/x-www-form-urlencoded", "", 'x/y; q="1"'))
        elif choice == 1:
            odd["content-encoding"] = rng.choice(("gzip", "br", "identity"))
        elif choice == 2:
            for i in range(rng.choice((10, 100))):
                odd[f"x-fuzz-{i}"] = "v" * rng.randint(1, 100)
        elif choice == 3:
            odd["accept"] = "text/event-stream"
        else:
            odd["expect"] = "100-continue"
        return method if rng.random() < 0.8 else rng.choice(HTTP_METHODS), path, odd, body


def path_class(path: str) -> str:
    """A bounded label for where a request went: the route (by model, a pool's path, the split) and the endpoint."""
    bare = path.split("?", 1)[0]
    for prefix in ("/v1/1b/", "/v1/3b/", "/v1/ab/"):
        if bare.startswith(prefix):
            rest = "/v1/" + bare.removeprefix(prefix)
            return prefix + (rest.removeprefix("/v1/") if rest in KNOWN_PATHS else "*")
    return bare if bare in KNOWN_PATHS else ("/v1/... (long)" if len(bare) > 1000 else "unknown path")


KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class HttpFuzzer:
    def __init__(
        self, inputs: HttpInputs, session: aiohttp.ClientSession, gateway: str, deadline: float, report: Report
    ) -> None:
        import aiohttp
        import yarl

        self.aiohttp = aiohttp
        self.yarl = yarl
        self.inputs = inputs
        self.session = session
        self.gateway = gateway
        self.deadline = deadline
        self.report = report
        self.members = {pool: set(addresses) for pool, addresses in inputs.pools.items()}
        self.local_json: Counter[int] = Counter()  # status -> answers without an upstream, OpenAI-shaped

    async def one(self, index: int) -> None:
        case = self.inputs.case(index)
        report = self.report
        url = self.yarl.URL(self.gateway + case.path, encoded=True)
        aiohttp = self.aiohttp
        try:
            async with self.session.request(
                case.method,
                url,
                data=case.body,
                headers=case.headers,
                timeout=aiohttp.ClientTimeout(total=self.deadline),
                skip_auto_headers=("Content-Type",),
            ) as response:
                data = await response.read()
                self._judge(case, response.status, response.headers, data)
        except TimeoutError:
            report.fail("hang", index, f"no answer within {self.deadline:.0f} s: {case.describe()}")
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError):
            # Envoy closes the connection after answering a body above its buffer (413) before reading it all.
            report.outcomes["connection closed by the gateway"] += 1
        except aiohttp.ClientResponseError as exc:
            if case.method == "HEAD" and "Data after" in str(exc.message):
                # Envoy's codec refuses the request line/headers (431) before it knows the method: a body follows.
                report.outcomes["HEAD answered with a body (Envoy's codec error reply)"] += 1
            else:
                report.fail("client_error", index, f"{type(exc).__name__}: {exc}: {case.describe()}")
        except (aiohttp.ClientError, ValueError) as exc:
            report.fail("client_error", index, f"{type(exc).__name__}: {exc}: {case.describe()}")

    def _judge(self, case: HttpCase, status: int, headers: Any, data: bytes) -> None:
        report = self.report
        upstream = headers.get(names.UPSTREAM_HOST_HEADER, "")
        if upstream:
            pool = headers.get(names.POOL_RESPONSE_HEADER, "")
            if upstream == self.inputs.outsider or upstream not in self.members.get(pool, ()):
                report.fail("escaped_pool", case.index, f"served by {upstream} in pool {pool!r}: {case.describe()}")
        source = "upstream" if upstream else "gateway"
        if upstream and not headers.get(names.PICKED_HEADER):
            report.slow[case.strategy] += 1
        shaped = True
        if status >= 400 and case.method != "HEAD":
            shaped = openai_error(headers.get("content-type", ""), data, status)
            if shaped and not upstream:
                self.local_json[status] += 1
            if not shaped:
                source = "upstream" if upstream else "envoy"
                snippet = data[:60].decode("utf-8", "replace").replace("\n", " ")
                key = f"{status} {source} {case.method} {path_class(case.path)}: {snippet!r}"
                report.non_json[key] += 1
                report.non_json_inputs.setdefault(key, case.index)
        report.outcomes[f"{status} {source}" + ("" if shaped else " (not JSON)")] += 1


ENVOY_EXT_PROC_CRASHES = ("streams_failed", "spurious_msgs_received")  # the picker's stream broke, or it misspoke


def envoy_ext_proc_stats(admin_port: int) -> dict[str, int]:
    import urllib.request

    url = f"http://127.0.0.1:{admin_port}/stats?filter=ext_proc"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[key.rsplit(".", 1)[-1]] = int(value)
    return out


def picker_refusals(metrics_url: str) -> Counter[int]:
    """The requests the picker answered itself, by HTTP status (its extproc_requests_total outcomes)."""
    out: Counter[int] = Counter()
    for name, labels, value in metric_samples(metrics_url):
        if name == "extproc_requests_total" and labels.get("outcome", "").isdigit():
            out[int(labels["outcome"])] += int(value)
    return out


def fuzz_http(options: Options) -> Report:
    """Fuzz the gateway over HTTP: Envoy, the picker and simulated pools, with an outsider replica in no pool."""
    from extproc.local.procs import free_port, start_sim
    from extproc.local.stack import PoolSpec, start_stack

    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="extproc-fuzz-http-"))
    report = Report("http")
    models = {"1b": "fuzz-1b", "3b": "fuzz-3b"}
    split = {"name": "ab", "backends": [{"pool": "1b", "weight": 70}, {"pool": "3b", "weight": 30}]}
    sim_args = ("--time-scale", "0")
    stack = start_stack(
        log_dir,
        [PoolSpec("1b", models["1b"], 2, sim_args), PoolSpec("3b", models["3b"], 1, sim_args)],
        settings={"splits": [split], "limits": {"max_body_bytes": MAX_BODY}, "server": {"grace_period": 1}},
    )
    try:
        port = free_port()
        stack.extras.append(start_sim("outsider", models["1b"], port, log_dir, *sim_args))
        outsider = f"127.0.0.1:{port}"
        pools = {name: [r.address for r in replicas] for name, replicas in stack.sims.items()}
        print(f"fuzz http: gateway {stack.gateway} (logs in {log_dir}), {options.inputs:,} inputs, "
              f"seed {options.seed}, concurrency {options.concurrency}", flush=True)  # fmt: skip
        inputs = HttpInputs(options.seed, pools, models, outsider)
        asyncio.run(_fuzz_http(options, report, inputs, stack))
        assert stack.extproc is not None and stack.envoy is not None
        report.checks["picker_alive"] = stack.extproc.alive()
        report.checks["envoy_alive"] = stack.envoy.alive()
        tracebacks = stack.extproc.log_path.read_text(errors="replace").count("Traceback")
        report.checks["no_tracebacks_in_picker_log"] = tracebacks == 0
        state = orjson.loads(_get(f"http://{outsider}/sim/state"))
        report.checks["outsider_never_served"] = state["steps"] == 0
    finally:
        stack.stop()
    return report


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


async def _fuzz_http(options: Options, report: Report, inputs: HttpInputs, stack: Stack) -> None:
    import aiohttp

    assert stack.extproc is not None and stack.envoy is not None
    watched = [Watched("picker", stack.extproc), Watched("envoy", stack.envoy)]
    connector = aiohttp.TCPConnector(limit=options.concurrency, limit_per_host=options.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        fuzzer = HttpFuzzer(inputs, session, stack.gateway, options.deadline, report)
        warm = HttpFuzzer(inputs, session, stack.gateway, options.deadline, Report("http"))
        await asyncio.gather(*(warm.one(i) for i in range(10_000_000, 10_000_200)))  # inputs of their own
        for w in watched:
            w.baseline()
        stats_before = envoy_ext_proc_stats(stack.admin_port)
        refusals_before = picker_refusals(stack.metrics_url)
        started = time.monotonic()
        await drive(options, report, fuzzer.one, watched)
        report.seconds = time.monotonic() - started
        report.inputs = options.inputs
        stats_after = envoy_ext_proc_stats(stack.admin_port)
        for stat in ENVOY_EXT_PROC_CRASHES:
            delta = stats_after.get(stat, 0) - stats_before.get(stat, 0)
            if delta:  # invisible to the client: Envoy routed on without the picker (failure_mode_allow)
                report.fail("crash", -1, f"Envoy's ext_proc {stat} grew by {delta}")
        report.notes.append(
            "Envoy's ext_proc counters over the run: "
            + ", ".join(f"{k} +{stats_after.get(k, 0) - stats_before.get(k, 0)}" for k in sorted(stats_after))
        )
        # Every refusal the picker counted is among the OpenAI-shaped answers without an upstream.
        refused = picker_refusals(stack.metrics_url) - refusals_before
        seen = fuzzer.local_json
        missing = {s: n - seen[s] for s, n in refused.items() if n > seen[s]}
        report.checks["picker_answers_are_json"] = not missing
        report.notes.append(f"the picker answered itself: {dict(sorted(refused.items()))}; shaped JSON seen: "
                            f"{dict(sorted(fuzzer.local_json.items()))}")  # fmt: skip
        # Afterwards: a valid request is picked and served.
        body = {"model": "fuzz-1b", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2}
        async with session.post(f"{stack.gateway}/v1/chat/completions", json=body) as response:
            await response.read()
            picked = response.headers.get(names.PICKED_HEADER, "")
            report.checks["valid_request_picked_after"] = response.status == 200 and bool(picked)
    for w in watched:
        await w.settle(report, fd_slack=16 if w.name == "envoy" else 8, thread_slack=2)
