"""Follows every endpoint's vLLM KV-cache event stream (ZMQ) into the ``precise_prefix`` scorer's index.

vLLM (``--kv-events-config``) publishes, per engine step, one ZMQ message of three frames: a topic, an
8-byte big-endian sequence number (newer releases may append more bytes) and a msgpack ``EventBatch``:
``[ts, events, data_parallel_rank]`` whose events are tagged ``BlockStored``, ``BlockRemoved`` and
``AllBlocksCleared``. Releases differ in whether structs are msgpack arrays or maps; both are read.

One SUB socket per endpoint (address from discovery, port and topic from the scorer's params), following
membership as endpoints come and go. An endpoint is *live* for the scorer while its socket is connected
(ZMQ's socket monitor says so) and its stream is in sequence:

- a sequence gap is filled from the engine's replay socket (ROUTER: ask "from N", get every buffered batch
  from N, then an end marker); without a replay socket, or if replay fails, the endpoint is not live until
  the next reconnect (its index may miss removals and stores);
- a sequence number that goes backwards means the engine restarted: its index is cleared;
- the first batch of a stream (this picker starting, or an engine restarting) shows where the stream is;
  the ``replay_window`` batches before it are replayed first, so a picker that starts after the engines
  learns what they hold (an endpoint is live from that first batch on; until then it is scored
  approximately).

Decoding and indexing run on the event loop, one batch at a time with a yield between batches; a batch is
a few hundred blocks at most, indexed at ~1-2 us per block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from zmq.utils.monitor import parse_monitor_message

from extproc.datalayer.table import EndpointTable
from extproc.scheduling.prefix.precise import PrecisePrefixScorer

log = logging.getLogger(__name__)

END_OF_REPLAY = -1
REPLAY_TIMEOUT = 10.0  # seconds a replay may take before the endpoint is given up as out of sequence
RESYNC_AFTER = 5.0  # seconds an endpoint with an unrecoverable gap is scored approximately; then live again
MEDIUM_GPU = "GPU"
_decode = msgspec.msgpack.Decoder().decode


@dataclass(slots=True)
class StreamStats:
    """One endpoint's stream, for the metrics and the logs."""

    connected: bool = False
    in_sequence: bool = True
    batches: int = 0
    stored: int = 0  # blocks
    removed: int = 0  # blocks
    cleared: int = 0
    gaps: int = 0
    replays: int = 0
    replayed_batches: int = 0
    restarts: int = 0  # sequence went backwards
    malformed: int = 0
    last_lag: float = 0.0  # seconds from the engine's batch timestamp to its indexing here
    expected: int | None = None  # the next sequence number
    reconnected: bool = False  # a reconnect since the last batch: a lower sequence number means a restart


@dataclass(slots=True)
class _Follow:
    task: asyncio.Task[None]
    stats: StreamStats = field(default_factory=StreamStats)


class KvEventsSubscriber:
    """One ZMQ subscription per endpoint of ``table``, feeding ``scorer`` (see the module)."""

    def __init__(self, scorer: PrecisePrefixScorer, table: EndpointTable, clock: Callable[[], float] = time.time):
        self.scorer = scorer
        self.table = table
        self._clock = clock
        self._ctx = zmq.asyncio.Context()
        self._follows: dict[str, _Follow] = {}
        self._unsubscribe: list[Callable[[], None]] = []

    @property
    def stats(self) -> dict[str, StreamStats]:
        return {address: f.stats for address, f in self._follows.items()}

    async def start(self) -> None:
        self._unsubscribe = [self.table.on_added(self._added), self.table.on_removed(self._removed)]
        for address in self.table.addresses():
            self._begin(address)

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        follows, self._follows = list(self._follows.values()), {}
        for follow in follows:
            follow.task.cancel()
        for follow in follows:
            with contextlib.suppress(asyncio.CancelledError):
                await follow.task
        self._ctx.term()

    def _added(self, _pool: str, address: str) -> None:
        self._begin(address)

    def _removed(self, address: str) -> None:
        follow = self._follows.pop(address, None)
        if follow is not None:
            follow.task.cancel()
        self.scorer.set_live(address, False)

    def _begin(self, address: str) -> None:
        if address in self._follows or self.scorer.event_address(address) is None:
            return
        stats = StreamStats()
        task = asyncio.get_running_loop().create_task(self._follow(address, stats), name=f"kv-events:{address}")
        self._follows[address] = _Follow(task, stats)

    # ----- one endpoint ------------------------------------------------------------------------------

    async def _follow(self, address: str, stats: StreamStats) -> None:
        where = self.scorer.event_address(address)
        assert where is not None
        host, port = where
        url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if ":" in host:
            sub.setsockopt(zmq.IPV6, 1)
        sub.setsockopt(zmq.SUBSCRIBE, self.scorer.topic.encode())
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(url)
        lock = asyncio.Lock()  # batches are applied in order: replays and live messages never interleave
        watch = asyncio.get_running_loop().create_task(self._watch(address, monitor, stats, lock))
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) < 3 or len(frames[1]) < 8:
                    stats.malformed += 1
                    continue
                seq = int.from_bytes(frames[1][:8], "big", signed=True)
                async with lock:
                    await self._sequenced(address, seq, frames[2], stats)
                await asyncio.sleep(0)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            self.scorer.set_live(address, False)

    async def _watch(self, address: str, monitor: zmq.asyncio.Socket, stats: StreamStats, lock: asyncio.Lock) -> None:
        """Connection state from ZMQ's socket monitor: live on connect (after catching up), not on disconnect."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECTED:
                stats.connected = True
                log.info("kv-events: %s connected", address)
                async with lock:
                    if stats.expected is not None:
                        stats.reconnected = True
                    else:
                        stats.in_sequence = False  # live once the first batch shows where the stream is
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                stats.connected = False
                log.warning("kv-events: %s disconnected; scoring it on the approximate index", address)
            self._publish_live(address, stats)

    def _publish_live(self, address: str, stats: StreamStats) -> None:
        self.scorer.set_live(address, stats.connected and stats.in_sequence)

    async def _sequenced(self, address: str, seq: int, payload: bytes, stats: StreamStats) -> None:
        expected = stats.expected
        if expected is None:
            await self._catch_up(address, seq, stats)
        elif seq < expected:
            if not stats.reconnected:
                return  # already applied (from a replay)
            stats.restarts += 1
            log.info("kv-events: %s sequence went from %d back to %d: the engine restarted", address, expected, seq)
            self.scorer.index.cleared(address)
            stats.expected = None
            await self._catch_up(address, seq, stats)
        elif seq > expected:
            stats.gaps += 1
            if not await self._replay(address, expected, seq, stats):
                self._out_of_sequence(address, expected, seq, stats)
        stats.reconnected = False
        if stats.expected is None or seq >= stats.expected:
            self._apply(address, payload, stats)
            stats.expected = seq + 1

    async def _catch_up(self, address: str, seq: int, stats: StreamStats) -> None:
        """The first batch of a stream (a start, or an engine restart) is ``seq``: replay the recent history
        before it (at most ``replay_window`` batches: older ones describe blocks long evicted, and replaying a
        whole buffer costs seconds of CPU), then go live."""
        start = max(0, seq - self.scorer.replay_window)
        if seq > start and self.scorer.event_address(address, replay=True) is not None:
            if not await self._replay(address, start, seq, stats, compact=True):
                log.warning(
                    "kv-events: %s: replaying batches %d..%d failed; going on from %d", address, start, seq, seq
                )
            stats.expected = None  # the live batch is applied next, whatever the replay reached
        stats.in_sequence = True
        self._publish_live(address, stats)

    def _out_of_sequence(self, address: str, first: int, last: int, stats: StreamStats) -> None:
        """Batches are lost: what the index holds for the endpoint is not to be trusted for a while."""
        log.warning(
            "kv-events: %s missed batches %d..%d and could not replay them; scoring it approximately for %.0fs",
            address,
            first,
            last - 1,
            RESYNC_AFTER,
        )
        stats.in_sequence = False
        self._publish_live(address, stats)

        def resync() -> None:
            stats.in_sequence = True
            if self._follows.get(address) is not None:
                self._publish_live(address, stats)

        asyncio.get_running_loop().call_later(RESYNC_AFTER, resync)

    async def _replay(
        self, address: str, start: int, until: int | None, stats: StreamStats, compact: bool = False
    ) -> bool:
        """Fetch and apply batches ``start`` .. ``until - 1`` (all buffered ones when None) from the replay socket.

        ``compact``: the history is applied as its net effect (``_apply_net``), not batch by batch."""
        where = self.scorer.event_address(address, replay=True)
        if where is None:
            return False
        host, port = where
        stats.replays += 1
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if ":" in host:
            dealer.setsockopt(zmq.IPV6, 1)
        dealer.connect(f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}")
        history: list[bytes] = []
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = asyncio.get_running_loop().time() + REPLAY_TIMEOUT
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 or not await dealer.poll(remaining * 1000):
                    return False
                frames = await dealer.recv_multipart()
                if len(frames) < 3 or len(frames[1]) < 8:
                    stats.malformed += 1
                    continue
                seq = int.from_bytes(frames[1][:8], "big", signed=True)
                if seq == END_OF_REPLAY:
                    if history:
                        await self._apply_net(address, history, stats)
                    return (
                        until is None
                        or (stats.expected is not None and stats.expected >= until)
                        or (stats.expected is None and start >= until)
                    )
                if (until is None or seq < until) and (stats.expected is None or seq >= stats.expected):
                    if compact:
                        history.append(frames[2])
                    else:
                        self._apply(address, frames[2], stats)
                        await asyncio.sleep(0)
                    stats.expected = seq + 1
                    stats.replayed_batches += 1
        except zmq.ZMQError as exc:
            log.warning("kv-events: replay from %s failed: %s", address, exc)
            return False
        finally:
            dealer.close(linger=0)

    async def _apply_net(self, address: str, history: list[bytes], stats: StreamStats) -> None:
        """Apply a replayed history as its net effect: only the blocks still held at its end are indexed.

        A replay window holds many times an engine's capacity of stores and evictions; following them one by
        one costs ~3 us per block, tracking which engine hashes survive costs a dict insert or pop, and the
        survivors are at most the engine's capacity."""
        held: dict[Any, tuple[Any, list[int], int]] = {}  # engine hash -> (parent engine hash, its tokens, block size)
        cleared = False
        for n, payload in enumerate(history):
            batch = _batch(payload)
            if batch is None:
                stats.malformed += 1
                continue
            stats.batches += 1
            for event in batch[1]:
                try:
                    kind, fields = _split(event)
                    if kind == "BlockStored":
                        medium = fields[5] if len(fields) > 5 else None
                        if medium not in (None, MEDIUM_GPU):
                            continue
                        hashes, parent, tokens, size = _hashable(fields[0]), _key(fields[1]), fields[2], fields[3]
                        if size < 1 or len(tokens) != size * len(hashes):
                            stats.malformed += 1
                            continue
                        for i, h in enumerate(hashes):
                            held[h] = (parent, tokens[i * size : (i + 1) * size], size)
                            parent = h
                    elif kind == "BlockRemoved":
                        for h in _hashable(fields[0]):
                            held.pop(h, None)
                    elif kind == "AllBlocksCleared":
                        held.clear()
                        cleared = True
                except (IndexError, TypeError, ValueError):
                    stats.malformed += 1
            if n % 64 == 63:
                await asyncio.sleep(0)
        index = self.scorer.index
        if cleared:
            index.cleared(address)
        for n, (h, (parent, tokens, size)) in enumerate(held.items()):  # parents before children, as stored
            stats.stored += index.stored(address, [h], parent, tokens, size)
            if n % 512 == 511:
                await asyncio.sleep(0)
        if held:
            self._bound(address, next(iter(held.values()))[2])

    def _apply(self, address: str, payload: bytes, stats: StreamStats) -> None:
        batch = _batch(payload)
        if batch is None:
            stats.malformed += 1
            return
        ts, events = batch
        index = self.scorer.index
        stats.batches += 1
        if isinstance(ts, int | float):
            stats.last_lag = max(0.0, self._clock() - ts)
        for event in events:
            try:
                kind, fields = _split(event)
                if kind == "BlockStored":
                    hashes, parent, tokens, block_size = fields[0], fields[1], fields[2], fields[3]
                    medium = fields[5] if len(fields) > 5 else None
                    if medium not in (None, MEDIUM_GPU):
                        continue  # offloaded tiers (CPU, storage) are not what a prefill reuses for free
                    stats.stored += index.stored(address, _hashable(hashes), _key(parent), tokens, block_size)
                    self._bound(address, block_size)
                elif kind == "BlockRemoved":
                    medium = fields[1] if len(fields) > 1 else None
                    if medium not in (None, MEDIUM_GPU):
                        continue
                    stats.removed += index.removed(address, _hashable(fields[0]))
                elif kind == "AllBlocksCleared":
                    stats.cleared += 1
                    index.cleared(address)
                else:
                    stats.malformed += 1
            except (IndexError, TypeError, ValueError, OverflowError):
                stats.malformed += 1

    def _bound(self, address: str, block_size: int) -> None:
        """An endpoint holds at most its KV capacity (``vllm:cache_config_info``), plus a little slack."""
        states = self.table.states_for(address)
        tokens = states[0].cache_tokens if states else None
        if tokens:
            self.scorer.index.set_limit(address, tokens // block_size + 16)

    # ----- metrics -------------------------------------------------------------------------------------

    def collect(self) -> list[Metric]:
        families = {
            name: CounterMetricFamily(f"extproc_kv_events_{name}", text, labels=["endpoint"])
            for name, text in (
                ("batches", "Event batches indexed (one per engine step with events)."),
                ("blocks_stored", "Blocks the engine reported stored, indexed."),
                ("blocks_removed", "Blocks the engine reported evicted, dropped from the index."),
                ("gaps", "Sequence gaps detected."),
                ("replays", "Replay requests sent (gaps and (re)connects)."),
                ("restarts", "Times the sequence went backwards (the engine restarted; its index cleared)."),
                ("malformed", "Messages or events that could not be read, skipped."),
            )
        }
        connected = GaugeMetricFamily(
            "extproc_kv_events_connected", "1 while the endpoint's event socket is connected.", labels=["endpoint"]
        )
        lag = GaugeMetricFamily(
            "extproc_kv_events_lag_seconds",
            "From the engine's timestamp of the latest batch to its indexing here.",
            labels=["endpoint"],
        )
        for address, s in self.stats.items():
            for name, value in (
                ("batches", s.batches),
                ("blocks_stored", s.stored),
                ("blocks_removed", s.removed),
                ("gaps", s.gaps),
                ("replays", s.replays),
                ("restarts", s.restarts),
                ("malformed", s.malformed),
            ):
                families[name].add_metric([address], float(value))
            connected.add_metric([address], 1.0 if s.connected else 0.0)
            lag.add_metric([address], s.last_lag)
        return [*families.values(), connected, lag]

    def describe(self) -> list[Metric]:
        return []


def _batch(payload: bytes) -> tuple[Any, list[Any]] | None:
    """``(ts, events)`` of an EventBatch, from msgspec's array or map encoding; None if it is not one."""
    try:
        batch = _decode(payload)
        if isinstance(batch, dict):
            ts, events = batch.get("ts"), batch.get("events")
        else:
            ts, events = batch[0], batch[1]
    except (msgspec.DecodeError, ValueError, IndexError, TypeError, KeyError):
        return None
    return (ts, events) if isinstance(events, list) else None


def _split(event: Any) -> tuple[str, list[Any]]:
    """An event's tag and fields, from msgspec's tagged array ``[tag, *fields]`` or tagged map."""
    if isinstance(event, list):
        return event[0], event[1:]
    if isinstance(event, dict):
        kind = event.get("type")
        if kind == "BlockStored":
            order = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
        elif kind == "BlockRemoved":
            order = ("block_hashes", "medium")
        else:
            order = ()
        return str(kind), [event.get(k) for k in order]
    raise TypeError("an event is neither a tagged array nor a tagged map")


def _key(value: Any) -> Any:
    """Engine hashes are ints or bytes (lists would come from a JSON-ish encoder): make them dict keys."""
    return tuple(value) if isinstance(value, list) else value


def _hashable(values: Any) -> list[Any]:
    if not isinstance(values, list):
        raise TypeError("block_hashes is not a list")
    if not values or type(values[0]) is not list:
        return values  # ints or bytes, as msgpack decodes them: already dict keys
    return [_key(v) for v in values]
