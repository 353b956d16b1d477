"""The three plugin kinds of the scheduling core, the per-request context they share, and their registry.

A request goes through filters (which endpoints may serve it), then weighted scorers (how well each
would serve it, 0..1), then a picker (the order to try them in). Each kind has one small interface;
a new plugin is one class with a ``@register_*("name")`` decorator in a module imported by
``extproc.scheduling.scheduler``, plus its name in the configuration.
"""

from __future__ import annotations

import enum
import inspect
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from extproc.config import ConfigError
from extproc.scheduling.types import EndpointState, RoutingRequest


class PluginError(ConfigError):
    """A plugin name is unknown or its parameters are wrong; the message names it and the known ones."""


class OnEmpty(enum.Enum):
    """What the scheduler does when a filter leaves no candidate."""

    FAIL_OPEN = "fail_open"  # ignore the filter, keep every candidate, flag Decision.fail_open
    REFUSE = "refuse"  # answer 503 with the filter's reason
    SHED = "shed"  # answer 429 if shed_when_saturated is configured, else ignore the filter


@dataclass(slots=True)
class SchedulingContext:
    """Everything a plugin may consult about one request, computed once by the scheduler.

    ``prefix_matches`` (leading prompt blocks each remaining candidate already holds) is filled in
    after the filters ran, and only when some scorer declares ``needs_prefix``.
    """

    request: RoutingRequest
    now: float
    stale_after: float
    queue_threshold: float
    kv_cache_threshold: float
    shed_when_saturated: bool
    rng: random.Random
    prefix_matches: Mapping[str, int] = field(default_factory=dict)

    @property
    def prompt_blocks(self) -> int:
        return len(self.request.prefix_hashes)


class Filter(Protocol):
    """Keeps the candidates that may serve the request; ``on_empty`` says what an empty result means."""

    on_empty: OnEmpty
    empty_reason: str

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]: ...


class Scorer(Protocol):
    """Rates each candidate in [0, 1] (1 = best), in the order of ``candidates``."""

    needs_prefix: bool

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]: ...


class Picker(Protocol):
    """Orders candidates to try: the indices of at most ``count`` of them, pick first."""

    def pick(
        self, ctx: SchedulingContext, candidates: Sequence[EndpointState], totals: Sequence[float], count: int
    ) -> list[int]: ...


_T = TypeVar("_T")
_FILTERS: dict[str, Callable[[], Filter]] = {}
_SCORERS: dict[str, Callable[..., Scorer]] = {}
_PICKERS: dict[str, Callable[[], Picker]] = {}


def _register(table: dict[str, Any], kind: str, name: str) -> Callable[[_T], _T]:
    def decorate(factory: _T) -> _T:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = factory
        return factory

    return decorate


def register_filter(name: str) -> Callable[[_T], _T]:
    return _register(_FILTERS, "filter", name)


def register_scorer(name: str) -> Callable[[_T], _T]:
    return _register(_SCORERS, "scorer", name)


def register_picker(name: str) -> Callable[[_T], _T]:
    return _register(_PICKERS, "picker", name)


def _lookup(table: dict[str, Any], kind: str, name: str, where: str) -> Any:
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "(none)"
        raise PluginError(f"{where}: unknown {kind} {name!r}; known {kind}s: {known}") from None


def make_filter(name: str, where: str = "scheduler.filters") -> Filter:
    return _lookup(_FILTERS, "filter", name, where)()


def make_picker(name: str, where: str = "scheduler.picker") -> Picker:
    return _lookup(_PICKERS, "picker", name, where)()


def make_scorer(name: str, params: Mapping[str, Any] | None = None, where: str = "scheduler.scorers") -> Scorer:
    """Build a scorer from its config entry; ``params`` are its constructor's keyword arguments."""
    factory = _lookup(_SCORERS, "scorer", name, where)
    params = dict(params or {})
    names = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    for key in params:
        if key not in names:
            accepts = f"accepts {', '.join(names)}" if names else "accepts no params"
            raise PluginError(f"{where}: unknown param {key!r} for scorer {name!r}; it {accepts}")
    try:
        return factory(**params)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{where}: bad params for scorer {name!r}: {exc}") from None


def known_plugins() -> dict[str, list[str]]:
    """Registered plugin names by kind (for error messages, docs and ``--help``)."""
    return {"filters": sorted(_FILTERS), "scorers": sorted(_SCORERS), "pickers": sorted(_PICKERS)}
