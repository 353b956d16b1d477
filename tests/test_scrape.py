"""The /metrics parser, and the scraper against real simulator processes (kills, hangs, membership changes)."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest, start_http_server
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import Config, MetricsSource, Pool, PoolEndpoints, Scrape
from extproc.datalayer.endpoint import EndpointState
from extproc.datalayer.scrape import MetricsParseError, Scraper, metrics_url, parse_vllm_metrics
from extproc.datalayer.table import EndpointTable
from extproc.local.procs import free_port
from tests.helpers import get, post, run, wait_until

FAST = Scrape(interval=0.05, timeout=0.3)


def config(scrape: Scrape = FAST, metrics: dict[str, MetricsSource] | None = None) -> Config:
    """A configuration whose pools only say where /metrics are; the tests set the table's membership."""
    pools = [
        Pool(name=name, models=[f"model-{name}"], endpoints=PoolEndpoints(static=[]), metrics=source)
        for name, source in (metrics or {"p": MetricsSource()}).items()
    ]
    return Config(pools=pools, scrape=scrape)


def table_of(pool: str, *addresses: str) -> EndpointTable:
    table = EndpointTable([pool])
    table.replace_pool(pool, addresses)
    return table


def state(table: EndpointTable, address: str, pool: str = "p") -> EndpointState:
    found = table.get(pool, address)
    assert found is not None
    return found


# ----- parser ---------------------------------------------------------------------------------

LEGACY = b"""\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.2-1B"} 3.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="meta-llama/Llama-3.2-1B"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.2-1B"} 7.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.2-1B"} 0.42
# HELP vllm:cpu_cache_usage_perc CPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:cpu_cache_usage_perc gauge
vllm:cpu_cache_usage_perc{model_name="meta-llama/Llama-3.2-1B"} 0.9
# TYPE vllm:gpu_prefix_cache_hit_rate gauge
vllm:gpu_prefix_cache_hit_rate{model_name="meta-llama/Llama-3.2-1B"} 0.5
"""


def test_parser_reads_the_simulator_page_like_prometheus_client(start_simulator) -> None:
    sim = start_simulator("--time-scale", "0")
    body = get(f"{sim.base}/metrics").body
    load = parse_vllm_metrics(body)
    expected = {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name.startswith(("vllm:num_requests_", "vllm:kv_cache"))
    }
    assert load.waiting == expected["vllm:num_requests_waiting"]
    assert load.running == expected["vllm:num_requests_running"]
    assert load.kv_usage == expected["vllm:kv_cache_usage_perc"]
    assert load.series == 1
    # Fast enough for 20 scrapes/s/endpoint on the gRPC server's event loop (measured ~20 us for 17 KB).
    times = []
    for _ in range(200):
        start = time.perf_counter()
        parse_vllm_metrics(body)
        times.append(time.perf_counter() - start)
    assert len(body) > 10_000 and statistics.median(times) < 0.001


def test_parser_falls_back_to_legacy_names() -> None:
    load = parse_vllm_metrics(LEGACY)
    assert (load.waiting, load.running, load.kv_usage, load.series) == (7.0, 3.0, 0.42, 1)


def test_parser_prefers_current_kv_name_when_both_are_present() -> None:
    page = LEGACY + b'vllm:kv_cache_usage_perc{model_name="m",engine="0"} 0.25\n'
    assert parse_vllm_metrics(page).kv_usage == 0.25


def test_parser_sums_queues_and_averages_kv_over_engines() -> None:
    page = b"""\
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 5.0
vllm:num_requests_running{engine="0",model_name="m"} 10
vllm:num_requests_running{engine="1",model_name="m"} 12
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6"""  # and no trailing newline
    load = parse_vllm_metrics(page)
    assert (load.waiting, load.running, load.series) == (7.0, 22.0, 2)
    assert load.kv_usage == pytest.approx(0.4)


def test_parser_edge_cases_of_the_text_format() -> None:
    page = (
        b'vllm:num_requests_waiting{model_name="we}ird name",engine="0"} 4 1712345678000\n'  # first line, timestamp
        b"# HELP vllm:num_requests_running mentions vllm:num_requests_running 99\n"
        b'vllm:num_requests_running_by_kind{kind="x"} 99\n'  # a longer name with the same prefix
        b"vllm:num_requests_running 1e0\r\n"  # no labels, CRLF
        b'vllm:kv_cache_usage_perc{engine="0"}\t0.5\n'
        b"# EOF\n"
    )
    assert parse_vllm_metrics(page)[:3] == (4.0, 1.0, 0.5)


@pytest.mark.parametrize(
    "page",
    [
        b"",
        b"<html>not metrics</html>",
        b"vllm:num_requests_waiting 1\nvllm:num_requests_running 1\n",  # no KV usage
        b'vllm:num_requests_waiting{a="b"} x\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0\n',
        b"vllm:num_requests_waiting NaN\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0\n",
        b'vllm:num_requests_waiting{a="b"\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0\n',
    ],
)
def test_parser_refuses_pages_it_cannot_trust(page: bytes) -> None:
    with pytest.raises(MetricsParseError):
        parse_vllm_metrics(page)


def test_metrics_url() -> None:
    assert metrics_url("10.0.0.1:8000", MetricsSource()) == "http://10.0.0.1:8000/metrics"
    assert metrics_url("[fd00::1]:8000", MetricsSource(port=9090, path="/m")) == "http://[fd00::1]:9090/m"


# ----- scraper against real simulators ---------------------------------------------------------


def test_scraper_sees_the_waiting_queue_build_and_drain(start_simulator) -> None:
    sim = start_simulator("--time-scale", "1", "--max-num-seqs", "1")
    table = table_of("p", sim.address)
    ep = state(table, sim.address)
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}

    async def go() -> tuple[float, float]:
        scraper = Scraper(config(), table)
        await scraper.start()
        try:
            await wait_until(lambda: ep.scrape_ok, what="first scrape")
            assert (ep.waiting, ep.running) == (0, 0)
            async with aiohttp.ClientSession() as session:

                async def one() -> int:
                    async with session.post(f"{sim.base}/v1/chat/completions", json=body) as r:
                        await r.read()
                        return r.status

                requests = [asyncio.create_task(one()) for _ in range(4)]
                max_waiting = max_running = 0.0
                while not all(t.done() for t in requests):
                    max_waiting = max(max_waiting, ep.waiting)
                    max_running = max(max_running, ep.running)
                    await asyncio.sleep(0.01)
                assert [t.result() for t in requests] == [200] * 4
            await wait_until(lambda: ep.waiting == 0 and ep.running == 0, 2.0, "queue to drain")
            return max_waiting, max_running
        finally:
            await scraper.stop()

    max_waiting, max_running = run(go())
    assert max_running == 1  # --max-num-seqs 1
    assert max_waiting >= 2  # 4 requests of ~200 ms each, scraped every 50 ms


def test_killed_endpoint_turns_not_ok_and_keeps_its_last_figures(start_simulator) -> None:
    sim = start_simulator("--time-scale", "0")
    table = table_of("p", sim.address)
    ep = state(table, sim.address)

    async def go() -> None:
        scraper = Scraper(config(), table)
        await scraper.start()
        try:
            await wait_until(lambda: ep.scrape_ok and scraper.stats[sim.address].successes >= 3, what="scrapes")
            await asyncio.to_thread(sim.child.stop)
            stopped_at = time.monotonic()
            await wait_until(lambda: not ep.scrape_ok, 1.0, "scrape_ok to turn False")
            assert time.monotonic() - stopped_at < 0.5  # connection refused is seen at the next scrape
            last = ep.scraped_at
            assert last is not None and last <= stopped_at
            ep.waiting = 123.0  # a marker: failed scrapes must not touch the figures
            await asyncio.sleep(1.0)
            stats = scraper.stats[sim.address]
            assert ep.scraped_at == last and not ep.scrape_ok and ep.waiting == 123.0
            assert stats.errors_by_kind.get("connect", 0) == stats.errors >= 2
            assert stats.errors <= 8  # backed off: 0.1, 0.2, 0.4, 0.8 s... not 20 attempts per second
            assert stats.next_delay > FAST.interval and stats.last_error
        finally:
            await scraper.stop()

    run(go())


def test_hung_endpoint_does_not_delay_a_healthy_one(start_simulator) -> None:
    healthy = start_simulator("--time-scale", "0")
    hung = start_simulator("--time-scale", "0")
    table = table_of("p", healthy.address, hung.address)
    good, bad = state(table, healthy.address), state(table, hung.address)

    async def go() -> None:
        scraper = Scraper(config(), table)
        await scraper.start()
        try:
            await wait_until(lambda: good.scrape_ok and bad.scrape_ok, what="first scrapes")
            assert post(f"{hung.base}/sim/faults", {"hang": True}).status == 200
            seen: list[float] = []
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                if good.scraped_at is not None and (not seen or good.scraped_at != seen[-1]):
                    seen.append(good.scraped_at)
                await asyncio.sleep(0.005)
            gaps = [b - a for a, b in itertools.pairwise(seen)]
            assert len(seen) >= 15, seen  # ~30 at 50 ms
            assert max(gaps) < 0.25, gaps  # never waited for the hung endpoint's 0.3 s timeout
            assert good.scrape_ok and not bad.scrape_ok
            assert scraper.stats[hung.address].errors_by_kind.get("timeout", 0) >= 1
            # When it answers again, the back-off resets and it is scraped normally.
            assert post(f"{hung.base}/sim/faults", {"hang": False}).status == 200
            await wait_until(lambda: bad.scrape_ok, 3.0, "the hung endpoint to recover")
            assert scraper.stats[hung.address].next_delay == FAST.interval
        finally:
            await scraper.stop()
            post(f"{hung.base}/sim/faults", {"hang": False})

    run(go())


def test_membership_changes_start_and_stop_scrapes(start_simulator) -> None:
    a = start_simulator("--time-scale", "0")
    b = start_simulator("--time-scale", "0")
    table = table_of("p", a.address)

    async def go() -> None:
        scraper = Scraper(config(), table)
        await scraper.start()
        try:
            first_a = state(table, a.address)
            await wait_until(lambda: first_a.scrape_ok, what="a scraped")
            assert scraper.scraping() == [a.address]

            table.replace_pool("p", [a.address, b.address])
            new_b = state(table, b.address)
            assert not new_b.scrape_ok and new_b.scraped_at is None
            await wait_until(lambda: new_b.scrape_ok, 1.0, "b scraped soon after it joined")
            assert sorted(scraper.scraping()) == sorted([a.address, b.address])

            table.replace_pool("p", [b.address])
            assert scraper.scraping() == [b.address] and a.address not in scraper.stats
            await asyncio.sleep(0.05)  # let the cancelled task finish
            frozen = first_a.scraped_at
            b_before = new_b.scraped_at
            await asyncio.sleep(0.3)
            assert first_a.scraped_at == frozen  # the dropped state is no longer written
            assert new_b.scraped_at != b_before

            table.replace_pool("p", [a.address, b.address])  # back again: a fresh state, scraped again
            again = state(table, a.address)
            assert again is not first_a
            await wait_until(lambda: again.scrape_ok, 1.0, "a scraped after re-joining")
        finally:
            await scraper.stop()
        assert scraper.scraping() == []
        table.replace_pool("p", [])  # listeners are gone: nothing to start or stop
        table.replace_pool("p", [a.address])
        assert scraper.scraping() == []

    run(go())


def test_metrics_port_path_and_bad_answers(start_simulator) -> None:
    sim = start_simulator("--time-scale", "0")
    # The serving port 1 is closed; the metrics port is the simulator's.
    table = EndpointTable(["other-port", "not-found", "not-metrics"])
    table.replace_pool("other-port", ["127.0.0.1:1"])
    table.replace_pool("not-found", [sim.address])
    table.replace_pool("not-metrics", [f"127.0.0.2:{sim.port}"])
    metrics = {
        "other-port": MetricsSource(port=sim.port),
        "not-found": MetricsSource(path="/nope"),
        "not-metrics": MetricsSource(path="/v1/models"),
    }

    async def go() -> None:
        scraper = Scraper(config(FAST, metrics), table)
        await scraper.start()
        try:
            other = state(table, "127.0.0.1:1", "other-port")
            await wait_until(lambda: other.scrape_ok, what="scrape through the metrics port")
            await wait_until(
                lambda: all(s.errors for a, s in scraper.stats.items() if a != "127.0.0.1:1"), what="errors"
            )
            stats = scraper.snapshot()
            assert stats["127.0.0.1:1"]["url"] == f"http://127.0.0.1:{sim.port}/metrics"
            assert stats["127.0.0.1:1"]["successes"] >= 1 and stats["127.0.0.1:1"]["errors"] == 0
            assert stats[sim.address]["errors_by_kind"].keys() == {"status"}
            assert stats[sim.address]["last_error"] == "HTTP 404"
            unparseable = stats[f"127.0.0.2:{sim.port}"]
            # 127.0.0.2 is loopback on Linux, but the simulator listens on 127.0.0.1 only, so a refusal is fine too.
            assert unparseable["errors_by_kind"].keys() <= {"parse", "connect"}
            assert not state(table, sim.address, "not-found").scrape_ok
        finally:
            await scraper.stop()

    run(go())


def test_one_address_in_two_pools_is_scraped_once_for_both(start_simulator) -> None:
    sim = start_simulator("--time-scale", "0")
    table = EndpointTable(["x", "y"])
    table.replace_pool("x", [sim.address])
    table.replace_pool("y", [sim.address])

    async def go() -> None:
        scraper = Scraper(config(), table)
        await scraper.start()
        try:
            sx, sy = state(table, sim.address, "x"), state(table, sim.address, "y")
            await wait_until(lambda: sx.scrape_ok and sy.scrape_ok, what="both pools' states")
            assert scraper.scraping() == [sim.address]
            table.replace_pool("x", [])  # still in y: keep scraping
            assert scraper.scraping() == [sim.address]
        finally:
            await scraper.stop()

    run(go())


def test_stop_is_clean_even_while_scrapes_hang(start_simulator) -> None:
    sim = start_simulator("--time-scale", "0")
    table = table_of("p", sim.address)

    async def go() -> None:
        scraper = Scraper(config(Scrape(interval=0.05, timeout=5.0)), table)
        await scraper.start()
        try:
            await wait_until(lambda: state(table, sim.address).scrape_ok, what="first scrape")
            post(f"{sim.base}/sim/faults", {"hang": True})
            await asyncio.sleep(0.2)  # a scrape is now stuck waiting for an answer
            started = time.monotonic()
            await scraper.stop()
            assert time.monotonic() - started < 1.0
            await scraper.stop()  # twice is fine
            assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
        finally:
            await scraper.stop()
            post(f"{sim.base}/sim/faults", {"hang": False})

    run(go())


def test_parser_reads_the_kv_capacity_of_every_engine() -> None:
    page = b"""\
vllm:num_requests_waiting{engine="0",model_name="m"} 0
vllm:num_requests_running{engine="0",model_name="m"} 0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="1",num_gpu_blocks="500"} 1.0
"""
    assert parse_vllm_metrics(page).cache_tokens == 1500 * 16
    unsized = page.replace(b'num_gpu_blocks="500"', b'num_gpu_blocks="None"')
    assert parse_vllm_metrics(unsized).cache_tokens is None  # unknown, never too small
    assert parse_vllm_metrics(page.split(b"vllm:cache_config_info")[0]).cache_tokens is None


class _CountingCollector:
    """A named metric family that counts how often the server rendered it."""

    def __init__(self) -> None:
        self.collected = 0

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily("vllm:request_prefill_time_seconds", "big")]

    def collect(self) -> list[Metric]:
        self.collected += 1
        family = HistogramMetricFamily("vllm:request_prefill_time_seconds", "big", labels=["model_name"])
        family.add_metric(["m"], [(str(b), b) for b in range(1, 40)] + [("+Inf", 40)], 100.0)
        return [family]


def test_scraper_asks_a_prometheus_client_server_only_for_what_it_reads() -> None:
    """prometheus_client's exposition (what vLLM mounts at /metrics) honours ``name[]``: the scraper's request
    makes the model server render three gauges and the cache info, not its histograms."""
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_waiting", "w", labels, registry=registry).labels("m", "0").set(3)
    Gauge("vllm:num_requests_running", "r", labels, registry=registry).labels("m", "0").set(5)
    Gauge("vllm:kv_cache_usage_perc", "k", labels, registry=registry).labels("m", "0").set(0.25)
    info = Gauge("vllm:cache_config_info", "c", ["block_size", "num_gpu_blocks"], registry=registry)
    info.labels("16", "1000").set(1)
    big = _CountingCollector()
    registry.register(big)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    table = table_of("p", f"127.0.0.1:{port}")

    async def go() -> None:
        scraper = Scraper(config(FAST), table)
        await scraper.start()
        try:
            endpoint = state(table, f"127.0.0.1:{port}")
            await wait_until(lambda: scraper.stats[endpoint.address].successes >= 3, what="three scrapes")
            assert (endpoint.waiting, endpoint.running, endpoint.kv_usage) == (3, 5, 0.25)
            assert endpoint.cache_tokens == 16_000
        finally:
            await scraper.stop()

    try:
        run(go())
    finally:
        server.shutdown()
        thread.join(5)
    assert big.collected == 0
    assert parse_vllm_metrics(generate_latest(registry)).waiting == 3  # the whole page parses the same
    assert big.collected == 1
