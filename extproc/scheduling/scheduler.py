"""The scheduler: filters -> weighted scorers -> picker, once per request, with no I/O.

The gRPC adapter calls ``Scheduler.schedule`` with the pool's endpoint states and the current
monotonic time; everything else (scraping, discovery) happens elsewhere and only updates those states.

Policies are plain configuration (``scheduler:`` in the config file):

=================  ===============================================  ==========================================
policy             scorers (name: weight, params)                   filters / picker
=================  ===============================================  ==========================================
default            queue: 2, kv_cache: 2, prefix: 3                 healthy, subset, not_saturated / max_score
GIE-like prefix    as default, prefix params {min_blocks: 1}        as default
least queue        queue: 1                                         as default / max_score
prefix only        prefix: 1                                        healthy, subset / max_score
random             (none)                                           healthy, subset / random
round robin        (none)                                           healthy, subset / round_robin
=================  ===============================================  ==========================================

e.g. least queue: ``scheduler: {scorers: [{name: queue, weight: 1}]}``;
round robin: ``scheduler: {filters: [healthy, subset], scorers: [], picker: round_robin}``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from extproc import config as cfg
from extproc.scheduling import filters as _filters  # noqa: F401  (registers the built-in plugins)
from extproc.scheduling import pickers as _pickers  # noqa: F401
from extproc.scheduling import scorers as _scorers  # noqa: F401
from extproc.scheduling.framework import (
    Filter,
    OnEmpty,
    Picker,
    SchedulingContext,
    Scorer,
    make_filter,
    make_picker,
    make_scorer,
)
from extproc.scheduling.prefix.index import PrefixIndex, prompt_hashes
from extproc.scheduling.types import Decision, EndpointState, RoutingRequest


class Scheduler:
    """Chooses an endpoint (and fallbacks) of a request's pool; owns the prefix index.

    Not thread-safe by design: the server calls it from its one event loop. Plugins are built here,
    so an unknown plugin name or a bad parameter fails at startup, not on the first request.
    """

    def __init__(
        self,
        settings: cfg.Scheduler | None = None,
        prefix: cfg.Prefix | None = None,
        *,
        stale_after: float = cfg.Scrape().stale_after,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings = settings or cfg.Scheduler()
        self.prefix_settings = prefix = prefix or cfg.Prefix()
        self.stale_after = stale_after
        self.rng = rng or random.Random()
        self.prefix_index = PrefixIndex(prefix.max_blocks)
        self._filters: list[Filter] = [
            make_filter(n, f"scheduler.filters[{i}]") for i, n in enumerate(settings.filters)
        ]
        self._scorers: list[tuple[float, Scorer]] = [
            (p.weight, make_scorer(p.name, p.params, f"scheduler.scorers[{i}]"))
            for i, p in enumerate(settings.scorers)
            if p.weight > 0
        ]
        self._picker: Picker = make_picker(settings.picker)
        self._needs_prefix = any(s.needs_prefix for _, s in self._scorers)
        self._count = 1 + settings.fallbacks

    @classmethod
    def from_config(cls, config: cfg.Config, rng: random.Random | None = None) -> Scheduler:
        return cls(config.scheduler, config.prefix, stale_after=config.scrape.stale_after, rng=rng)

    def hash_prompt(self, text: str, model: str) -> tuple[int, ...]:
        """The request's ``prefix_hashes``, with the configured block size and prompt bound."""
        p = self.prefix_settings
        return prompt_hashes(text, model, p.block_chars, p.max_prompt_blocks)

    def schedule(self, request: RoutingRequest, endpoints: Sequence[EndpointState], now: float) -> Decision:
        """Pick an endpoint of ``request.pool`` among ``endpoints`` (their states as of ``now``).

        On success the pick's ``pending`` is incremented (the scraper resets it with each fresh
        scrape) and its prefix index learns the prompt's blocks. ``Decision.reason`` notes any filter
        that was bypassed even when the request is routed.
        """
        candidates = [e for e in endpoints if e.pool == request.pool]
        if not candidates:
            return Decision(status=503, reason=f"no endpoint in pool {request.pool!r}")
        s = self.settings
        ctx = SchedulingContext(
            request=request,
            now=now,
            stale_after=self.stale_after,
            queue_threshold=s.saturation.queue_threshold,
            kv_cache_threshold=s.saturation.kv_cache_threshold,
            shed_when_saturated=s.shed_when_saturated,
            rng=self.rng,
        )
        fail_open = False
        notes: list[str] = []
        for f in self._filters:
            kept = f.apply(ctx, candidates)
            if kept:
                candidates = kept
                continue
            if f.on_empty is OnEmpty.REFUSE:
                return Decision(status=503, reason=f.empty_reason)
            if f.on_empty is OnEmpty.SHED:
                if ctx.shed_when_saturated:
                    return Decision(status=429, reason=f.empty_reason)
                notes.append(f"{f.empty_reason}; routed anyway")
            else:
                fail_open = True
                notes.append(f"{f.empty_reason}; failed open")

        hashes = request.prefix_hashes
        looked_up = self._needs_prefix and bool(hashes)
        if looked_up:
            ctx.prefix_matches = self.prefix_index.match(hashes, [e.address for e in candidates])
        totals = [0.0] * len(candidates)
        for weight, scorer in self._scorers:
            totals = [t + weight * v for t, v in zip(totals, scorer.score(ctx, candidates), strict=True)]

        order = self._picker.pick(ctx, candidates, totals, self._count)
        picked = candidates[order[0]]
        picked.pending += 1
        if hashes:
            self.prefix_index.record(picked.address, hashes)
        return Decision(
            endpoints=tuple(candidates[i].address for i in order),
            reason="; ".join(notes),
            fail_open=fail_open,
            scores=dict(zip([e.address for e in candidates], totals, strict=True)),
            prompt_blocks=len(hashes) if looked_up else 0,
            matched_blocks=ctx.prefix_matches.get(picked.address, 0) if looked_up else 0,
        )

    def forget(self, address: str) -> None:
        """Drop what the scheduler remembers of an endpoint that left its pool."""
        self.prefix_index.purge(address)
