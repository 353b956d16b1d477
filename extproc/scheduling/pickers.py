"""Pickers: the order in which Envoy should try the candidates (the pick, then fallbacks)."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.datalayer.endpoint import EndpointState
from extproc.scheduling.framework import SchedulingContext, register_picker


@register_picker("max_score")
class MaxScore:
    """Highest total score first, the rest by score as fallbacks.

    Totals within ``tie_tolerance`` of each other count as a tie, and a tie goes to the endpoint picked
    least recently (then at random). With no prefix to follow, near-equal scores are the common case:
    breaking them in rotation spreads equal-cost requests as evenly as round robin does, where a random
    draw (or a fixed order) lets a burst between two scrapes bunch up on one endpoint.
    """

    def __init__(self, tie_tolerance: float = 0.2) -> None:
        if isinstance(tie_tolerance, bool) or not isinstance(tie_tolerance, int | float) or tie_tolerance < 0:
            raise ValueError(f"tie_tolerance must be a number >= 0, got {tie_tolerance!r}")
        self.tie_tolerance = float(tie_tolerance)
        self._last_pick: dict[str, int] = {}
        self._picks = 0

    def pick(
        self, ctx: SchedulingContext, candidates: Sequence[EndpointState], totals: Sequence[float], count: int
    ) -> list[int]:
        draw = ctx.rng.random
        last = self._last_pick
        step = self.tie_tolerance
        best = max(totals)
        keyed = sorted(
            (
                (best - t) // step if step else -t,  # totals in one tolerance band below the best tie
                last.get(c.address, -1),
                draw(),
                i,
            )
            for i, (t, c) in enumerate(zip(totals, candidates, strict=True))
        )
        order = [k[-1] for k in keyed[:count]]
        self._picks += 1
        last[candidates[order[0]].address] = self._picks
        return order


@register_picker("random")
class RandomPick:
    """Uniformly random order, ignoring scores: a baseline."""

    def pick(
        self, ctx: SchedulingContext, candidates: Sequence[EndpointState], totals: Sequence[float], count: int
    ) -> list[int]:
        return ctx.rng.sample(range(len(candidates)), min(count, len(candidates)))


@register_picker("round_robin")
class RoundRobin:
    """Each pool's candidates in turn (sorted by address, so the order is stable), ignoring scores.

    Stateful: one counter per pool, kept by this picker instance (one per Scheduler).
    """

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(
        self, ctx: SchedulingContext, candidates: Sequence[EndpointState], totals: Sequence[float], count: int
    ) -> list[int]:
        n = len(candidates)
        pool = ctx.request.pool
        turn = self._next.get(pool, 0)
        self._next[pool] = turn + 1
        order = sorted(range(n), key=lambda i: candidates[i].address)
        start = turn % n
        return [order[(start + k) % n] for k in range(min(count, n))]
