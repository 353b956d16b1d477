"""Endpoint sources: where a pool's membership comes from, one small interface and a registry.

A source is chosen by the field set under a pool's ``endpoints:`` in the configuration (``static``,
``dns``, ...), built by the factory registered under that field's name, and started by `Discovery`.
``start`` applies the first membership before it returns (so serving begins with endpoints) and keeps
it current until ``stop``; every change goes through ``EndpointTable.replace_pool``. Adding a source is
one class with ``@register_source("field")`` plus that field on ``config.PoolEndpoints``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from extproc.config import Pool
from extproc.datalayer.table import EndpointTable

log = logging.getLogger("extproc.datalayer.discovery")

# Same shape as ``loop.getaddrinfo(host, port)``: ``[(family, type, proto, canonname, sockaddr), ...]``.
AddrInfo = tuple[Any, ...]
Resolver = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


class EndpointSource(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class SourceOptions:
    """What every source may use besides its pool: the process-wide resolver and the shared stats."""

    resolver: Resolver | None = None  # None: the system resolver
    resolve_timeout: float = 10.0
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # pool -> the source's counters


SourceFactory = Callable[[Pool, EndpointTable, SourceOptions], EndpointSource]
_T = TypeVar("_T")
_SOURCES: dict[str, SourceFactory] = {}


def register_source(config_field: str) -> Callable[[_T], _T]:
    """Register a source for pools whose ``endpoints.<config_field>`` is set."""

    def decorate(factory: _T) -> _T:
        if config_field in _SOURCES:
            raise ValueError(f"endpoint source {config_field!r} is registered twice")
        _SOURCES[config_field] = factory  # type: ignore[assignment]
        return factory

    return decorate


def make_source(pool: Pool, table: EndpointTable, options: SourceOptions) -> EndpointSource:
    """The source for ``pool``, by the one ``endpoints`` field its configuration sets."""
    for config_field, factory in _SOURCES.items():
        if getattr(pool.endpoints, config_field, None) is not None:
            return factory(pool, table, options)
    raise ValueError(f"pool {pool.name}: no registered endpoint source for {pool.endpoints!r}")


@register_source("static")
class StaticSource:
    """A fixed list of ``ip:port`` (config reloads change it, through `Discovery.apply_config`)."""

    def __init__(self, pool: Pool, table: EndpointTable, options: SourceOptions) -> None:
        self._pool = pool
        self._table = table

    async def start(self) -> None:
        added, _ = self._table.replace_pool(self._pool.name, self._pool.endpoints.static or ())
        log.info("pool %s: %d static endpoints", self._pool.name, len(added))

    async def stop(self) -> None:
        pass
