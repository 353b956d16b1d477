"""Pool membership: the one place it is written into the `EndpointTable`.

`Discovery` starts one endpoint source per pool (``sources.py``: static lists; ``dns.py``: a headless
Service's records) and applies config reloads. Everything that follows membership (the scraper, the EDS
files, the scheduler's plugins, the metrics) listens to the table, not to discovery.
"""

from __future__ import annotations

import asyncio
from typing import Any

from extproc.config import Config, Pool
from extproc.datalayer import dns as _dns  # noqa: F401  (registers the dns source)
from extproc.datalayer.sources import EndpointSource, Resolver, SourceOptions, log, make_source
from extproc.datalayer.table import EndpointTable


class Discovery:
    """Keeps the membership of every pool current: one source per pool, started together."""

    def __init__(
        self,
        config: Config,
        table: EndpointTable,
        *,
        resolver: Resolver | None = None,
        resolve_timeout: float = 10.0,
    ) -> None:
        self._table = table
        self._pools: list[Pool] = list(config.pools)
        self._options = SourceOptions(resolver=resolver, resolve_timeout=resolve_timeout)
        self._sources: list[EndpointSource] = []

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per pool, what its source counts (DNS: resolutions, failures, last_error, endpoints)."""
        return self._options.stats

    async def start(self) -> None:
        """Start every pool's source; returns once each applied its first membership (or gave up trying)."""
        if self._sources:
            return
        self._sources = [make_source(pool, self._table, self._options) for pool in self._pools]
        await asyncio.gather(*(source.start() for source in self._sources))

    async def stop(self) -> None:
        sources, self._sources = self._sources, []
        await asyncio.gather(*(source.stop() for source in sources))

    def apply_config(self, new: Config) -> bool:
        """Apply a re-read configuration's static endpoint lists; returns whether any membership changed.

        Membership is what scaling changes, and it is applied live. Any other change to a pool, a changed
        endpoint source, or pools added or removed are logged and wait for a restart.
        """
        changed = False
        running = {p.name: p for p in self._pools}
        for pool in new.pools:
            old = running.get(pool.name)
            if old is None or pool.model_copy(update={"endpoints": old.endpoints}) != old:
                log.warning("config reload: pool %s changed beyond its endpoints; restart to apply", pool.name)
                continue
            if pool.endpoints.static is not None and old.endpoints.static is not None:
                added, removed = self._table.replace_pool(pool.name, pool.endpoints.static)
                if added or removed:
                    changed = True
                    log.info("config reload: pool %s +%s -%s", pool.name, added, removed)
            elif pool.endpoints != old.endpoints:
                log.warning("config reload: pool %s changed its endpoint source; restart to apply", pool.name)
        if {p.name for p in new.pools} != set(running):
            log.warning("config reload: pools were added or removed; restart to apply")
        return changed
