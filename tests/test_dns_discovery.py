"""DNS discovery against a real DNS server on 127.0.0.1 whose records change while traffic flows.

This is how a pool finds its pods in Kubernetes without API-server access: the A records of a headless
Service. Here a dnslib server answers for the Service name with loopback addresses (127.0.0.1-3, one
simulated vLLM replica each on the same port, as pods share a container port), and the test adds and
removes records under load, then makes the server fail.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
import yaml
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer

from extproc.config import parse_config
from extproc.datalayer.dns import nameserver_resolver
from extproc.envoy.bootstrap import build_bootstrap
from extproc.envoy.run import cluster_members, start_envoy, wait_for_members
from extproc.local.procs import Child, extproc_argv, free_port, start_sim
from tests.helpers import post

SERVICE = "vllm-llama-3-2-1b.llm-d.svc.cluster.local"
MODEL = "llama-3-2-1b"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class Records(BaseResolver):
    """A/AAAA answers from a dict the test edits; ``failing`` answers SERVFAIL to everything."""

    def __init__(self) -> None:
        self.addresses: dict[str, list[str]] = {}
        self.failing = False
        self.queries = 0

    def resolve(self, request: Any, handler: Any) -> Any:
        self.queries += 1
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        if self.failing:
            reply.header.rcode = RCODE.SERVFAIL
        elif name not in self.addresses:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for ip in list(self.addresses[name]):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=1))
        return reply  # AAAA and others: NOERROR, no answer


@pytest.fixture
def dns_server() -> Iterator[tuple[Records, int]]:
    records = Records()
    port = free_port()
    server = DNSServer(records, port=port, address="127.0.0.1")  # UDP
    server.start_thread()
    try:
        yield records, port
    finally:
        server.stop()
        server.server.server_close()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[int]:
    """One simulator per loopback address, all on the same port."""
    for _ in range(20):
        port = free_port()
        children: list[Child] = []
        try:
            for i, host in enumerate(HOSTS):
                children.append(
                    start_sim(f"sim-{i}", MODEL, port, tmp_path / "logs", "--time-scale", "0.05", host=host)
                )
        except BaseException:
            for child in children:
                child.stop()
            continue
        try:
            yield port
        finally:
            for child in children:
                child.stop()
        return
    pytest.fail("no port was free on all of 127.0.0.1-3")


def test_nameserver_resolver_asks_the_given_server(dns_server: tuple[Records, int]) -> None:
    import asyncio

    records, port = dns_server
    records.addresses[SERVICE] = ["127.0.0.2", "127.0.0.3"]
    resolve = nameserver_resolver([("127.0.0.1", port)], timeout=2.0)
    infos = asyncio.run(resolve(SERVICE, 8000))
    assert sorted(info[4] for info in infos) == [("127.0.0.2", 8000), ("127.0.0.3", 8000)]
    assert records.queries >= 2  # A and AAAA
    records.failing = True
    with pytest.raises(dns.resolver.NoNameservers):  # SERVFAIL from every server
        asyncio.run(resolve(SERVICE, 8000))
    records.failing = False
    with pytest.raises(dns.resolver.NXDOMAIN):
        asyncio.run(resolve("nothing.llm-d.svc.cluster.local", 8000))


@dataclass
class Traffic:
    gateway: str
    phase: str = "start"
    stop: threading.Event = field(default_factory=threading.Event)
    seen: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 2}
            reply = post(f"{self.gateway}/v1/1b/chat/completions", body, timeout=10)
            phase = self.phase
            if reply.status != 200:
                self.failures.append(f"{phase}: {reply.status} {reply.body[:200]!r}")
            else:
                self.seen.setdefault(phase, Counter())[reply.headers["x-gateway-upstream-host"]] += 1


def _start_gateway(tmp_path: Path, sim_port: int, dns_port: int, eds: bool) -> tuple[list[Child], str, str]:
    server: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "grace_period": 1,
    }
    if eds:
        server["eds_dir"] = str(tmp_path / "eds")
    data = {
        "server": server,
        "pools": [
            {
                "name": "1b",
                "models": [MODEL],
                "endpoints": {
                    "dns": {
                        "name": SERVICE,
                        "port": sim_port,
                        "interval": 0.2,
                        "nameservers": [f"127.0.0.1:{dns_port}"],
                    }
                },
            }
        ],
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    config = parse_config(data)
    started: list[Child] = []
    try:
        picker = Child("extproc", extproc_argv("serve", "--config", str(config_path)), tmp_path)
        started.append(picker)
        picker.wait_http(f"http://{server['metrics_listen']}/metrics")
        gateway_port, admin_port = free_port(), free_port()
        bootstrap = build_bootstrap(config, listen=f"127.0.0.1:{gateway_port}", admin=f"127.0.0.1:{admin_port}")
        started.append(start_envoy(bootstrap, tmp_path, admin_port))
    except BaseException:
        for child in reversed(started):
            child.stop()
        raise
    return started, f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{admin_port}"


def _wait_until(what: str, check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_pool_follows_dns_records_under_traffic(tmp_path: Path, dns_server: tuple[Records, int], replicas: int) -> None:
    """EDS mode: the picker resolves, writes Envoy's endpoint files, and picks among the current records."""
    records, dns_port = dns_server
    records.addresses[SERVICE] = ["127.0.0.1", "127.0.0.2"]
    children, gateway, admin = _start_gateway(tmp_path, replicas, dns_port, eds=True)
    endpoint = {host: f"{host}:{replicas}" for host in HOSTS}
    traffic = Traffic(gateway)
    worker = threading.Thread(target=traffic.run, daemon=True)
    try:
        wait_for_members(admin, "pool-1b", [endpoint["127.0.0.1"], endpoint["127.0.0.2"]], timeout=10)
        worker.start()
        time.sleep(1.0)

        traffic.phase = "added"
        records.addresses[SERVICE] = list(HOSTS)
        wait_for_members(admin, "pool-1b", list(endpoint.values()), timeout=5)
        _wait_until(
            "a request on the new record", lambda: traffic.seen.get("added", Counter())[endpoint["127.0.0.3"]] > 0
        )
        time.sleep(1.0)

        traffic.phase = "removing"
        records.addresses[SERVICE] = ["127.0.0.2", "127.0.0.3"]
        wait_for_members(admin, "pool-1b", [endpoint["127.0.0.2"], endpoint["127.0.0.3"]], timeout=5)
        time.sleep(0.5)  # requests picked just before the change may still land on the old member
        traffic.phase = "removed"
        time.sleep(1.5)

        traffic.phase = "dns down"
        records.failing = True
        time.sleep(1.5)  # several failed resolutions: the last membership must stay
        assert cluster_members(admin, "pool-1b") == [endpoint["127.0.0.2"], endpoint["127.0.0.3"]]
        traffic.phase = "dns back"
        records.failing = False
        time.sleep(1.0)
    finally:
        traffic.stop.set()
        worker.join(timeout=15)
        for child in reversed(children):
            child.stop()

    assert traffic.failures == [], traffic.failures[:5]
    assert set(traffic.seen["start"]) == {endpoint["127.0.0.1"], endpoint["127.0.0.2"]}
    assert endpoint["127.0.0.3"] in traffic.seen["added"]
    assert set(traffic.seen["removed"]) == {endpoint["127.0.0.2"], endpoint["127.0.0.3"]}
    assert set(traffic.seen["dns down"]) == {endpoint["127.0.0.2"], endpoint["127.0.0.3"]}
    assert sum(traffic.seen["dns down"].values()) > 5


def test_envoy_dns_cluster_asks_the_same_server(tmp_path: Path, dns_server: tuple[Records, int], replicas: int) -> None:
    """Without EDS files Envoy resolves the pool itself: through the configured nameserver, like the picker."""
    records, dns_port = dns_server
    records.addresses[SERVICE] = ["127.0.0.1"]
    children, gateway, admin = _start_gateway(tmp_path, replicas, dns_port, eds=False)
    try:
        wait_for_members(admin, "pool-1b", [f"127.0.0.1:{replicas}"], timeout=10)
        records.addresses[SERVICE] = ["127.0.0.2", "127.0.0.3"]
        wait_for_members(admin, "pool-1b", [f"127.0.0.2:{replicas}", f"127.0.0.3:{replicas}"], timeout=10)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        hosts = set()
        for _ in range(10):
            reply = post(f"{gateway}/v1/1b/chat/completions", body, timeout=10)
            assert reply.status == 200, reply.body
            hosts.add(reply.headers["x-gateway-upstream-host"])
        assert hosts <= {f"127.0.0.2:{replicas}", f"127.0.0.3:{replicas}"}
    finally:
        for child in reversed(children):
            child.stop()
