"""The multi-model gateway side of Envoy 1.40: weighted splits, sticky splits, response headers, EDS from files.

Real simulators and real Envoys, with the ext_proc down (a closed port): what is measured here is Envoy's own
behaviour, which is what a request gets before (and whatever) the ext_proc decides inside the drawn pool.
Requests carry no ``model``, so each simulator answers with its own served name: the response tells which
pool served it, independently of the ``x-gateway-pool`` header under test.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extproc.config import Config, parse_config
from extproc.datalayer.eds import write_eds
from extproc.envoy.bootstrap import build_bootstrap
from extproc.envoy.run import cluster_members, start_envoy, wait_for_members
from extproc.local.procs import Child, free_port, start_sim
from extproc.names import POOL_RESPONSE_HEADER, ROUTING_US_HEADER, UPSTREAM_HOST_HEADER
from tests.helpers import Reply, get, post

MODEL = {"1b": "llama-3-2-1b", "3b": "llama-3-2-3b"}
POOL_OF_MODEL = {model: pool for pool, model in MODEL.items()}
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}  # no model: the pool's own answers
SPLIT = [{"pool": "1b", "weight": 70}, {"pool": "3b", "weight": 30}]
SPLITS = [
    {"name": "ab-test", "backends": SPLIT, "sticky_header": "x-user-id"},  # as in examples/config.yaml
    {"name": "plain", "backends": SPLIT},  # no hash policy at all
]
# 3,000 draws: a 70/30 share has a standard deviation of 0.84 points, so 3 points is 3.6 sigma (1,000 draws
# would make it 2.1 sigma, a test that fails one run in 25).
RANDOM_DRAWS = 3000


@dataclass
class Sims:
    pool_1b: list[str]
    pool_3b: list[str]
    spare: str  # a 1b replica in no pool until the EDS test adds it


@dataclass
class Gateway:
    base: str
    admin: str
    envoy: Child


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    log_dir = tmp_path_factory.mktemp("sims")
    plan = [("1b-0", "1b"), ("1b-1", "1b"), ("3b-0", "3b"), ("3b-1", "3b"), ("spare", "1b")]
    ports = {name: free_port() for name, _ in plan}
    children: list[Child] = []
    lock = threading.Lock()

    def start(name: str, pool: str) -> None:
        child = start_sim(name, MODEL[pool], ports[name], log_dir, "--time-scale", "0")
        with lock:
            children.append(child)

    try:
        with ThreadPoolExecutor(len(plan)) as pool:  # in parallel: each takes ~1 s to import and bind
            for future in [pool.submit(start, name, group) for name, group in plan]:
                future.result()
        address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        yield Sims([address["1b-0"], address["1b-1"]], [address["3b-0"], address["3b-1"]], address["spare"])
    finally:
        for child in children:
            child.stop()


def _config(sims: Sims, *, dns_3b: bool = False, **server: Any) -> Config:
    """Pools 1b and 3b of the simulators (3b as a DNS pool if ``dns_3b``), and the splits."""
    endpoints_3b = {"dns": {"name": "localhost", "port": 9}} if dns_3b else {"static": sims.pool_3b}
    return parse_config(
        {
            "pools": [
                {"name": "1b", "models": [MODEL["1b"]], "endpoints": {"static": sims.pool_1b}},
                {"name": "3b", "models": [MODEL["3b"]], "endpoints": endpoints_3b},
            ],
            "splits": SPLITS,
            "server": server,
        }
    )


def _start(config: Config, log_dir: Path, **kwargs: Any) -> Gateway:
    """Envoy with its ext_proc on a closed port: fail-open, so Envoy's own routing is what is seen."""
    listen, admin, closed = free_port(), free_port(), free_port()
    bootstrap = build_bootstrap(
        config, listen=f"127.0.0.1:{listen}", admin=f"127.0.0.1:{admin}", ext_proc=f"127.0.0.1:{closed}", **kwargs
    )
    envoy = start_envoy(bootstrap, log_dir, admin)
    return Gateway(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", envoy)


@pytest.fixture(scope="module")
def gateway(sims: Sims, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = _start(_config(sims), tmp_path_factory.mktemp("envoy-gateway"))
    try:
        yield gw
    finally:
        gw.envoy.stop()


def fire(base: str, path: str, headers: Iterable[dict[str, str]], workers: int = 8) -> list[Reply]:
    """POST the chat body to ``path`` once per headers dict, ``workers`` at a time; replies in order."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda h: post(f"{base}{path}", CHAT, headers=h), headers))


def pool_of(reply: Reply, sims: Sims) -> str:
    """The pool that served: by the model the simulator answered with, checked against the response headers."""
    assert reply.status == 200, reply.body
    pool = POOL_OF_MODEL[reply.json()["model"]]
    assert reply.headers[POOL_RESPONSE_HEADER] == pool, reply.headers
    members = {"1b": [*sims.pool_1b, sims.spare], "3b": sims.pool_3b}[pool]
    assert reply.headers[UPSTREAM_HOST_HEADER] in members, reply.headers
    return pool


def share_1b(pools: list[str]) -> float:
    return 100.0 * pools.count("1b") / len(pools)


# ------------------------------------------------------------------------------------------ weighted splits


@pytest.mark.parametrize(
    ("split", "headers"),
    [
        ("plain", {}),  # weighted_clusters alone
        ("ab-test", {}),  # a sticky split without its header: still a random draw, by weight
        ("plain", {"x-extproc-pool": "3b"}),  # the pool-header routes come after the splits: no hijack
    ],
)
def test_split_follows_the_weights(gateway: Gateway, sims: Sims, split: str, headers: dict[str, str]) -> None:
    pools = [pool_of(r, sims) for r in fire(gateway.base, f"/v1/{split}/chat/completions", [headers] * RANDOM_DRAWS)]
    assert abs(share_1b(pools) - 70) <= 3, Counter(pools)


def test_sticky_split_keeps_a_user_on_one_pool(gateway: Gateway, sims: Sims) -> None:
    users = [f"user-{i}" for i in range(20)]
    replies = fire(gateway.base, "/v1/ab-test/chat/completions", [{"x-user-id": u} for u in users * 10])
    seen: dict[str, set[str]] = {}
    for user, reply in zip(users * 10, replies, strict=True):
        seen.setdefault(user, set()).add(pool_of(reply, sims))
    assert all(len(pools) == 1 for pools in seen.values()), seen
    assert {p for pools in seen.values() for p in pools} == {"1b", "3b"}  # 20 users do not all hash alike


def test_sticky_split_over_many_users_follows_the_weights(gateway: Gateway, sims: Sims) -> None:
    """1,000 distinct users: the hash of each picks the pool, so the shares follow the weights (deterministic:
    the same ids hash the same way in every run and every Envoy)."""
    headers = [{"x-user-id": f"user-{i}"} for i in range(1000)]
    pools = [pool_of(r, sims) for r in fire(gateway.base, "/v1/ab-test/chat/completions", headers)]
    assert abs(share_1b(pools) - 70) <= 4, Counter(pools)


def test_response_headers_name_pool_and_routing_time(gateway: Gateway, sims: Sims) -> None:
    for path, headers, pool in [
        ("/v1/1b/chat/completions", {}, "1b"),
        ("/v1/3b/chat/completions", {}, "3b"),
        ("/v1/chat/completions", {"x-extproc-pool": "3b"}, "3b"),
        ("/v1/chat/completions", {}, "1b"),  # the default route
    ]:
        reply = post(f"{gateway.base}{path}", CHAT, headers=headers)
        assert pool_of(reply, sims) == pool
        # With the ext_proc down, Envoy does not buffer the body: the upstream request may start before the
        # request's last byte arrived, a negative span that Envoy's formatter leaves empty (no header). With
        # an ext_proc (test_envoy_bootstrap.py) the body is buffered first and the header is always there.
        if ROUTING_US_HEADER in reply.headers:
            assert 0 <= int(reply.headers[ROUTING_US_HEADER]) < 1_000_000, reply.headers


# ------------------------------------------------------------------------------------------ EDS from files


def test_eds_membership_changes_live(sims: Sims, tmp_path: Path) -> None:
    """Pool clusters read from EDS files: rewriting one moves traffic within ~1 s, no restart, no failures.

    Pool 3b is a DNS pool here: in EDS mode the ext_proc resolves it and writes its file, so Envoy starts
    with an empty file (and an empty cluster) until then.
    """
    eds_dir = tmp_path / "eds"
    gw = _start(
        _config(sims, dns_3b=True, eds_dir=str(eds_dir)), tmp_path / "envoy"
    )  # build_bootstrap wrote pool-1b.json (static) and pool-3b.json (empty)
    try:
        assert cluster_members(gw.admin, "pool-1b") == sorted(sims.pool_1b)
        assert cluster_members(gw.admin, "pool-3b") == []
        reply = post(f"{gw.base}/v1/3b/chat/completions", CHAT)
        assert reply.status == 503, reply.body
        assert reply.json()["error"]["message"] == "no healthy upstream"  # Envoy's local reply, as OpenAI JSON
        assert reply.headers[POOL_RESPONSE_HEADER] == "3b"
        assert ROUTING_US_HEADER not in reply.headers  # no upstream request, so no duration
        write_eds(eds_dir, "3b", sims.pool_3b)  # what the ext_proc's DNS discovery does
        assert wait_for_members(gw.admin, "pool-3b", sims.pool_3b, timeout=1.0) < 1.0
        assert pool_of(post(f"{gw.base}/v1/3b/chat/completions", CHAT), sims) == "3b"

        # Traffic on pool 1b while its file changes: (start time, status, upstream host) per request.
        log: list[tuple[float, int, str]] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                started = time.monotonic()
                reply = post(f"{gw.base}/v1/1b/chat/completions", CHAT)
                log.append((started, reply.status, reply.headers.get(UPSTREAM_HOST_HEADER, "")))

        def served_since(moment: float) -> Counter[str]:
            time.sleep(0.3)
            return Counter(host for started, _, host in list(log) if started > moment)

        workers = [threading.Thread(target=loop) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(0.2)
            a, b = sims.pool_1b
            for members in ([a, b, sims.spare], [b, sims.spare], [a, b]):  # add a 3rd, remove one, back
                write_eds(eds_dir, "1b", members)
                took = wait_for_members(gw.admin, "pool-1b", members, timeout=1.0)
                assert took < 1.0
                # From 50 ms on: /clusters shows the main thread's view, workers apply it a moment later.
                served = served_since(time.monotonic() + 0.05)
                assert set(served) == set(members), served  # every member gets traffic, nothing else does
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        statuses = Counter(status for _, status, _ in log)
        assert statuses == {200: len(log)} and len(log) > 100, statuses
        assert gw.envoy.alive()
        updates = get(f"{gw.admin}/stats?filter=^cluster.pool-1b.update_success$").body.decode()
        assert int(updates.split(":")[1]) >= 4  # the initial file and three rewrites, all read by the same Envoy
    finally:
        gw.envoy.stop()


def test_sticky_pools_agree_across_envoys(gateway: Gateway, sims: Sims, tmp_path: Path) -> None:
    """The header hash is deterministic, so two Envoy replicas (here STATIC and EDS ones) agree on each user."""
    other = _start(_config(sims, eds_dir=str(tmp_path / "eds")), tmp_path / "envoy")
    try:
        headers = [{"x-user-id": f"agree-{i}"} for i in range(100)]
        here = [pool_of(r, sims) for r in fire(gateway.base, "/v1/ab-test/chat/completions", headers)]
        there = [pool_of(r, sims) for r in fire(other.base, "/v1/ab-test/chat/completions", headers)]
        assert here == there
    finally:
        other.envoy.stop()
