"""The endpoint table, static and DNS discovery (injected answers and the real resolver), with real simulators."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

import pytest

from extproc.config import Config, DnsDiscovery, Pool, PoolEndpoints, Scrape
from extproc.datalayer.discovery import Discovery
from extproc.datalayer.dns import addresses_from_addrinfo, default_resolver, format_address
from extproc.datalayer.scrape import Scraper
from extproc.datalayer.table import EndpointTable
from tests.helpers import run, wait_until


def addresses(table: EndpointTable, pool: str) -> list[str]:
    return sorted(s.address for s in table.pool_endpoints(pool))


# ----- the table ------------------------------------------------------------------------------


def test_replace_pool_keeps_states_that_stay() -> None:
    table = EndpointTable(["p"])
    assert table.pool_endpoints("p") == () and table.pool_endpoints("unknown") == ()
    assert table.replace_pool("p", ["10.0.0.1:80", "10.0.0.2:80"]) == (["10.0.0.1:80", "10.0.0.2:80"], [])
    kept = table.get("p", "10.0.0.2:80")
    assert kept is not None
    kept.waiting, kept.pending = 4.0, 2
    cached = table.pool_endpoints("p")
    assert table.replace_pool("p", ["10.0.0.2:80", "10.0.0.1:80"]) == ([], [])  # same set: nothing changes
    assert table.pool_endpoints("p") is cached  # the request path's tuple is not rebuilt

    assert table.replace_pool("p", ["10.0.0.2:80", "10.0.0.3:80", "10.0.0.3:80"]) == (["10.0.0.3:80"], ["10.0.0.1:80"])
    assert table.get("p", "10.0.0.2:80") is kept and kept.waiting == 4.0 and kept.pending == 2
    fresh = table.get("p", "10.0.0.3:80")
    assert fresh is not None and fresh.pool == "p" and not fresh.scrape_ok and fresh.scraped_at is None
    assert table.pool_endpoints("p") is not cached
    assert addresses(table, "p") == ["10.0.0.2:80", "10.0.0.3:80"]
    assert "10.0.0.1:80" not in table and "10.0.0.3:80" in table
    table.replace_pool("q", ["10.0.0.9:80"])  # a pool the constructor did not name
    assert sorted(s.address for s in table.all_endpoints()) == ["10.0.0.2:80", "10.0.0.3:80", "10.0.0.9:80"]
    assert table.pools() == ["p", "q"]


def test_listeners_see_changes_after_the_table_is_consistent() -> None:
    table = EndpointTable(["p", "q"])
    events: list[tuple[str, ...]] = []

    def added(pool: str, address: str) -> None:
        assert table.get(pool, address) is not None
        events.append(("added", pool, address))

    def removed(address: str) -> None:
        assert address not in table
        events.append(("removed", address))

    def broken(_address: str) -> None:
        raise RuntimeError("a listener bug")

    unsubscribe_added = table.on_added(added)
    table.on_removed(broken)
    table.on_removed(removed)
    table.replace_pool("p", ["a:1", "b:1"])
    table.replace_pool("q", ["b:1"])  # b joins a second pool
    table.replace_pool("p", ["a:1"])  # b leaves p but stays in q: not removed
    assert events == [("added", "p", "a:1"), ("added", "p", "b:1"), ("added", "q", "b:1")]
    assert [s.pool for s in table.states_for("b:1")] == ["q"]
    table.replace_pool("q", [])  # b's last pool
    assert events[-1] == ("removed", "b:1") and table.states_for("b:1") == ()
    unsubscribe_added()
    table.replace_pool("p", ["a:1", "c:1"])
    assert ("added", "p", "c:1") not in events


# ----- static and DNS discovery -----------------------------------------------------------------


class FakeResolver:
    """Stands in for DNS: the answer (IP strings) can be changed, or made to fail, while discovery runs."""

    def __init__(self, *ips: str) -> None:
        self.ips = list(ips)
        self.error: Exception | None = None
        self.calls: list[tuple[str, int]] = []
        self.hang = False

    async def __call__(self, host: str, port: int) -> Sequence[tuple[Any, ...]]:
        self.calls.append((host, port))
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.ips
        ]


def dns_pool(name: str = "pool-a", host: str = "vllm.ns.svc.cluster.local", port: int = 8000) -> Pool:
    return Pool(
        name=name,
        models=[f"model-{name}"],
        endpoints=PoolEndpoints(dns=DnsDiscovery(name=host, port=port, interval=0.02)),
    )


def test_format_and_dedupe_addresses() -> None:
    assert format_address("10.1.2.3", 80) == "10.1.2.3:80"
    assert format_address("fd00:0:0::1", 80) == "[fd00::1]:80"
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 80)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::1", 80, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", 80)),
    ]
    assert addresses_from_addrinfo(infos, 8000) == ["10.0.0.2:8000", "[fd00::1]:8000"]


def test_static_pools_are_applied_once() -> None:
    table = EndpointTable()
    pool = Pool(name="s", models=["m"], endpoints=PoolEndpoints(static=["10.0.0.1:8000", "10.0.0.2:8000"]))

    async def go() -> None:
        discovery = Discovery(Config(pools=[pool]), table, resolver=FakeResolver())
        await discovery.start()
        await discovery.stop()

    run(go())
    assert addresses(table, "s") == ["10.0.0.1:8000", "10.0.0.2:8000"]


def test_dns_adds_removes_and_keeps_the_last_set_on_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extproc.datalayer.discovery")
    table = EndpointTable()
    resolver = FakeResolver("10.0.0.1", "fd00::1")
    pool = dns_pool()

    async def go() -> None:
        discovery = Discovery(Config(pools=[pool]), table, resolver=resolver)
        await discovery.start()
        try:
            # start() returns with the first answer applied, so serving can begin with endpoints.
            assert addresses(table, "pool-a") == ["10.0.0.1:8000", "[fd00::1]:8000"]
            assert resolver.calls[0] == ("vllm.ns.svc.cluster.local", 8000)
            kept = table.get("pool-a", "10.0.0.1:8000")

            resolver.ips = ["10.0.0.1", "10.0.0.2"]  # a pod replaced
            await wait_until(lambda: addresses(table, "pool-a") == ["10.0.0.1:8000", "10.0.0.2:8000"])
            assert table.get("pool-a", "10.0.0.1:8000") is kept

            resolver.error = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            failures_before = len(resolver.calls)
            await wait_until(lambda: len(resolver.calls) >= failures_before + 5, what="several failed resolutions")
            assert addresses(table, "pool-a") == ["10.0.0.1:8000", "10.0.0.2:8000"]  # the last known set stays
            assert discovery.stats["pool-a"]["failures"] >= 5
            assert "Temporary failure" in discovery.stats["pool-a"]["last_error"]
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "cannot resolve" in warnings[0].getMessage()  # once per streak

            resolver.error = None
            resolver.ips = ["10.0.0.3"]
            await wait_until(lambda: addresses(table, "pool-a") == ["10.0.0.3:8000"])
            assert any("resolves again" in r.getMessage() for r in caplog.records)

            resolver.ips = []  # a successful, empty answer: the pool really has no endpoints
            await wait_until(lambda: addresses(table, "pool-a") == [])
            assert any("no addresses" in r.getMessage() for r in caplog.records)
        finally:
            await discovery.stop()
        calls = len(resolver.calls)
        await asyncio.sleep(0.1)
        assert len(resolver.calls) == calls  # stopped means stopped

    run(go())


def test_dns_failing_at_start_and_a_hung_resolver_do_not_block() -> None:
    table = EndpointTable()
    failing = FakeResolver("10.0.0.1")
    failing.error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    hung = FakeResolver("10.0.0.2")
    hung.hang = True

    async def go() -> None:
        first = Discovery(Config(pools=[dns_pool("pool-a")]), table, resolver=failing)
        second = Discovery(Config(pools=[dns_pool("pool-b")]), table, resolver=hung, resolve_timeout=0.05)
        started = time.monotonic()
        await first.start()
        await second.start()
        try:
            assert time.monotonic() - started < 1.0
            assert addresses(table, "pool-a") == [] and addresses(table, "pool-b") == []
            failing.error = None
            hung.hang = False
            await wait_until(lambda: addresses(table, "pool-a") == ["10.0.0.1:8000"], what="a resolves later")
            await wait_until(lambda: addresses(table, "pool-b") == ["10.0.0.2:8000"], what="b resolves later")
            assert second.stats["pool-b"]["failures"] >= 1
        finally:
            await first.stop()
            await second.stop()

    run(go())


def test_real_resolver_and_scraper_find_a_simulator_by_name(start_simulator) -> None:
    sim = start_simulator("--time-scale", "0")
    table = EndpointTable()

    async def go() -> None:
        infos = await default_resolver("localhost", sim.port)
        assert f"127.0.0.1:{sim.port}" in addresses_from_addrinfo(infos, sim.port)

        cfg = Config(pools=[dns_pool("local", "localhost", sim.port)], scrape=Scrape(interval=0.05, timeout=0.5))
        discovery = Discovery(cfg, table)
        scraper = Scraper(cfg, table)
        await discovery.start()
        await scraper.start()
        try:
            # localhost may also resolve to [::1], where the simulator does not listen; 127.0.0.1 must work.
            assert sim.address in addresses(table, "local")
            state = table.get("local", sim.address)
            assert state is not None
            await wait_until(lambda: state.scrape_ok, what="the discovered simulator to be scraped")
            await asyncio.sleep(0.1)  # a few re-resolutions of the same answer change nothing
            assert table.get("local", sim.address) is state and state.scrape_ok
        finally:
            await scraper.stop()
            await discovery.stop()

    run(go())
