"""vLLM /metrics -> the load figures in each `EndpointState`, scraped in the background.

The scraper runs in the same process and on the same event loop as the gRPC server, at ~20 scrapes per
second per endpoint, so each scrape is kept cheap for both sides: it asks only for the series it reads
(``?name[]=...``, which vLLM's prometheus_client endpoint honours: the model server then renders a few
lines instead of every histogram, ~1.5 ms of its event loop per scrape for the simulator's full page), one
keep-alive aiohttp session, the raw body as bytes (no decompression, no decoding), and a parser that only
looks for those series instead of parsing the whole page (a server that ignores the filter sends the
whole page, which parses the same). Each endpoint has its own task, so a slow or hung endpoint only
delays itself; failing endpoints are retried with exponential back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
from yarl import URL

from extproc.config import Config, MetricsSource, Scrape
from extproc.datalayer.table import EndpointTable

log = logging.getLogger(__name__)

WAITING = b"vllm:num_requests_waiting"
RUNNING = b"vllm:num_requests_running"
KV_USAGE = b"vllm:kv_cache_usage_perc"
KV_USAGE_LEGACY = b"vllm:gpu_cache_usage_perc"  # vLLM v0 engine and early v1 releases
CACHE_CONFIG = b"vllm:cache_config_info"  # labels num_gpu_blocks and block_size: the KV capacity
SERIES = (WAITING, RUNNING, KV_USAGE, KV_USAGE_LEGACY, CACHE_CONFIG)  # all the picker reads


class MetricsParseError(ValueError):
    """The page lacks a series the picker needs, or a sample of one is malformed."""


class VllmLoad(NamedTuple):
    """What one /metrics page says about load, summed over the engines of a data-parallel server."""

    waiting: float
    running: float
    kv_usage: float  # mean over the label sets, 0..1
    series: int  # label sets (engines / model names) the KV figure came from
    cache_tokens: int | None = None  # KV-cache capacity in tokens (all engines), None if not exported


def _sample_lines(data: bytes, name: bytes) -> Iterator[tuple[bytes, bytes]]:
    """``(labels, rest)`` of every sample line of ``name`` in Prometheus text: the text between the braces
    (empty without labels) and what follows them (the value, maybe a timestamp).

    Finds lines that start with exactly ``name`` followed by ``{`` or a space, so longer names that share
    the prefix (``..._by_reason``) and ``# HELP``/``# TYPE`` lines never match. Label values may hold any
    character; the value follows the last ``}`` on the line.
    """
    size = len(name)
    needle = b"\n" + name
    start = 0 if data.startswith(name) else data.find(needle) + 1
    if start == 0 and not data.startswith(name):
        return
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        delimiter = data[start + size : start + size + 1]
        if delimiter == b"{":
            close = data.rfind(b"}", start, end)
            if close > start + size:
                yield data[start + size + 1 : close], data[close + 1 : end]
            else:
                yield b"", b""  # a label set that never closes: malformed
        elif delimiter in (b" ", b"\t"):
            yield b"", data[start + size : end]
        start = data.find(needle, end) + 1
        if start == 0:
            return


def _samples(data: bytes, name: bytes) -> list[float]:
    """Values of every sample of ``name`` (any labels); [] if there are none; a timestamp is ignored."""
    out: list[float] = []
    for _labels, rest in _sample_lines(data, name):
        parts = rest.split()
        try:
            value = float(parts[0])
        except (IndexError, ValueError):
            raise MetricsParseError(f"malformed sample of {name.decode()}: {rest[:200]!r}") from None
        if not math.isfinite(value):
            raise MetricsParseError(f"{name.decode()} is {value}")
        out.append(value)
    return out


def _label_int(labels: bytes, key: bytes) -> int | None:
    start = labels.find(key + b'="')
    if start < 0:
        return None
    start += len(key) + 2
    value = labels[start : labels.find(b'"', start)]
    return int(value) if value.isdigit() else None


def _cache_tokens(data: bytes) -> int | None:
    """KV capacity in tokens from ``vllm:cache_config_info{num_gpu_blocks, block_size}``, summed over engines.

    An engine whose labels are missing or not integers (vLLM reports ``None`` before its cache is sized)
    makes the whole figure unknown rather than too small.
    """
    total = 0
    for labels, _rest in _sample_lines(data, CACHE_CONFIG):
        blocks, size = _label_int(labels, b"num_gpu_blocks"), _label_int(labels, b"block_size")
        if blocks is None or size is None:
            return None
        total += blocks * size
    return total or None


def parse_vllm_metrics(data: bytes) -> VllmLoad:
    """The queue, batch and KV-cache figures of a vLLM /metrics page (Prometheus text or OpenMetrics).

    Several label sets (``engine`` of a data-parallel server, ``model_name``): waiting and running are
    summed, since the server queues them all; KV usage is the mean, since vLLM balances requests across
    its engines itself, so the pod's headroom is the engines' combined free cache (equal-sized engines).
    ``vllm:gpu_cache_usage_perc`` is read only when ``vllm:kv_cache_usage_perc`` is absent.
    Raises `MetricsParseError` if any of the three figures is missing.
    """
    waiting = _samples(data, WAITING)
    running = _samples(data, RUNNING)
    kv = _samples(data, KV_USAGE) or _samples(data, KV_USAGE_LEGACY)
    if not waiting or not running or not kv:
        missing = [
            label
            for label, values in (
                ("vllm:num_requests_waiting", waiting),
                ("vllm:num_requests_running", running),
                ("vllm:kv_cache_usage_perc", kv),
            )
            if not values
        ]
        raise MetricsParseError(f"no {', '.join(missing)} in the page (is this a vLLM /metrics endpoint?)")
    return VllmLoad(sum(waiting), sum(running), sum(kv) / len(kv), len(kv), _cache_tokens(data))


@dataclass(slots=True)
class ScrapeStats:
    """Per-endpoint scrape counters and gauges, for logs and the telemetry module."""

    address: str
    url: str
    successes: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)  # timeout, connect, status, parse
    consecutive_errors: int = 0
    last_error: str = ""
    last_duration: float = 0.0  # seconds, of the latest attempt
    last_success_at: float | None = None  # monotonic
    next_delay: float = 0.0  # current wait between attempts (grows while failing)
    shared: int = 0  # rounds skipped because another replica's scrape of it had just arrived (share_scrapes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "url": self.url,
            "successes": self.successes,
            "errors": self.errors,
            "errors_by_kind": dict(self.errors_by_kind),
            "consecutive_errors": self.consecutive_errors,
            "last_error": self.last_error,
            "last_duration": self.last_duration,
            "last_success_at": self.last_success_at,
            "next_delay": self.next_delay,
            "shared": self.shared,
        }


def metrics_url(address: str, source: MetricsSource) -> str:
    """``http://ip:port/path`` of an endpoint's /metrics; IPv6 addresses keep their brackets."""
    host, _, port = address.rpartition(":")
    return f"http://{host}:{source.port or port}{source.path}"


class Scraper:
    """Scrapes every endpoint of an `EndpointTable`, one task per address, following membership changes.

    On success the endpoint's states get the new figures, ``scraped_at`` (monotonic), ``scrape_ok`` and
    ``pending = 0``. On failure only ``scrape_ok`` turns False: the last figures and ``scraped_at`` stay,
    so the picker can see how stale they are.
    """

    def __init__(self, config: Config, table: EndpointTable, *, max_backoff: float = 1.0) -> None:
        """Scrape settings come from ``config.scrape``, each pool's /metrics location from ``pool.metrics``."""
        self._table = table
        self._scrape: Scrape = config.scrape
        self._metrics: dict[str, MetricsSource] = {pool.name: pool.metrics for pool in config.pools}
        self._interval = self._scrape.interval
        self._max_backoff = max(max_backoff, self._interval)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ending: set[asyncio.Task[None]] = set()
        self._unsubscribe: list[Any] = []
        self.stats: dict[str, ScrapeStats] = {}
        self._covered: Callable[[str], bool] | None = None
        self._scraped: Callable[[str, VllmLoad], None] | None = None

    def share(self, covered: Callable[[str], bool], scraped: Callable[[str, VllmLoad], None]) -> None:
        """Share scrapes with other replicas: skip a round while ``covered(address)`` (another replica's
        scrape of it is fresh), and hand every good scrape to ``scraped``."""
        self._covered = covered
        self._scraped = scraped

    # ----- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
            timeout=aiohttp.ClientTimeout(total=self._scrape.timeout),
            # identity: prometheus_client gzips when asked, which costs CPU on both ends for nothing here;
            # text/plain: the classic format, not OpenMetrics (both parse, the classic one is smaller).
            headers={"Accept": "text/plain", "Accept-Encoding": "identity", "User-Agent": "extproc-router/scrape"},
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        self._unsubscribe = [self._table.on_added(self._added), self._table.on_removed(self._removed)]
        for address in self._table.addresses():
            self._begin(address)

    async def stop(self) -> None:
        """Cancel every scrape, wait for them to end, close the session. Safe to call twice."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        tasks = [*self._tasks.values(), *self._ending]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ending.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def scraping(self) -> list[str]:
        """Addresses with a live scrape task."""
        return list(self._tasks)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Plain-dict copy of `stats`, keyed by address."""
        return {address: stats.as_dict() for address, stats in self.stats.items()}

    # ----- membership -------------------------------------------------------------------------

    def _added(self, _pool: str, address: str) -> None:
        self._begin(address)

    def _removed(self, address: str) -> None:
        task = self._tasks.pop(address, None)
        self.stats.pop(address, None)
        if task is not None:
            task.cancel()
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    def _begin(self, address: str) -> None:
        if address in self._tasks:
            return
        states = self._table.states_for(address)
        source = self._metrics.get(states[0].pool) if states else None
        url = metrics_url(address, source or MetricsSource())
        stats = self.stats[address] = ScrapeStats(address=address, url=url, next_delay=self._interval)
        target = URL(url)
        if self._scrape.only_needed_series:
            target = target.with_query([("name[]", name.decode()) for name in SERIES])
        self._tasks[address] = asyncio.get_running_loop().create_task(
            self._run(address, target, stats), name=f"scrape:{address}"
        )

    # ----- scraping ---------------------------------------------------------------------------

    async def _run(self, address: str, url: URL, stats: ScrapeStats) -> None:
        """Scrape at a fixed rate while it works; back off (doubling, up to max_backoff) while it fails."""
        loop = asyncio.get_running_loop()
        interval = self._interval
        delay = interval
        next_at = loop.time()
        first = True
        while True:
            if self._covered is not None and self._covered(address):
                stats.shared += 1  # another replica's figures arrived in time: nothing to do this round
                ok = True
            else:
                ok = await self._scrape_once(address, url, stats)
            now = loop.time()
            if ok:
                delay = interval
                # The first wait is random so endpoints added together do not scrape in lockstep.
                next_at = now + random.uniform(0.0, interval) if first else max(next_at + interval, now)
                first = False
            else:
                delay = min(delay * 2, self._max_backoff)
                next_at = now + delay
            stats.next_delay = delay
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def _scrape_once(self, address: str, url: URL, stats: ScrapeStats) -> bool:
        session = self._session
        assert session is not None
        started = time.monotonic()
        try:
            async with session.get(url, allow_redirects=False) as response:
                body = await response.read()
                status = response.status
            if status != 200:
                return self._failed(address, stats, started, "status", f"HTTP {status}")
            load = parse_vllm_metrics(body)
        except TimeoutError:
            return self._failed(address, stats, started, "timeout", f"no answer within {self._scrape.timeout}s")
        except MetricsParseError as exc:
            return self._failed(address, stats, started, "parse", str(exc))
        except (aiohttp.ClientError, OSError) as exc:
            return self._failed(address, stats, started, "connect", f"{type(exc).__name__}: {exc}")
        now = time.monotonic()
        for state in self._table.states_for(address):
            state.scraped(load.waiting, load.running, load.kv_usage, load.cache_tokens, now)
        if self._scraped is not None:
            self._scraped(address, load)
        stats.successes += 1
        stats.last_duration = now - started
        stats.last_success_at = now
        if stats.consecutive_errors:
            log.info("scrape of %s works again after %d failures", address, stats.consecutive_errors)
            stats.consecutive_errors = 0
        return True

    def _failed(self, address: str, stats: ScrapeStats, started: float, kind: str, error: str) -> bool:
        for state in self._table.states_for(address):
            state.scrape_ok = False
        stats.errors += 1
        stats.errors_by_kind[kind] = stats.errors_by_kind.get(kind, 0) + 1
        stats.last_error = error
        stats.last_duration = time.monotonic() - started
        if not stats.consecutive_errors:
            log.warning("scrape of %s failed: %s (retrying with back-off)", stats.url, error)
        stats.consecutive_errors += 1
        return False
