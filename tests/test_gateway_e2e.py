"""The multi-model gateway end to end: the 70/30 split, model routing, /v1/models, scaling under traffic."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from extproc.local.procs import free_port, start_sim
from extproc.local.stack import PoolSpec, SimReplica, Stack, start_stack
from tests.helpers import post, request

MODELS = {"1b": "llama-3-2-1b", "3b": "llama-3-2-3b"}
UPSTREAM, PICKED, POOL = "x-gateway-upstream-host", "x-gateway-picked-endpoint", "x-gateway-pool"
SPLIT = {"name": "ab-test", "backends": [{"pool": "1b", "weight": 70}, {"pool": "3b", "weight": 30}]}


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(sticky: str | None = None, **settings: Any) -> Stack:
        split = {**SPLIT, "sticky_header": sticky} if sticky else SPLIT
        pools = [PoolSpec(name, model, 2, ("--time-scale", "0")) for name, model in MODELS.items()]
        stack = start_stack(tmp_path / f"gw{len(stacks)}", pools, settings={"splits": [split], **settings})
        stacks.append(stack)
        time.sleep(0.3)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def pool_of(header: str) -> str:
    return header.removeprefix("pool-")


async def fire(
    stack: Stack,
    path: str,
    bodies: list[dict[str, Any]],
    headers: list[dict[str, str]] | None = None,
    concurrency: int = 16,
) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    results: list[tuple[int, dict[str, str], dict[str, Any]]] = [None] * len(bodies)  # type: ignore[list-item]
    queue = iter(range(len(bodies)))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for i in queue:
                extra = headers[i] if headers else {}
                async with session.post(stack.gateway + path, json=bodies[i], headers=extra) as r:
                    results[i] = (r.status, dict(r.headers), await r.json(content_type=None))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def check_pool_correct(stack: Stack, results) -> Counter[str]:
    """Every request served inside the pool Envoy drew, by the endpoint the picker chose, as that pool's model."""
    shares: Counter[str] = Counter()
    members = {name: {r.address for r in replicas} for name, replicas in stack.sims.items()}
    for status, headers, body in results:
        assert status == 200, body
        pool = pool_of(headers[POOL])
        assert headers[UPSTREAM] in members[pool]
        assert headers[PICKED].split(",")[0] == headers[UPSTREAM]
        assert body["model"] == MODELS[pool]
        shares[pool] += 1
    return shares


def chat(model: str, i: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": f"Test A/B routing #{i}"}], "max_tokens": 2}


@pytest.mark.parametrize("mixed", [False, True], ids=["auto", "mixed-model-names"])
def test_ab_split_is_70_30_and_pool_correct(make_gateway, mixed: bool) -> None:
    stack = make_gateway()
    names = ["auto", MODELS["1b"], MODELS["3b"]] if mixed else ["auto"]
    bodies = [chat(names[i % len(names)], i) for i in range(2000)]
    results = asyncio.run(fire(stack, "/v1/ab-test/chat/completions", bodies))
    shares = check_pool_correct(stack, results)
    assert sum(shares.values()) == 2000
    assert abs(shares["1b"] / 2000 - 0.70) <= 0.03, shares


def test_sticky_split_keeps_a_user_on_one_arm(make_gateway) -> None:
    stack = make_gateway(sticky="x-user-id")
    users = [f"user-{u}" for u in range(1000)]
    bodies = [chat("auto", i) for i in range(2000)]
    headers = [{"x-user-id": users[i % 1000]} for i in range(2000)]
    results = asyncio.run(fire(stack, "/v1/ab-test/chat/completions", bodies, headers))
    shares = check_pool_correct(stack, results)
    arms: dict[str, set[str]] = {}
    for i, (_, response_headers, _) in enumerate(results):
        arms.setdefault(headers[i]["x-user-id"], set()).add(pool_of(response_headers[POOL]))
    assert all(len(a) == 1 for a in arms.values())
    users_on_1b = sum(1 for a in arms.values() if a == {"1b"})
    assert abs(users_on_1b / 1000 - 0.70) <= 0.045, users_on_1b
    assert abs(shares["1b"] / 2000 - 0.70) <= 0.045


def test_path_and_model_routing_and_model_listing(make_gateway) -> None:
    stack = make_gateway()
    for pool, model in MODELS.items():
        reply = post(f"{stack.gateway}/v1/{pool}/chat/completions", chat(model, 0))
        assert reply.status == 200 and reply.json()["model"] == model and pool_of(reply.headers[POOL]) == pool
        reply = post(f"{stack.gateway}/v1/chat/completions", chat(model, 1))  # routed by the body's model
        assert reply.status == 200 and reply.json()["model"] == model and pool_of(reply.headers[POOL]) == pool
        reply = post(f"{stack.gateway}/v1/completions", {"model": model, "prompt": "Once", "max_tokens": 2})
        assert reply.status == 200 and reply.json()["model"] == model
        # Streams take the streaming twins of the same routes (same names: the picker reads "default" as "no pool
        # chosen yet" and still routes by the body's model).
        for path in (f"/v1/{pool}/chat/completions", "/v1/chat/completions", "/v1/ab-test/chat/completions"):
            reply = post(f"{stack.gateway}{path}", chat(model, 3) | {"stream": True})
            assert reply.status == 200 and reply.body.rstrip().endswith(b"data: [DONE]"), (path, reply.body)
            if "ab-test" not in path:
                assert pool_of(reply.headers[POOL]) == pool and f'"model":"{model}"'.encode() in reply.body
    unknown = post(f"{stack.gateway}/v1/chat/completions", chat("llama-9-70b", 2))
    assert unknown.status == 404 and unknown.json()["error"]["code"] == 404
    listing = request("GET", f"{stack.gateway}/v1/models")
    assert listing.status == 200
    assert sorted(m["id"] for m in listing.json()["data"]) == sorted(MODELS.values())


def write_config(stack: Stack, pool: str, addresses: list[str]) -> None:
    data = yaml.safe_load(stack.config_path.read_text())
    for entry in data["pools"]:
        if entry["name"] == pool:
            entry["endpoints"]["static"] = addresses
    tmp = stack.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, stack.config_path)


def test_scaling_a_pool_up_and_down_under_traffic(make_gateway, tmp_path: Path) -> None:
    stack = make_gateway(server={"eds_dir": str(tmp_path / "eds"), "reload_interval": 0.2})
    port = free_port()
    extra = SimReplica(start_sim("sim-1b-new", MODELS["1b"], port, tmp_path, "--time-scale", "0"), port)
    first, second = stack.sims["1b"]
    statuses: Counter[int] = Counter()
    served: list[tuple[float, str]] = []
    marks: dict[str, float] = {}

    async def traffic(stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:

            async def worker(w: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    body = chat(MODELS["1b"], i) | {"messages": [{"role": "user", "content": f"w{w} {i}"}]}
                    async with session.post(f"{stack.gateway}/v1/1b/chat/completions", json=body) as r:
                        await r.read()
                        statuses[r.status] += 1
                        served.append((time.monotonic(), r.headers.get(UPSTREAM, "")))

            await asyncio.gather(*(worker(w) for w in range(4)))

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(stop))
        await asyncio.sleep(0.5)
        marks["up"] = time.monotonic()
        write_config(stack, "1b", [first.address, second.address, extra.address])  # scale up
        await asyncio.sleep(2.0)
        marks["down"] = time.monotonic()
        write_config(stack, "1b", [second.address, extra.address])  # scale down: drain first, then stop it
        await asyncio.sleep(1.5)
        first.child.stop()
        marks["stopped"] = time.monotonic()
        await asyncio.sleep(1.0)
        stop.set()
        await load

    try:
        asyncio.run(scenario())
    finally:
        extra.child.stop()
    assert set(statuses) == {200}, statuses
    assert any(host == extra.address for t, host in served if t > marks["up"])
    assert not any(host == first.address for t, host in served if t > marks["down"] + 1.0)
    assert sum(statuses.values()) > 100
