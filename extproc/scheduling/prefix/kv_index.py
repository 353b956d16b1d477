"""What each endpoint's KV cache holds, as its engine reported it (vLLM's KV-cache events).

The approximate index (``index.py``) remembers what the picker *sent* where and forgets by its own LRU; this
one holds what each engine *stored* and *evicted*, so it is right under cache pressure, when the guess goes
stale. Engine block hashes are opaque (their algorithm and seed differ across vLLM versions and settings), so
every stored block is re-keyed at ingestion by this module's own chained hash over the block's token ids
(``token_block_hashes``); a request's prompt tokens hash the same way, with the block size the engine
reported. Pure and in memory: the event subscriber (``extproc/datalayer/kv_events.py``) feeds it, the
``precise_prefix`` scorer reads it.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

_hash = xxhash.xxh3_64_intdigest
ROOT = 0  # the seed of a chain's first block


def token_block_hashes(tokens: array, block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the leading full ``block_size``-token blocks of ``tokens`` (an ``array('I')``)."""
    full = min(len(tokens) // block_size, max_blocks)
    if not full:
        return []
    data = tokens[: full * block_size].tobytes()
    step = block_size * tokens.itemsize
    out: list[int] = []
    h = ROOT
    for start in range(0, full * step, step):
        h = _hash(data[start : start + step], h)
        out.append(h)
    return out


@dataclass(slots=True)
class IngestStats:
    stored: int = 0  # blocks added by BlockStored
    removed: int = 0  # blocks dropped by BlockRemoved
    cleared: int = 0  # AllBlocksCleared events (or engine restarts)
    orphans: int = 0  # stored blocks whose parent this index never saw (missed events): not indexed
    unknown_removals: int = 0  # removals of blocks this index did not hold
    malformed: int = 0  # events whose token ids do not fill their blocks
    evicted_over_limit: int = 0  # blocks dropped because an endpoint held more than its capacity


@dataclass(slots=True)
class _Endpoint:
    bit: int
    limit: int
    block_size: int | None = None
    # engine hash -> our hash, oldest first; an OrderedDict because dropping the oldest of a plain dict
    # rescans the deleted slots at its front: quadratic once an endpoint sits at its bound
    engine: OrderedDict[Hashable, int] = field(default_factory=OrderedDict)
    ours: dict[int, int] = field(default_factory=dict)  # our hash -> engine blocks mapping to it


class KvBlockIndex:
    """Per endpoint, the blocks its engine holds, keyed by our hash; ``match`` walks a prompt's chain.

    ``_holders[hash]`` is a bit mask of the endpoints holding that block (as in the approximate index), so a
    lookup tests every candidate with one dict access per block. Memory is bounded per endpoint by
    ``set_limit`` (its KV capacity in blocks, from ``vllm:cache_config_info``) or ``max_blocks``: an engine
    never holds more, so more means missed removals, and the oldest are dropped (counted).
    """

    def __init__(self, max_blocks: int = 1 << 20) -> None:
        self.max_blocks = max_blocks
        self.stats = IngestStats()
        self._endpoints: dict[str, _Endpoint] = {}
        self._holders: dict[int, int] = {}
        self._free_bits: list[int] = []
        self._next_bit = 1

    # ----- ingestion (the event subscriber) ----------------------------------------------------------

    def stored(
        self,
        address: str,
        engine_hashes: Sequence[Hashable],
        parent: Hashable | None,
        token_ids: Sequence[int],
        block_size: int,
    ) -> int:
        """A BlockStored event; returns the blocks indexed."""
        if block_size < 1 or len(token_ids) != block_size * len(engine_hashes):
            self.stats.malformed += 1
            return 0
        ep = self._endpoint(address)
        if parent is None:
            h = ROOT
        else:
            found = ep.engine.get(parent)
            if found is None:
                self.stats.orphans += len(engine_hashes)
                return 0
            h = found
        ep.block_size = block_size
        data = array("I", token_ids).tobytes()
        step = block_size * 4
        holders, bit, engine, ours = self._holders, ep.bit, ep.engine, ep.ours
        added = 0
        for i, engine_hash in enumerate(engine_hashes):
            h = _hash(data[i * step : (i + 1) * step], h)
            previous = engine.get(engine_hash)
            if previous is not None:  # stored again (a replay, an at-least-once resend)
                if previous == h:
                    continue
                self._release(ep, previous)
            engine[engine_hash] = h
            count = ours.get(h, 0)
            if not count:
                holders[h] = holders.get(h, 0) | bit
            ours[h] = count + 1
            added += 1
        self.stats.stored += added
        while len(engine) > ep.limit:
            self._release(ep, engine.popitem(last=False)[1])
            self.stats.evicted_over_limit += 1
        return added

    def removed(self, address: str, engine_hashes: Iterable[Hashable]) -> int:
        """A BlockRemoved event; returns the blocks dropped."""
        ep = self._endpoints.get(address)
        dropped = 0
        for engine_hash in engine_hashes:
            ours = ep.engine.pop(engine_hash, None) if ep is not None else None
            if ours is None:
                self.stats.unknown_removals += 1
                continue
            self._release(ep, ours)  # type: ignore[arg-type]
            dropped += 1
        self.stats.removed += dropped
        return dropped

    def cleared(self, address: str) -> None:
        """AllBlocksCleared, or the engine restarted: it holds nothing now."""
        ep = self._endpoints.get(address)
        self.stats.cleared += 1
        if ep is None:
            return
        holders, clear = self._holders, ~ep.bit
        for h in ep.ours:
            mask = holders.get(h, 0) & clear
            if mask:
                holders[h] = mask
            else:
                holders.pop(h, None)
        ep.engine.clear()
        ep.ours.clear()

    def forget(self, address: str) -> None:
        """The endpoint left every pool: drop its blocks and free its bit."""
        if address in self._endpoints:
            self.cleared(address)
            self.stats.cleared -= 1  # not an engine's event
            self._free_bits.append(self._endpoints.pop(address).bit)

    def set_limit(self, address: str, blocks: int) -> None:
        """At most ``blocks`` blocks for ``address`` (its KV capacity)."""
        self._endpoint(address).limit = max(1, blocks)

    # ----- lookups (the request path) ----------------------------------------------------------------

    def match(self, hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """For each candidate, how many leading blocks of ``hashes`` its engine holds."""
        result = dict.fromkeys(candidates, 0)
        endpoints = self._endpoints
        active = 0
        owner: dict[int, str] = {}
        for address in result:
            ep = endpoints.get(address)
            if ep is not None:
                active |= ep.bit
                owner[ep.bit] = address
        if not active or not hashes:
            return result
        holders = self._holders
        for i, h in enumerate(hashes):
            still = holders.get(h, 0) & active
            if still != active:
                gone = active & ~still
                while gone:
                    bit = gone & -gone
                    result[owner[bit]] = i
                    gone ^= bit
                active = still
                if not active:
                    return result
        while active:
            bit = active & -active
            result[owner[bit]] = len(hashes)
            active ^= bit
        return result

    def block_size(self, address: str) -> int | None:
        ep = self._endpoints.get(address)
        return ep.block_size if ep is not None else None

    def size(self, address: str) -> int:
        ep = self._endpoints.get(address)
        return len(ep.engine) if ep is not None else 0

    def addresses(self) -> list[str]:
        return list(self._endpoints)

    # ----- internals ---------------------------------------------------------------------------------

    def _endpoint(self, address: str) -> _Endpoint:
        ep = self._endpoints.get(address)
        if ep is None:
            if self._free_bits:
                bit = self._free_bits.pop()
            else:
                bit, self._next_bit = self._next_bit, self._next_bit << 1
            ep = self._endpoints[address] = _Endpoint(bit=bit, limit=self.max_blocks)
        return ep

    def _release(self, ep: _Endpoint, h: int) -> None:
        count = ep.ours[h] - 1
        if count:
            ep.ours[h] = count
            return
        del ep.ours[h]
        mask = self._holders.get(h, 0) & ~ep.bit
        if mask:
            self._holders[h] = mask
        else:
            self._holders.pop(h, None)
