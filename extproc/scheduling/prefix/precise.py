"""The ``precise_prefix`` scorer: prefix affinity from what each engine reports it holds (KV-cache events).

For an endpoint whose event stream is live, a request's prompt tokens (rendered by the engine's own
tokenizer and chat template, ``extproc/datalayer/render.py``) are hashed in the engine's block size and
looked up in ``KvBlockIndex``: the match is what the engine really holds, evictions included. Between a pick
and the engine's BlockStored for it (a prefill takes a while) a burst of the same prefix would see nothing,
so each pick is also held *speculatively* on its endpoint for ``speculative_ttl`` seconds.

For an endpoint whose stream is unknown (not connected, never heard from, a gap that could not be replayed)
or when the request's tokens are not available, the score comes from an embedded approximate ``prefix``
scorer, which keeps learning from every pick so it is warm when it is needed. Both scores are the fraction
of the prompt's blocks an endpoint holds, so they compare.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from extproc.datalayer.endpoint import EndpointState
from extproc.hf_tokenizer import HfTokenizer, TokenizerError
from extproc.scheduling.framework import SchedulingContext, register_scorer
from extproc.scheduling.prefix.kv_index import KvBlockIndex, token_block_hashes
from extproc.scheduling.prefix.metrics import RatioHistograms
from extproc.scheduling.prefix.scorer import PrefixScorer


def _number(name: str, value: object, low: float, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < low:
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {what} >= {low}, got {value!r}")
    return value


def _port(name: str, value: object) -> int | None:
    if value is None:
        return None
    return int(_number(name, value, 1, integer=True))


class _Speculative:
    """Blocks recently routed to an endpoint and not yet confirmed by its engine, each until an expiry."""

    __slots__ = ("_expiry", "_queue", "ttl")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._expiry: dict[tuple[int, str], float] = {}
        self._queue: deque[tuple[float, str, Sequence[int]]] = deque()

    def record(self, address: str, hashes: Sequence[int], now: float) -> None:
        until = now + self.ttl
        expiry = self._expiry
        for h in hashes:
            expiry[h, address] = until
        self._queue.append((until, address, hashes))
        queue = self._queue
        while queue and queue[0][0] <= now:
            until, old_address, old = queue.popleft()
            for h in old:
                key = (h, old_address)
                if expiry.get(key, 0.0) <= now:
                    expiry.pop(key, None)

    def extend(self, address: str, hashes: Sequence[int], start: int, now: float) -> int:
        """How far the run of blocks held from ``start`` on extends with unexpired speculative blocks."""
        expiry = self._expiry
        n = start
        for h in hashes[start:]:
            if expiry.get((h, address), 0.0) > now:
                n += 1
            else:
                break
        return n

    def forget(self, address: str) -> None:
        for key in [k for k in self._expiry if k[1] == address]:
            del self._expiry[key]


@register_scorer("precise_prefix")
class PrecisePrefixScorer:
    """Prefix affinity from the engines' KV-cache events; the approximate index where a stream is unknown.

    Params: ``port`` (the engines' event port, vLLM's default 5557) or ``port_offset`` (the endpoint's port
    plus this, for several engines on one host); ``replay_port`` / ``replay_port_offset`` likewise for the
    replay socket (optional); ``topic`` (a ZMQ subscription prefix, "" for all); ``min_blocks`` as the
    ``prefix`` scorer; ``max_prompt_blocks`` leading blocks looked up; ``max_blocks`` per endpoint until its
    capacity is known; ``speculative_ttl`` seconds a pick counts before the engine confirms it;
    ``render_timeout`` seconds to wait for the engine's tokenization before scoring without tokens;
    ``render_cache`` tokenized prompts kept; ``tokenizer``: a model directory (or its ``tokenizer.json``) to
    tokenize with here instead of the render round trip, for every pool, or a mapping pool -> directory;
    ``replay_window`` batches of history replayed when a stream is
    first heard (a picker start, an engine restart); ``fallback``: params of the embedded ``prefix`` scorer.
    """

    needs_tokens = True  # the director renders the prompt through an engine before scheduling

    def __init__(
        self,
        min_blocks: int = 16,
        port: int | None = 5557,
        port_offset: int | None = None,
        replay_port: int | None = None,
        replay_port_offset: int | None = None,
        topic: str = "",
        max_prompt_blocks: int = 1024,
        max_blocks: int = 1 << 20,
        speculative_ttl: float = 2.0,
        render_timeout: float = 0.25,
        render_cache: int = 2048,
        tokenizer: str | Mapping[str, str] | None = None,
        replay_window: int = 2000,
        fallback: Mapping[str, Any] | None = None,
    ) -> None:
        self.min_blocks = int(_number("min_blocks", min_blocks, 1, integer=True))
        self.port_offset = port_offset if port_offset is None else int(_number("port_offset", port_offset, 1, True))
        self.port = None if self.port_offset is not None else _port("port", port)
        if self.port is None and self.port_offset is None:
            raise ValueError("set port (the engines' KV-event port, e.g. 5557) or port_offset")
        self.replay_port_offset = (
            replay_port_offset
            if replay_port_offset is None
            else int(_number("replay_port_offset", replay_port_offset, 1, integer=True))
        )
        self.replay_port = None if self.replay_port_offset is not None else _port("replay_port", replay_port)
        if not isinstance(topic, str):
            raise ValueError(f"topic must be a string, got {topic!r}")
        self.topic = topic
        self.max_prompt_blocks = int(_number("max_prompt_blocks", max_prompt_blocks, 1, integer=True))
        self.index = KvBlockIndex(int(_number("max_blocks", max_blocks, 1, integer=True)))
        self.speculative = _Speculative(float(_number("speculative_ttl", speculative_ttl, 0)))
        self.render_timeout = float(_number("render_timeout", render_timeout, 0.001))
        self.render_cache = int(_number("render_cache", render_cache, 0, integer=True))
        self.tokenizers = _load_tokenizers(tokenizer)
        self.replay_window = int(_number("replay_window", replay_window, 0, integer=True))
        if fallback is not None and not isinstance(fallback, Mapping):
            raise ValueError(f"fallback must be a mapping of prefix scorer params, got {fallback!r}")
        self.approximate = PrefixScorer(**dict(fallback or {}))
        self.live: set[str] = set()  # endpoints whose event stream is connected and in sequence
        self.hit_ratio = RatioHistograms()
        self.scored = {"precise": 0, "approximate": 0}  # candidates scored each way

    def named_pools(self) -> Mapping[str, Iterable[str]]:
        return {"tokenizer": [pool for pool in self.tokenizers if pool is not None]}

    # ----- the event subscriber's side ---------------------------------------------------------------

    def event_address(self, address: str, replay: bool = False) -> tuple[str, int] | None:
        """Where ``address``'s engine publishes its events (or answers replays): host and port."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        fixed, offset = (self.replay_port, self.replay_port_offset) if replay else (self.port, self.port_offset)
        if offset is not None:
            return host, int(port) + offset
        return (host, fixed) if fixed is not None else None

    def set_live(self, address: str, live: bool) -> None:
        if live:
            self.live.add(address)
        else:
            self.live.discard(address)

    # ----- scoring -------------------------------------------------------------------------------------

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        approximate = self.approximate.score(ctx, candidates)  # also keeps the fallback index learning
        tokens = ctx.request.token_ids
        live = [e for e in candidates if e.address in self.live and self.index.block_size(e.address)]
        if tokens is None or not live:
            self.scored["approximate"] += len(candidates)
            return approximate
        by_size: dict[int, list[int]] = {}
        matched: dict[str, tuple[list[int], int]] = {}
        for e in live:
            size = self.index.block_size(e.address)
            assert size is not None
            hashes = by_size.get(size)
            if hashes is None:
                hashes = by_size[size] = token_block_hashes(_as_array(tokens), size, self.max_prompt_blocks)
            matched[e.address] = (hashes, 0)
        for hashes in by_size.values():
            addresses = [a for a, (h, _) in matched.items() if h is hashes]
            found = self.index.match(hashes, addresses)
            for address in addresses:
                n = self.speculative.extend(address, hashes, found[address], ctx.now)
                matched[address] = (hashes, n)
        ctx.state[self] = matched
        scores = []
        for e, fallback_score in zip(candidates, approximate, strict=True):
            got = matched.get(e.address)
            if got is None:
                scores.append(fallback_score)
            else:
                hashes, n = got
                scores.append(n / max(len(hashes), self.min_blocks) if hashes else 0.0)
        self.scored["precise"] += len(matched)
        self.scored["approximate"] += len(candidates) - len(matched)
        return scores

    def on_picked(self, ctx: SchedulingContext, endpoint: EndpointState) -> None:
        self.approximate.on_picked(ctx, endpoint)
        matched = ctx.state.get(self)
        if not matched:
            return
        got = matched.get(endpoint.address)
        if got is None:
            return
        hashes, n = got
        if hashes:
            self.speculative.record(endpoint.address, hashes, ctx.now)
            self.hit_ratio.observe(ctx.request.pool, n / len(hashes))

    # With state.backend: redis the replicas share the fallback index's records (each reads the events itself).
    share_kind = "prefix"

    def shared_record(self, ctx: SchedulingContext, endpoint: EndpointState) -> Any | None:
        return self.approximate.shared_record(ctx, endpoint)

    def encode_shared(self, record: Any) -> bytes:
        return self.approximate.encode_shared(record)

    def apply_shared(self, address: str, payload: bytes) -> None:
        self.approximate.apply_shared(address, payload)

    def forget_endpoint(self, address: str) -> None:
        self.approximate.forget_endpoint(address)
        self.index.forget(address)
        self.speculative.forget(address)
        self.live.discard(address)

    def collect_metrics(self, members: Mapping[str, Sequence[str]]) -> Iterable[Any]:
        yield from self.approximate.collect_metrics(members)
        blocks = GaugeMetricFamily(
            "extproc_precise_prefix_index_blocks",
            "Blocks the engines reported holding (KV-cache events), per endpoint.",
            labels=["pool", "endpoint"],
        )
        live = GaugeMetricFamily(
            "extproc_precise_prefix_live",
            "1 while the endpoint's KV-event stream is connected and in sequence (else the approximate index).",
            labels=["pool", "endpoint"],
        )
        for pool, addresses in members.items():
            for address in addresses:
                blocks.add_metric([pool, address], self.index.size(address))
                live.add_metric([pool, address], 1.0 if address in self.live else 0.0)
        yield blocks
        yield live
        yield self.hit_ratio.family(
            "extproc_precise_prefix_hit_ratio",
            "Share of a prompt's blocks the picked endpoint's engine held (or was just sent), per request.",
            "pool",
        )


def _load_tokenizers(given: str | Mapping[str, str] | None) -> dict[str | None, HfTokenizer]:
    """Pool name (None: every pool) -> its model's tokenizer, read once at start."""
    if given is None:
        return {}
    paths: Mapping[str | None, object] = {None: given} if isinstance(given, str) else given
    if not isinstance(paths, Mapping) or not paths:
        raise ValueError(f"tokenizer must be a model directory or a mapping pool -> directory, got {given!r}")
    loaded: dict[str | None, HfTokenizer] = {}
    for pool, path in paths.items():
        field = "tokenizer" if pool is None else f"tokenizer.{pool}"
        if not isinstance(path, str) or not path:
            raise ValueError(f"{field} must be a path (a model directory or its tokenizer.json), got {path!r}")
        try:
            loaded[pool] = HfTokenizer.load(path)
        except TokenizerError as exc:
            raise ValueError(f"{field}: {exc}") from None
    return loaded


def _as_array(tokens: Sequence[int]) -> array:
    return tokens if isinstance(tokens, array) else array("I", tokens)
