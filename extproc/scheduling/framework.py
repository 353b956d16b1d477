"""The scheduling framework: the plugin interfaces, the per-request context, one registry and one factory.

A request goes through filters (which endpoints may serve it), then weighted scorers (how well each would
serve it, 0..1), then a picker (the order to try them in). Each kind has one small interface. A plugin is
one class with a ``@register_filter/scorer/picker("name")`` decorator in a module the scheduler imports;
its constructor's keyword arguments are its ``params`` in the configuration, so every kind is built the
same way, from ``{name, weight (scorers only), params}``, and checked when the picker starts.

Any plugin may also implement the optional hooks below; the scheduler finds them when it builds the
plugin and calls them without knowing what the plugin is:

- ``on_picked(ctx, endpoint)``: the request was routed to ``endpoint`` (learn from the decision);
- ``forget_endpoint(address)``: the address left every pool (drop what is remembered of it);
- ``collect_metrics(members)``: Prometheus metric families describing the plugin's own state, read at
  scrape time (``members`` maps each pool to its endpoint addresses);
- ``share_kind`` with ``shared_record``, ``encode_shared`` and ``apply_shared``: what the plugin learns
  from a pick, shared with the other replicas of the picker (``state.backend: redis``). The request path
  only calls ``shared_record`` (cheap: a tuple); encoding and applying happen in the background;
- ``named_pools()``: params that name pools (param -> the names given), checked against the config's pools
  at start so a typo is an error naming the entry, not a setting that silently never applies.
"""

from __future__ import annotations

import enum
import inspect
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from extproc.config import ConfigError
from extproc.datalayer.endpoint import EndpointState
from extproc.scheduling.types import RoutingRequest


class PluginError(ConfigError):
    """A plugin name is unknown or its parameters are wrong; the message names it and the known ones."""


class OnEmpty(enum.Enum):
    """What the scheduler does when a filter leaves no candidate."""

    FAIL_OPEN = "fail_open"  # bypass the filter, keep every candidate, flag Decision.fail_open
    REFUSE = "refuse"  # answer the filter's ``empty_status`` with its ``empty_reason``
    BYPASS = "bypass"  # bypass the filter (route anyway) and say so in Decision.reason


@dataclass(slots=True)
class SchedulingContext:
    """One request's pass through the scheduler: the request, the time, and a scratchpad for plugins.

    ``state`` carries what a plugin computed for this request to its own later hooks (e.g. the prefix
    scorer's block hashes, from ``score`` to ``on_picked``); a plugin keys it by itself.
    """

    request: RoutingRequest
    now: float
    rng: random.Random
    state: dict[object, Any] = field(default_factory=dict)


class Filter(Protocol):
    """Keeps the candidates that may serve the request; ``on_empty`` says what an empty result means."""

    on_empty: OnEmpty
    empty_status: int  # the answer when on_empty is REFUSE (503: nothing to route to; 429: shed)
    empty_reason: str

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]: ...


class Scorer(Protocol):
    """Rates each candidate in [0, 1] (1 = best), in the order of ``candidates``."""

    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]: ...


class Picker(Protocol):
    """Orders candidates to try: the indices of at most ``count`` of them, pick first."""

    def pick(
        self, ctx: SchedulingContext, candidates: Sequence[EndpointState], totals: Sequence[float], count: int
    ) -> list[int]: ...


@runtime_checkable
class LearnsFromPicks(Protocol):
    def on_picked(self, ctx: SchedulingContext, endpoint: EndpointState) -> None: ...


@runtime_checkable
class RemembersEndpoints(Protocol):
    def forget_endpoint(self, address: str) -> None: ...


@runtime_checkable
class ExportsMetrics(Protocol):
    def collect_metrics(self, members: Mapping[str, Sequence[str]]) -> Iterable[Any]: ...


@runtime_checkable
class SharesState(Protocol):
    share_kind: str  # names the plugin's records on the wire; replicas must agree on it

    def shared_record(self, ctx: SchedulingContext, endpoint: EndpointState) -> Any | None: ...

    def encode_shared(self, record: Any) -> bytes: ...

    def apply_shared(self, address: str, payload: bytes) -> None:
        """Learn another replica's pick of ``address``; raises ValueError when ``payload`` is malformed."""
        ...


@runtime_checkable
class NamesPools(Protocol):
    def named_pools(self) -> Mapping[str, Iterable[str]]:
        """Per-pool params: param name -> the pool names it was given, checked against the config's pools."""
        ...


KINDS = ("filter", "scorer", "picker")
_T = TypeVar("_T")
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}


def _register(kind: str, name: str) -> Callable[[_T], _T]:
    def decorate(factory: _T) -> _T:
        table = _REGISTRY[kind]
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = factory  # type: ignore[assignment]
        return factory

    return decorate


def register_filter(name: str) -> Callable[[_T], _T]:
    return _register("filter", name)


def register_scorer(name: str) -> Callable[[_T], _T]:
    return _register("scorer", name)


def register_picker(name: str) -> Callable[[_T], _T]:
    return _register("picker", name)


def _param_names(factory: Callable[..., Any]) -> list[str]:
    return [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def build(kind: str, name: str, params: Mapping[str, Any] | None, where: str) -> Any:
    """Build the ``kind`` plugin registered as ``name`` with ``params`` as keyword arguments.

    Errors name ``where`` (the config path of the entry), the plugin and what it accepts.
    """
    table = _REGISTRY[kind]
    factory = table.get(name)
    if factory is None:
        known = ", ".join(sorted(table)) or "(none)"
        raise PluginError(f"{where}: unknown {kind} {name!r}; known {kind}s: {known}")
    params = dict(params or {})
    accepted = _param_names(factory)
    for key in params:
        if key not in accepted:
            accepts = f"accepts {', '.join(accepted)}" if accepted else "accepts no params"
            raise PluginError(f"{where}: unknown param {key!r} for {kind} {name!r}; it {accepts}")
    try:
        return factory(**params)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{where}: bad params for {kind} {name!r}: {exc}") from None


def effective_params(kind: str, name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``params`` with the plugin's defaults filled in, as it runs (for ``extproc serve --check``)."""
    factory = _REGISTRY[kind][name]
    out = {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not inspect.Parameter.empty
    }
    out.update(params or {})
    return out


def known_plugins() -> dict[str, list[str]]:
    """Registered plugin names by kind (for error messages, docs and ``--help``)."""
    return {f"{kind}s": sorted(_REGISTRY[kind]) for kind in KINDS}
