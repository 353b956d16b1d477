"""Shared state through a real `redis-server` on 127.0.0.1: picks made by one replica reach the others.

Each test starts its own redis-server (Debian's package; skipped, saying so, without it) on a free port and
stops it by PID. Waits are event-based (poll until the condition holds, with a generous bound), never sleeps
that assume how fast this machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc import config as cfg
from extproc.datalayer.scrape import VllmLoad
from extproc.datalayer.table import EndpointTable
from extproc.local.procs import free_port, port_free
from extproc.scheduling import RoutingRequest, Scheduler
from extproc.state.records import Load, decode_batch, decode_loads, encode_batch, encode_loads
from extproc.state.replicator import Replicator

POOL, MODEL = "pool", "m"
ADDRESSES = [f"10.0.0.{i}:8000" for i in range(1, 5)]
DOCUMENT = "You are the assistant of tenant seven. Context: " + "the river runs north to the sea. " * 60

NO_REDIS = "redis-server not installed (Debian: apt-get install redis-server; .ci/run installs it)"


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence; stop/restart by PID."""

    def __init__(self, tmp: Path, *extra: str, port: int | None = None, tls_ca: Path | None = None) -> None:
        self.port = port or free_port()
        self.tls_ca = tls_ca  # TLS only (rediss://): PING through redis-cli --tls with this CA
        self.tmp = tmp
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.tmp), *self.extra]
        log = (self.tmp / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 10, "redis-server to answer PING")

    def _answers(self) -> bool:
        tls = ["--tls", "--cacert", str(self.tls_ca)] if self.tls_ca else []
        return redis_cli(*tls, "-p", str(self.port), "ping").strip() == "PONG"

    def cli(self, *args: str) -> str:
        return redis_cli("-p", str(self.port), *args)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


def redis_cli(*args: str) -> str:
    """What ``redis-cli ARGS`` prints; "" when it does not finish in 5 s (a port held by a stopped process)."""
    try:
        return subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=5).stdout
    except subprocess.TimeoutExpired:
        return ""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def low_free_port() -> int:
    """A free port below 55536 whose port + 10000 is free too (Redis Cluster's bus port)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55000)
        if port_free(port) and port_free(port + 10000):
            return port
    raise AssertionError("no free port pair for a Redis Cluster node")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait on the event loop until ``condition`` holds; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def config(url: str | None = None, **state: Any) -> cfg.Config:
    data: dict[str, Any] = {"pools": [{"name": POOL, "models": [MODEL], "endpoints": {"static": ADDRESSES}}]}
    if url is not None:
        data["state"] = {"backend": "redis", "url": url, "timeout": 0.5, "warmup_timeout": 2.0, **state}
    return cfg.parse_config(data)


class Replica:
    """What one picker replica holds: its table, scheduler and replicator (no gRPC: the state is the point)."""

    def __init__(self, conf: cfg.Config, name: str) -> None:
        self.table = EndpointTable([POOL])
        self.table.replace_pool(POOL, ADDRESSES)
        for e in self.table.pool_endpoints(POOL):
            e.scrape_ok, e.scraped_at, e.cache_tokens = True, time.monotonic(), 16_000
        self.scheduler = Scheduler.from_config(conf, rng=random.Random(1))
        self.replicator = Replicator(conf, self.scheduler, self.table, name=name)

    def pick(self, text: str) -> str:
        request = RoutingRequest(POOL, MODEL, text, None, target_model=MODEL)
        decision = self.scheduler.schedule(request, self.table.pool_endpoints(POOL), time.monotonic())
        assert decision.routed
        return decision.endpoints[0]

    def prefix_scorer(self) -> Any:
        return next(p for p in self.scheduler.plugins() if getattr(p, "share_kind", None) == "prefix")

    def matches(self, text: str) -> dict[str, int]:
        scorer = self.prefix_scorer()
        return scorer.index.match(scorer.hashes(text, MODEL), ADDRESSES)


async def one_pick_replicates(conf: cfg.Config, timeout: float, what: str) -> None:
    """Two replicas on ``conf``: one pick by the first reaches the second's index within ``timeout``."""
    a, b = Replica(conf, "a"), Replica(conf, "b")
    await a.replicator.start()
    await b.replicator.start()
    try:
        home = a.pick(DOCUMENT)
        await until(lambda: b.replicator.stats.applied == 1, timeout, what)
        assert b.matches(DOCUMENT)[home] > 10
    finally:
        await a.replicator.stop()
        await b.replicator.stop()


# ----- the wire format and the plugin's records: no Redis ----------------------------------------------


def test_batches_round_trip_and_anything_else_is_rejected() -> None:
    picks = [("pool", "10.0.0.1:8000", [("prefix", b"\x00" * 12), ("other", b"")]), ("p2", "[::1]:80", [])]
    data = encode_batch(picks)
    assert decode_batch(data) == picks
    for bad in (b"", b"\x02" + data[1:], data[:-1], data + b"x", b"\x01\xff\xff\xff\xff", b"garbage" * 3):
        with pytest.raises(ValueError):
            decode_batch(bad)


def test_loads_round_trip_and_bad_ones_are_rejected() -> None:
    loads = [Load("10.0.0.1:8000", 3.0, 7.0, 0.25, 16_000, 1e9), Load("[::1]:80", 0.0, 0.0, 0.0, None, 2.5)]
    data = encode_loads(loads)
    assert decode_loads(data) == loads
    nan = encode_loads([Load("a", float("nan"), 0.0, 0.0, None, 1.0)])
    negative = encode_loads([Load("a", 0.0, -1.0, 0.0, None, 1.0)])
    for bad in (b"", b"\x02" + data[1:], data[:-1], data + b"x", nan, negative):
        with pytest.raises(ValueError):
            decode_loads(bad)


def test_a_shared_pick_teaches_another_scheduler_the_same_prefix() -> None:
    a, b = Replica(config(), "a"), Replica(config(), "b")
    a.scheduler.share(100)
    home = a.pick(DOCUMENT + "first question")
    taken = a.scheduler.take_shared()
    assert [(pool, address) for pool, address, _ in taken] == [(POOL, home)]
    (kind, payload) = taken[0][2][0]
    assert kind == "prefix"
    b.scheduler.apply_shared(kind, home, payload)
    assert b.matches(DOCUMENT)[home] == a.matches(DOCUMENT)[home] > 10
    assert b.pick(DOCUMENT + "second question") == home  # b now routes the tenant where a sent it
    with pytest.raises(ValueError):
        b.scheduler.apply_shared("prefix", home, payload[:-3])
    with pytest.raises(ValueError):
        b.scheduler.apply_shared("nobody", home, payload)


def test_the_outbox_is_bounded_and_counts_what_it_drops() -> None:
    a = Replica(config(), "a")
    a.scheduler.share(100)
    for i in range(150):
        a.pick(f"prompt {i} " * 20)
    assert a.scheduler.shared_dropped == 50
    assert len(a.scheduler.take_shared()) == 100
    assert a.scheduler.take_shared() == []


def test_without_sharing_nothing_is_kept() -> None:
    a = Replica(config(), "a")
    a.pick(DOCUMENT)
    assert a.scheduler.take_shared() == []


# ----- through a real redis-server ----------------------------------------------------------------------


def test_picks_reach_the_other_replica_and_a_new_replica_warms_up_before_ready(redis_server: RedisServer) -> None:
    async def main() -> None:
        conf = config(redis_server.url)
        a, b = Replica(conf, "a"), Replica(conf, "b")
        await a.replicator.start()
        await b.replicator.start()
        try:
            homes = {t: a.pick(f"Tenant {t}. " + DOCUMENT + f"question of tenant {t}") for t in range(8)}
            took = await until(lambda: b.replicator.stats.applied == 8, 5, "b to apply a's 8 picks")
            for t, home in homes.items():
                assert b.matches(f"Tenant {t}. " + DOCUMENT)[home] > 10
            assert a.replicator.stats.published == 8 and a.replicator.stats.applied == 0  # its own are skipped
            lag = {s.name: s.value for m in b.replicator.lag.collect() for s in m.samples}
            assert lag["extproc_state_replication_lag_seconds_count"] >= 1
            assert lag["extproc_state_replication_lag_seconds_sum"] < lag["extproc_state_replication_lag_seconds_count"]
            # a replica that starts now reads the history before start() returns
            c = Replica(conf, "c")
            await c.replicator.start()
            try:
                assert c.replicator.stats.warmup_entries >= 1 and c.replicator.stats.applied == 8
                for t, home in homes.items():
                    assert c.matches(f"Tenant {t}. " + DOCUMENT)[home] > 10
            finally:
                await c.replicator.stop()
            print(f"replicated in {took * 1000:.0f} ms")
        finally:
            await a.replicator.stop()
            await b.replicator.stop()

    asyncio.run(main())


def test_an_idle_replica_publishes_nothing_and_a_pick_goes_out_at_once(redis_server: RedisServer) -> None:
    def xadds() -> int:
        stats = redis_server.cli("INFO", "commandstats")
        line = next((x for x in stats.splitlines() if x.startswith("cmdstat_xadd:")), "calls=0,")
        return int(line.split("calls=")[1].split(",")[0])

    async def main() -> None:
        conf = config(redis_server.url)
        a, b = Replica(conf, "a"), Replica(conf, "b")
        await a.replicator.start()
        await b.replicator.start()
        try:
            before = xadds()
            await asyncio.sleep(0.5)  # a hundred publish intervals with nothing to publish
            assert xadds() == before
            a.pick(DOCUMENT)
            took = await until(lambda: b.replicator.stats.applied == 1, 5, "the pick to reach b")
            assert xadds() == before + 1
            assert took < 1.0  # woken by the pick, not by a slow timer
        finally:
            await a.replicator.stop()
            await b.replicator.stop()

    asyncio.run(main())


def test_scrapes_are_shared_one_replica_per_endpoint_and_the_next_takes_over(redis_server: RedisServer) -> None:
    async def main() -> None:
        conf = config(redis_server.url)
        interval = conf.scrape.interval
        a, b = Replica(conf, "a"), Replica(conf, "b")
        await a.replicator.start()
        await b.replicator.start()
        try:
            # b ranks first for some endpoints, a for the others: a's scrapes make b skip only where a ranks first
            a_first = [x for x in ADDRESSES if a.replicator.rank(b"a", x) < b.replicator.rank(b"b", x)]
            assert 0 < len(a_first) < len(ADDRESSES), "pick replica names that split these endpoints"
            for address in ADDRESSES:
                a.replicator.scraped(address, VllmLoad(waiting=5.0, running=3.0, kv_usage=0.5, series=1))
            await until(lambda: b.replicator.stats.loads_applied == len(ADDRESSES), 5, "b to apply a's scrapes")
            assert all(e.waiting == 5.0 and e.pending == 0 for e in b.table.pool_endpoints(POOL))
            assert [x for x in ADDRESSES if b.replicator.covered(x)] == a_first
            assert not any(a.replicator.covered(x) for x in ADDRESSES)  # b published nothing
            # a scraping on (no picks to carry its figures): they keep arriving, b keeps skipping
            for _ in range(10):
                await asyncio.sleep(interval)
                for address in ADDRESSES:
                    a.replicator.scraped(address, VllmLoad(waiting=1.0, running=1.0, kv_usage=0.1, series=1))
                assert [x for x in ADDRESSES if b.replicator.covered(x)] == a_first
            await until(lambda: b.replicator.stats.loads_applied >= 5 * len(ADDRESSES), 5, "a's later scrapes")
            # a goes quiet (stopped, crashed, cut off): b scrapes those endpoints itself again
            await asyncio.sleep(4 * interval + 0.02)
            assert not any(b.replicator.covered(x) for x in ADDRESSES)
        finally:
            await a.replicator.stop()
            await b.replicator.stop()

    asyncio.run(main())


def test_foreign_and_corrupt_entries_are_skipped_and_counted(redis_server: RedisServer) -> None:
    async def main() -> None:
        conf = config(redis_server.url)
        key = conf.state.key
        redis_server.cli("XADD", key, "*", "hello", "world")
        redis_server.cli("XADD", key, "*", "r", "x", "t", "1", "b", "\x01garbage")
        redis_server.cli("XADD", key, "*", "r", "x", "t", "not a time", "b", "")
        a, b = Replica(conf, "a"), Replica(conf, "b")
        await a.replicator.start()
        await b.replicator.start()
        try:
            assert b.replicator.stats.rejected == 3
            redis_server.cli("XADD", key, "*", "more", "junk")
            home = a.pick(DOCUMENT)
            await until(lambda: b.replicator.stats.applied == 1, 5, "b to apply a's pick after the junk")
            assert b.replicator.stats.rejected == 4 and b.matches(DOCUMENT)[home] > 10
            # the key taken over by another program's value: errors, counted, routing goes on; back when freed
            redis_server.cli("DEL", key)
            redis_server.cli("SET", key, "not a stream")
            a.pick("during " + DOCUMENT)
            await until(lambda: "WRONGTYPE" in a.replicator.stats.last_error, 5, "the wrong type to be noticed")
            redis_server.cli("DEL", key)
            await until(lambda: b.replicator.stats.applied == 2, 10, "replication once the key is a stream again")
        finally:
            await a.replicator.stop()
            await b.replicator.stop()

    asyncio.run(main())


def test_a_copy_of_an_entry_is_applied_once(redis_server: RedisServer) -> None:
    """A publish that timed out may have reached Redis: its retry (the same entry) must not count twice."""

    async def main() -> None:
        import redis.asyncio as aioredis

        conf = config(redis_server.url)
        a, b = Replica(conf, "a"), Replica(conf, "b")
        await a.replicator.start()
        await b.replicator.start()
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            home = a.pick(DOCUMENT)
            await until(lambda: b.replicator.stats.applied == 1, 5, "b to apply a's pick")
            pending = next(e.pending for e in b.table.pool_endpoints(POOL) if e.address == home)
            [(_, fields)] = await client.xrange(conf.state.key)
            await client.xadd(conf.state.key, fields)  # what a retried XADD leaves behind
            await until(lambda: b.replicator.stats.duplicates == 1, 5, "b to see the copy")
            assert b.replicator.stats.applied == 1
            assert next(e.pending for e in b.table.pool_endpoints(POOL) if e.address == home) == pending
            a.pick("another " + DOCUMENT)  # a's next entry is new, not mistaken for a copy
            await until(lambda: b.replicator.stats.applied == 2, 5, "b to apply a's next pick")
        finally:
            await client.aclose()
            await a.replicator.stop()
            await b.replicator.stop()

    asyncio.run(main())


def test_redis_down_at_start_stalled_and_restarted_empty(redis_server: RedisServer) -> None:
    async def main() -> None:
        conf = config(redis_server.url)
        redis_server.stop()
        a, b = Replica(conf, "a"), Replica(conf, "b")
        started = time.monotonic()
        await a.replicator.start()  # Redis is down: ready after at most warmup_timeout, on local state
        await b.replicator.start()
        assert time.monotonic() - started < 2 * (conf.state.warmup_timeout + 1)
        assert not a.replicator.stats.up
        try:
            first = a.pick("one " + DOCUMENT)  # decisions go on meanwhile
            redis_server.start()  # back, empty: the queued pick goes out, b catches up
            await until(lambda: b.replicator.stats.applied == 1, 10, "replication after Redis came back")
            assert b.matches("one " + DOCUMENT)[first] > 10

            assert redis_server.proc is not None
            os.kill(redis_server.proc.pid, signal.SIGSTOP)  # a hung Redis
            try:
                second = a.pick("two " + DOCUMENT)
                picked_while_stalled = time.monotonic()
                await until(lambda: not a.replicator.stats.up or not b.replicator.stats.up, 10, "a stall noticed")
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            # exactly once, though the stalled XADD may reach Redis after all and be sent again
            resumed = await until(lambda: b.replicator.stats.applied >= 2, 10, "replication after SIGCONT")
            assert b.matches("two " + DOCUMENT)[second] > 10
            print(
                f"stalled pick applied {time.monotonic() - picked_while_stalled:.2f}s after; {resumed:.2f}s after CONT;"
                f" copies skipped: {b.replicator.stats.duplicates}"
            )
            await until(lambda: not a.replicator.stats.outbox and a.replicator._unsent is None, 10, "a's retry")
            assert b.replicator.stats.applied == 2

            redis_server.stop()  # killed and restarted empty
            redis_server.start()
            third = a.pick("three " + DOCUMENT)
            resumed = await until(lambda: b.replicator.stats.applied == 3, 10, "replication after a restart")
            assert resumed < 2 + 2.0  # within 2 s of Redis answering (plus the publish interval and slack)
            assert b.matches("three " + DOCUMENT)[third] > 10
            assert a.replicator.stats.dropped == 0
        finally:
            await a.replicator.stop()
            await b.replicator.stop()

    asyncio.run(main())


def test_stop_ends_in_bounded_time_with_redis_stalled(redis_server: RedisServer) -> None:
    """A picker shutting down while Redis hangs: stop() gives up on the flush and the close, never waits on."""

    async def main() -> None:
        conf = config(redis_server.url)
        a = Replica(conf, "a")
        await a.replicator.start()
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            a.pick(DOCUMENT)  # waiting to be published when the stop comes
            started = time.monotonic()
            await a.replicator.stop()
            took = time.monotonic() - started
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        # the loops (2 x timeout), cancelling a stuck one (timeout), the flush and the close (timeout each)
        assert took < 5 * conf.state.timeout + 0.5, took
        assert not a.replicator._tasks or all(t.done() for t in a.replicator._tasks)

    asyncio.run(main())


def test_a_redis_cluster_and_a_sentinel_watched_primary_work_the_same(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip(NO_REDIS)
    servers: list[RedisServer] = []
    try:
        for _ in range(3):
            port = low_free_port()  # a cluster node's bus listens on port + 10000
            node = RedisServer(
                tmp_path, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf", port=port
            )
            servers.append(node)
            node.start()
        nodes = [f"127.0.0.1:{n.port}" for n in servers]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        wait_for(lambda: "cluster_state:ok" in servers[0].cli("cluster", "info"), 30, "the cluster to form")

        primary = RedisServer(tmp_path)
        servers.append(primary)
        primary.start()
        sentinel_port = free_port()
        conf_file = tmp_path / "sentinel.conf"
        conf_file.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 {primary.port} 1\n"
        )
        sentinel = subprocess.Popen(
            ["redis-server", str(conf_file), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            ask = ["-p", str(sentinel_port), "sentinel", "get-master-addr-by-name", "main"]
            wait_for(lambda: str(primary.port) in redis_cli(*ask), 30, "sentinel")

            for url in (f"redis+cluster://{nodes[1]}", f"redis+sentinel://127.0.0.1:{sentinel_port}/main/0"):
                asyncio.run(one_pick_replicates(config(url), 10, f"replication through {url}"))
        finally:
            sentinel.kill()
            sentinel.wait(10)
    finally:
        for server in servers:
            server.stop()


def test_the_password_comes_from_a_file_or_the_environment_never_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from extproc.state.connect import password

    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    assert password(config("redis://r:6379", password_file=str(secret)).state) == "s3cret"
    monkeypatch.setenv("EXTPROC_TEST_REDIS_PASSWORD", "from-env")
    assert password(config("redis://r:6379", password_env="EXTPROC_TEST_REDIS_PASSWORD").state) == "from-env"
    monkeypatch.delenv("EXTPROC_TEST_REDIS_PASSWORD")
    assert password(config("redis://r:6379", password_env="EXTPROC_TEST_REDIS_PASSWORD").state) is None
    with pytest.raises(cfg.ConfigError, match="password_file"):
        password(config("redis://r:6379", password_file=str(tmp_path / "missing")).state)
    with pytest.raises(cfg.ConfigError, match="must not hold a password"):
        config("redis://user:pw@r:6379")
    with pytest.raises(cfg.ConfigError, match="not both"):
        config("redis://r:6379", password_file="a", password_env="B")


def test_a_password_protected_redis_with_an_acl_user(redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.cli("ACL", "SETUSER", "picker", "on", ">pw-of-picker", "~extproc:*", "+@all")
    redis_server.cli("CONFIG", "SET", "requirepass", "admin-pw")
    secret = tmp_path / "password"
    secret.write_text("pw-of-picker")

    async def main() -> None:
        good = config(redis_server.url, username="picker", password_file=str(secret))
        await one_pick_replicates(good, 5, "replication as an ACL user")
        wrong = Replica(config(redis_server.url), "c")  # no password: refused, and said so
        await wrong.replicator.start()
        try:
            assert not wrong.replicator.stats.up and "auth" in wrong.replicator.stats.last_error.lower()
            assert wrong.pick(DOCUMENT)  # it still routes, on its own state
        finally:
            await wrong.replicator.stop()

    asyncio.run(main())


def test_serve_check_names_a_bad_state_section(tmp_path: Path) -> None:
    import yaml

    base = {"pools": [{"name": POOL, "models": [MODEL], "endpoints": {"static": ADDRESSES}}]}
    cases = [
        ({"backend": "redis", "url": "redis://r:6379/0", "password_file": str(tmp_path / "nope")}, "password_file"),
        ({"backend": "redis", "url": "redis+sentinel://h:26379"}, "MASTER_NAME"),
        ({"backend": "redis"}, "needs 'url'"),
    ]
    for state, expected in cases:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({**base, "state": state}))
        argv = [sys.executable, "-m", "extproc", "serve", "--config", str(path), "--check"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2 and expected in result.stderr, (state, result.stderr)


def test_rediss_with_a_private_ca(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        pytest.skip(f"{NO_REDIS}, and openssl to make the certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, capture_output=True, check=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=extproc-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "san").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "srv.crt", "-days", "2", "-extfile", "san")  # fmt: skip
    ca = tmp_path / "ca.crt"
    server = RedisServer(tmp_path, "--tls-cert-file", "srv.crt", "--tls-key-file", "srv.key", tls_ca=ca)
    server.extra += ("--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--tls-port", str(server.port))
    server.extra += ("--port", "0")  # TLS only: the plain port is off
    server.start()
    try:

        async def main() -> None:
            url = f"rediss://127.0.0.1:{server.port}/0"
            await one_pick_replicates(config(url, ca_file=str(tmp_path / "ca.crt")), 5, "replication over TLS")
            untrusted = Replica(config(url), "c")  # the system CAs do not know the private one: refused
            await untrusted.replicator.start()
            try:
                assert (
                    not untrusted.replicator.stats.up and "certificate" in untrusted.replicator.stats.last_error.lower()
                )
            finally:
                await untrusted.replicator.stop()

        asyncio.run(main())
    finally:
        server.stop()
