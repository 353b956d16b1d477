"""The ``dns`` endpoint source: a name's A/AAAA records, re-resolved every ``interval``.

DNS is how a Kubernetes headless Service lists its ready pods. A failed resolution keeps the last known
membership: a DNS hiccup must not empty a pool that is serving traffic, and endpoints that really went
away show up as failing scrapes anyway. Only a successful but empty answer empties a pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterable, Sequence

from extproc.config import DnsDiscovery, Pool
from extproc.datalayer.sources import AddrInfo, Resolver, SourceOptions, log, register_source
from extproc.datalayer.table import EndpointTable


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


@register_source("dns")
class DnsSource:
    """One pool's DNS name: resolved once at start (bounded by the resolve timeout), then every ``interval``."""

    def __init__(self, pool: Pool, table: EndpointTable, options: SourceOptions) -> None:
        assert pool.endpoints.dns is not None
        self._pool = pool.name
        self._dns: DnsDiscovery = pool.endpoints.dns
        self._table = table
        self._timeout = options.resolve_timeout
        if self._dns.nameservers is not None:
            self._resolve: Resolver = nameserver_resolver(self._dns.nameserver_addresses())
        else:
            self._resolve = options.resolver or default_resolver
        self._failing = False  # in a streak of failed resolutions (warned once)
        self._task: asyncio.Task[None] | None = None
        self.stats = options.stats.setdefault(
            pool.name, {"resolutions": 0, "failures": 0, "last_error": "", "endpoints": 0}
        )

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name=f"discovery:{self._pool}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._dns.interval)
            await self.refresh()

    async def refresh(self) -> bool:
        """Resolve once and apply the answer; on failure keep the membership. Returns whether it resolved."""
        pool, dns, stats = self._pool, self._dns, self.stats
        try:
            infos = await asyncio.wait_for(self._resolve(dns.name, dns.port), self._timeout)
            addresses = addresses_from_addrinfo(infos, dns.port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # gaierror, timeout, or anything an injected resolver raises
            stats["failures"] += 1
            stats["last_error"] = f"{type(exc).__name__}: {exc}"
            if not self._failing:
                self._failing = True
                log.warning(
                    "pool %s: cannot resolve %s (%s); keeping the last %d endpoints until it resolves again",
                    pool,
                    dns.name,
                    stats["last_error"],
                    len(self._table.pool_endpoints(pool)),
                )
            return False
        stats["resolutions"] += 1
        if self._failing:
            self._failing = False
            log.info("pool %s: %s resolves again", pool, dns.name)
        had = len(self._table.pool_endpoints(pool))
        added, removed = self._table.replace_pool(pool, addresses)
        stats["endpoints"] = len(addresses)
        if not addresses and (had or stats["resolutions"] == 1):
            log.warning("pool %s: %s resolved to no addresses; the pool is empty", pool, dns.name)
        elif added or removed:
            log.info("pool %s: %s -> %d endpoints (+%s -%s)", pool, dns.name, len(addresses), added, removed)
        return True
