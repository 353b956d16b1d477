"""The client: streaming chat requests sent open-loop to one router, timed as a user's client times them.

Every figure is the client's wall clock, not the simulators' headers: the peers pass no ``x-sim-*`` header
through, and what users compare is what their client sees. TTFT ends at the first SSE chunk whose delta carries
text (vLLM's first chunk may carry only the assistant role, which says nothing about prefill), inter-token latency
is the mean gap between content chunks, e2e ends at ``data: [DONE]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from extproc.bench.routing.cell import COUNTERS, open_loop, scrape_all
from extproc.bench.workloads import Workload
from extproc.names import PICKED_HEADER, UPSTREAM_HOST_HEADER

# The routing benchmark's counters plus each replica's finished requests (who served how many, for any router).
SERVED = "vllm:request_success_total"
PEER_COUNTERS = (*COUNTERS, SERVED)
_STREAM_OPTIONS = b',"stream":true,"stream_options":{"include_usage":true}}'
_HEADERS = {"Content-Type": "application/json"}


def streaming(body: bytes) -> bytes:
    """A workload's chat body (a JSON object) asking for an SSE stream that ends with a usage chunk."""
    if not body.endswith(b"}") or b'"stream"' in body:
        raise ValueError("expected a chat request body without a stream setting")
    return body[:-1] + _STREAM_OPTIONS


@dataclass
class Timing:
    """One request as the client saw it; times in wall seconds from the cell's start, latencies in ms."""

    index: int
    scheduled: float
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    ttft_ms: float = math.nan
    itl_ms: float = math.nan  # mean gap between content chunks (NaN with fewer than two)
    e2e_ms: float = math.nan
    chunks: int = 0  # chunks that carried text
    prompt_tokens: int = 0
    cached_tokens: int = 0
    host: str = ""  # the gateway's x-gateway-upstream-host (the gateway only)
    picked: str = ""  # the gateway's x-gateway-picked-endpoint
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.chunks > 0


async def _read_stream(response: aiohttp.ClientResponse, timing: Timing, sent: float) -> str:
    """Consume the SSE stream; stamp each content chunk; return the answer's text."""
    pieces: list[str] = []
    first = last = 0.0
    async for raw in response.content:
        now = time.monotonic()  # when the line arrived, before any parsing
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            timing.e2e_ms = (now - sent) * 1e3
            break
        chunk = orjson.loads(data)
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                pieces.append(text)
                first = first or now
                last = now
                timing.chunks += 1
        usage = chunk.get("usage")
        if usage:
            timing.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            timing.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    else:
        timing.error = "the stream ended before data: [DONE]"
    if first:
        timing.ttft_ms = (first - sent) * 1e3
    if timing.chunks > 1:
        timing.itl_ms = (last - first) * 1e3 / (timing.chunks - 1)
    return "".join(pieces)


async def stream_one(session: aiohttp.ClientSession, url: str, body: bytes, timing: Timing, start: float) -> str | None:
    """Send one streaming request and time it into ``timing``; the answer's text, or None if it failed."""
    sent = time.monotonic()
    timing.sent = sent - start
    text = ""
    try:
        async with session.post(url, data=streaming(body), headers=_HEADERS) as response:
            timing.status = response.status
            timing.host = response.headers.get(UPSTREAM_HOST_HEADER, "")
            timing.picked = response.headers.get(PICKED_HEADER, "")
            if response.status == 200:
                text = await _read_stream(response, timing, sent)
            else:
                timing.error = (await response.read())[:200].decode(errors="replace")
    except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError, AttributeError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"[:200]
    timing.done = time.monotonic() - start
    return text if timing.ok else None


@dataclass
class StreamRun:
    timings: list[Timing] = field(default_factory=list)
    before: dict[str, dict[str, float]] = field(default_factory=dict)  # replicas' counters at the first measured
    after: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_before: dict[str, float] = field(default_factory=dict)  # CPU seconds by process group, same moments
    cpu_after: dict[str, float] = field(default_factory=dict)


async def send_stream_cell(
    url: str, workload: Workload, warmup: int, bases: Sequence[str], cpu: Callable[[], dict[str, float]]
) -> StreamRun:
    """``workload`` open-loop to ``url`` at its arrival times (seconds = wall seconds); counters and CPU read
    just before the first measured request and once every request is done."""
    run = StreamRun()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.monotonic()

        async def one(index: int) -> None:
            timing = Timing(index, scheduled=workload.arrivals[index])
            run.timings.append(timing)
            turn = workload.next(index)
            workload.answered(turn, await stream_one(session, url, turn.body, timing, start))

        async def measure_from() -> None:
            run.before = await scrape_all(session, bases, PEER_COUNTERS)
            run.cpu_before = cpu()

        await open_loop(workload.arrivals, start, 1.0, warmup, one, measure_from)
        run.cpu_after = cpu()
        run.after = await scrape_all(session, bases, PEER_COUNTERS)
    run.timings.sort(key=lambda t: t.index)
    return run


def counter_deltas(run: StreamRun, name: str) -> dict[str, float]:
    """Each replica's increase of counter ``name`` over the measured window."""
    return {base: run.after[base][name] - run.before.get(base, run.after[base])[name] for base in run.after}


def cpu_deltas(run: StreamRun) -> dict[str, Any]:
    return {k: run.cpu_after[k] - run.cpu_before.get(k, run.cpu_after[k]) for k in run.cpu_after}
