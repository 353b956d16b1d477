"""The KV-event subscriber over real ZMQ: sequence gaps filled from the replay socket, restarts, bad messages.

The publisher is the simulator's own (vLLM's wire format); the subscriber feeds a real ``precise_prefix``
scorer. No model server is needed: the subscriber only talks ZMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from extproc.datalayer.kv_events import KvEventsSubscriber
from extproc.datalayer.table import EndpointTable
from extproc.local.procs import free_ports
from extproc.scheduling.prefix.kv_index import token_block_hashes
from extproc.scheduling.prefix.precise import PrecisePrefixScorer
from extproc.sim.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch

BS = 16


class LossyPublisher:
    """vLLM's publisher protocol (PUB + a ROUTER replaying its buffer), dropping the live message of chosen
    sequence numbers as a full PUB queue would; the replay still has them."""

    def __init__(self, port: int, replay_port: int | None, drop: set[int]) -> None:
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.drop = drop
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.task: asyncio.Task[None] | None = None
        if replay_port is not None:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(f"tcp://127.0.0.1:{replay_port}")
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def send(self, events: list[Any], raw: bytes | None = None) -> None:
        payload = raw if raw is not None else msgspec.msgpack.encode(EventBatch(time.time(), events, 0))
        if self.seq not in self.drop:
            await self.pub.send_multipart((b"kv@test", self.seq.to_bytes(8, "big"), payload))
        self.buffer.append((self.seq, payload))
        self.seq += 1

    async def _serve(self) -> None:
        while True:
            identity, _, start = await self.router.recv_multipart()
            for seq, payload in self.buffer:
                if seq >= int.from_bytes(start, "big"):
                    await self.router.send_multipart((identity, b"", seq.to_bytes(8, "big"), payload))
            await self.router.send_multipart((identity, b"", (-1).to_bytes(8, "big", signed=True), b""))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.ctx.destroy(linger=0)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


def chain(n_events: int, start: int) -> list[tuple[list[int], int | None, list[int]]]:
    """``n_events`` BlockStored of 4 blocks each, chained: (engine hashes, parent, token ids)."""
    out = []
    parent = None
    for i in range(n_events):
        hashes = [start + 4 * i + k for k in range(4)]
        out.append((hashes, parent, list(range((start + i) * 64, (start + i) * 64 + 4 * BS))))
        parent = hashes[-1]
    return out


def test_a_gap_is_replayed_and_the_index_is_complete() -> None:
    async def main() -> None:
        port = free_ports(3)
        address = f"127.0.0.1:{port}"
        publisher = LossyPublisher(port + 1, port + 2, drop={3, 4})
        scorer = PrecisePrefixScorer(port_offset=1, replay_port_offset=2, topic="kv@")
        table = EndpointTable(["p"])
        table.replace_pool("p", [address])
        subscriber = KvEventsSubscriber(scorer, table)
        await subscriber.start()
        try:
            await until(lambda: subscriber.stats[address].connected, 10, "the subscription to connect")
            await asyncio.sleep(0.2)  # slow joiner: the subscription reaches the publisher
            events = chain(8, 1000)
            tokens = array("I", [t for _, _, ids in events for t in ids])
            hashes = token_block_hashes(tokens, BS, 100)
            for engine_hashes, parent, ids in events:
                await publisher.send([BlockStored(engine_hashes, parent, ids, BS, None, "GPU", None)])
                await asyncio.sleep(0.01)
            await until(lambda: scorer.index.match(hashes, [address])[address] == 32, 10, "all 32 blocks indexed")
            stats = subscriber.stats[address]
            assert stats.gaps == 1 and stats.replayed_batches >= 2  # batches 3 and 4 came from the replay
            assert address in scorer.live

            # evictions follow; a message that is not a batch is counted, not fatal
            await publisher.send([], raw=b"\xc1garbage")
            await publisher.send([BlockRemoved(events[-1][0], "GPU")])
            await until(lambda: scorer.index.match(hashes, [address])[address] == 28, 10, "the removal")
            assert stats.malformed == 1
        finally:
            await subscriber.stop()
            await publisher.close()

    asyncio.run(main())


def test_a_restarted_engine_is_noticed_and_an_endpoint_without_replay_is_scored_approximately() -> None:
    async def main() -> None:
        port = free_ports(3)
        address = f"127.0.0.1:{port}"
        publisher = LossyPublisher(port + 1, None, drop={2})
        scorer = PrecisePrefixScorer(port_offset=1)  # no replay socket
        table = EndpointTable(["p"])
        table.replace_pool("p", [address])
        subscriber = KvEventsSubscriber(scorer, table)
        await subscriber.start()
        try:
            await until(lambda: subscriber.stats[address].connected, 10, "the subscription to connect")
            await asyncio.sleep(0.2)  # slow joiner: the subscription reaches the publisher
            for engine_hashes, parent, ids in chain(4, 1):
                await publisher.send([BlockStored(engine_hashes, parent, ids, BS, None, "GPU", None)])
                await asyncio.sleep(0.01)
            await until(lambda: subscriber.stats[address].gaps == 1, 10, "the gap")
            assert address not in scorer.live  # batch 2 is lost for good: approximate until resynchronised
            assert scorer.index.stats.orphans == 4  # batch 3's parent was in the lost batch

            # the engine restarts: its socket goes away and comes back with sequence numbers from 0
            await publisher.close()
            await until(lambda: not subscriber.stats[address].connected, 10, "the disconnect")
            publisher = LossyPublisher(port + 1, None, drop=set())
            await until(lambda: subscriber.stats[address].connected, 10, "the reconnect")
            await asyncio.sleep(0.2)  # slow joiner: the subscription reaches the new publisher
            await publisher.send([BlockStored([7, 8], None, list(range(2 * BS)), BS, None, "GPU", None)])
            await until(lambda: subscriber.stats[address].restarts == 1, 10, "the restart to be noticed")
            assert scorer.index.size(address) == 2  # what the new engine stored, nothing from before
            assert address in scorer.live  # a fresh engine has nothing to have missed
        finally:
            await subscriber.stop()
            await publisher.close()

    asyncio.run(main())


def test_a_picker_that_starts_late_replays_the_history_as_its_net_effect() -> None:
    async def main() -> None:
        port = free_ports(3)
        address = f"127.0.0.1:{port}"
        publisher = LossyPublisher(port + 1, port + 2, drop=set())
        # Before the picker listens: a chain of 8 events (32 blocks), 4 of its blocks evicted, then an unrelated
        # prompt stored and everything cleared, then the chain stored again: only the last state counts.
        events = chain(8, 1000)
        for engine_hashes, parent, ids in events:
            await publisher.send([BlockStored(engine_hashes, parent, ids, BS, None, "GPU", None)])
        await publisher.send([BlockRemoved(events[-1][0], "GPU")])
        await publisher.send([BlockStored([5, 6], None, list(range(2 * BS)), BS, None, "GPU", None)])
        await publisher.send([AllBlocksCleared()])
        for engine_hashes, parent, ids in events[:5]:
            await publisher.send([BlockStored(engine_hashes, parent, ids, BS, None, "GPU", None)])
        scorer = PrecisePrefixScorer(port_offset=1, replay_port_offset=2, replay_window=100)
        table = EndpointTable(["p"])
        table.replace_pool("p", [address])
        subscriber = KvEventsSubscriber(scorer, table)
        await subscriber.start()
        try:
            await until(lambda: subscriber.stats[address].connected, 10, "the subscription to connect")
            await asyncio.sleep(0.2)
            tokens = array("I", [t for _, _, ids in events for t in ids])
            hashes = token_block_hashes(tokens, BS, 100)
            await publisher.send([BlockRemoved([1019], "GPU")])  # the first live batch: block 19, the 5th event's last
            await until(lambda: address in scorer.live, 10, "the catch-up")
            assert scorer.index.match(hashes, [address])[address] == 19  # 5 events of 4 blocks, minus the last one
            assert scorer.index.size(address) == 19 and scorer.index.stats.stored == 20  # only survivors indexed
        finally:
            await subscriber.stop()
            await publisher.close()

    asyncio.run(main())
