"""vLLM's KV-cache events: the structs on the wire and the ZeroMQ publisher with its replay socket.

A KV-aware router (llm-d's KV-cache manager, for one) learns which blocks a vLLM replica holds from
these events instead of guessing from its own routing history. The
simulator sends the frames and msgpack layout that vLLM releases with ``array_like`` structs send
(``vllm/distributed/kv_events.py``), so such a router can be tested against simulated replicas:

- one PUB message per engine step with events: ``[topic, seq (8 bytes, big-endian), msgpack(EventBatch)]``;
- ``EventBatch`` is ``[ts, events, data_parallel_rank]``; each event an array tagged with its class name;
- a ROUTER socket replays buffered batches from a requested sequence number, then an end marker.

vLLM publishes from a thread fed by a queue; the simulator's engine and HTTP server share one event
loop, so it encodes and sends in the step itself (a PUB send never blocks: past the high-water mark
ZeroMQ drops) and serves replay requests from a task on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, TypeVar

import msgspec

if TYPE_CHECKING:
    import zmq
    import zmq.asyncio

    from extproc.sim.config import KVEventsConfig

logger = logging.getLogger(__name__)
_S = TypeVar("_S", bound="zmq.Socket[bytes]")

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay's end marker, as vLLM's


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the events: ``tag=True`` puts the class name first in each event's array."""


class BlockStored(KVCacheEvent):
    """Consecutive prompt blocks became reusable; ``token_ids`` are all their tokens, in order."""

    block_hashes: list[int]
    parent_block_hash: int | None  # the block before the first one; None at the start of a prompt
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    """Blocks left the cache (evicted, or dropped by a reset that could not clear everything)."""

    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    """The prefix cache was reset and holds nothing reusable any more."""


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One step's events: ``[ts, events, data_parallel_rank]`` (the rank is always set, so always sent)."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventsBindError(RuntimeError):
    """A socket could not bind or connect; the message names the config key and the endpoint."""


def binds(endpoint: str) -> bool:
    """vLLM's rule: wildcard hosts and local transports are bound (stable side), anything else connected."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqEventPublisher:
    """PUB socket for the live stream, ROUTER socket for replay, and the replay buffer.

    Must be created inside the running event loop: the replay socket is served by a task on it.
    """

    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0) -> None:
        import zmq
        import zmq.asyncio

        self._rank = data_parallel_rank
        self._topic = config.topic.encode("utf-8")
        self._seq = itertools.count()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._encode = msgspec.msgpack.Encoder().encode
        # PUB is a plain socket (its sends never wait); ROUTER is awaited on the loop via a shadow context.
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context.shadow(self._ctx.underlying)
        self._noblock = zmq.NOBLOCK
        self._send_error = zmq.ZMQError
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        try:
            pub = self._ctx.socket(zmq.PUB)
            self._pub = self._open(pub, "endpoint", config.endpoint, config.hwm, bind=binds(config.endpoint))
            if config.replay_endpoint is not None:
                # One replay answers with up to buffer_steps messages: let them all queue for the client.
                router = self._actx.socket(zmq.ROUTER)
                hwm = config.buffer_steps + 2
                self._replay = self._open(router, "replay_endpoint", config.replay_endpoint, hwm, bind=True)
                self._task = asyncio.get_running_loop().create_task(self._serve_replay())
        except BaseException:
            self._close_sockets()
            raise

    @staticmethod
    def _open(sock: _S, key: str, endpoint: str, hwm: int, *, bind: bool) -> _S:
        """Bind or connect (vLLM always binds the replay socket); a failure names the config key."""
        import zmq

        sock.setsockopt(zmq.LINGER, 0)
        sock.set_hwm(hwm)
        try:
            if bind:
                sock.bind(endpoint)
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            verb = "bind" if bind else "connect"
            raise KVEventsBindError(f"--kv-events-config: cannot {verb} {key} {endpoint!r}: {exc}") from None
        return sock

    def publish(self, events: list[KVEvent]) -> None:
        """Encode one step's events, send them without waiting, and keep them for replay."""
        seq = next(self._seq)
        payload = self._encode(EventBatch(time.time(), events, self._rank))
        assert self._pub is not None
        try:  # PUB drops past the high-water mark rather than wait; a failure must not stop the engine
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), flags=self._noblock)
        except self._send_error as exc:
            logger.warning("kv events: batch %d not sent (%s); it stays available for replay", seq, exc)
        self._buffer.append((seq, payload))

    async def _serve_replay(self) -> None:
        """Answer replay requests until closed; a bad request is logged and skipped, never fatal."""
        replay = self._replay
        assert replay is not None
        while True:
            try:
                frames = await replay.recv_multipart()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("kv events: receiving a replay request failed")
                await asyncio.sleep(0.1)
                continue
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                logger.warning(
                    "kv events: ignoring a malformed replay request (%d frames: %s); expected "
                    "[identity, b'', start_seq as 8 bytes big-endian]",
                    len(frames),
                    [f[:16] for f in frames[:4]],
                )
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big")
            first = self._buffer[0][0] if self._buffer else 0
            # A snapshot: publish() may append while the sends below yield to the loop.
            batches = list(itertools.islice(self._buffer, max(0, start_seq - first), None))
            try:
                for seq, payload in batches:
                    await replay.send_multipart((identity, b"", seq.to_bytes(8, "big"), payload))
                await replay.send_multipart((identity, b"", END_SEQ, b""))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("kv events: answering a replay request failed")

    async def close(self) -> None:
        """Stop the replay task and close both sockets at once (linger 0: nothing to flush on shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None
        self._ctx.term()
