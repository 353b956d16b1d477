"""`extproc bench soak`: the local gateway under mixed open-loop traffic for a long time; does anything grow?

The stack of `extproc up` (Envoy, the picker, two 1B and two 3B simulated replicas, the 70/30 A/B split) gets a
fixed request rate for ``--duration`` seconds: every route (by path, by model, the split), chat and completions,
streaming and not, shared-prefix and unique prompts, and a few deliberately bad requests that must get their
4xx (counted apart, not as errors). Every ``--sample-interval`` seconds the picker's and Envoy's RSS, open file
descriptors and CPU are read from /proc, with the picker's series count and prefix-index size from its /metrics
and Envoy's stats count and heap from its admin; every window (a minute) the client's latency percentiles,
requests and errors by status. Judged: RSS growth after the warm-up (< 10 %), errors (0), and the last
window's p99 against the first window after the warm-up (within 20 %). Results: ``soak.json``, ``soak.md`` and
``soak.png`` in ``--out``. Exit status 0 when every criterion passes, 1 when one fails, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import shlex
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from extproc.bench import machine
from extproc.bench.workloads import text
from extproc.cli import DefaultsHelp
from extproc.local.multi_model import AB_ROUTE, POOLS, SPLIT_SETTINGS, STICKY_HEADER
from extproc.local.promtext import samples as prom_samples
from extproc.stats import percentile

WARMUP_CAP = 120.0  # seconds: the warm-up is the first 2 minutes or 10 % of the run, whichever is shorter
WARMUP_SHARE = 0.10
RSS_GROWTH_LIMIT = 0.10  # RSS at the end over RSS after the warm-up, minus 1
P99_DRIFT_LIMIT = 0.20  # |last window's p99 / first post-warm-up window's - 1|
REQUEST_TIMEOUT = 60.0  # seconds; a request that takes longer is an error
RATE_SUSTAINED = 0.95  # sent / offered below this: the client could not keep up, the run does not count

# The traffic mix (shares of the good requests): route, API, streaming, prompt.
ROUTE_SHARES = {"1b-path": 0.22, "3b-path": 0.13, "ab-split": 0.25, "by-model": 0.40}
BY_MODEL_1B_SHARE = 0.6
CHAT_SHARE = 0.7
STREAM_SHARE = 0.5
SHARED_PREFIX_SHARE = 0.6
TENANTS = 32
MAX_TOKENS = (8, 48)
# Deliberately bad requests: kind -> (relative weight, the status the gateway must answer).
BAD_KINDS: dict[str, tuple[int, int]] = {
    "bad_json": (3, 400),
    "empty_messages": (3, 400),
    "bad_stream_type": (2, 400),
    "unknown_model": (3, 404),
    "too_large": (1, 413),
}


# ----- traffic -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoakRequest:
    """One request of the mix: where it goes, what it carries, and the status it must get."""

    kind: str  # e.g. "by-model/chat/stream/shared", or "bad/unknown_model"
    path: str
    body: bytes
    headers: dict[str, str]
    stream: bool
    expect: int  # 200, or the 4xx a deliberately bad request must get


class Traffic:
    """The mixed request stream, deterministic for a seed: request ``i`` is the same in every run."""

    def __init__(
        self,
        seed: int = 1,
        bad_share: float = 0.02,
        max_body_bytes: int = 4 * 1024 * 1024,
        bad_kinds: Sequence[str] = tuple(BAD_KINDS),
    ) -> None:
        rng = random.Random(f"{seed}-corpus")
        self.seed = seed
        self.bad_share = bad_share
        self.max_body_bytes = max_body_bytes
        self._rng = random.Random(f"{seed}-mix")
        self._corpus = text(rng, 60_000)  # 240,000 characters that prompts are cut from
        self._tenants = [
            text(
                random.Random(f"{seed}-tenant-{t}"), rng.randint(600, 1500), f"You are the assistant of tenant {t:03d}."
            )
            for t in range(TENANTS)
        ]
        self._models = {p.name: p.model for p in POOLS}
        self._routes = list(ROUTE_SHARES)
        self._route_weights = list(ROUTE_SHARES.values())
        unknown = set(bad_kinds) - set(BAD_KINDS)
        if unknown:
            raise ValueError(f"unknown bad request kinds {sorted(unknown)}; known: {', '.join(BAD_KINDS)}")
        self._bad = list(bad_kinds)
        self._bad_weights = [BAD_KINDS[k][0] for k in self._bad]
        if not self._bad:
            self.bad_share = 0.0
        self._too_large: bytes | None = None

    def _slice(self, chars: int) -> str:
        start = self._rng.randrange(len(self._corpus) - chars)
        return self._corpus[start : start + chars]

    def _route(self, route: str) -> tuple[str, str, dict[str, str]]:
        """(path prefix, model, headers) of a route."""
        if route == "1b-path":
            return "/v1/1b/", self._models["1b"], {}
        if route == "3b-path":
            return "/v1/3b/", self._models["3b"], {}
        if route == "ab-split":
            return f"/v1/{AB_ROUTE}/", "auto", {STICKY_HEADER: f"user-{self._rng.randrange(500)}"}
        model = self._models["1b"] if self._rng.random() < BY_MODEL_1B_SHARE else self._models["3b"]
        return "/v1/", model, {}

    def next(self, i: int) -> SoakRequest:
        """Request ``i`` of the stream (call in order: the mix draws from one generator)."""
        rng = self._rng
        if rng.random() < self.bad_share:
            return self._bad_request(i)
        route = rng.choices(self._routes, self._route_weights)[0]
        prefix, model, headers = self._route(route)
        chat = rng.random() < CHAT_SHARE
        stream = rng.random() < STREAM_SHARE
        shared = rng.random() < SHARED_PREFIX_SHARE
        max_tokens = rng.randint(*MAX_TOKENS)
        if shared:
            system = self._tenants[rng.randrange(TENANTS)]
            question = f"Question {i}: {self._slice(rng.randint(100, 240))}"
        else:  # unique from the first block on: every block of its chain is new to the prefix index
            system, question = "", f"Soak request {i} of seed {self.seed}: {self._slice(rng.randint(1200, 4000))}"
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream}
        if chat:
            messages = [{"role": "system", "content": system}] if system else []
            body["messages"] = [*messages, {"role": "user", "content": question}]
        else:
            body["prompt"] = f"{system}\n{question}" if system else question
        kind = "/".join(
            (route, "chat" if chat else "completions", "stream" if stream else "json", "shared" if shared else "unique")
        )
        path = prefix + ("chat/completions" if chat else "completions")
        return SoakRequest(kind, path, orjson.dumps(body), headers, stream, 200)

    def _bad_request(self, i: int) -> SoakRequest:
        rng = self._rng
        name = rng.choices(self._bad, self._bad_weights)[0]
        route = rng.choices(self._routes, self._route_weights)[0]
        prefix, model, headers = self._route(route)
        question = f"Bad request {i}"
        if name == "bad_json":
            body = (
                b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "' + question.encode()
            )
        elif name == "empty_messages":
            body = orjson.dumps({"model": model, "messages": []})
        elif name == "bad_stream_type":
            body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": question}], "stream": "yes"})
        elif name == "unknown_model":
            body = orjson.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": question}]})
        else:  # too_large: above limits.max_body_bytes: Envoy's own 413 (its buffer is the limit)
            if self._too_large is None:
                padding = b"x" * (self.max_body_bytes + 1024)
                self._too_large = b'{"model": "' + model.encode() + b'", "prompt": "' + padding + b'"}'
            body = self._too_large
        return SoakRequest(f"bad/{name}", prefix + "chat/completions", body, headers, False, BAD_KINDS[name][1])


# ----- what the client records --------------------------------------------------------------------------------


@dataclass
class Window:
    """One window (a minute) of the run: requests sent and completed in it, and the latencies of the latter."""

    index: int
    start: float
    end: float
    sent: int = 0
    done: int = 0
    ok: int = 0
    expected: Counter[str] = field(default_factory=Counter)  # status of deliberately bad requests, as expected
    errors: Counter[str] = field(default_factory=Counter)  # status (or failure) of everything else not ok
    e2e: list[float] = field(default_factory=list)  # seconds from the scheduled send, every ok request
    ttft: list[float] = field(default_factory=list)  # seconds to the first token, ok streaming requests
    max_in_flight: int = 0
    max_lag: float = 0.0  # seconds a send started after its scheduled time

    def summary(self) -> dict[str, Any]:
        length = max(1e-9, self.end - self.start)

        def ms(values: list[float], q: float) -> float | None:
            return round(percentile(values, q) * 1e3, 2) if values else None

        return {
            "index": self.index,
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "sent": self.sent,
            "rate": round(self.sent / length, 2),
            "done": self.done,
            "ok": self.ok,
            "expected_4xx": dict(self.expected),
            "errors": dict(self.errors),
            "e2e_p50_ms": ms(self.e2e, 0.5),
            "e2e_p90_ms": ms(self.e2e, 0.9),
            "e2e_p99_ms": ms(self.e2e, 0.99),
            "ttft_p50_ms": ms(self.ttft, 0.5),
            "ttft_p90_ms": ms(self.ttft, 0.9),
            "ttft_p99_ms": ms(self.ttft, 0.99),
            "max_in_flight": self.max_in_flight,
            "max_send_lag_ms": round(self.max_lag * 1e3, 2),
        }


class Recorder:
    """Per-window and per-kind counts; latencies are kept only until their window is summarised."""

    def __init__(self, duration: float, window: float) -> None:
        count = max(1, math.ceil(duration / window - 1e-9))
        self.windows = [Window(k, k * window, min(duration, (k + 1) * window)) for k in range(count)]
        self.window = window
        self.in_flight = 0
        self.kinds: dict[str, Counter[str]] = {}
        self.error_examples: list[str] = []
        self.summaries: list[dict[str, Any]] = []

    def at(self, t: float) -> Window:
        return self.windows[min(len(self.windows) - 1, max(0, int(t // self.window)))]

    def sent(self, t: float, lag: float) -> None:
        w = self.at(t)
        w.sent += 1
        self.in_flight += 1
        w.max_in_flight = max(w.max_in_flight, self.in_flight)
        w.max_lag = max(w.max_lag, lag)

    def done(
        self, request: SoakRequest, t: float, status: int, e2e: float, ttft: float | None, problem: str, detail: str
    ) -> None:
        self.in_flight -= 1
        w = self.at(t)
        w.done += 1
        kind = self.kinds.setdefault(request.kind, Counter())
        kind["requests"] += 1
        if request.expect == 200 and status == 200 and not problem:
            w.ok += 1
            kind["ok"] += 1
            w.e2e.append(e2e)
            if ttft is not None:
                w.ttft.append(ttft)
        elif request.expect != 200 and status == request.expect:
            w.expected[str(status)] += 1
            kind[f"expected {status}"] += 1
        else:
            key = f"{status} {problem}".strip() if status else problem or "no answer"
            w.errors[key] += 1
            kind[f"error {key}"] += 1
            if len(self.error_examples) < 20:
                self.error_examples.append(f"t={t:.1f}s {request.kind} {request.path}: {key} {detail}"[:300])

    def close(self, index: int) -> dict[str, Any]:
        """Summarise window ``index`` and free its latencies."""
        w = self.windows[index]
        summary = w.summary()
        w.e2e, w.ttft = [], []
        self.summaries.append(summary)
        return summary


async def _read_sse(response: aiohttp.ClientResponse) -> tuple[float | None, str]:
    """Consume an SSE answer: (time of the first content chunk, "" or what was wrong with the stream)."""
    first: float | None = None
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return first, "" if first is not None else "no content"
        if first is None:
            for choice in orjson.loads(data).get("choices") or ():
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    first = time.monotonic()
                    break
    return first, "truncated stream"


async def send_one(
    session: aiohttp.ClientSession, base: str, request: SoakRequest, scheduled: float, t0: float, recorder: Recorder
) -> None:
    """Send one request and record it; latencies count from its scheduled time (no coordinated omission)."""
    sent = time.monotonic()
    recorder.sent(sent - t0, sent - scheduled)
    status, ttft, problem, detail = 0, None, "", ""
    headers = {"Content-Type": "application/json", **request.headers}
    try:
        async with session.post(base + request.path, data=request.body, headers=headers) as response:
            status = response.status
            if status == 200 and request.stream:
                first, problem = await _read_sse(response)
                ttft = None if first is None else first - scheduled
            else:
                payload = await response.read()
                if status == 200 and request.expect == 200 and b'"choices"' not in payload:
                    problem = "no choices"
                if status != request.expect:
                    detail = payload[:160].decode(errors="replace")
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        problem, detail = type(exc).__name__, str(exc)[:160]
    done = time.monotonic()
    recorder.done(request, done - t0, status, done - scheduled, ttft, problem, detail)


# ----- what the sampler reads ---------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, float] | None:
    """RSS and anonymous RSS (MB), open file descriptors, threads and CPU seconds of a process; None if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "Threads"):
            fields[key] = float(value.split()[0])
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss_mb": fields.get("VmRSS", 0.0) / 1024,
        "anon_mb": fields.get("RssAnon", 0.0) / 1024,
        "fds": float(fds),
        "threads": fields.get("Threads", 0.0),
        "cpu_s": (int(stat[11]) + int(stat[12])) / ticks,
    }


def envoy_stat_values(page: str, keys: set[str] | None = None) -> dict[str, float]:
    """From Envoy's admin /stats text: the stats count and the gauges and counters that show queueing; every stat
    name goes into ``keys``."""
    wanted = {
        "http.gateway.downstream_rq_active": "envoy_rq_active",
        "http.gateway.downstream_cx_active": "envoy_cx_active",
        "http.gateway.ext_proc.streams_failed": "envoy_ext_proc_streams_failed",
        "http.gateway.ext_proc.message_timeouts": "envoy_ext_proc_timeouts",
        "http.gateway.ext_proc.failure_mode_allowed": "envoy_ext_proc_fail_open",
    }
    out = {v: 0.0 for v in wanted.values()}
    out["envoy_upstream_rq_active"] = 0.0
    lines = page.splitlines()
    out["envoy_stats"] = float(len(lines))
    for line in lines:
        name, _, value = line.partition(": ")
        if keys is not None:
            keys.add(name)
        if name in wanted:
            with contextlib.suppress(ValueError):
                out[wanted[name]] = float(value)
        elif name.startswith("cluster.pool-") and name.endswith(".upstream_rq_active"):
            with contextlib.suppress(ValueError):
                out["envoy_upstream_rq_active"] += float(value)
    return out


def picker_metric_values(page: str, keys: set[str] | None = None) -> dict[str, float]:
    """From the picker's /metrics: its series count, prefix-index size, the replicas' queues, fail-open picks;
    every series' name and labels go into ``keys``."""
    out = {"picker_series": 0.0, "prefix_blocks": 0.0, "sims_waiting": 0.0, "sims_running": 0.0, "picker_fallback": 0.0}
    for name, labels, value in prom_samples(page):
        out["picker_series"] += 1
        if keys is not None:
            keys.add(name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}")
        if name == "extproc_prefix_index_blocks":
            out["prefix_blocks"] += value
        elif name == "extproc_endpoint_waiting_requests":
            out["sims_waiting"] += value
        elif name == "extproc_endpoint_running_requests":
            out["sims_running"] += value
        elif name == "extproc_requests_total" and labels.get("outcome") == "fallback":
            out["picker_fallback"] += value
    return out


class Sampler:
    """Reads /proc for the picker, Envoy, the replicas and this client, and the picker's and Envoy's pages."""

    def __init__(
        self, pids: dict[str, int | Sequence[int]], metrics_url: str | None, admin: str | None, recorder: Recorder
    ) -> None:
        self.pids = {name: [p] if isinstance(p, int) else list(p) for name, p in pids.items()}
        self.metrics_url = metrics_url
        self.admin = admin
        self.recorder = recorder
        self.samples: list[dict[str, Any]] = []
        self.first_seen: dict[str, dict[str, float]] = {"picker": {}, "envoy": {}}  # series -> when it appeared
        self._cpu: dict[str, tuple[float, float]] = {}

    def _seen(self, who: str, keys: set[str], t: float) -> None:
        known = self.first_seen[who]
        for key in keys - known.keys():
            known[key] = t

    async def _get(self, session: aiohttp.ClientSession, url: str) -> str | None:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                return await response.text() if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def sample(self, session: aiohttp.ClientSession, t: float, phase: str) -> dict[str, Any]:
        now = time.monotonic()
        row: dict[str, Any] = {"t": round(t, 2), "phase": phase, "in_flight": self.recorder.in_flight}
        row["load1"] = os.getloadavg()[0]
        for name, pids in self.pids.items():
            stats = [s for s in (proc_status(p) for p in pids) if s is not None]
            if not stats:
                continue
            row[f"{name}_rss_mb"] = round(sum(s["rss_mb"] for s in stats), 2)
            row[f"{name}_anon_mb"] = round(sum(s["anon_mb"] for s in stats), 2)
            row[f"{name}_fds"] = int(sum(s["fds"] for s in stats))
            row[f"{name}_threads"] = int(sum(s["threads"] for s in stats))
            cpu = sum(s["cpu_s"] for s in stats)
            before = self._cpu.get(name)
            if before is not None and now > before[1]:
                row[f"{name}_cpu_pct"] = round(100 * (cpu - before[0]) / (now - before[1]), 1)
            self._cpu[name] = (cpu, now)
        if self.metrics_url:
            page = await self._get(session, self.metrics_url)
            if page is not None:
                keys: set[str] = set()
                row.update(picker_metric_values(page, keys))
                self._seen("picker", keys, t)
        if self.admin:
            page = await self._get(session, f"{self.admin}/stats")
            if page is not None:
                keys = set()
                row.update(envoy_stat_values(page, keys))
                self._seen("envoy", keys, t)
            memory = await self._get(session, f"{self.admin}/memory")
            if memory is not None:
                with contextlib.suppress(ValueError):
                    data = json.loads(memory)
                    for field_name, key in (
                        ("allocated", "envoy_allocated_mb"),  # in use by Envoy
                        ("heap_size", "envoy_heap_mb"),  # reserved by tcmalloc from the OS
                        ("pageheap_free", "envoy_pageheap_free_mb"),  # freed, kept by tcmalloc (counts in RSS)
                        ("pageheap_unmapped", "envoy_pageheap_unmapped_mb"),  # freed and given back
                    ):
                        if field_name in data:
                            row[key] = round(int(data[field_name]) / 2**20, 2)
        self.samples.append(row)
        return row


# ----- judging ------------------------------------------------------------------------------------------------


def warmup_seconds(duration: float) -> float:
    """The warm-up: the first 2 minutes or 10 % of the run, whichever is shorter."""
    return min(WARMUP_CAP, WARMUP_SHARE * duration)


def _loaded(samples: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [s for s in samples if s.get("phase") == "load" and s.get(key) is not None]


def growth(samples: Sequence[dict[str, Any]], key: str, warmup: float) -> dict[str, Any] | None:
    """``key`` at the start, at the first sample after the warm-up, at the last under load, its maximum, and the
    growth from after the warm-up to the end; None without a sample after the warm-up."""
    loaded = _loaded(samples, key)
    after = [s for s in loaded if s["t"] >= warmup - 1e-9]
    if not after:
        return None
    base, end = after[0], after[-1]
    first = loaded[0][key]
    ratio = end[key] / base[key] - 1 if base[key] else (0.0 if not end[key] else math.inf)
    return {
        "start": first,
        "after_warmup": base[key],
        "after_warmup_t": base["t"],
        "end": end[key],
        "end_t": end["t"],
        "max": max(s[key] for s in loaded),
        "growth": ratio,
        "slope_per_min": slope(after, key),
        "slope_per_min_second_half": slope(after[len(after) // 2 :], key),
    }


def slope(samples: Sequence[dict[str, Any]], key: str) -> float | None:
    """Least-squares slope of ``key`` per minute over the samples (None for fewer than 3)."""
    if len(samples) < 3:
        return None
    xs = [s["t"] / 60 for s in samples]
    ys = [float(s[key]) for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else None


def judged_windows(windows: Sequence[dict[str, Any]], warmup: float) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The first window that starts after the warm-up and the last whole window, both with latencies."""
    if not windows:
        return None
    length = max(w["end"] - w["start"] for w in windows)
    usable = [w for w in windows if w["start"] >= warmup - 1e-9 and w.get("e2e_p99_ms") is not None]
    whole = [w for w in usable if w["end"] - w["start"] >= 0.99 * length]
    if not usable:
        return None
    return usable[0], (whole or usable)[-1]


def _check(name: str, passed: bool, value: float | None, limit: float, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "value": value, "limit": limit, "detail": detail}


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def judge(
    samples: Sequence[dict[str, Any]],
    windows: Sequence[dict[str, Any]],
    *,
    warmup: float,
    rss_limit: float = RSS_GROWTH_LIMIT,
    p99_limit: float = P99_DRIFT_LIMIT,
) -> list[dict[str, Any]]:
    """The issue's criteria: picker and Envoy RSS growth after the warm-up < ``rss_limit``, 0 errors (expected
    4xx apart), the last window's p99 e2e within ``p99_limit`` of the first post-warm-up window's."""
    checks = []
    for who, key in (("picker", "picker_rss_mb"), ("Envoy", "envoy_rss_mb")):
        name = f"{who} RSS growth after warm-up < {rss_limit:.0%}"
        g = growth(samples, key, warmup)
        if g is None:
            checks.append(_check(name, False, None, rss_limit, "no RSS sample after the warm-up"))
            continue
        detail = (
            f"{g['after_warmup']:.1f} MB at {_clock(g['after_warmup_t'])} -> {g['end']:.1f} MB at {_clock(g['end_t'])} "
            f"({g['growth']:+.1%}; start {g['start']:.1f} MB, max {g['max']:.1f} MB)"
        )
        checks.append(_check(name, g["growth"] < rss_limit, g["growth"], rss_limit, detail))
    errors: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    for w in windows:
        errors.update(w.get("errors") or {})
        expected.update(w.get("expected_4xx") or {})
    total = sum(errors.values())
    shown = ", ".join(f"{k}: {v}" for k, v in errors.most_common()) or "none"
    extra = ", ".join(f"{k}: {v}" for k, v in sorted(expected.items())) or "none"
    checks.append(
        _check("0 errors (expected 4xx apart)", total == 0, total, 0, f"errors {shown}; expected 4xx {extra}")
    )
    name = f"p99 e2e of the last window within {p99_limit:.0%} of the first after warm-up"
    pair = judged_windows(windows, warmup)
    if pair is None:
        checks.append(_check(name, False, None, p99_limit, "no window with latencies after the warm-up"))
    else:
        first, last = pair
        drift = last["e2e_p99_ms"] / first["e2e_p99_ms"] - 1 if first["e2e_p99_ms"] else math.inf
        detail = (
            f"window {first['index'] + 1} ({_clock(first['start'])}-{_clock(first['end'])}) "
            f"{first['e2e_p99_ms']:.1f} ms, window {last['index'] + 1} ({_clock(last['start'])}-{_clock(last['end'])}) "
            f"{last['e2e_p99_ms']:.1f} ms "
            f"({drift:+.1%})"
        )
        checks.append(_check(name, abs(drift) <= p99_limit, drift, p99_limit, detail))
    return checks


def rate_check(windows: Sequence[dict[str, Any]], rate: float, duration: float) -> dict[str, Any]:
    """Whether the client sent what it was asked to (not a criterion: a run that fails it does not count)."""
    sent = sum(w["sent"] for w in windows)
    achieved = sent / duration if duration else 0.0
    share = achieved / rate if rate else 0.0
    detail = f"{achieved:.1f} of {rate:g} req/s offered ({share:.1%})"
    return _check(f"rate sustained >= {RATE_SUSTAINED:.0%}", share >= RATE_SUSTAINED, share, RATE_SUSTAINED, detail)


# ----- memory findings -----------------------------------------------------------------------------------------


def index_bytes_per_block(blocks: int = 16384, endpoints: int = 4) -> float:
    """Python heap bytes per remembered block of a `PrefixIndex` at ``blocks`` per endpoint (measured here)."""
    from extproc.scheduling.prefix.index import PrefixIndex

    rng = random.Random(0)
    gc.collect()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(blocks)
    addresses = [f"10.0.0.{i}:8000" for i in range(endpoints)]
    for n in range(3 * blocks * endpoints // 32):  # three times over: the steady state evicts as it records
        index.record(addresses[n % endpoints], [rng.getrandbits(64) for _ in range(32)])
    used = tracemalloc.get_traced_memory()[0] - before
    total = index.total_blocks()
    del index
    if started:
        tracemalloc.stop()
    return used / total if total else 0.0


def prefix_bound(config: Any) -> int | None:
    """The prefix index's bound over every endpoint of ``config`` (``max_blocks`` each), None without one."""
    from extproc.scheduling.prefix.index import PrefixIndex
    from extproc.scheduling.scheduler import Scheduler

    for plugin in Scheduler(config.scheduler).plugins():
        index = getattr(plugin, "index", None)
        if isinstance(index, PrefixIndex):
            endpoints = sum(len(p.endpoints.static or ()) for p in config.pools)
            return index.max_blocks * endpoints
    return None


TRACKED = (
    ("picker_rss_mb", "picker RSS MB"),
    ("picker_anon_mb", "picker anonymous RSS MB"),
    ("picker_fds", "picker fds"),
    ("picker_threads", "picker threads"),
    ("picker_series", "picker /metrics series"),
    ("prefix_blocks", "prefix index blocks"),
    ("envoy_rss_mb", "Envoy RSS MB"),
    ("envoy_allocated_mb", "Envoy heap allocated MB"),
    ("envoy_heap_mb", "Envoy heap size MB"),
    ("envoy_pageheap_free_mb", "Envoy freed heap kept by tcmalloc MB"),
    ("envoy_fds", "Envoy fds"),
    ("envoy_stats", "Envoy stats"),
    ("sims_rss_mb", "replicas RSS MB (4)"),
    ("client_rss_mb", "client RSS MB"),
)


def late_series(first_seen: dict[str, float], warmup: float, end: float) -> dict[str, Any]:
    """Series that first appeared after the warm-up: how many, in each half of the rest of the run, by metric."""
    late = sorted((t, key) for key, t in first_seen.items() if t > warmup + 1e-9)
    middle = (warmup + end) / 2
    return {
        "total": len(first_seen),
        "after_warmup": len(late),
        "first_half": sum(1 for t, _ in late if t <= middle),
        "second_half": sum(1 for t, _ in late if t > middle),
        "by_metric": dict(Counter(key.split("{", 1)[0] for _, key in late).most_common()),
        "examples": [f"{_clock(t)} {key}" for t, key in late[:30]],
    }


def _late_finding(who: str, late: dict[str, Any]) -> str:
    if not late["after_warmup"]:
        return f"{who}: {late['total']} series, none new after the warm-up"
    if not late["second_half"]:
        verdict = "none in the second half: rare label combinations showing up late, not a growing set"
    elif late["second_half"] >= max(3, late["first_half"]):
        verdict = "still appearing in the second half as fast as in the first: possibly unbounded"
    else:
        verdict = "a few late label combinations, not a growing set"
    metrics = ", ".join(f"{k} {v}" for k, v in list(late["by_metric"].items())[:6])
    return (
        f"{who}: {late['total']} series, {late['after_warmup']} new after the warm-up ({late['first_half']} in the "
        f"first half of the rest, {late['second_half']} in the second; {metrics}): {verdict}"
    )


def diagnose_memory(
    samples: Sequence[dict[str, Any]],
    warmup: float,
    bound: int | None,
    bytes_per_block: float | None,
    first_seen: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """What grew after the warm-up and what that says: series counts (and which series were new), the prefix index
    against its bound, fds, Envoy's heap."""
    series = {key: g for key, _ in TRACKED if (g := growth(samples, key, warmup)) is not None}
    loaded = [s for s in samples if s.get("phase") == "load"]
    end = loaded[-1]["t"] if loaded else warmup
    late = {who: late_series(seen, warmup, end) for who, seen in (first_seen or {}).items()}
    findings = []
    rss, blocks, count = series.get("picker_rss_mb"), series.get("prefix_blocks"), series.get("picker_series")
    if rss is not None:
        tail = rss["slope_per_min_second_half"]
        findings.append(
            f"picker RSS {rss['start']:.1f} MB at the start, {rss['after_warmup']:.1f} MB after the warm-up, "
            f"{rss['end']:.1f} MB at the end ({rss['growth']:+.1%}), max {rss['max']:.1f} MB; slope over the second "
            f"half {'n/a' if tail is None else f'{tail:+.3f} MB/min'}"
        )
    if blocks is not None:
        loaded = _loaded(samples, "prefix_blocks")
        full = next((s["t"] for s in loaded if s["prefix_blocks"] >= 0.99 * blocks["max"]), None)
        line = (
            f"prefix index {blocks['start']:,.0f} -> {blocks['after_warmup']:,.0f} (after warm-up) -> "
            f"{blocks['end']:,.0f} blocks"
        )
        if bound:
            line += f", bound {bound:,} ({blocks['end'] / bound:.0%} used)"
        if full is not None:
            line += f"; within 1 % of its maximum from {_clock(full)}"
        if bytes_per_block:
            line += f"; at ~{bytes_per_block:.0f} B/block that is ~{blocks['end'] * bytes_per_block / 2**20:.1f} MB"
        findings.append(line)
    if count is not None:
        findings.append(
            f"picker /metrics series {count['start']:.0f} -> {count['after_warmup']:.0f} (after warm-up) -> "
            f"{count['end']:.0f}"
        )
    for who, label in (("picker", "picker /metrics"), ("envoy", "Envoy stats")):
        if who in late:
            findings.append(_late_finding(label, late[who]))
    for key, label in (("picker_fds", "picker fds"), ("envoy_fds", "Envoy fds"), ("envoy_stats", "Envoy stats")):
        g = series.get(key)
        if g is not None:
            findings.append(
                f"{label} {g['start']:.0f} -> {g['after_warmup']:.0f} -> {g['end']:.0f} (max {g['max']:.0f})"
            )
    envoy = series.get("envoy_rss_mb")
    heap = series.get("envoy_allocated_mb")
    if envoy is not None:
        line = (
            f"Envoy RSS {envoy['start']:.1f} -> {envoy['after_warmup']:.1f} -> {envoy['end']:.1f} MB "
            f"({envoy['growth']:+.1%})"
        )
        if heap is not None:
            line += f"; heap allocated {heap['after_warmup']:.1f} -> {heap['end']:.1f} MB"
        free = series.get("envoy_pageheap_free_mb")
        if free is not None:
            line += f", freed but kept by tcmalloc {free['after_warmup']:.1f} -> {free['end']:.1f} MB"
            if heap is not None and heap["growth"] < RSS_GROWTH_LIMIT and free["end"] > free["after_warmup"]:
                line += " (live memory flat: RSS follows tcmalloc's high-water mark, e.g. of buffered large bodies)"
        findings.append(line)
    if rss is not None and rss["growth"] >= RSS_GROWTH_LIMIT:
        grown_mb = rss["end"] - rss["after_warmup"]
        causes = []
        if blocks is not None and bytes_per_block and blocks["end"] > blocks["after_warmup"]:
            index_mb = (blocks["end"] - blocks["after_warmup"]) * bytes_per_block / 2**20
            causes.append(f"the prefix index still filling accounts for ~{index_mb:.1f} of {grown_mb:.1f} MB")
        if count is not None and count["end"] > count["after_warmup"]:
            causes.append(f"{count['end'] - count['after_warmup']:.0f} more /metrics series (a few KB each at most)")
        tail = rss["slope_per_min_second_half"]
        if tail is not None:
            causes.append(
                "RSS still rising over the second half" if tail > 0.05 else "RSS flat over the second half (bounded)"
            )
        findings.append("picker RSS grew: " + ("; ".join(causes) or "no tracked structure grew with it"))
    return {
        "series": series,
        "late_series": late,
        "prefix_bound": bound,
        "index_bytes_per_block": bytes_per_block,
        "findings": findings,
    }


# ----- output -------------------------------------------------------------------------------------------------


def _fmt(value: Any, pattern: str = "{:.1f}") -> str:
    return "" if value is None else pattern.format(value)


def window_rows(result: dict[str, Any]) -> list[str]:
    """The per-window table, with the sample at each window's end."""
    samples = result["samples"]
    lines = [
        "| window | req/s | ok | expected 4xx | errors | e2e p50 ms | e2e p90 ms | e2e p99 ms | TTFT p99 ms "
        "| max in flight | picker RSS MB | picker fds | picker CPU % | Envoy RSS MB | Envoy fds | index blocks "
        "| series | load 1m |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
    ]
    for w in result["windows"]:
        at = [s for s in samples if s["phase"] == "load" and s["t"] <= w["end"] + 1e-6]
        s = at[-1] if at else {}
        lines.append(
            f"| {w['index'] + 1} ({_clock(w['end'])}) | {w['rate']:.1f} | {w['ok']:,} "
            f"| {sum(w['expected_4xx'].values())} | {sum(w['errors'].values())} | {_fmt(w['e2e_p50_ms'])} "
            f"| {_fmt(w['e2e_p90_ms'])} | {_fmt(w['e2e_p99_ms'])} "
            f"| {_fmt(w['ttft_p99_ms'])} | {w['max_in_flight']} | {_fmt(s.get('picker_rss_mb'))} "
            f"| {_fmt(s.get('picker_fds'), '{:.0f}')} | {_fmt(s.get('picker_cpu_pct'), '{:.0f}')} "
            f"| {_fmt(s.get('envoy_rss_mb'))} | {_fmt(s.get('envoy_fds'), '{:.0f}')} "
            f"| {_fmt(s.get('prefix_blocks'), '{:,.0f}')} | {_fmt(s.get('picker_series'), '{:.0f}')} "
            f"| {_fmt(s.get('load1'), '{:.2f}')} |"
        )
    return lines


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items())) or "none"


def markdown(result: dict[str, Any]) -> str:
    """The run's summary: setup, criteria, the per-window table and the memory findings."""
    setup, totals = result["setup"], result["totals"]
    load = result["load_average"]
    lines = [
        "# Soak",
        "",
        f"`{result['command']}`, started {result['started_at']}"
        + (" (interrupted: partial)" if result["interrupted"] else ""),
        "",
        f"- {machine.summary_line(result['machine'])}; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load['before'])}, after {', '.join(f'{x:.2f}' for x in load['after'])}",
        f"- {setup['rate']:g} req/s open loop for {setup['duration']:g} s through Envoy + picker to two 1B and two "
        f"3B simulated replicas (time scale {setup['time_scale']:g}); windows of {setup['window']:g} s, samples every "
        f"{setup['sample_interval']:g} s, warm-up {setup['warmup']:g} s",
        f"- mix: routes {', '.join(f'{k} {v:.0%}' for k, v in setup['mix']['routes'].items())}, chat "
        f"{setup['mix']['chat']:.0%}, streaming "
        f"{setup['mix']['stream']:.0%}, shared prefix {setup['mix']['shared_prefix']:.0%}, bad requests "
        f"{setup['mix']['bad']:.1%} ({', '.join(f'{k} -> {v}' for k, v in setup['mix']['bad_kinds'].items())})",
        f"- totals: {totals['sent']:,} sent, {totals['ok']:,} ok, expected 4xx {_counts(totals['expected_4xx'])}, "
        f"errors {_counts(totals['errors'])}; routed while the picker failed open (Envoy's ext_proc "
        f"failure_mode_allowed) {totals.get('fail_open', 0):.0f}",
        "",
        "| criterion | result | measured |",
        "| --- | --- | --- |",
    ]
    for c in [*result["criteria"], result["validity"]]:
        lines.append(f"| {c['name']} | {'PASS' if c['passed'] else 'FAIL'} | {c['detail']} |")
    lines += ["", *window_rows(result), "", "Memory:", ""]
    lines += [f"- {f}" for f in result["memory"]["findings"]]
    if result["error_examples"]:
        lines += ["", "First errors:", ""] + [f"- `{e}`" for e in result["error_examples"]]
    lines += ["", "![soak](soak.png)", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """RSS (with the prefix index), fds, latency per window and CPU over time, the warm-up marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in result["samples"] if s["phase"] == "load"]
    t = [s["t"] / 60 for s in samples]

    def series(key: str) -> list[float]:
        return [s.get(key, math.nan) if s.get(key) is not None else math.nan for s in samples]

    fig, axes = plt.subplots(2, 2, figsize=(14, 8), sharex=True)
    ax = axes[0][0]
    for key, label in (("picker_rss_mb", "picker"), ("envoy_rss_mb", "Envoy"), ("picker_anon_mb", "picker (anon)")):
        ax.plot(t, series(key), label=label)
    ax.set_ylabel("RSS (MB)")
    ax.set_title("memory")
    blocks = ax.twinx()
    blocks.plot(t, series("prefix_blocks"), color="grey", ls="--", lw=1, label="prefix index blocks")
    blocks.set_ylabel("prefix index blocks")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = blocks.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=8, loc="lower right")
    ax = axes[0][1]
    for key, label in (("picker_fds", "picker"), ("envoy_fds", "Envoy")):
        ax.plot(t, series(key), label=label)
    ax.set_ylabel("open file descriptors")
    ax.set_title("file descriptors")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    windows = result["windows"]
    mid = [(w["start"] + w["end"]) / 120 for w in windows]
    for key, label in (("e2e_p50_ms", "e2e p50"), ("e2e_p99_ms", "e2e p99"), ("ttft_p99_ms", "TTFT p99 (streaming)")):
        ax.plot(mid, [w[key] if w[key] is not None else math.nan for w in windows], marker="o", ms=3, label=label)
    ax.set_ylabel("ms at the client")
    ax.set_title(f"latency per {result['setup']['window']:g} s window")
    ax.set_xlabel("minutes")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    for key, label in (
        ("picker_cpu_pct", "picker"),
        ("envoy_cpu_pct", "Envoy"),
        ("sims_cpu_pct", "4 replicas"),
        ("client_cpu_pct", "client"),
    ):
        ax.plot(t, series(key), label=label, lw=1)
    ax.set_ylabel("CPU (% of one core)")
    ax.set_title("CPU, and the machine's load average (shared)")
    ax.set_xlabel("minutes")
    load = ax.twinx()
    load.plot(t, series("load1"), color="black", ls=":", lw=1, label="load 1m")
    load.set_ylabel("load average (1 min)")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = load.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=8, loc="upper left")
    warm = result["setup"]["warmup"] / 60
    for row in axes:
        for a in row:
            a.axvline(warm, color="black", ls=":", lw=0.8)
            a.grid(True, alpha=0.3)
    setup = result["setup"]
    fig.suptitle(
        f"soak: {setup['rate']:g} req/s for {setup['duration'] / 60:.3g} min through Envoy + picker, "
        f"time scale {setup['time_scale']:g} (dotted line: end of warm-up)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def progress_line(w: dict[str, Any], sample: dict[str, Any], windows: int, errors: int, expected: int) -> str:
    return (
        f"[{w['index'] + 1:>3}/{windows}] {_clock(w['end']):>6} {w['rate']:7.1f} req/s  ok {w['ok']:>6,}  "
        f"p99 {_fmt(w['e2e_p99_ms']):>7} ms (p50 {_fmt(w['e2e_p50_ms'])})  "
        f"picker {_fmt(sample.get('picker_rss_mb'))} MB {_fmt(sample.get('picker_fds'), '{:.0f}')} fds "
        f"{_fmt(sample.get('picker_cpu_pct'), '{:.0f}')}% CPU  "
        f"envoy {_fmt(sample.get('envoy_rss_mb'))} MB {_fmt(sample.get('envoy_fds'), '{:.0f}')} fds  "
        f"index {_fmt(sample.get('prefix_blocks'), '{:,.0f}')}  in flight {w['max_in_flight']}  "
        f"errors {errors} (expected 4xx {expected})  fail-open {_fmt(sample.get('envoy_ext_proc_fail_open'), '{:.0f}')}"
    )


# ----- the run ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    rate: float
    duration: float
    window: float
    sample_interval: float
    warmup: float


async def drive(
    base: str, traffic: Traffic, plan: Plan, recorder: Recorder, sampler: Sampler, say: Callable[[str], None]
) -> float | None:
    """Send the traffic open-loop, sample on the side, print each window; when SIGINT or SIGTERM cut the run short,
    the second it stopped sending at (else None)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    tasks: set[asyncio.Task[None]] = set()
    totals = {"errors": 0, "expected": 0}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session,
        aiohttp.ClientSession() as admin,
    ):
        await sampler.sample(admin, 0.0, "load")
        t0 = time.monotonic()

        async def sample_loop() -> None:
            k = 1
            while not stop.is_set():
                delay = t0 + k * plan.sample_interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                t = time.monotonic() - t0
                if t > plan.duration + plan.sample_interval / 2:
                    return
                await sampler.sample(admin, t, "load")
                k += 1

        def report(index: int) -> None:
            summary = recorder.close(index)
            totals["errors"] += sum(summary["errors"].values())
            totals["expected"] += sum(summary["expected_4xx"].values())
            last = sampler.samples[-1] if sampler.samples else {}
            say(progress_line(summary, last, len(recorder.windows), totals["errors"], totals["expected"]))

        async def window_loop() -> None:
            for index in range(len(recorder.windows) - 1):
                delay = t0 + recorder.windows[index].end - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if stop.is_set():
                    return
                report(index)

        helpers = [asyncio.create_task(sample_loop()), asyncio.create_task(window_loop())]
        total = int(plan.rate * plan.duration)
        i = 0
        while i < total and not stop.is_set():
            scheduled = t0 + i / plan.rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # behind schedule: still let answers in
            task = asyncio.create_task(send_one(session, base, traffic.next(i), scheduled, t0, recorder))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        stopped_at = time.monotonic() - t0
        if tasks:
            await asyncio.wait(set(tasks), timeout=REQUEST_TIMEOUT + 5)
        if not stop.is_set():
            helpers[0].cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            last_window = recorder.windows[-1]
            if last_window.index >= len(recorder.summaries):
                report(last_window.index)
        else:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            # an interrupted run: summarise the windows that had started, cut where the sending stopped
            for index in range(len(recorder.summaries), len(recorder.windows)):
                window = recorder.windows[index]
                if window.start < stopped_at:
                    window.end = min(window.end, stopped_at)
                    report(index)
        await asyncio.sleep(min(5.0, plan.sample_interval))
        await sampler.sample(admin, time.monotonic() - t0, "after")  # idle, once the last answer is in
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    return stopped_at if stop.is_set() else None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "soak",
        help="the local gateway under mixed open-loop traffic for a long time: RSS, fds, latency drift, errors",
        description=__doc__,
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of traffic")
    p.add_argument("--rate", type=float, default=40.0, help="open-loop requests per second")
    p.add_argument("--time-scale", type=float, default=0.1, help="the simulated replicas' wall seconds per second")
    p.add_argument("--out", type=Path, help="where soak.json, soak.md and soak.png go (default: a new temp folder)")
    p.add_argument("--window", type=float, default=60.0, help="seconds per window of latency and error counts")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between /proc and metrics samples")
    p.add_argument("--warmup", type=float, help="seconds of warm-up (default: 2 minutes or 10 %% of the run)")
    p.add_argument("--bad-share", type=float, default=0.02, help="share of deliberately bad requests (4xx expected)")
    p.add_argument(
        "--bad-kinds",
        default=",".join(BAD_KINDS),
        help="comma-separated kinds of bad requests: "
        + ", ".join(f"{k} ({status})" for k, (_, status) in BAD_KINDS.items())
        + "; too_large sends bodies just above limits.max_body_bytes",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the traffic mix")
    p.add_argument("--log-dir", type=Path, help="the processes' logs (default: a new temp folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from extproc.local.stack import PoolSpec, start_stack

    if args.rate <= 0 or args.duration <= 0 or args.window <= 0 or args.sample_interval <= 0:
        print("extproc bench soak: --rate, --duration, --window and --sample-interval must be above 0", file=sys.stderr)
        return 2
    out: Path = args.out or Path(tempfile.mkdtemp(prefix="extproc-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    log_dir: Path = args.log_dir or Path(tempfile.mkdtemp(prefix="extproc-soak-logs-"))
    bad_kinds = [k for k in args.bad_kinds.split(",") if k]
    if set(bad_kinds) - set(BAD_KINDS):
        print(f"extproc bench soak: --bad-kinds: choose among {', '.join(BAD_KINDS)}", file=sys.stderr)
        return 2
    warmup = warmup_seconds(args.duration) if args.warmup is None else args.warmup
    plan = Plan(args.rate, args.duration, args.window, args.sample_interval, warmup)
    info = machine.describe()
    load_before = list(os.getloadavg())

    def say(line: str) -> None:
        print(line, flush=True)

    say(machine.summary_line(info))
    say(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; logs in {log_dir}; results in {out}")
    pools = [
        PoolSpec(p.name, p.model, p.replicas, (*p.sim_args, "--time-scale", f"{args.time_scale:g}")) for p in POOLS
    ]
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # while starting, SIGTERM acts as Ctrl-C
    stack = None
    try:
        stack = start_stack(log_dir, pools, settings=SPLIT_SETTINGS)
        assert stack.extproc is not None and stack.envoy is not None
        traffic = Traffic(args.seed, args.bad_share, stack.config.limits.max_body_bytes, bad_kinds)
        recorder = Recorder(args.duration, args.window)
        pids: dict[str, int | Sequence[int]] = {
            "picker": stack.extproc.pid,
            "envoy": stack.envoy.pid,
            "sims": [r.child.pid for replicas in stack.sims.values() for r in replicas],
            "client": os.getpid(),
        }
        sampler = Sampler(pids, stack.metrics_url, f"http://127.0.0.1:{stack.admin_port}", recorder)
        say(
            f"gateway {stack.gateway}: {args.rate:g} req/s for {args.duration:g} s, windows of {args.window:g} s, "
            f"warm-up {warmup:g} s"
        )
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            stopped_at = runner.run(drive(stack.gateway, traffic, plan, recorder, sampler, say))
        interrupted = stopped_at is not None
        bound = prefix_bound(stack.config)
    except KeyboardInterrupt:
        say("interrupted while starting")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if stack is not None:
            stack.stop()
    load_after = list(os.getloadavg())
    say(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    result = assemble(args, plan, info, load_before, load_after, started_at, interrupted, recorder, sampler, bound)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "soak.md").write_text(markdown(result))
    plot(result, out / "soak.png")
    for check in [*result["criteria"], result["validity"]]:
        say(f"{'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")
    for finding in result["memory"]["findings"]:
        say(f"memory: {finding}")
    say(f"wrote {out / 'soak.json'}, {out / 'soak.md'}, {out / 'soak.png'}")
    if interrupted:
        return 130
    return 0 if result["passed"] else 1


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


def assemble(
    args: argparse.Namespace,
    plan: Plan,
    info: dict[str, object],
    load_before: list[float],
    load_after: list[float],
    started_at: str,
    interrupted: bool,
    recorder: Recorder,
    sampler: Sampler,
    bound: int | None,
) -> dict[str, Any]:
    """The run as one JSON-able dict: setup, windows, samples, totals, criteria and memory findings."""
    windows = recorder.summaries
    expected: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for w in windows:
        expected.update(w["expected_4xx"])
        errors.update(w["errors"])
    loaded = [s for s in sampler.samples if s["phase"] == "load"]

    def last_count(key: str) -> float:  # counters since the start: the largest value read
        return max((s.get(key, 0.0) for s in sampler.samples), default=0.0)

    criteria = judge(sampler.samples, windows, warmup=plan.warmup)
    validity = rate_check(windows, plan.rate, windows[-1]["end"] if interrupted and windows else plan.duration)
    bytes_per_block = index_bytes_per_block() if bound else None
    command = "extproc " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return {
        "command": command,
        "started_at": started_at,
        "interrupted": interrupted,
        "machine": info,
        "load_average": {"before": load_before, "after": load_after, "shared_machine": True},
        "setup": {
            "rate": plan.rate,
            "duration": plan.duration,
            "time_scale": args.time_scale,
            "window": plan.window,
            "sample_interval": plan.sample_interval,
            "warmup": plan.warmup,
            "seed": args.seed,
            "pools": [{"name": p.name, "model": p.model, "replicas": p.replicas} for p in POOLS],
            "mix": {
                "routes": ROUTE_SHARES,
                "chat": CHAT_SHARE,
                "stream": STREAM_SHARE,
                "shared_prefix": SHARED_PREFIX_SHARE,
                "bad": args.bad_share,
                "bad_kinds": {k: v for k, (_, v) in BAD_KINDS.items() if k in args.bad_kinds.split(",")},
            },
        },
        "totals": {
            "sent": sum(w["sent"] for w in windows),
            "ok": sum(w["ok"] for w in windows),
            "expected_4xx": dict(expected),
            "errors": dict(errors),
            "fail_open": last_count("envoy_ext_proc_fail_open"),
            "ext_proc_message_timeouts": last_count("envoy_ext_proc_timeouts"),
            "ext_proc_streams_failed": last_count("envoy_ext_proc_streams_failed"),
            "picker_fallback_picks": last_count("picker_fallback"),
            "max_in_flight": max((w["max_in_flight"] for w in windows), default=0),
            "samples": len(loaded),
        },
        "kinds": {k: dict(v) for k, v in sorted(recorder.kinds.items())},
        "windows": windows,
        "samples": sampler.samples,
        "criteria": criteria,
        "validity": validity,
        "passed": all(c["passed"] for c in criteria) and validity["passed"],
        "memory": diagnose_memory(sampler.samples, plan.warmup, bound, bytes_per_block, sampler.first_seen),
        "error_examples": recorder.error_examples,
        "series_first_seen": sampler.first_seen,  # every series and stat name, with when it first appeared
    }
