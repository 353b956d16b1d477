"""Replicas of the picker share their picks through one Redis stream, off the request path.

Each replica keeps deciding on its own in-memory state (the prefix index, the endpoints' ``pending``
counts): a decision never waits for Redis. In the background this replica

- publishes what its picks taught it (``Scheduler.take_shared``) every ``publish_interval``, one stream
  entry per batch (``XADD ... MAXLEN ~ max_entries``);
- reads every other replica's entries as they arrive (``XREAD BLOCK`` from the last entry it saw) and
  applies them: the plugins' records (``Scheduler.apply_shared``), and one ``pending`` request on the
  endpoint when the pick is younger than a scrape interval (an older one is in the scrape already);
- with ``share_scrapes``, publishes its scrapes too and skips scraping an endpoint while a replica that
  ranks before it for that endpoint (rendezvous hashing over replica name and address) has just published
  one: each endpoint is scraped by one replica instead of all, and by the next one within
  ``COVER_INTERVALS`` scrape intervals when that one goes quiet;
- on start, reads the stream's history before it reports ready (at most ``warmup_timeout``), so a new or
  restarted replica starts with what the others know.

Why a stream rather than pub/sub: a stream keeps the recent history, so warm-up and a reconnect after an
outage replay what was missed (from the last entry id seen), while pub/sub drops whatever was published
while a subscriber was away. Trimming is approximate (``~``), which costs Redis nothing per entry.

When Redis is down, stalled or slow, decisions go on with the local state; picks wait in a bounded outbox
(the oldest are dropped and counted) and go out when Redis answers again; the reader resumes where it
stopped. Entries that are not batches (another program's, or corrupt) are skipped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from redis.exceptions import RedisError

from extproc.config import Config
from extproc.state import connect
from extproc.state.records import Load, Pick, decode_batch, decode_loads, encode_batch, encode_loads

if TYPE_CHECKING:
    from extproc.datalayer.scrape import VllmLoad
    from extproc.datalayer.table import EndpointTable
    from extproc.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

BATCH_PICKS = 64  # picks per stream entry at most: applying one entry holds the event loop ~2 ms at worst
READ_COUNT = 500  # entries per XREAD / XRANGE
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BACKOFF_MAX = 1.0  # seconds between attempts while Redis is away: leaves room to resume within 2 s of its return
ERRORS = (RedisError, OSError, asyncio.TimeoutError)
COVER_INTERVALS = 4.0  # another replica's scrape stands in for ours this many scrape intervals after it arrives


def _next_backoff(backoff: float) -> float:
    """The wait before the next attempt: 50 ms, doubling to at most ``BACKOFF_MAX``."""
    return min(BACKOFF_MAX, max(0.05, backoff * 2))


def replica_name() -> str:
    """This process's name on the stream: host, PID and a random tag (PIDs repeat across containers)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class ReplicationStats:
    up: bool = False
    published: int = 0  # picks written to Redis
    applied: int = 0  # other replicas' picks applied
    dropped: int = 0  # picks lost: the outbox was full while Redis was away
    rejected: int = 0  # stream entries or records that were not ours to read (corrupt, foreign, unknown kind)
    unknown_endpoint: int = 0  # picks of an endpoint this replica does not know (yet)
    reconnects: int = 0
    warmup_seconds: float | None = None
    warmup_entries: int = 0
    outbox: int = 0  # picks waiting to be published
    loads_published: int = 0  # scrapes shared with the other replicas
    loads_applied: int = 0  # other replicas' scrapes applied here
    duplicates: int = 0  # entries skipped as copies of one already applied (a retried publish)
    last_error: str = ""


class Replicator:
    """Publishes this replica's picks to ``state.key`` and applies the other replicas' (see the module)."""

    def __init__(
        self,
        config: Config,
        scheduler: Scheduler,
        table: EndpointTable,
        registry: CollectorRegistry | None = None,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = config.state
        self.scrape_interval = config.scrape.interval
        self.scheduler = scheduler
        self.table = table
        self.name = name or replica_name()
        self._name_bytes = self.name.encode()
        self._clock = clock
        self.stats = ReplicationStats()
        self._outbox: deque[Pick] = deque(maxlen=self.settings.max_outbox)
        self._loads: dict[str, Load] = {}  # the latest scrape of each endpoint, until published
        self._covered_at: dict[str, float] = {}  # address -> monotonic arrival of a better-ranked replica's scrape
        self._ranks: dict[str, int] = {}  # address -> this replica's rank for it (lower scrapes)
        self._wake = asyncio.Event()  # something to publish
        self._stopping = False  # stop(): the loops finish their Redis command and end
        self._loads_timer = False  # a wake-up for the pending loads is scheduled
        self._client: Any = None
        self._last_id: bytes | None = None  # the last stream entry applied; None until the history is read
        self._sequence = 0  # entries this replica built; a retried entry keeps its number
        self._unsent: tuple[dict[bytes, bytes], int, list[Load]] | None = None  # built, not yet acknowledged
        self._seen: dict[bytes, int] = {}  # replica -> the highest entry sequence applied from it
        self._tasks: list[asyncio.Task[None]] = []
        self.lag = Histogram(
            "extproc_state_replication_lag_seconds",
            "From another replica's pick being published to it being applied here (both wall clocks).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        if registry is not None:
            registry.register(_StatsCollector(self.stats))

    async def start(self) -> None:
        """Start sharing; return once the stream's history is applied, or after ``warmup_timeout``."""
        self.scheduler.share(self.settings.max_outbox, on_first=self._wake.set)
        self._client = connect.client(self.settings)
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._catch_up(), self.settings.warmup_timeout)
            self.stats.warmup_seconds = time.monotonic() - started
            log.info(
                "state: %d entries of history applied from %s in %.2fs",
                self.stats.warmup_entries,
                self.settings.key,
                self.stats.warmup_seconds,
            )
        except ERRORS as exc:  # including the timeout
            self._down(exc)
            log.warning(
                "state: no history from Redis within %.1fs (%s); ready with local state, catching up later",
                self.settings.warmup_timeout,
                self.stats.last_error,
            )
        self._tasks = [asyncio.create_task(self._publish_loop()), asyncio.create_task(self._read_loop())]

    async def stop(self) -> None:
        """Stop the loops, publish what is left (briefly), close the connection.

        The loops are asked to end rather than cancelled: redis-py (8.1) can lose a cancellation that lands
        in a read, and the task then waits on its socket for ever (seen with Cluster and Sentinel clients on a
        loaded machine: a shutdown that awaited it never ended). A loop ends after its current command (a
        blocked XREAD returns within ``timeout / 2``); one that does not is cancelled, and every wait here is
        bounded, so a shutdown never hangs on Redis.
        """
        self._stopping = True
        self._wake.set()  # an idle publisher wakes, sees the flag and ends
        if self._tasks:
            _, running = await asyncio.wait(self._tasks, timeout=self.settings.timeout * 2)
            for task in running:
                task.cancel()
            if running:
                _, stuck = await asyncio.wait(running, timeout=self.settings.timeout)
                if stuck:
                    log.warning("state: %d replication task(s) did not stop; abandoned", len(stuck))
        if self._client is not None:
            with contextlib.suppress(*ERRORS):
                await asyncio.wait_for(self._flush(), self.settings.timeout)
            with contextlib.suppress(*ERRORS):
                await asyncio.wait_for(self._client.aclose(), self.settings.timeout)

    # ----- publishing -------------------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        """Sleep until a pick or a scrape is waiting, gather for ``publish_interval``, publish one batch."""
        backoff = 0.0
        while True:
            await self._wake.wait()
            await asyncio.sleep(max(self.settings.publish_interval, backoff))
            if self._stopping:
                return  # stop() flushes what is left
            self._wake.clear()  # before taking: a pick made during the flush wakes the next round
            try:
                await self._flush()
                backoff = 0.0
            except ERRORS as exc:
                self._down(exc)
                backoff = _next_backoff(backoff)
                self._wake.set()  # the outbox still holds them: try again after the back-off

    # ----- shared scrapes (Scraper.share) -------------------------------------------------------------

    def scraped(self, address: str, load: VllmLoad) -> None:
        """This replica scraped ``address``: publish the figures with the next batch of picks, or within one
        scrape interval when no picks flow (an entry per scrape would cost more than the scrape saves)."""
        if not self._loads_timer:
            self._loads_timer = True
            asyncio.get_running_loop().call_later(self.scrape_interval, self._loads_due)
        self._loads[address] = Load(
            address, load.waiting, load.running, load.kv_usage, load.cache_tokens, self._clock()
        )

    def _loads_due(self) -> None:
        self._loads_timer = False
        self._wake.set()

    def covered(self, address: str) -> bool:
        """Whether a better-ranked replica's scrape of ``address`` arrived recently enough to skip ours."""
        at = self._covered_at.get(address)
        return at is not None and time.monotonic() - at < COVER_INTERVALS * self.scrape_interval

    def rank(self, replica: bytes, address: str) -> int:
        """A replica's place for scraping ``address`` (lowest first): the same everywhere, different per address."""
        return xxhash.xxh64_intdigest(replica + b"|" + address.encode())  # not CRC: it is linear in its seed

    def _apply_loads(self, origin: bytes, loads: list[Load]) -> None:
        now, wall = time.monotonic(), self._clock()
        for load in loads:
            states = self.table.states_for(load.address)
            if not states:  # not (yet) in this replica's pools
                continue
            mine = self._ranks.get(load.address)
            if mine is None:
                mine = self._ranks[load.address] = self.rank(self._name_bytes, load.address)
            if self.rank(origin, load.address) < mine:
                self._covered_at[load.address] = now
            scraped_at = now - max(0.0, wall - load.scraped)
            for state in states:
                if state.scraped_at is None or scraped_at > state.scraped_at:
                    state.scraped(load.waiting, load.running, load.kv_usage, load.cache_tokens, scraped_at)
            self.stats.loads_applied += 1

    async def _flush(self) -> None:
        outbox = self._outbox
        for pick in self.scheduler.take_shared():
            if len(outbox) == outbox.maxlen:
                self.stats.dropped += 1
            outbox.append(pick)
        self.stats.dropped += self.scheduler.shared_dropped
        self.scheduler.shared_dropped = 0
        loads = list(self._loads.values())
        while self._unsent is not None or outbox or loads:
            if self._unsent is None:
                self._unsent = self._entry(loads)
                loads = []
            fields, picks, sent_loads = self._unsent
            self.stats.outbox = len(outbox)
            # An XADD that timed out may have reached Redis anyway: the retry sends the same entry, same
            # sequence number, and readers skip the copy (at-least-once on the wire, once in the index).
            await self._client.xadd(self.settings.key, fields, maxlen=self.settings.max_entries, approximate=True)
            self._unsent = None
            self.stats.published += picks
            self.stats.loads_published += len(sent_loads)
            self._up()
        self.stats.outbox = 0

    def _entry(self, loads: list[Load]) -> tuple[dict[bytes, bytes], int, list[Load]]:
        """The next stream entry: up to ``BATCH_PICKS`` picks taken from the outbox, and ``loads``."""
        batch = [self._outbox.popleft() for _ in range(min(BATCH_PICKS, len(self._outbox)))]
        self._sequence += 1
        fields = {
            b"r": self._name_bytes,
            b"s": str(self._sequence).encode(),
            b"t": repr(self._clock()).encode(),
        }
        if batch:
            fields[b"b"] = encode_batch(batch)
        if loads:
            fields[b"l"] = encode_loads(loads)
            for load in loads:
                if self._loads.get(load.address) is load:  # not replaced by a newer scrape meanwhile
                    del self._loads[load.address]
        return fields, len(batch), loads

    # ----- reading ----------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        block_ms = max(10, int(self.settings.timeout * 500))  # a blocked read must end before the socket times out
        backoff = 0.0
        while not self._stopping:
            try:
                if self._last_id is None:
                    await self._catch_up()
                answer = await self._client.xread({self.settings.key: self._last_id}, count=READ_COUNT, block=block_ms)
                for _stream, entries in answer or ():
                    for entry_id, fields in entries:
                        self._apply(entry_id, fields, live=True)
                        await asyncio.sleep(0)  # a backlog (after an outage) never holds the request path long
                self._up()
                backoff = 0.0
            except ERRORS as exc:
                self._down(exc)
                backoff = _next_backoff(backoff)
                await asyncio.sleep(backoff)  # stop() cancels a sleep: that is safe, unlike a read

    async def _catch_up(self) -> None:
        """Apply the stream's whole history, oldest first (a start, or a reader that never got it)."""
        start = b"-"
        while True:
            entries = await self._client.xrange(self.settings.key, min=start, count=READ_COUNT)
            for entry_id, fields in entries:
                self._apply(entry_id, fields, live=False)
                self.stats.warmup_entries += 1
                await asyncio.sleep(0)
            if len(entries) < READ_COUNT:
                break
            start = b"(" + entries[-1][0]
        self._up()
        if self._last_id is None:
            self._last_id = b"0-0"

    def _apply(self, entry_id: bytes, fields: dict[bytes, bytes], live: bool) -> None:
        self._last_id = entry_id
        origin = fields.get(b"r")
        if origin == self._name_bytes:
            return
        sequence = fields.get(b"s")
        if sequence is not None and origin is not None:
            try:
                number = int(sequence)
            except ValueError:
                self.stats.rejected += 1
                return
            if number <= self._seen.get(origin, 0):
                self.stats.duplicates += 1  # a retried XADD that had reached Redis the first time
                return
            self._seen[origin] = number
        try:
            sent = float(fields[b"t"])
            if b"b" not in fields and b"l" not in fields:
                raise KeyError("neither picks nor loads")
            picks = decode_batch(fields[b"b"]) if b"b" in fields else []
            loads = decode_loads(fields[b"l"]) if live and b"l" in fields else []  # old scrapes: no use
        except (KeyError, ValueError):
            self.stats.rejected += 1
            return
        age = max(0.0, self._clock() - sent)
        if live:
            self.lag.observe(age)
        if loads:
            self._apply_loads(origin or b"", loads)
        fresh = live and age < self.scrape_interval
        table, scheduler, stats = self.table, self.scheduler, self.stats
        for pool, address, records in picks:
            endpoint = table.get(pool, address)
            if endpoint is None:
                stats.unknown_endpoint += 1
                continue
            if fresh:
                endpoint.pending += 1
            for kind, payload in records:
                try:
                    scheduler.apply_shared(kind, address, payload)
                except ValueError:
                    stats.rejected += 1
            stats.applied += 1

    # ----- connection state -------------------------------------------------------------------------

    def _up(self) -> None:
        if not self.stats.up:
            if self.stats.last_error:
                log.info("state: Redis answers again")
            self.stats.up = True

    def _down(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.stats.up or message != self.stats.last_error:
            log.warning("state: Redis unavailable (%s); routing on local state, retrying", message)
            self.stats.reconnects += 1
        self.stats.up = False
        self.stats.last_error = message


class _StatsCollector:
    """The replication counters, read at Prometheus scrape time."""

    def __init__(self, stats: ReplicationStats) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        s = self._stats
        up = GaugeMetricFamily("extproc_state_redis_up", "1 while the last Redis command of the replicator succeeded.")
        up.add_metric([], 1.0 if s.up else 0.0)
        outbox = GaugeMetricFamily("extproc_state_outbox_picks", "Picks waiting to be published.")
        outbox.add_metric([], float(s.outbox))
        warmup = GaugeMetricFamily(
            "extproc_state_warmup_seconds", "How long reading the shared history took at start (NaN: it timed out)."
        )
        warmup.add_metric([], s.warmup_seconds if s.warmup_seconds is not None else float("nan"))
        out: list[Metric] = [up, outbox, warmup]
        for name, value, text in (
            ("published_picks", s.published, "Picks this replica published."),
            ("applied_picks", s.applied, "Other replicas' picks applied here."),
            ("published_loads", s.loads_published, "Scrapes this replica shared (state.share_scrapes)."),
            ("applied_loads", s.loads_applied, "Other replicas' scrapes applied here."),
            ("dropped_picks", s.dropped, "Picks never published: the outbox was full while Redis was away."),
            ("rejected_records", s.rejected, "Stream entries or records skipped as corrupt or foreign."),
            ("duplicate_entries", s.duplicates, "Entries skipped as copies of one applied (a retried publish)."),
            ("unknown_endpoint_picks", s.unknown_endpoint, "Shared picks of endpoints this replica does not know."),
            ("redis_errors", s.reconnects, "Times Redis became unavailable to the replicator."),
        ):
            family = CounterMetricFamily(f"extproc_state_{name}", text)
            family.add_metric([], float(value))
            out.append(family)
        return out
