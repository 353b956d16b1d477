"""The scheduler: filters -> weighted scorers -> picker, once per request, with no I/O.

The director (``gateway/director.py``) calls ``Scheduler.schedule`` with the pool's endpoint states and the current
monotonic time; everything else (scraping, discovery) happens elsewhere and only updates those states.

Policies are plain configuration (``scheduler:`` in the config file):

=================  ===============================================  ==========================================
policy             scorers (name: weight, params)                   filters / picker
=================  ===============================================  ==========================================
default            queue: 2, kv_cache: 2, prefix: 4                 healthy, subset, not_saturated / max_score
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
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from extproc import config as cfg
from extproc.datalayer.endpoint import EndpointState
from extproc.scheduling import filters as _filters  # noqa: F401  (registers the built-in plugins)
from extproc.scheduling import pickers as _pickers  # noqa: F401
from extproc.scheduling import scorers as _scorers  # noqa: F401
from extproc.scheduling.framework import (
    ExportsMetrics,
    Filter,
    LearnsFromPicks,
    NamesPools,
    OnEmpty,
    Picker,
    RemembersEndpoints,
    SchedulingContext,
    Scorer,
    SharesState,
    build,
    effective_params,
)
from extproc.scheduling.prefix import precise as _precise  # noqa: F401
from extproc.scheduling.prefix import scorer as _prefix  # noqa: F401
from extproc.scheduling.types import Decision, RoutingRequest


class Scheduler:
    """Chooses an endpoint (and fallbacks) of a request's pool.

    Not thread-safe by design: the server calls it from its one event loop. Plugins are built here,
    so an unknown plugin name or a bad parameter fails at startup, not on the first request. What a
    plugin remembers (e.g. the prefix index) is the plugin's own; the scheduler only calls its hooks.
    """

    def __init__(self, settings: cfg.Scheduler | None = None, *, rng: random.Random | None = None) -> None:
        self.settings = settings = settings or cfg.Scheduler()
        self.rng = rng or random.Random()
        self._entries: list[tuple[str, Any]] = []  # (config path, plugin): errors point at the config's entry
        self._filters: list[Filter] = [
            self._build("filter", f.name, f.params, f"scheduler.filters[{i}]") for i, f in enumerate(settings.filters)
        ]
        self._scorers: list[tuple[float, Scorer]] = [
            (s.weight, self._build("scorer", s.name, s.params, f"scheduler.scorers[{i}]"))
            for i, s in enumerate(settings.scorers)
            if s.weight > 0
        ]
        self._picker: Picker = self._build("picker", settings.picker.name, settings.picker.params, "scheduler.picker")
        self._count = 1 + settings.fallbacks
        plugins = self.plugins()
        self._learners = [p for p in plugins if isinstance(p, LearnsFromPicks)]
        self._rememberers = [p for p in plugins if isinstance(p, RemembersEndpoints)]
        self._sharers: dict[str, SharesState] = {p.share_kind: p for p in plugins if isinstance(p, SharesState)}
        # (pool, address, [(plugin, record)]) per pick while sharing is on; None: local state only
        self._outbox: deque[tuple[str, str, list[tuple[SharesState, Any]]]] | None = None
        self.shared_dropped = 0  # picks the outbox lost (full while nobody took them)
        self._on_first_shared: Callable[[], None] | None = None

    @classmethod
    def from_config(cls, config: cfg.Config, rng: random.Random | None = None) -> Scheduler:
        scheduler = cls(config.scheduler, rng=rng)
        pools = [p.name for p in config.pools]
        for where, plugin in scheduler._entries:  # a plugin's per-pool params must name configured pools
            if not isinstance(plugin, NamesPools):
                continue
            for param, named in plugin.named_pools().items():
                unknown = sorted(str(n) for n in named if n not in pools)
                if unknown:
                    raise cfg.ConfigError(
                        f"{where}.params.{param} names pool(s) {', '.join(unknown)}, which the config does not "
                        f"define; its pools: {', '.join(pools)}"
                    )
        return scheduler

    def _build(self, kind: str, name: str, params: Mapping[str, Any] | None, where: str) -> Any:
        plugin = build(kind, name, params, where)
        self._entries.append((where, plugin))
        return plugin

    @property
    def needs_tokens(self) -> bool:
        """Whether a plugin scores the engine's tokens of the prompt (``RoutingRequest.token_ids``)."""
        return any(getattr(p, "needs_tokens", False) for p in self.plugins())

    def plugins(self) -> list[Any]:
        """Every plugin, in the order a request meets them."""
        return [*self._filters, *(s for _, s in self._scorers), self._picker]

    def schedule(self, request: RoutingRequest, endpoints: Sequence[EndpointState], now: float) -> Decision:
        """Pick an endpoint of ``request.pool`` among ``endpoints`` (their states as of ``now``).

        On success the pick's ``pending`` is incremented (the scraper resets it with each fresh
        scrape) and plugins that learn from picks are told. ``Decision.reason`` notes any filter that
        was bypassed even when the request is routed.
        """
        candidates = [e for e in endpoints if e.pool == request.pool]
        if not candidates:
            return Decision(status=503, reason=f"no endpoint in pool {request.pool!r}")
        ctx = SchedulingContext(request=request, now=now, rng=self.rng)
        fail_open = False
        notes: list[str] = []
        for f in self._filters:
            kept = f.apply(ctx, candidates)
            if kept:
                candidates = kept
                continue
            if f.on_empty is OnEmpty.REFUSE:
                return Decision(status=f.empty_status, reason=f.empty_reason)
            if f.on_empty is OnEmpty.BYPASS:
                notes.append(f"{f.empty_reason}; routed anyway")
            else:
                fail_open = True
                notes.append(f"{f.empty_reason}; failed open")

        totals = [0.0] * len(candidates)
        for weight, scorer in self._scorers:
            totals = [t + weight * v for t, v in zip(totals, scorer.score(ctx, candidates), strict=True)]

        order = self._picker.pick(ctx, candidates, totals, self._count)
        picked = candidates[order[0]]
        picked.pending += 1
        for learner in self._learners:
            learner.on_picked(ctx, picked)
        outbox = self._outbox
        if outbox is not None:
            if not outbox and self._on_first_shared is not None:
                self._on_first_shared()
            if len(outbox) == outbox.maxlen:
                self.shared_dropped += 1
            records = [(p, r) for p in self._sharers.values() if (r := p.shared_record(ctx, picked)) is not None]
            outbox.append((request.pool, picked.address, records))
        return Decision(
            endpoints=tuple(candidates[i].address for i in order),
            reason="; ".join(notes),
            fail_open=fail_open,
            scores=dict(zip([e.address for e in candidates], totals, strict=True)),
        )

    def share(self, max_outbox: int, on_first: Callable[[], None] | None = None) -> None:
        """Keep what every pick teaches (up to ``max_outbox`` picks) for ``take_shared``: replicas share it.

        ``on_first`` is called when a pick lands in an empty outbox, so a publisher can sleep while idle.
        """
        self._outbox = deque(maxlen=max_outbox)
        self._on_first_shared = on_first

    def take_shared(self) -> list[tuple[str, str, list[tuple[str, bytes]]]]:
        """The picks since the last call, each as (pool, address, [(plugin kind, encoded record)]), oldest first."""
        outbox = self._outbox
        if not outbox:
            return []
        taken = list(outbox)
        outbox.clear()
        return [
            (pool, address, [(p.share_kind, p.encode_shared(r)) for p, r in records])
            for pool, address, records in taken
        ]

    def apply_shared(self, kind: str, address: str, payload: bytes) -> None:
        """Another replica's pick of ``address``, as plugin ``kind`` recorded it; ValueError if unknown or malformed."""
        plugin = self._sharers.get(kind)
        if plugin is None:
            raise ValueError(f"no plugin shares records of kind {kind!r}")
        plugin.apply_shared(address, payload)

    def forget_endpoint(self, address: str) -> None:
        """Tell every plugin that remembers endpoints that ``address`` left its last pool."""
        for plugin in self._rememberers:
            plugin.forget_endpoint(address)

    def collect_metrics(self, members: Mapping[str, Sequence[str]]) -> Iterator[Any]:
        """The metric families of every plugin that exports its own (read at Prometheus scrape time)."""
        for plugin in self.plugins():
            if isinstance(plugin, ExportsMetrics):
                yield from plugin.collect_metrics(members)

    def effective_settings(self) -> dict[str, Any]:
        """The policy as it runs, every plugin's params with their defaults filled in."""
        s = self.settings
        return {
            "filters": [{"name": f.name, "params": effective_params("filter", f.name, f.params)} for f in s.filters],
            "scorers": [
                {"name": c.name, "weight": c.weight, "params": effective_params("scorer", c.name, c.params)}
                for c in s.scorers
            ],
            "picker": {"name": s.picker.name, "params": effective_params("picker", s.picker.name, s.picker.params)},
            "fallbacks": s.fallbacks,
        }
