"""The generated Envoy bootstrap, checked against the real Envoy 1.40 binary and real simulators.

Two running stacks: one whose ext_proc address is a closed port (the outage case: Envoy must balance by
itself inside the right pool, and override_host must ignore client-chosen endpoints outside the pool),
and one with a tiny in-test ext_proc on a unix socket (metadata per route, request attributes, the
picked endpoint via dynamic metadata, re-routing by header, and the body buffer limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from extproc.config import Config, ConfigError, load_config, parse_config
from extproc.datalayer.eds import write_eds
from extproc.envoy.bootstrap import build_bootstrap, render_bootstrap
from extproc.envoy.command import add_parser, main
from extproc.envoy.run import start_envoy, validate_bootstrap
from extproc.local.procs import Child, SimStart, free_port_blocks, start_sims
from extproc.local.stack import PoolSpec, start_stack
from tests.helpers import get, metrics, post

with warnings.catch_warnings():  # envoy-data-plane's classes trip pydantic deprecation warnings on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.service.ext_proc import v3 as ext_proc_pb
    from envoy_data_plane.google.protobuf import Struct

ROOT = Path(__file__).resolve().parent.parent
MODEL_1B, MODEL_3B = "llama-3-2-1b", "llama-3-2-3b"
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
SPLIT = {"name": "ab-test", "backends": [{"pool": "1b", "weight": 70}, {"pool": "3b", "weight": 30}]}


def two_pools(p1b: list[str], p3b: list[str], **extra: Any) -> Config:
    return parse_config(
        {
            "pools": [
                {"name": "1b", "models": [MODEL_1B], "endpoints": {"static": p1b}},
                {"name": "3b", "models": [MODEL_3B], "endpoints": {"static": p3b}},
            ],
            **extra,
        }
    )


def served(address: str) -> float:
    """Requests a simulator finished (any reason), from its own /metrics."""
    samples = metrics(f"http://{address}")
    return sum(v for k, v in samples.items() if k.startswith("vllm:request_success_total"))


# ---------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("name", "data", "kwargs"),
    [
        ("static", {}, {}),
        (
            "dns",
            {"pools": [{"name": "dns", "models": ["m"], "endpoints": {"dns": {"name": "localhost", "port": 8000}}}]},
            {},
        ),
        ("unix", {"server": {"listen": "unix:/tmp/extproc-test.sock"}}, {"fallback": "least_request"}),
        ("ipv6", {}, {"listen": "[::1]:18080", "admin": "[::1]:19901", "ext_proc": "[::1]:9002", "access_log": True}),
        ("split", {"splits": [SPLIT]}, {}),
        ("sticky", {"splits": [{**SPLIT, "sticky_header": "x-user-id"}]}, {}),
        ("eds", {"splits": [SPLIT]}, {"eds_dir": "EDS"}),  # EDS: replaced by a directory under tmp_path
        ("eds-from-config", {"server": {"eds_dir": "EDS"}}, {}),
    ],
)
def test_envoy_accepts_bootstrap(tmp_path: Path, name: str, data: dict[str, Any], kwargs: dict[str, Any]) -> None:
    base = {
        "pools": [
            {"name": "1b", "models": [MODEL_1B], "endpoints": {"static": ["127.0.0.1:8001", "10.0.0.2:8000"]}},
            {"name": "3b", "models": [MODEL_3B], "endpoints": {"dns": {"name": "localhost", "port": 8000}}},
        ]
    }
    eds_dir = str(tmp_path / "eds")
    kwargs = {k: eds_dir if v == "EDS" else v for k, v in kwargs.items()}
    if "server" in data and data["server"].get("eds_dir") == "EDS":
        data = {**data, "server": {"eds_dir": eds_dir}}
    config = parse_config({**base, **data})
    bootstrap = build_bootstrap(config, **kwargs)
    validate_bootstrap(bootstrap, tmp_path / f"{name}.yaml")
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert set(clusters) == {"extproc", *(f"pool-{p.name}" for p in config.pools)}
    if name == "dns":
        assert clusters["pool-dns"]["cluster_type"]["name"] == "envoy.clusters.dns"
    elif name.startswith("eds"):
        assert {clusters[c]["type"] for c in ("pool-1b", "pool-3b")} == {"EDS"}
        assert sorted(p.name for p in Path(eds_dir).iterdir()) == ["pool-1b.json", "pool-3b.json"]
    else:
        assert clusters["pool-1b"]["type"] == "STATIC"
    if name == "unix":
        address = clusters["extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert address == {"pipe": {"path": "/tmp/extproc-test.sock"}}


def _route(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    return next(r for r in routes if r["name"] == name)


def _route_names(bootstrap: dict[str, Any]) -> list[str]:
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [r["name"] for r in manager["route_config"]["virtual_hosts"][0]["routes"]]


def test_split_routes_come_first_with_pool_metadata_per_arm() -> None:
    config = two_pools(["127.0.0.1:8001"], ["127.0.0.1:8003"], splits=[{**SPLIT, "sticky_header": "x-user-id"}])
    bootstrap = build_bootstrap(config)
    # Each forwarding route twice: its streaming twin (per-try idle timeout) first, under the same name.
    assert _route_names(bootstrap) == [
        *["method-not-allowed"] * 3,  # one per API path
        *["ab-test-split"] * 2,
        *["1b-by-header"] * 2,
        *["3b-by-header"] * 2,
        *["1b-by-path"] * 2,
        *["3b-by-path"] * 2,
        *["default"] * 2,
        "not-found",
    ]
    split = _route(bootstrap, "ab-test-split")
    assert split["match"]["safe_regex"] == {"regex": "^/v1/ab-test/(?:chat/completions|completions|models)$"}
    action = split["route"]
    assert action["regex_rewrite"] == {"pattern": {"regex": "^/v1/ab-test/"}, "substitution": "/v1/"}
    assert action["hash_policy"] == [{"header": {"header_name": "x-user-id"}}]
    assert action["weighted_clusters"]["use_hash_policy"] is True
    arms = action["weighted_clusters"]["clusters"]
    assert [(a["name"], a["weight"]) for a in arms] == [("pool-1b", 70), ("pool-3b", 30)]
    for arm, pool in zip(arms, ["1b", "3b"], strict=True):
        overrides = arm["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"]
        assert overrides == {"grpc_initial_metadata": [{"key": "x-pool", "value": pool}]}

    plain = _route(build_bootstrap(two_pools(["127.0.0.1:8001"], ["127.0.0.1:8003"], splits=[SPLIT])), "ab-test-split")
    assert "hash_policy" not in plain["route"] and "use_hash_policy" not in plain["route"]["weighted_clusters"]


def test_eds_mode_writes_the_initial_files(tmp_path: Path) -> None:
    eds_dir = tmp_path / "eds"
    config = parse_config(
        {
            "pools": [
                {"name": "1b", "models": [MODEL_1B], "endpoints": {"static": ["127.0.0.1:8002", "127.0.0.1:8001"]}},
                {"name": "dns", "models": ["m"], "endpoints": {"dns": {"name": "localhost", "port": 8000}}},
            ],
            "server": {"eds_dir": str(eds_dir)},
        }
    )
    bootstrap = build_bootstrap(config)
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert clusters["pool-1b"]["eds_cluster_config"] == {
        "eds_config": {
            "path_config_source": {
                "path": str(eds_dir / "pool-1b.json"),
                "watched_directory": {"path": str(eds_dir)},
            },
            "resource_api_version": "V3",
        }
    }
    assert "load_assignment" not in clusters["pool-dns"] and clusters["pool-dns"]["type"] == "EDS"
    assert "override_host" in json.dumps(clusters["pool-dns"]["load_balancing_policy"])

    def members(pool: str) -> list[str]:
        data = json.loads((eds_dir / f"pool-{pool}.json").read_text())
        (assignment,) = data["resources"]
        assert assignment["cluster_name"] == f"pool-{pool}"
        return [
            f"{e['endpoint']['address']['socket_address']['address']}:"
            f"{e['endpoint']['address']['socket_address']['port_value']}"
            for group in assignment["endpoints"]
            for e in group["lb_endpoints"]
        ]

    assert members("1b") == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert members("dns") == []  # until the ext_proc resolves the name
    write_eds(eds_dir, "dns", ["10.0.0.7:8000"])  # the ext_proc did; a new bootstrap keeps that file
    build_bootstrap(config)
    assert members("dns") == ["10.0.0.7:8000"]

    other = tmp_path / "other"
    build_bootstrap(config, eds_dir=str(other), write_eds_files=False)
    assert not other.exists()


def test_example_bootstrap_is_valid_and_current(tmp_path: Path) -> None:
    path = ROOT / "envoy" / "example-bootstrap.yaml"
    validate_bootstrap(path, tmp_path / "example.yaml")
    data = yaml.safe_load(path.read_text())
    assert [c["name"] for c in data["static_resources"]["clusters"]] == ["extproc", "pool-1b", "pool-3b"]
    example_config = ROOT / "examples" / "config.yaml"
    if example_config.exists():
        assert path.read_text() == render_bootstrap(load_config(example_config)), (
            "envoy/example-bootstrap.yaml is stale: "
            "extproc envoy-config --config examples/config.yaml -o envoy/example-bootstrap.yaml"
        )


def test_cli_writes_a_valid_bootstrap(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump({"pools": [{"name": "a", "models": ["m"], "endpoints": {"static": ["127.0.0.1:8000"]}}]})
    )
    out = tmp_path / "envoy.yaml"
    assert main(["--config", str(config_file), "--listen", "127.0.0.1:18080", "-o", str(out)]) == 0
    validate_bootstrap(out, tmp_path / "copy.yaml")
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2

    parser = argparse.ArgumentParser(prog="extproc")
    add_parser(parser.add_subparsers(dest="command"))
    out2 = tmp_path / "via-subcommand.yaml"
    args = parser.parse_args(
        ["envoy-config", "--config", str(config_file), "--fallback", "least_request", "-o", str(out2)]
    )
    assert args.func(args) == 0
    assert "envoy.load_balancing_policies.least_request" in out2.read_text()


def test_bad_arguments_are_rejected() -> None:
    config = two_pools(["127.0.0.1:8001"], ["127.0.0.1:8003"])
    with pytest.raises(ValueError, match="fallback"):
        build_bootstrap(config, fallback="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_request_bytes"):
        build_bootstrap(config, max_request_bytes=0)
    assert render_bootstrap(config).startswith("# Generated by")


# ---------------------------------------------------------------------------------------------- gateway section


def _manager(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _routes_named(bootstrap: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in _manager(bootstrap)["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == name]


def test_gateway_section_sets_retries_idle_timeout_and_budget(tmp_path: Path) -> None:
    gateway = {
        "retries": 3,
        "retry_on": ["connect-failure", "reset"],
        "per_try_idle_timeout": 7,
        "per_try_timeout": 60,
        "retry_budget_percent": 25,
        "retry_budget_min_concurrency": 4,
    }
    bootstrap = build_bootstrap(two_pools(["127.0.0.1:8001"], ["127.0.0.1:8003"], splits=[SPLIT], gateway=gateway))
    validate_bootstrap(bootstrap, tmp_path / "gateway.yaml")
    manager = _manager(bootstrap)
    # The body's "stream" reaches dynamic metadata before the ext_proc (and so before the first route match).
    assert [f["name"] for f in manager["http_filters"]] == [
        "envoy.filters.http.json_to_metadata",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    for name in ("ab-test-split", "1b-by-header", "1b-by-path", "default"):
        streaming, plain = _routes_named(bootstrap, name)
        assert streaming["match"]["dynamic_metadata"] == [
            {"filter": "extproc.request", "path": [{"key": "stream"}], "value": {"bool_match": True}}
        ]
        assert "dynamic_metadata" not in plain["match"]
        assert {k: v for k, v in streaming["match"].items() if k != "dynamic_metadata"} == plain["match"]
        for variant in (streaming, plain):
            policy = variant["route"]["retry_policy"]
            assert policy["retry_on"] == "connect-failure,reset" and policy["num_retries"] == 3
            assert [p["name"] for p in policy["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]
        # The idle timeout is for streams only; the per-try timeout for answers that arrive whole.
        assert streaming["route"]["retry_policy"]["per_try_idle_timeout"] == "7s"
        assert "per_try_timeout" not in streaming["route"]["retry_policy"]
        assert plain["route"]["retry_policy"]["per_try_timeout"] == "60s"
        assert "per_try_idle_timeout" not in plain["route"]["retry_policy"]
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    budget = {"thresholds": [{"retry_budget": {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 4}}]}
    assert clusters["pool-1b"]["circuit_breakers"] == clusters["pool-3b"]["circuit_breakers"] == budget
    assert "circuit_breakers" not in clusters["extproc"]
    # Envoy's own answers run no ext_proc: no pick is made, or counted, for a request nobody serves.
    off = {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}
    for name in ("method-not-allowed", "not-found"):
        for direct in _routes_named(bootstrap, name):
            assert direct["typed_per_filter_config"] == {"envoy.filters.http.ext_proc": off}
            assert direct["direct_response"]["status"] in (404, 405)
    assert {
        m["filter"].get("status_code_filter", {}).get("comparison", {}).get("value", {}).get("default_value")
        for m in manager["local_reply_config"]["mappers"]
    } >= {404, 429, 500}


def test_gateway_section_turns_each_part_off(tmp_path: Path) -> None:
    gateway = {"retries": 0, "per_try_idle_timeout": 0, "json_errors": False}
    bootstrap = build_bootstrap(two_pools(["127.0.0.1:8001"], ["127.0.0.1:8003"], gateway=gateway))
    validate_bootstrap(bootstrap, tmp_path / "off.yaml")
    manager = _manager(bootstrap)
    assert "local_reply_config" not in manager
    assert [f["name"] for f in manager["http_filters"]] == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]
    forwarding = [r for r in manager["route_config"]["virtual_hosts"][0]["routes"] if "route" in r]
    assert len(forwarding) == len({r["name"] for r in forwarding}) == 5  # no streaming twins
    assert not any("retry_policy" in r["route"] for r in forwarding)


def test_pool_paths_shape_its_routes(tmp_path: Path) -> None:
    """A path only some pools serve: the pools without it answer 404 (not the default route's pool), and the
    default route for it goes to the first pool that serves it."""
    config = parse_config(
        {
            "pools": [
                {
                    "name": "gen",
                    "models": ["c"],
                    "endpoints": {"static": ["127.0.0.1:8001"]},
                    "paths": ["/v1/chat/completions", "/v1/models"],
                },
                {
                    "name": "embed",
                    "models": ["e"],
                    "endpoints": {"static": ["127.0.0.1:8002"]},
                    "paths": ["/v1/embeddings", "/v1/models"],
                },
            ],
            "gateway": {
                "paths": {"/v1/chat/completions": ["POST"], "/v1/embeddings": ["POST"], "/v1/models": ["GET"]},
                "per_try_idle_timeout": 0,
            },
        }
    )
    bootstrap = build_bootstrap(config)
    validate_bootstrap(bootstrap, tmp_path / "paths.yaml")
    (by_path,) = _routes_named(bootstrap, "embed-by-path")
    assert by_path["match"]["safe_regex"]["regex"] == "^/v1/embed/(?:embeddings|models)$"
    (not_served,) = _routes_named(bootstrap, "embed-not-served")
    assert not_served["match"]["headers"] == [{"name": "x-extproc-pool", "string_match": {"exact": "embed"}}]
    assert "POST /v1/embeddings" in not_served["direct_response"]["body"]["inline_string"]
    defaults = _routes_named(bootstrap, "default")
    assert [(r["match"]["safe_regex"]["regex"], r["route"]["cluster"]) for r in defaults] == [
        ("^/v1/(?:chat/completions|models)$", "pool-gen"),
        ("^/v1/(?:embeddings)$", "pool-embed"),
    ]
    assert len(_routes_named(bootstrap, "gen-not-served")) == 1
    # Every pool serves all gateway paths unless it says otherwise: then no pool needs a not-served route.
    assert not _routes_named(build_bootstrap(two_pools(["127.0.0.1:8001"], ["127.0.0.1:8003"])), "1b-not-served")


@pytest.mark.parametrize(
    ("gateway", "pool", "message"),
    [
        ({"retry_on": ["connect_failure"]}, {}, "gateway.retry_on: 'connect_failure' is not an Envoy retry condition"),
        ({"retries": 11}, {}, "gateway.retries: Input should be less than or equal to 10"),
        ({"per_try_idle_timeout": -1}, {}, "gateway.per_try_idle_timeout"),
        ({"paths": {"/v2/chat": ["POST"]}}, {}, "path '/v2/chat' must start with /v1/"),
        ({"paths": {"/v1/chat/completions": ["SEND"]}}, {}, "give its methods once each, among GET"),
        (
            {},
            {"paths": ["/v1/embeddings"]},
            "add it there with its methods (gateway: {paths: {/v1/embeddings: [POST]}})",
        ),
        ({}, {"name": "chat"}, "pool or split 'chat' is named like the first segment of a gateway path"),
    ],
)
def test_gateway_section_errors_name_the_field_and_the_fix(
    gateway: dict[str, Any], pool: dict[str, Any], message: str
) -> None:
    data = {
        "pools": [{"name": "1b", "models": ["m"], "endpoints": {"static": ["127.0.0.1:8001"]}, **pool}],
        "gateway": gateway,
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------- stacks


@dataclass
class Stack:
    base: str
    admin: str
    pool_1b: list[str]
    pool_3b: list[str]
    outsider: str
    extproc: FakeExtProc | None = None


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[str]]]:
    """Two 1b and two 3b replicas, a 1b replica in no pool, and a slow one (real-time tokens) for streaming."""
    log_dir = tmp_path_factory.mktemp("sims")
    out: dict[str, list[str]] = {"1b": [], "3b": [], "outsider": [], "slow": []}
    instant = ("--time-scale", "0")
    groups = [
        ("1b", MODEL_1B, 2, instant),
        ("3b", MODEL_3B, 2, instant),
        ("outsider", MODEL_1B, 1, instant),
        ("slow", "slow-model", 1, ("--time-scale", "1", "--itl-ms", "100")),
    ]
    planned: list[SimStart] = []
    ports = iter(free_port_blocks(sum(count for _, _, count, _ in groups)))
    for group, model, count, args in groups:
        for i in range(count):
            planned.append(SimStart(f"{group}-{i}", model, next(ports), args))
            out[group].append(f"127.0.0.1:{planned[-1].port}")
    children = start_sims(planned, log_dir)
    try:
        yield out
    finally:
        for child in children:
            child.stop()


def _run_envoy(config: Config, ext_proc: str | None, log_dir: Path, **kwargs: Any) -> tuple[Child, str, str]:
    """Start Envoy; ``ext_proc=None`` points it at a closed port (the outage case)."""
    listen, admin, closed = free_port_blocks(3)
    ext_proc = ext_proc or f"127.0.0.1:{closed}"
    bootstrap = build_bootstrap(
        config, listen=f"127.0.0.1:{listen}", admin=f"127.0.0.1:{admin}", ext_proc=ext_proc, **kwargs
    )
    child = start_envoy(bootstrap, log_dir, admin)
    return child, f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}"


@pytest.fixture(scope="module")
def down(sims: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy whose ext_proc is a closed port: fail-open, Envoy balances by itself."""
    config = parse_config(
        {
            "pools": [
                {"name": "1b", "models": [MODEL_1B], "endpoints": {"static": sims["1b"]}},
                {"name": "3b", "models": [MODEL_3B], "endpoints": {"static": sims["3b"]}},
                {"name": "dns", "models": ["other"], "endpoints": {"dns": {"name": "localhost", "port": 9}}},
            ],
            "limits": {"max_body_bytes": 64 * 1024},
        }
    )
    envoy, base, admin = _run_envoy(config, None, tmp_path_factory.mktemp("envoy-down"))
    try:
        yield Stack(base, admin, sims["1b"], sims["3b"], sims["outsider"][0])
    finally:
        envoy.stop()


def test_outage_falls_back_to_round_robin_in_the_path_pool(down: Stack) -> None:
    before = {a: served(a) for a in [*down.pool_1b, *down.pool_3b]}
    for _ in range(8):
        reply = post(f"{down.base}/v1/1b/chat/completions", {"model": MODEL_1B, **CHAT})
        assert reply.status == 200, reply.body  # failure_mode_allow hides the outage
        assert reply.json()["model"] == MODEL_1B  # prefix_rewrite /v1/1b/ -> /v1/ reached the 1b replicas
    gained = {a: served(a) - before[a] for a in before}
    assert all(gained[a] >= 2 for a in down.pool_1b), gained  # both replicas share the load
    assert sum(gained[a] for a in down.pool_1b) == 8
    assert all(gained[a] == 0 for a in down.pool_3b), gained
    stats = get(f"{down.admin}/stats?filter=ext_proc.failure_mode_allowed").body.decode()
    assert int(stats.split(":")[1]) >= 8


def test_client_header_cannot_leave_the_pool_but_can_pick_a_member(down: Stack) -> None:
    outsider_before = served(down.outsider)
    for _ in range(4):
        reply = post(
            f"{down.base}/v1/1b/chat/completions",
            {"model": MODEL_1B, **CHAT},
            headers={"x-gateway-destination-endpoint": down.outsider},
        )
        assert reply.status == 200, reply.body
    assert served(down.outsider) == outsider_before  # override_host skips non-members

    member, other = down.pool_1b
    before = {a: served(a) for a in down.pool_1b}
    for _ in range(4):
        reply = post(
            f"{down.base}/v1/1b/chat/completions",
            {"model": MODEL_1B, **CHAT},
            headers={"x-gateway-destination-endpoint": member},
        )
        assert reply.status == 200, reply.body
    assert served(member) - before[member] == 4
    assert served(other) == before[other]


def test_pool_header_routes_plain_path_to_that_pool(down: Stack) -> None:
    before = {a: served(a) for a in down.pool_3b}
    for _ in range(4):
        reply = post(f"{down.base}/v1/chat/completions", {"model": MODEL_3B, **CHAT}, headers={"x-extproc-pool": "3b"})
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == MODEL_3B
    assert sum(served(a) - before[a] for a in down.pool_3b) == 4
    # The header wins over a pool path too, and the pool prefix is still stripped.
    reply = post(f"{down.base}/v1/1b/chat/completions", {"model": MODEL_3B, **CHAT}, headers={"x-extproc-pool": "3b"})
    assert reply.status == 200, reply.body
    assert reply.json()["model"] == MODEL_3B
    # Without the header (the ext_proc has not decided) the default route is the first pool.
    reply = post(f"{down.base}/v1/chat/completions", {"model": MODEL_1B, **CHAT})
    assert reply.status == 200 and reply.json()["model"] == MODEL_1B


def test_clusters_and_dns_pool_are_loaded(down: Stack) -> None:
    clusters = get(f"{down.admin}/clusters").body.decode()
    for address in [*down.pool_1b, *down.pool_3b]:
        assert address in clusters
    assert down.outsider not in clusters
    assert "pool-dns::127.0.0.1:9::" in clusters  # localhost resolved by the envoy.clusters.dns extension


def test_outage_with_large_body_passes_or_gets_413(down: Stack) -> None:
    """With the ext_proc down the limit is a race: Envoy buffers the body only until the connect failure.

    A body that arrives first overflows the buffer (413); one that arrives after fail-open streams through
    unbuffered (200). Either way the outage never turns into a 5xx.
    """
    body = {"model": MODEL_1B, **CHAT, "pad": "x" * (256 * 1024)}  # twice Envoy's buffer (2 x max_body_bytes)
    statuses = {post(f"{down.base}/v1/1b/chat/completions", body).status for _ in range(3)}
    assert statuses <= {200, 413}, statuses


# -------------------------------------------------------------------------------- a running ext_proc


@dataclass
class Call:
    metadata: dict[str, str]
    attributes: dict[str, Any] = field(default_factory=dict)
    body: bytes | None = None


class FakeExtProc:
    """A minimal ext_proc (grpcio generic handler): answers every message, optionally picks from the body.

    A body field ``pick`` becomes the endpoint (dynamic metadata ``envoy.lb`` only, no header, to prove the
    metadata path works), ``pool`` the ``x-extproc-pool`` header with a route cache clear, and ``sleep_ms``
    a delay before the answer (a slow picker).
    """

    def __init__(self, address: str) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(8), options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        handler = grpc.method_handlers_generic_handler(
            "envoy.service.ext_proc.v3.ExternalProcessor",
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    self._process, request_deserializer=ext_proc_pb.ProcessingRequest.parse, response_serializer=bytes
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.server.add_insecure_port(address)
        self.server.start()

    def _process(self, requests: Iterator[ext_proc_pb.ProcessingRequest], context: Any) -> Iterator[Any]:
        call = Call({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        with self._lock:
            self.calls.append(call)
        for request in requests:
            if request.attributes:
                call.attributes = {k: v.to_dict() for k, v in request.attributes.items()}
            if request.request_headers is not None:
                yield ext_proc_pb.ProcessingResponse(request_headers=ext_proc_pb.HeadersResponse())
            elif request.request_body is not None:
                call.body = request.request_body.body
                yield self._decide(json.loads(call.body or b"{}"))
            else:  # nothing else is configured to be sent
                return

    @staticmethod
    def _decide(body: dict[str, Any]) -> ext_proc_pb.ProcessingResponse:
        if body.get("sleep_ms"):
            time.sleep(body["sleep_ms"] / 1000)
        headers = []
        if body.get("pool"):
            headers.append(
                core.HeaderValueOption(header=core.HeaderValue(key="x-extproc-pool", raw_value=body["pool"].encode()))
            )
        common = ext_proc_pb.CommonResponse(
            header_mutation=ext_proc_pb.HeaderMutation(set_headers=headers), clear_route_cache=bool(headers)
        )
        picked = body.get("pick")
        dynamic = Struct.from_dict({"envoy.lb": {"x-gateway-destination-endpoint": picked}}) if picked else None
        return ext_proc_pb.ProcessingResponse(
            request_body=ext_proc_pb.BodyResponse(response=common), dynamic_metadata=dynamic
        )

    def stop(self) -> None:
        self.server.stop(0)


MAX_BODY = 32 * 1024


@pytest.fixture(scope="module")
def up(sims: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy with the fake ext_proc on a unix socket."""
    log_dir = tmp_path_factory.mktemp("envoy-up")
    socket_path = log_dir / "extproc.sock"
    fake = FakeExtProc(f"unix:{socket_path}")
    try:
        config = two_pools(sims["1b"], sims["3b"], server={"listen": f"unix:{socket_path}"}, splits=[SPLIT])
        slow = {"name": "slow", "models": ["slow-model"], "endpoints": {"static": sims["slow"]}}
        config = config.model_copy(update={"pools": [*config.pools, parse_config({"pools": [slow]}).pools[0]]})
        # A generous message timeout: a busy CI box must not turn a slow answer into fail-open.
        envoy, base, admin = _run_envoy(
            config, f"unix:{socket_path}", log_dir, max_request_bytes=MAX_BODY, message_timeout_ms=2000
        )
        try:
            yield Stack(base, admin, sims["1b"], sims["3b"], sims["outsider"][0], fake)
        finally:
            envoy.stop()
    finally:
        fake.stop()


def _last_call(stack: Stack) -> Call:
    assert stack.extproc is not None
    return stack.extproc.calls[-1]


def test_ext_proc_learns_the_pool_from_metadata_and_attributes(up: Stack) -> None:
    reply = post(f"{up.base}/v1/3b/chat/completions", {"model": MODEL_3B, **CHAT})
    assert reply.status == 200, reply.body
    call = _last_call(up)
    assert call.metadata.get("x-pool") == "3b"
    attrs = call.attributes["envoy.filters.http.ext_proc"]
    assert attrs == {"xds.cluster_name": "pool-3b", "xds.route_name": "3b-by-path"}
    assert call.body is not None and json.loads(call.body)["model"] == MODEL_3B

    reply = post(f"{up.base}/v1/chat/completions", {"model": MODEL_1B, **CHAT})
    assert reply.status == 200, reply.body
    call = _last_call(up)
    assert "x-pool" not in call.metadata
    assert call.attributes["envoy.filters.http.ext_proc"]["xds.route_name"] == "default"


def test_pick_from_dynamic_metadata_and_reroute_by_header(up: Stack) -> None:
    target = up.pool_3b[1]
    before = {a: served(a) for a in [*up.pool_1b, *up.pool_3b]}
    for _ in range(3):  # the default route would send this to 1b; the ext_proc moves it to 3b, replica 2
        body = {"model": MODEL_3B, **CHAT, "pool": "3b", "pick": target}
        reply = post(f"{up.base}/v1/chat/completions", body)
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == MODEL_3B
    gained = {a: served(a) - before[a] for a in before}
    assert gained == {**dict.fromkeys(before, 0.0), target: 3.0}

    before_outsider = served(up.outsider)
    reply = post(f"{up.base}/v1/1b/chat/completions", {"model": MODEL_1B, **CHAT, "pick": up.outsider})
    assert reply.status == 200, reply.body  # a pick outside the pool falls back, never leaves the pool
    assert served(up.outsider) == before_outsider


def test_body_above_the_buffer_limit_gets_413(up: Stack) -> None:
    def body_of(size: int) -> bytes:
        raw = json.dumps({"model": MODEL_1B, "prompt": "", "max_tokens": 1}).encode()
        raw = raw.replace(b'"prompt": ""', b'"prompt": "' + b"x" * (size - len(raw)) + b'"')
        assert len(raw) == size
        return raw

    reply = post(f"{up.base}/v1/1b/completions", body_of(MAX_BODY))
    assert reply.status == 200, reply.body
    assert _last_call(up).body is not None and len(_last_call(up).body or b"") == MAX_BODY
    reply = post(f"{up.base}/v1/1b/completions", body_of(MAX_BODY + 1))
    assert reply.status == 413  # Envoy's own reply, in the picker's error shape (gateway.json_errors)
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "error": {
            "message": f"request body is larger than {MAX_BODY} bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": 413,
        }
    }


def test_responses_stream_through_unbuffered(up: Stack) -> None:
    """Tokens reach the client as the replica produces them (ext_proc sees only the request)."""

    async def stream() -> tuple[float, float, int]:
        start = time.monotonic()
        first = -1.0
        events = 0
        body = {"model": "slow-model", **CHAT, "max_tokens": 10, "stream": True}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{up.base}/v1/slow/chat/completions", json=body) as response,
        ):
            assert response.status == 200, await response.text()
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.content:
                if line.startswith(b"data: {") and b'"content"' in line:
                    events += 1
                    if first < 0:
                        first = time.monotonic() - start
        return first, time.monotonic() - start, events

    first, total, events = asyncio.run(stream())
    assert events >= 5
    assert total > 0.8  # ~10 tokens x 100 ms
    assert first < total / 3, (first, total)


def test_split_arm_tells_the_ext_proc_the_drawn_pool(up: Stack) -> None:
    """Each weighted arm sets ``x-pool`` on the ext_proc stream; a re-route by header cannot change the draw."""
    drawn = []
    for i in range(30):
        # Half of them ask the ext_proc to move the request to pool 3b (header + route cache clear): the split
        # route is matched first again, and Envoy keeps the stream's draw.
        body = {**CHAT, "pool": "3b"} if i % 2 else CHAT
        reply = post(f"{up.base}/v1/ab-test/chat/completions", body)
        assert reply.status == 200, reply.body
        call = _last_call(up)
        pool = call.metadata["x-pool"]
        assert call.attributes["envoy.filters.http.ext_proc"] == {
            "xds.cluster_name": f"pool-{pool}",
            "xds.route_name": "ab-test-split",
        }
        assert reply.headers["x-gateway-pool"] == pool
        assert reply.json()["model"] == {"1b": MODEL_1B, "3b": MODEL_3B}[pool]
        drawn.append(pool)
    assert set(drawn) == {"1b", "3b"}, drawn  # P(30 draws of one pool) < 1e-4
    assert "1b" in drawn[1::2]  # the x-extproc-pool: 3b requests were not taken out of their drawn pool


def test_routing_time_header_includes_the_ext_proc(up: Stack) -> None:
    """x-gateway-routing-us spans from the last request byte to the upstream request: a slower picker shows."""

    def routing_us(sleep_ms: int) -> float:
        values = []
        for _ in range(5):
            reply = post(f"{up.base}/v1/1b/chat/completions", {"model": MODEL_1B, **CHAT, "sleep_ms": sleep_ms})
            assert reply.status == 200, reply.body
            values.append(int(reply.headers["x-gateway-routing-us"]))
        return statistics.median(values)

    fast, slow = routing_us(0), routing_us(20)
    assert 0 < fast < 20_000, fast
    assert 15_000 < slow - fast < 50_000, (fast, slow)  # ~20,800 measured


def test_ext_proc_by_hostname_goes_through_dns(tmp_path: Path) -> None:
    """A name such as a compose service or Kubernetes Service: Envoy resolves it and the picks still arrive."""
    stack = start_stack(tmp_path, [PoolSpec("1b", "llama-3-2-1b", 2, ("--time-scale", "0"))])
    try:
        # Same picker, reached as localhost:PORT instead of 127.0.0.1:PORT: restart Envoy with that bootstrap.
        port = stack.config.server.listen.rsplit(":", 1)[1]
        assert stack.envoy is not None
        stack.envoy.stop()
        bootstrap = build_bootstrap(
            stack.config,
            listen=f"127.0.0.1:{stack.gateway_port}",
            admin=f"127.0.0.1:{stack.admin_port}",
            ext_proc=f"localhost:{port}",
        )
        clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
        assert clusters["extproc"]["cluster_type"]["name"] == "envoy.clusters.dns"
        stack.envoy = start_envoy(bootstrap, tmp_path, stack.admin_port)
        body = {"model": "llama-3-2-1b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for _ in range(4):
            reply = post(f"{stack.gateway}/v1/1b/chat/completions", body)
            assert reply.status == 200
            assert reply.headers["x-gateway-picked-endpoint"].split(",")[0] == reply.headers["x-gateway-upstream-host"]
    finally:
        stack.stop()
