"""The simulated GPU KV cache: fixed-size blocks, chained-hash prefix reuse, LRU eviction.

It follows vLLM's v1 block manager closely enough for routing to behave as it would on vLLM:

- capacity is ``num_blocks`` blocks of ``block_size`` tokens;
- a prompt block is reusable only if it and every block before it are cached (chained hashes);
- blocks held by running requests are never evicted; blocks nobody holds stay cached and are
  evicted least-recently-used first, the tail of a prompt before its head;
- usage, as in ``vllm:kv_cache_usage_perc``, counts only blocks held by running requests.

With ``events`` set to a list, the cache also records vLLM's KV-cache events into it (BlockStored,
BlockRemoved, AllBlocksCleared) for the engine to publish once per step; with ``events`` None (the
default) it records nothing and pays for nothing but a None check.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.sim.kv_events import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass
class Allocation:
    """The blocks one request holds."""

    hashed: list[int] = field(default_factory=list)  # prompt blocks, shared and reusable
    anonymous: int = 0  # blocks for the tail of the prompt and generated tokens
    cached_blocks: int = 0  # how many leading prompt blocks were already in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.hashed) + self.anonymous


class KVCache:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs: dict[int, int] = {}  # hash -> number of running requests holding it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; LRU first
        self._held = 0  # blocks held by running requests (hashed once each, plus anonymous)
        self.evictions = 0
        self.events: list[KVEvent] | None = None  # a list: record KV-cache events into it

    @property
    def held_blocks(self) -> int:
        return self._held

    @property
    def cached_blocks(self) -> int:
        """Blocks that carry a reusable prefix, held or not."""
        return len(self._refs) + len(self._evictable)

    @property
    def usage(self) -> float:
        return self._held / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` are cached."""
        n = 0
        refs, evictable = self._refs, self._evictable
        for h in hashes:
            if h in refs or h in evictable:
                n += 1
            else:
                break
        return n

    def allocate(
        self,
        hashes: list[int],
        lookup_blocks: int,
        num_tokens: int,
        token_ids: Sequence[int] | None = None,
    ) -> Allocation | None:
        """Hold blocks for a request of ``num_tokens`` tokens whose full prompt blocks are ``hashes``.

        Only the first ``lookup_blocks`` hashes may count as cache hits (vLLM always recomputes at
        least the last prompt token). Returns None, changing nothing, when the free space is short.
        ``token_ids`` are the ids of the tokens ``hashes`` cover (a list or a numpy array); they are
        needed only when events are recorded, for the BlockStored of the blocks that are new.
        """
        hit = self.match(hashes[:lookup_blocks])
        total = self.blocks_for(num_tokens)
        revived = sum(1 for h in hashes[:hit] if h not in self._refs)
        # New hashed blocks may already exist out of chain order; they are revived, not added.
        fresh_hashed = [h for h in hashes[hit:] if h not in self._refs and h not in self._evictable]
        revived += sum(1 for h in hashes[hit:] if h in self._evictable)
        anonymous = max(0, total - len(hashes))
        needed = revived + len(fresh_hashed) + anonymous
        if self._held + needed > self.num_blocks:
            return None
        refs, evictable, events = self._refs, self._evictable, self.events
        stored = None
        if fresh_hashed and events is not None:
            stored = self._stored_events(hashes, hit, len(fresh_hashed), token_ids)
        for h in hashes:
            count = refs.get(h)
            if count is None:
                evictable.pop(h, None)
                refs[h] = 1
            else:
                refs[h] = count + 1
        self._held += needed
        self._evict_overflow()
        if stored is not None and events is not None:
            # After the evictions that made room, as in vLLM: it evicts when it takes free blocks for a
            # request and announces them as stored once their tokens are computed.
            events.extend(stored)
        return Allocation(hashed=list(hashes), anonymous=anonymous, cached_blocks=hit)

    def _stored_events(
        self, hashes: list[int], hit: int, fresh: int, token_ids: Sequence[int] | None
    ) -> list[BlockStored]:
        """One BlockStored per run of consecutive blocks that are not cached yet, each with its parent.

        Call before the blocks are added. There is usually one run (the uncached tail of the prompt);
        a block evicted from the middle of a chain whose tail survived splits it.
        """
        if token_ids is None:
            raise ValueError("KV-cache events need the prompt's token ids: pass token_ids to allocate()")
        refs, evictable, size = self._refs, self._evictable, self.block_size
        runs: list[tuple[int, int]] = []
        if fresh == len(hashes) - hit:  # the usual case: everything after the hit is new, one run
            runs.append((hit, len(hashes)))
        else:
            new = [i for i in range(hit, len(hashes)) if hashes[i] not in refs and hashes[i] not in evictable]
            start = prev = new[0]
            for i in new[1:]:
                if i != prev + 1:
                    runs.append((start, prev + 1))
                    start = i
                prev = i
            runs.append((start, prev + 1))
        events: list[BlockStored] = []
        for start, stop in runs:
            chunk = token_ids[start * size : stop * size]
            ids = chunk.tolist() if hasattr(chunk, "tolist") else list(chunk)  # numpy ints do not encode
            parent = hashes[start - 1] if start else None
            events.append(BlockStored(hashes[start:stop], parent, ids, size, None, MEDIUM_GPU, None))
        return events

    def grow(self, allocation: Allocation, num_tokens: int) -> bool:
        """Make room for a request that now has ``num_tokens`` tokens; False if the cache is full."""
        extra = self.blocks_for(num_tokens) - allocation.num_blocks
        if extra <= 0:
            return True
        if self._held + extra > self.num_blocks:
            return False
        allocation.anonymous += extra
        self._held += extra
        self._evict_overflow()
        return True

    def release(self, allocation: Allocation) -> None:
        """Give a finished (or preempted) request's blocks back; its prompt blocks stay cached."""
        refs, evictable = self._refs, self._evictable
        # Tail blocks go in first so that they are evicted before the head of the same prompt.
        for h in reversed(allocation.hashed):
            count = refs[h] - 1
            if count:
                refs[h] = count
            else:
                del refs[h]
                evictable[h] = None
                self._held -= 1
        self._held -= allocation.anonymous
        allocation.hashed = []
        allocation.anonymous = 0
        self._evict_overflow()

    def reset(self) -> int:
        """Drop every unheld cached block (vLLM's reset_prefix_cache); returns how many.

        The event says what happened: AllBlocksCleared when nothing reusable is left, as after vLLM's
        reset; while running requests hold blocks (vLLM would refuse the reset) they stay cached, so
        the dropped blocks go out as a BlockRemoved and a subscriber's view still matches the cache.
        """
        n = len(self._evictable)
        events = self.events
        if events is not None:
            if not self._refs:
                events.append(AllBlocksCleared())
            elif n:
                events.append(BlockRemoved(list(self._evictable), MEDIUM_GPU))
        self._evictable.clear()
        return n

    def _evict_overflow(self) -> None:
        evictable, events = self._evictable, self.events
        if events is None:
            while evictable and self._held + len(evictable) > self.num_blocks:
                evictable.popitem(last=False)
                self.evictions += 1
            return
        removed: list[int] = []
        while evictable and self._held + len(evictable) > self.num_blocks:
            removed.append(evictable.popitem(last=False)[0])
            self.evictions += 1
        if removed:
            events.append(BlockRemoved(removed, MEDIUM_GPU))  # one per eviction round, vLLM one per block
