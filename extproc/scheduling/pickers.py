"""Pickers: the order in which Envoy should try the candidates (the pick, then fallbacks)."""

from __future__ import annotations

from collections.abc import Sequence

from extproc.scheduling.plugins import SchedulingContext, register_picker
from extproc.scheduling.types import EndpointState


@register_picker("max_score")
class MaxScore:
    """Highest total score first, the rest by score as fallbacks; ties broken at random.

    Random tie-breaking matters: with equal scores (an idle pool, no prefix match) a fixed order would
    send a burst between two scrapes to the same endpoint until ``pending`` tips the queue score.
    """

    def pick(
        self, ctx: SchedulingContext, candidates: Sequence[EndpointState], totals: Sequence[float], count: int
    ) -> list[int]:
        draw = ctx.rng.random
        keyed = sorted(((-t, draw(), i) for i, t in enumerate(totals)))
        return [i for _, _, i in keyed[:count]]


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
