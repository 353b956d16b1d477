"""Pool membership: static lists from the configuration (and its reloads), DNS names re-resolved periodically.

This is the one place membership is written into the `EndpointTable`; everything that follows
membership (the scraper, the EDS files, the scheduler's plugins, the metrics) listens to the table.

DNS is how a Kubernetes headless Service lists its ready pods (A/AAAA records). A failed resolution keeps
the last known membership: a DNS hiccup must not empty a pool that is serving traffic, and endpoints that
really went away show up as failing scrapes anyway. Only a successful but empty answer empties a pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from extproc.config import Config, DnsDiscovery, Pool
from extproc.datalayer.table import EndpointTable

log = logging.getLogger(__name__)

# Same shape as ``loop.getaddrinfo(host, port)``: ``[(family, type, proto, canonname, sockaddr), ...]``.
AddrInfo = tuple[Any, ...]
Resolver = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


async def default_resolver(host: str, port: int) -> Sequence[AddrInfo]:
    """The system resolver (glibc, so /etc/hosts and the pod's search domains apply), off the event loop."""
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


def nameserver_resolver(nameservers: Sequence[tuple[str, int]], timeout: float = 2.0) -> Resolver:
    """A resolver asking these DNS servers (dnspython), A and AAAA, shaped like ``loop.getaddrinfo``.

    The name is taken as fully qualified (no search domains). NXDOMAIN or an unreachable server raise, so
    discovery keeps the last membership; a name that exists with no address records resolves to nothing.
    """
    import dns.asyncresolver
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [ip for ip, _port in nameservers]
    resolver.nameserver_ports = {ip: port for ip, port in nameservers}
    resolver.lifetime = timeout
    resolver.cache = None  # re-resolution must see changes at once; the interval is the cache

    async def resolve(host: str, port: int) -> Sequence[AddrInfo]:
        infos: list[AddrInfo] = []
        for rdtype, family in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            try:
                answer = await resolver.resolve(host.rstrip(".") + ".", rdtype, search=False)
            except dns.resolver.NoAnswer:
                continue
            infos.extend((family, socket.SOCK_STREAM, 6, "", (r.address, port)) for r in answer)
        return infos

    return resolve


def format_address(host: str, port: int) -> str:
    """``ip:port``, IPv6 as ``[ip]:port``, normalised as the config normalises static endpoints."""
    ip = ipaddress.ip_address(host)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def addresses_from_addrinfo(infos: Iterable[AddrInfo], port: int) -> list[str]:
    """Distinct ``ip:port`` of an answer (A and AAAA), sorted so logs and tables are stable."""
    out: set[str] = set()
    for info in infos:
        sockaddr = info[4]
        host = sockaddr[0]
        if isinstance(host, str):
            out.add(format_address(host, port))
    return sorted(out)


class Discovery:
    """Keeps the `EndpointTable` membership of every pool up to date; one task per DNS pool."""

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
        self._resolver: Resolver = resolver or default_resolver
        self._pool_resolvers: dict[str, Resolver] = {}  # pools with their own nameservers
        self._resolve_timeout = resolve_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._failing: set[str] = set()  # pools in a streak of failed resolutions (warned once)
        self.stats: dict[str, dict[str, Any]] = {}  # pool -> resolutions, failures, last_error, endpoints

    async def start(self) -> None:
        """Apply static pools, resolve every DNS pool once (so we start with endpoints), then keep resolving."""
        if self._tasks:
            return
        for pool in self._pools:
            if pool.endpoints.static is not None:
                added, _ = self._table.replace_pool(pool.name, pool.endpoints.static)
                log.info("pool %s: %d static endpoints", pool.name, len(added))
        dns_pools = [(pool.name, pool.endpoints.dns) for pool in self._pools if pool.endpoints.dns is not None]
        await asyncio.gather(*(self.refresh(name, dns) for name, dns in dns_pools))
        for name, dns in dns_pools:
            self._tasks.append(asyncio.create_task(self._loop(name, dns), name=f"discovery:{name}"))

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

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, pool: str, dns: DnsDiscovery) -> None:
        while True:
            await asyncio.sleep(dns.interval)
            await self.refresh(pool, dns)

    def _resolver_for(self, pool: str, dns: DnsDiscovery) -> Resolver:
        if dns.nameservers is None:
            return self._resolver
        resolver = self._pool_resolvers.get(pool)
        if resolver is None:
            resolver = self._pool_resolvers[pool] = nameserver_resolver(dns.nameserver_addresses())
        return resolver

    async def refresh(self, pool: str, dns: DnsDiscovery) -> bool:
        """Resolve once and apply the answer; on failure keep the membership. Returns whether it resolved."""
        stats = self.stats.setdefault(pool, {"resolutions": 0, "failures": 0, "last_error": "", "endpoints": 0})
        resolve = self._resolver_for(pool, dns)
        try:
            infos = await asyncio.wait_for(resolve(dns.name, dns.port), self._resolve_timeout)
            addresses = addresses_from_addrinfo(infos, dns.port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # gaierror, timeout, or anything an injected resolver raises
            stats["failures"] += 1
            stats["last_error"] = f"{type(exc).__name__}: {exc}"
            if pool not in self._failing:
                self._failing.add(pool)
                log.warning(
                    "pool %s: cannot resolve %s (%s); keeping the last %d endpoints until it resolves again",
                    pool,
                    dns.name,
                    stats["last_error"],
                    len(self._table.pool_endpoints(pool)),
                )
            return False
        stats["resolutions"] += 1
        if pool in self._failing:
            self._failing.discard(pool)
            log.info("pool %s: %s resolves again", pool, dns.name)
        had = len(self._table.pool_endpoints(pool))
        added, removed = self._table.replace_pool(pool, addresses)
        stats["endpoints"] = len(addresses)
        if not addresses and (had or stats["resolutions"] == 1):
            log.warning("pool %s: %s resolved to no addresses; the pool is empty", pool, dns.name)
        elif added or removed:
            log.info("pool %s: %s -> %d endpoints (+%s -%s)", pool, dns.name, len(addresses), added, removed)
        return True
