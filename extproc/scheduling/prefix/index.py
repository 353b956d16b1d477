"""The bounded prefix index: which endpoint recently received which prompt blocks.

An endpoint that recently served a prompt very likely still holds the KV-cache blocks of its prefix, so
sending a request whose prompt starts the same way there skips that part of the prefill. A lookup is a
longest-prefix walk over the chained hashes of ``hashing.prompt_hashes`` that stops at the first miss.

Everything here is pure and in memory; memory is bounded by ``max_blocks`` per endpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PrefixIndex:
    """Which endpoint recently received which prompt blocks: a bounded LRU per endpoint.

    ``_lru[address]`` holds that endpoint's block hashes, least recently used first, at most
    ``max_blocks`` of them. ``_holders[hash]`` is a bit mask of the endpoints holding a block (each
    endpoint owns one bit while it is indexed), kept consistent with the LRUs, so one dict lookup and
    one integer ``&`` test a block against every candidate at once, whatever the pool size. Masks
    rather than sets of addresses also keep the global map out of the garbage collector's sight (a
    dict of ints is not tracked), so a large index does not make full collections slower.

    Memory is bounded by ``max_blocks`` times the number of endpoints; ``purge`` drops an endpoint
    that left the pool and frees its bit.
    """

    __slots__ = ("_bit", "_free", "_holders", "_lru", "_owner", "max_blocks")

    def __init__(self, max_blocks: int = 16384) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self.max_blocks = max_blocks
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, int] = {}  # block hash -> bit mask of endpoints holding it
        self._bit: dict[str, int] = {}  # address -> its bit (a power of two)
        self._owner: dict[int, str] = {}  # bit -> address
        self._free: list[int] = []  # bits released by purge, reused first

    def match(self, hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """For each candidate address, how many *leading* blocks of ``hashes`` it holds.

        ``record`` keeps every endpoint's blocks of a chain prefix-closed (see there), so the set of
        candidates holding block ``i`` only shrinks as ``i`` grows. The walk therefore binary-searches
        for the few places where that set changes instead of testing every block: O(log n) lookups per
        distinct match length, instead of one per matched block (a 250-block prompt: ~10 lookups
        rather than 250). The result is the same as the block-by-block walk that stops at each
        endpoint's first miss (``tests/test_prefix.py`` checks it against one).
        """
        result = dict.fromkeys(candidates, 0)
        if not hashes:
            return result
        bits = self._bit
        wanted = 0
        for address in result:
            wanted |= bits.get(address, 0)
        if not wanted:
            return result
        holders = self._holders.get
        n = len(hashes)
        active = holders(hashes[0], 0) & wanted
        i = 0  # invariant: exactly the endpoints in ``active`` hold blocks 0..i
        while active:
            # the last block j >= i that every endpoint in ``active`` holds
            lo, hi = i, n - 1
            while lo < hi:
                mid = (lo + hi + 1) >> 1
                if holders(hashes[mid], 0) & active == active:
                    lo = mid
                else:
                    hi = mid - 1
            if lo == n - 1:
                self._assign(result, active, n)
                break
            still = holders(hashes[lo + 1], 0) & active
            self._assign(result, active & ~still, lo + 1)
            active, i = still, lo + 1
        return result

    def _assign(self, result: dict[str, int], mask: int, depth: int) -> None:
        owner = self._owner
        while mask:
            low = mask & -mask
            result[owner[low]] = depth
            mask ^= low

    def record(self, address: str, hashes: Sequence[int], limit: int | None = None) -> None:
        """Remember that ``address`` now holds these blocks; evict its least recently used beyond the bound.

        The bound is ``max_blocks``, or ``limit`` when smaller: what the endpoint can really hold (its KV
        capacity), so the index never believes it still holds what it must have evicted.

        ``hashes`` must be a whole chain from the prompt's first block, as ``prompt_hashes`` makes.
        Blocks are touched last to first, so the head of a prompt is the most recent: under
        pressure a prompt loses its tail before its head (as vLLM evicts), and a shared head such
        as a system prompt, refreshed by every request using it, survives longest. It also keeps
        each endpoint's blocks prefix-closed (holding block i implies holding blocks 0..i-1 of its
        chain: every touch of block i is followed by a touch of block i-1), which ``match`` relies on.
        """
        if not hashes:
            return
        lru = self._lru.get(address)
        if lru is None:
            lru = self._lru[address] = OrderedDict()
            bit = self._free.pop() if self._free else 1 << len(self._bit)
            self._bit[address] = bit
            self._owner[bit] = address
        else:
            bit = self._bit[address]
        holders = self._holders
        get = holders.get
        touch = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                touch(h)
            else:
                lru[h] = None
                holders[h] = get(h, 0) | bit
        bound = self.max_blocks if limit is None else max(1, min(limit, self.max_blocks))
        for _ in range(len(lru) - bound):
            old, _none = lru.popitem(last=False)
            self._drop(old, bit)

    def purge(self, address: str) -> int:
        """Forget everything about ``address`` (an endpoint that left the pool); returns blocks dropped."""
        lru = self._lru.pop(address, None)
        if lru is None:
            return 0
        bit = self._bit.pop(address)
        del self._owner[bit]
        for h in lru:
            self._drop(h, bit)
        self._free.append(bit)
        return len(lru)

    def _drop(self, h: int, bit: int) -> None:
        mask = self._holders.get(h, 0) & ~bit
        if mask:
            self._holders[h] = mask
        else:
            self._holders.pop(h, None)

    def holders(self, h: int) -> list[str]:
        """Endpoints holding block ``h`` (for tests and debugging)."""
        return sorted(address for bit, address in self._owner.items() if self._holders.get(h, 0) & bit)

    def size(self, address: str) -> int:
        """Blocks remembered for one endpoint."""
        lru = self._lru.get(address)
        return 0 if lru is None else len(lru)

    def total_blocks(self) -> int:
        """Blocks remembered over all endpoints (a block held by two endpoints counts twice)."""
        return sum(len(lru) for lru in self._lru.values())

    def distinct_blocks(self) -> int:
        """Distinct block hashes in the index."""
        return len(self._holders)

    def addresses(self) -> list[str]:
        """Endpoints the index remembers anything for."""
        return list(self._lru)
