"""The simulated GPU KV cache: fixed-size blocks, chained-hash prefix reuse, LRU eviction.

It follows vLLM's v1 block manager closely enough for routing to behave as it would on vLLM:

- capacity is ``num_blocks`` blocks of ``block_size`` tokens;
- a prompt block is reusable only if it and every block before it are cached (chained hashes);
- blocks held by running requests are never evicted; blocks nobody holds stay cached and are
  evicted least-recently-used first, the tail of a prompt before its head;
- usage, as in ``vllm:kv_cache_usage_perc``, counts only blocks held by running requests.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


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

    def allocate(self, hashes: list[int], lookup_blocks: int, num_tokens: int) -> Allocation | None:
        """Hold blocks for a request of ``num_tokens`` tokens whose full prompt blocks are ``hashes``.

        Only the first ``lookup_blocks`` hashes may count as cache hits (vLLM always recomputes at
        least the last prompt token). Returns None, changing nothing, when the free space is short.
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
        refs, evictable = self._refs, self._evictable
        for h in hashes:
            count = refs.get(h)
            if count is None:
                evictable.pop(h, None)
                refs[h] = 1
            else:
                refs[h] = count + 1
        self._held += needed
        self._evict_overflow()
        return Allocation(hashed=list(hashes), anonymous=anonymous, cached_blocks=hit)

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
        """Drop every unheld cached block (vLLM's reset_prefix_cache); returns how many."""
        n = len(self._evictable)
        self._evictable.clear()
        return n

    def _evict_overflow(self) -> None:
        evictable = self._evictable
        while evictable and self._held + len(evictable) > self.num_blocks:
            evictable.popitem(last=False)
            self.evictions += 1
