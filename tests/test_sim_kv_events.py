"""The simulator's KV-cache events, read as a vLLM consumer reads them: real processes, real ZeroMQ.

The structs below are declared the way vLLM declares them (``vllm/distributed/kv_events.py``, the
releases with ``array_like`` structs), not imported from the simulator, so a change of field order or
tagging on the simulator's side fails here the way it would fail in a KV-aware router.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
import pytest
import zmq

from extproc.local.procs import extproc_argv, free_port, port_free
from extproc.sim.tokens import block_hashes
from tests.conftest import Sim
from tests.helpers import get, post

END_SEQ = (-1).to_bytes(8, "big", signed=True)
TOPIC = "kv@127.0.0.1@test-model"
BLOCK = 16


# ----- vLLM's declarations ------------------------------------------------------------------


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base class for all KV cache-related events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


DECODE = msgspec.msgpack.Decoder(KVEventBatch).decode


# ----- a subscriber and a replay client -----------------------------------------------------


@dataclass
class Received:
    seq: int
    payload: bytes
    batch: KVEventBatch


@dataclass
class Events:
    """A SUB socket on a simulator's publisher, with its replay endpoint; everything received is kept."""

    sim: Sim
    pub_port: int
    replay_port: int
    ctx: zmq.Context[zmq.Socket[bytes]] = field(default_factory=zmq.Context)
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        self.sub.connect(f"tcp://127.0.0.1:{self.pub_port}")

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def recv(self, timeout: float) -> Received | None:
        if not self.sub.poll(int(timeout * 1000)):
            return None
        frames = self.sub.recv_multipart()
        assert len(frames) == 3, frames
        topic, seq, payload = frames
        assert topic == TOPIC.encode() and len(seq) == 8
        item = Received(int.from_bytes(seq, "big"), payload, DECODE(payload))
        self.received.append(item)
        return item

    def until(self, done: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
        """Receive until ``done`` holds for what arrived since the call; fail after ``timeout``."""
        start = len(self.received)
        deadline = time.monotonic() + timeout
        while not done(self.received[start:]):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; got {[r.batch for r in self.received[start:]]}"
            self.recv(min(left, 0.5))
        return self.received[start:]

    def sync(self, timeout: float = 20.0) -> Received:
        """Beat the slow joiner: send probe prompts until one's BlockStored arrives on the SUB socket."""
        deadline = time.monotonic() + timeout
        probe = 0
        while time.monotonic() < deadline:
            probe += 1
            ids = [200 + probe] * (BLOCK + 1)
            assert complete(self.sim, ids).status == 200
            wait_until = time.monotonic() + 0.5
            while time.monotonic() < wait_until:
                item = self.recv(0.1)
                if item is not None and any(
                    isinstance(e, BlockStored) and e.token_ids == ids[:BLOCK] for e in item.batch.events
                ):
                    return item
        raise AssertionError("the SUB socket never received a probe's events")

    def replay(self, start_seq: int, timeout: float = 20.0) -> list[tuple[int, bytes]]:
        """Ask the ROUTER for batches from ``start_seq``; return them up to the end marker."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{self.replay_port}")
        try:
            dealer.send_multipart([b"", start_seq.to_bytes(8, "big")])
            out: list[tuple[int, bytes]] = []
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                assert left > 0 and dealer.poll(int(left * 1000)), f"no end marker after {len(out)} batches"
                empty, seq, payload = dealer.recv_multipart()
                assert empty == b""
                if seq == END_SEQ:
                    assert payload == b""
                    return out
                out.append((int.from_bytes(seq, "big"), payload))
        finally:
            dealer.close(linger=0)


def kv_config(pub_port: int, replay_port: int, **extra: Any) -> str:
    return orjson.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{pub_port}",
            "replay_endpoint": f"tcp://*:{replay_port}",
            "topic": TOPIC,
            "buffer_steps": 10000,
            "hwm": 100000,
            **extra,
        }
    ).decode()


@pytest.fixture
def start_events(start_simulator: Callable[..., Sim]) -> Iterator[Callable[..., Events]]:
    """A simulator with events on two free ports, and a subscriber already in sync with it."""
    opened: list[Events] = []

    def start(*args: str) -> Events:
        pub_port, replay_port = free_port(), free_port()
        sim = start_simulator(
            "--time-scale",
            "0",
            "--block-size",
            str(BLOCK),
            *args,
            "--kv-events-config",
            kv_config(pub_port, replay_port),
        )
        events = Events(sim, pub_port, replay_port)
        opened.append(events)
        events.sync()
        return events

    yield start
    for events in opened:
        events.close()


def complete(sim: Sim, prompt: str | list[int], max_tokens: int = 1) -> Any:
    return post(f"{sim.base}/v1/completions", {"model": "test-model", "prompt": prompt, "max_tokens": max_tokens})


def chat(sim: Sim, messages: list[dict[str, str]], max_tokens: int = 4) -> dict[str, Any]:
    reply = post(
        f"{sim.base}/v1/chat/completions", {"model": "test-model", "messages": messages, "max_tokens": max_tokens}
    )
    assert reply.status == 200, reply.body
    return reply.json()


def tokenize(sim: Sim, messages: list[dict[str, str]]) -> list[int]:
    reply = post(f"{sim.base}/tokenize", {"model": "test-model", "messages": messages})
    assert reply.status == 200, reply.body
    return reply.json()["tokens"]


def stored(items: list[Received]) -> list[BlockStored]:
    return [e for r in items for e in r.batch.events if isinstance(e, BlockStored)]


def words(n: int, seed: int) -> str:
    return " ".join(f"w{seed}x{i}" for i in range(n))


# ----- tests --------------------------------------------------------------------------------


def test_chat_stores_its_blocks_and_a_follow_up_only_the_new_ones(start_events: Callable[..., Events]) -> None:
    ev = start_events()
    first = [{"role": "system", "content": words(60, 1)}, {"role": "user", "content": "first question?"}]
    ids = tokenize(ev.sim, first)
    full = len(ids) // BLOCK
    assert full >= 4
    reply = chat(ev.sim, first, max_tokens=8)
    got = ev.until(lambda items: sum(len(e.block_hashes) for e in stored(items)) >= full)
    # One batch for the step that admitted the request; decode steps publish nothing.
    assert len(got) == 1, [r.batch for r in got]
    (event,) = stored(got)
    assert event.parent_block_hash is None
    assert event.token_ids == ids[: full * BLOCK]
    assert event.block_hashes == block_hashes(ids, BLOCK)
    assert (event.block_size, event.lora_id, event.medium, event.lora_name) == (BLOCK, None, "GPU", None)
    assert got[0].batch.data_parallel_rank == 0
    assert abs(got[0].batch.ts - time.time()) < 60

    # The next turn renders the first as its prefix: only the blocks after it are new.
    second = [*first, reply["choices"][0]["message"], {"role": "user", "content": words(30, 2)}]
    ids2 = tokenize(ev.sim, second)
    assert ids2[: full * BLOCK] == ids[: full * BLOCK]
    reply2 = chat(ev.sim, second)
    assert reply2["usage"]["prompt_tokens_details"]["cached_tokens"] == full * BLOCK
    got2 = ev.until(lambda items: bool(stored(items)))
    assert got2[0].seq == got[0].seq + 1
    (event2,) = stored(got2)
    assert event2.parent_block_hash == event.block_hashes[-1]
    full2 = len(ids2) // BLOCK
    assert event2.token_ids == ids2[full * BLOCK : full2 * BLOCK]
    assert event.block_hashes + event2.block_hashes == block_hashes(ids2, BLOCK)

    # The render endpoint hands out the same ids the events carry.
    rendered = post(f"{ev.sim.base}/v1/chat/completions/render", {"model": "test-model", "messages": second})
    assert rendered.json()["token_ids"][: full2 * BLOCK] == event.token_ids + event2.token_ids

    # Sequence numbers: contiguous on the SUB socket, and from 0 in the replay buffer.
    seqs = [r.seq for r in ev.received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert [seq for seq, _ in ev.replay(0)] == list(range(seqs[-1] + 1))


def test_a_small_cache_evicts_stored_blocks_and_says_so(start_events: Callable[..., Events]) -> None:
    ev = start_events("--num-gpu-blocks", "12")
    cached: set[int] = set()
    removed: list[int] = []

    def apply(batch: KVEventBatch) -> None:
        """Mirror the cache from its events, as an indexer does, checking each event against the mirror."""
        for e in batch.events:
            if isinstance(e, BlockStored):
                assert not cached & set(e.block_hashes), "stored a block that was cached already"
                cached.update(e.block_hashes)
            elif isinstance(e, BlockRemoved):
                assert e.medium == "GPU"
                assert set(e.block_hashes) <= cached, "removed a block that was never stored"
                cached.difference_update(e.block_hashes)
                removed.extend(e.block_hashes)

    # The probes' events from the replay buffer: the SUB socket may have joined after the first of them.
    for _seq, payload in ev.replay(0):
        apply(DECODE(payload))
    removed.clear()
    for i in range(6):
        ids = [1000 * (i + 1) + k for k in range(4 * BLOCK + 1)]  # 4 full blocks + 1 token: holds 5 blocks
        assert complete(ev.sim, ids).status == 200
        for r in ev.until(lambda items, ids=ids: any(e.token_ids == ids[: 4 * BLOCK] for e in stored(items))):
            apply(r.batch)
    assert removed, "12 blocks cannot hold six prompts of four blocks"
    # The events add up to what the simulator holds.
    assert len(cached) == get(f"{ev.sim.base}/sim/state").json()["cached_blocks"]


def test_reset_clears_all_blocks(start_events: Callable[..., Events]) -> None:
    ev = start_events()
    assert post(f"{ev.sim.base}/reset_prefix_cache", b"").status == 200
    (got,) = ev.until(bool)
    assert got.batch.events == [AllBlocksCleared()]
    assert get(f"{ev.sim.base}/sim/state").json()["cached_blocks"] == 0
    # The same prompt again is stored again, from its first block.
    ids = [7] * (2 * BLOCK)
    assert complete(ev.sim, ids).status == 200
    (event,) = stored(ev.until(lambda items: bool(stored(items))))
    assert event.parent_block_hash is None and event.token_ids == ids


def test_wire_format_is_vllms(start_events: Callable[..., Events]) -> None:
    """Without the typed decoder: the raw msgpack arrays a consumer of any language sees."""
    ev = start_events()
    assert complete(ev.sim, [5] * (BLOCK + 3)).status == 200
    assert post(f"{ev.sim.base}/reset_prefix_cache", b"").status == 200
    got = ev.until(lambda items: any(isinstance(e, AllBlocksCleared) for r in items for e in r.batch.events))
    raw = [msgspec.msgpack.decode(r.payload) for r in got]
    ts, events, rank = raw[0]
    assert isinstance(ts, float) and rank == 0
    assert events[0][0] == "BlockStored" and len(events[0]) == 8
    assert events[0][3] == [5] * BLOCK and events[0][4:] == [BLOCK, None, "GPU", None]
    assert raw[-1][1] == [["AllBlocksCleared"]]


def test_replay_returns_the_buffered_batches_then_the_end_marker(start_events: Callable[..., Events]) -> None:
    ev = start_events()
    for i in range(5):
        ids = [300 + i] * (BLOCK + 1)
        assert complete(ev.sim, ids).status == 200
        ev.until(lambda items, ids=ids: any(e.token_ids == ids[:BLOCK] for e in stored(items)))
    live = {r.seq: r.payload for r in ev.received}
    last = max(live)
    start = last - 3
    replayed = ev.replay(start)
    assert [seq for seq, _ in replayed] == list(range(start, last + 1))
    assert all(payload == live[seq] for seq, payload in replayed)
    assert ev.replay(last + 1) == []
    everything = ev.replay(0)
    assert [seq for seq, _ in everything] == list(range(last + 1))
    assert all(payload == live[seq] for seq, payload in everything if seq in live)


def test_malformed_replay_requests_are_ignored(start_events: Callable[..., Events]) -> None:
    ev = start_events()
    for frames in ([b"junk"], [b"", b"123"], [b"", b"\x00" * 8, b"extra"], [b"x", b"\x00" * 8]):
        dealer = ev.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{ev.replay_port}")
        dealer.send_multipart(frames)
        assert not dealer.poll(300), f"answered {frames}"
        dealer.close(linger=0)
    # A REQ client adds the empty delimiter itself; the ROUTER sees [identity, b"", start] as from a DEALER.
    req = ev.ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(f"tcp://127.0.0.1:{ev.replay_port}")
    req.send((10**6).to_bytes(8, "big"))
    assert req.poll(10000) and req.recv_multipart() == [END_SEQ, b""]
    req.close(linger=0)
    assert get(f"{ev.sim.base}/health").status == 200
    assert [seq for seq, _ in ev.replay(0)] == list(range(max(r.seq for r in ev.received) + 1))
    assert ev.sim.child.alive()
    assert "malformed replay request" in ev.sim.child.log_tail(50)


def test_publisher_null_and_disabled_bind_nothing(start_simulator: Callable[..., Sim]) -> None:
    for config in ({"enable_kv_cache_events": True, "publisher": "null"}, {"enable_kv_cache_events": False}):
        port = free_port()
        sim = start_simulator(
            "--time-scale", "0", "--kv-events-config", orjson.dumps({**config, "endpoint": f"tcp://*:{port}"}).decode()
        )
        assert complete(sim, [9] * (BLOCK + 1)).status == 200
        assert port_free(port)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ('{"enable_kv_cache_events": true, "bogus": 1}', "'bogus'"),
        ('{"enable_kv_cache_events": "yes"}', "'enable_kv_cache_events'"),
        ('{"hwm": "many"}', "'hwm'"),
        ('{"buffer_steps": -1}', "'buffer_steps'"),
        ('{"publisher": "kafka"}', "'publisher'"),
        ('{"endpoint": 5557}', "'endpoint'"),
        ('{"enable_kv_cache_events": true', "not valid JSON"),
        ("[]", "must be a JSON object"),
    ],
)
def test_bad_config_exits_2_naming_the_key(value: str, named: str) -> None:
    argv = extproc_argv("sim", "--model", "m", "--port", str(free_port()), "--kv-events-config", value)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done
    assert "--kv-events-config" in done.stderr and named in done.stderr, done.stderr


def test_an_endpoint_in_use_exits_2_naming_it(start_events: Callable[..., Events]) -> None:
    ev = start_events()
    config = kv_config(ev.pub_port, free_port())
    argv = extproc_argv("sim", "--model", "m", "--port", str(free_port()), "--kv-events-config", config)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done
    assert "endpoint" in done.stderr and str(ev.pub_port) in done.stderr, done.stderr
    assert get(f"{ev.sim.base}/health").status == 200


# ----- the cache's side, without processes: cases a request sequence cannot reach reliably --------


def test_new_blocks_split_by_cached_ones_go_out_as_runs_with_their_parents() -> None:
    from extproc.sim.kvcache import KVCache

    cache = KVCache(6, 2)
    ids = list(range(100, 108))  # 4 blocks of 2 tokens
    cache.release(cache.allocate([1, 2, 3, 4], 0, 8, ids))  # LRU order: 4 3 2 1
    cache.release(cache.allocate([4], 0, 2, ids))  # 3 2 1 4
    cache.release(cache.allocate([2], 0, 2, ids))  # 3 1 4 2
    cache.events = []
    cache.release(cache.allocate([9], 0, 8, [0, 0]))  # holds 4 blocks: evicts 3, then 1
    assert [type(e).__name__ for e in cache.events] == ["BlockRemoved", "BlockStored"]
    assert cache.events[0].block_hashes == [3, 1]
    cache.events = []
    cache.allocate([1, 2, 3, 4], 0, 8, ids)
    runs = [(e.block_hashes, e.parent_block_hash, e.token_ids) for e in cache.events]
    assert runs == [([1], None, [100, 101]), ([3], 2, [104, 105])]


def test_reset_while_blocks_are_held_removes_only_what_it_dropped() -> None:
    from extproc.sim.kvcache import KVCache

    cache = KVCache(16, 2)
    cache.release(cache.allocate([1, 2], 0, 4, [1, 1, 2, 2]))
    held = cache.allocate([7, 8], 0, 4, [7, 7, 8, 8])
    cache.events = []
    assert cache.reset() == 2
    assert [(type(e).__name__, getattr(e, "block_hashes", None)) for e in cache.events] == [("BlockRemoved", [2, 1])]
    assert held is not None
    cache.release(held)
    cache.events = []
    cache.reset()
    assert [type(e).__name__ for e in cache.events] == ["AllBlocksCleared"]
