"""A scheduling plugin that raises: the request is still routed (by load, inside the pool and the subset hint),
the error is counted per plugin and logged once with its traceback.

The plugins are real, registered here; the picker is the real `App` (gRPC server, scraper, director) in this
process, so the test reads its log records and its metrics registry directly, over real simulators.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf.struct_pb2 import Struct

from extproc import names
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from extproc.config import parse_config
from extproc.datalayer.endpoint import EndpointState
from extproc.gateway.app import App
from extproc.local.procs import free_port
from extproc.scheduling import SchedulingContext, register_filter, register_picker, register_scorer
from extproc.scheduling.framework import OnEmpty
from tests.conftest import Sim
from tests.helpers import wait_until

MODEL = "test-model"


class PluginBug(RuntimeError):
    """What the plugins below raise: a bug in a plugin's code."""


@register_scorer("test-raising-scorer")
class RaisingScorer:
    def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
        raise PluginBug("scorer bug")


@register_filter("test-raising-filter")
class RaisingFilter:
    on_empty = OnEmpty.REFUSE
    empty_status = 503
    empty_reason = "never"

    def apply(self, ctx: SchedulingContext, candidates: list[EndpointState]) -> list[EndpointState]:
        return self._inner(candidates)

    def _inner(self, candidates: list[EndpointState]) -> list[EndpointState]:
        raise PluginBug("filter bug, one call deep")


@register_picker("test-raising-picker")
class RaisingPicker:
    def pick(
        self, ctx: SchedulingContext, candidates: Sequence[EndpointState], totals: Sequence[float], count: int
    ) -> list[int]:
        return [len(candidates) + 5]  # an index out of range: IndexError in the scheduler, after the picker ran


POLICIES: dict[str, tuple[dict[str, Any], str]] = {
    "scorer": ({"scorers": [{"name": "queue", "weight": 1}, {"name": "test-raising-scorer", "weight": 1}]}, "scorer"),
    "filter": ({"filters": ["subset", "test-raising-filter", "healthy"]}, "filter"),
    # The IndexError comes from the scheduler's own frame: no plugin is on the traceback.
    "picker": ({"picker": "test-raising-picker"}, "picker"),
}
EXPECTED_LABEL = {"scorer": "test-raising-scorer", "filter": "test-raising-filter", "picker": "scheduler"}


def headers(path: str = "/v1/chat/completions", **kw: Any) -> ep.ProcessingRequest:
    request = ep.ProcessingRequest(**kw)
    for key, value in ((":path", path), (":method", "POST")):
        h = request.request_headers.headers.headers.add()
        h.key, h.raw_value = key, value.encode()
    return request


def body(i: int) -> ep.ProcessingRequest:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i} " * 20}]}
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=orjson.dumps(chat), end_of_stream=True))


def picked(response: ep.ProcessingResponse) -> list[str]:
    assert response.WhichOneof("response") == "request_body", response
    metadata = response.dynamic_metadata.fields[names.LB_NAMESPACE].struct_value.fields
    return metadata[names.DESTINATION_KEY].string_value.split(",")


@pytest.mark.parametrize("kind", list(POLICIES))
def test_a_raising_plugin_routes_by_load_counts_and_logs_once(
    kind: str, start_simulator: Callable[..., Sim], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sims = [start_simulator("--time-scale", "0", model=MODEL) for _ in range(3)]
    addresses = {s.address for s in sims}
    policy, _ = POLICIES[kind]
    config = parse_config(
        {
            "server": {"listen": f"127.0.0.1:{free_port()}", "metrics_listen": f"127.0.0.1:{free_port()}"},
            "pools": [{"name": "p", "models": [MODEL], "endpoints": {"static": sorted(addresses)}}],
            "scheduler": policy,
        }
    )
    label = EXPECTED_LABEL[kind]

    async def scenario() -> None:
        app = App(config)
        await app.start()
        try:
            table = app.table
            await wait_until(
                lambda: all(e.scraped_at is not None for e in table.pool_endpoints("p")), 10, "a first scrape"
            )
            async with grpc.aio.insecure_channel(config.server.listen) as channel:
                stub = ep_grpc.ExternalProcessorStub(channel)
                for i in range(30):
                    responses = [r async for r in stub.Process(iter([headers(), body(i)]), timeout=10)]
                    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
                    endpoints = picked(responses[1])
                    assert set(endpoints) <= addresses and len(endpoints) == 3  # the pick and two fallbacks
                    assert len(set(endpoints)) == 3
                # The subset hint still holds on the fallback path.
                hint = Struct()
                hint.update({names.SUBSET_KEY: [sims[2].address]})
                metadata = ep.ProcessingRequest().metadata_context
                metadata.filter_metadata[names.SUBSET_NAMESPACE].CopyFrom(hint)
                responses = [r async for r in stub.Process(iter([headers(metadata_context=metadata), body(99)]))]
                assert picked(responses[1]) == [sims[2].address]
        finally:
            await app.stop(grace=0)
        registry = app.telemetry.registry
        assert registry.get_sample_value("extproc_plugin_errors_total", {"plugin": label}) == 31
        fallback = {"pool": "p", "model": MODEL, "route": "by-model", "outcome": "fallback"}
        assert registry.get_sample_value("extproc_requests_total", fallback) == 31
        assert registry.get_sample_value("extproc_requests_total", {**fallback, "outcome": "picked"}) is None

    with caplog.at_level(logging.ERROR, logger="extproc"):
        asyncio.run(scenario())
    logged = [r for r in caplog.records if "raised; routing by load" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once per plugin, not once per request
    assert repr(label) in logged[0].getMessage()
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], PluginBug if kind != "picker" else IndexError)
