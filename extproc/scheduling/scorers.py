"""Scorers: how well each candidate would serve the request, in [0, 1] (1 = best)."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.scheduling.framework import SchedulingContext, register_scorer
from extproc.scheduling.types import EndpointState


def _fewer_is_better(values: Sequence[float]) -> list[float]:
    """Min/max normalisation as in GIE: the smallest value scores 1, the largest 0, all 1 when equal."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


@register_scorer("queue")
class QueueScorer:
    """Shorter queue is better: requests waiting at the last scrape plus those sent there since."""

    needs_prefix = False

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        return _fewer_is_better([e.waiting + e.pending for e in candidates])


@register_scorer("running")
class RunningScorer:
    """Fewer running requests is better (a proxy for decode batch size, i.e. inter-token latency)."""

    needs_prefix = False

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        return _fewer_is_better([e.running for e in candidates])


@register_scorer("kv_cache")
class KVCacheScorer:
    """More free KV cache is better: 1 - utilisation."""

    needs_prefix = False

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        return [1.0 - u if 0.0 <= u <= 1.0 else float(u < 0.0) for u in (e.kv_usage for e in candidates)]


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
    256 tokens), makes a fully matched prompt outweigh the queue scorer's full swing (default weights 3 vs 2)
    only from 11 matched blocks (~170 tokens) on; below that, load decides and affinity breaks ties.
    """

    needs_prefix = True

    def __init__(self, min_blocks: int = 16) -> None:
        if isinstance(min_blocks, bool) or not isinstance(min_blocks, int) or min_blocks < 1:
            raise ValueError(f"min_blocks must be an integer >= 1, got {min_blocks!r}")
        self.min_blocks = min_blocks

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        blocks = ctx.prompt_blocks
        if not blocks:
            return [0.0] * len(candidates)
        denominator = float(max(blocks, self.min_blocks))
        matches = ctx.prefix_matches
        return [matches.get(e.address, 0) / denominator for e in candidates]
