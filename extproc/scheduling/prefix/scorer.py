"""The ``prefix`` scorer plugin: prefix affinity, with its own hashing, index, settings and metrics.

Everything prefix routing knows lives here, behind the framework's generic hooks: the scheduler calls
``score`` (hash the prompt, look its blocks up), ``on_picked`` (record the blocks on the pick),
``forget_endpoint`` and ``collect_metrics``, and knows nothing else about it. A shared or event-fed index
replaces ``self.index`` without touching the scheduler. With no prefix scorer configured, no prompt is
hashed at all.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from extproc.datalayer.endpoint import EndpointState
from extproc.scheduling.framework import SchedulingContext, register_scorer
from extproc.scheduling.prefix.hashing import prompt_hashes
from extproc.scheduling.prefix.index import PrefixIndex
from extproc.scheduling.prefix.metrics import RatioHistograms, index_metrics

_LIMIT = struct.Struct("<I")  # a shared record: the index limit (0 = none), then the hashes as uint64 LE
_LITTLE = sys.byteorder == "little"


def _at_least(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@register_scorer("prefix")
class PrefixScorer:
    """Prefix affinity weighted by the work it saves: ``matched / max(prompt_blocks, min_blocks)``.

    GIE scores ``matched / prompt_blocks``. For a short prompt that ratio is all or nothing: every
    repeat of the same short text scores 1.0 on the endpoint that served it first and piles onto it
    (GIE issue 2561), although reusing one or two cached blocks saves almost no prefill. Here the
    denominator never drops below ``min_blocks``, so

    - prompts of at least ``min_blocks`` blocks score exactly GIE's ratio (the fraction of prefill
      skipped);
    - shorter prompts score their matched blocks over ``min_blocks``, i.e. the absolute work saved
      relative to a prefix long enough to be worth a queue position; identical short prompts then get a
      small tie-breaking bonus and are spread by the load scorers.

    ``min_blocks=1`` gives GIE's ratio-only score. The default, 16 blocks of 64 characters (about
    256 tokens), makes a fully matched prompt outweigh the queue scorer's full swing (default weights 4 vs 2)
    only from 9 matched blocks (~140 tokens) on; below that, load decides and affinity breaks ties.

    Params: ``block_chars`` characters per block (~16 tokens at the default 64), ``max_prompt_blocks``
    leading blocks of a prompt that are hashed, ``max_blocks`` blocks remembered per endpoint (LRU) at most.
    With ``capacity_aware`` an endpoint that exports its KV capacity (``vllm:cache_config_info``) is
    remembered for at most what fits in it, at ``chars_per_token`` characters per token: a replica with
    16,000 tokens of cache cannot still hold 16,384 blocks of 16 tokens, and believing it does sends
    requests after prefixes it has long evicted.
    """

    def __init__(
        self,
        min_blocks: int = 16,
        block_chars: int = 64,
        max_blocks: int = 16384,
        max_prompt_blocks: int = 256,
        capacity_aware: bool = True,
        chars_per_token: float = 4.0,
    ) -> None:
        self.min_blocks = _at_least("min_blocks", min_blocks, 1)
        self.block_chars = _at_least("block_chars", block_chars, 8)
        self.max_prompt_blocks = _at_least("max_prompt_blocks", max_prompt_blocks, 1)
        self.index = PrefixIndex(_at_least("max_blocks", max_blocks, 1))
        if not isinstance(capacity_aware, bool):
            raise ValueError(f"capacity_aware must be true or false, got {capacity_aware!r}")
        if isinstance(chars_per_token, bool) or not isinstance(chars_per_token, int | float) or chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be a number above 0, got {chars_per_token!r}")
        # index blocks per token of KV capacity; 0 = capacity ignored
        self._blocks_per_token = chars_per_token / self.block_chars if capacity_aware else 0.0
        self.hit_ratio = RatioHistograms()  # per pool: share of the prompt's blocks found on the pick

    def hashes(self, text: str, model: str) -> tuple[int, ...]:
        """The chained block hashes of a prompt, with this scorer's block size and bound."""
        return prompt_hashes(text, model, self.block_chars, self.max_prompt_blocks)

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        request = ctx.request
        hashes = self.hashes(request.prompt, request.target_model) if request.prompt else ()
        if not hashes:
            return [0.0] * len(candidates)
        matches = self.index.match(hashes, [e.address for e in candidates])
        ctx.state[self] = (hashes, matches)
        denominator = float(max(len(hashes), self.min_blocks))
        return [matches[e.address] / denominator for e in candidates]

    def on_picked(self, ctx: SchedulingContext, endpoint: EndpointState) -> None:
        looked_up = ctx.state.get(self)
        if looked_up is None:
            return
        hashes, matches = looked_up
        self.index.record(endpoint.address, hashes, self._limit(endpoint))
        self.hit_ratio.observe(ctx.request.pool, matches.get(endpoint.address, 0) / len(hashes))

    def forget_endpoint(self, address: str) -> None:
        self.index.purge(address)

    # Shared with the other replicas (state.backend: redis): what on_picked recorded, and its bound.
    share_kind = "prefix"

    def shared_record(self, ctx: SchedulingContext, endpoint: EndpointState) -> Any | None:
        looked_up = ctx.state.get(self)
        if looked_up is None:
            return None
        return looked_up[0], self._limit(endpoint)

    def encode_shared(self, record: Any) -> bytes:
        hashes, limit = record
        blocks = array("Q", hashes)
        if not _LITTLE:
            blocks.byteswap()
        return _LIMIT.pack(limit or 0) + blocks.tobytes()

    def apply_shared(self, address: str, payload: bytes) -> None:
        if len(payload) < _LIMIT.size + 8 or (len(payload) - _LIMIT.size) % 8:
            raise ValueError(f"a prefix record is 4 bytes of limit and 8 per block hash, got {len(payload)} bytes")
        (limit,) = _LIMIT.unpack_from(payload)
        blocks = array("Q")
        blocks.frombytes(payload[_LIMIT.size :])
        if not _LITTLE:
            blocks.byteswap()
        if len(blocks) > self.max_prompt_blocks:
            raise ValueError(f"{len(blocks)} blocks in a prefix record, more than max_prompt_blocks")
        self.index.record(address, blocks.tolist(), limit or None)

    def _limit(self, endpoint: EndpointState) -> int | None:
        capacity = endpoint.cache_tokens
        return int(capacity * self._blocks_per_token) if capacity and self._blocks_per_token else None

    def collect_metrics(self, members: Mapping[str, Sequence[str]]) -> Iterable[Any]:
        yield from index_metrics(self.index, members)
        yield self.hit_ratio.family(
            "inference_extension_prefix_indexer_hit_ratio",
            "Share of a prompt's blocks the prefix index placed on the picked endpoint, per request (GIE name; "
            "name = pool).",
            "name",
        )
