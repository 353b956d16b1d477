"""`extproc serve` spoken to directly over gRPC, as Envoy would: every message type and every pool source."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
import yaml
from google.protobuf.struct_pb2 import Struct
from prometheus_client.parser import text_string_to_metric_families

from extproc import names
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from extproc.local.procs import Child, extproc_argv, free_port

POOL_A = ["127.0.0.1:1", "127.0.0.1:2"]  # nothing listens: scrapes fail, and health fails open
POOL_B = ["127.0.0.1:3", "127.0.0.1:4"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`extproc serve` for the module: its gRPC address and its metrics URL."""
    tmp: Path = tmp_path_factory.mktemp("grpc")
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = {
        "server": {"listen": listen, "metrics_listen": metrics},
        "pools": [
            {"name": "a", "models": ["model-a"], "endpoints": {"static": POOL_A}},
            {"name": "b", "models": ["model-b", "model-b-alias"], "endpoints": {"static": POOL_B}},
        ],
        "limits": {"max_body_bytes": 6 * 1024 * 1024},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    child = Child("extproc", extproc_argv("serve", "--config", str(path)), tmp)
    try:
        child.wait_http(f"http://{metrics}/metrics")
        yield listen, f"http://{metrics}/metrics"
    finally:
        child.stop()


@pytest.fixture(scope="module")
def listen(server: tuple[str, str]) -> str:
    return server[0]


@pytest.fixture(scope="module")
def channel(listen: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(listen) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> ep_grpc.ExternalProcessorStub:
    return ep_grpc.ExternalProcessorStub(channel)


def headers(path: str = "/v1/chat/completions", method: str = "POST", end: bool = False, **kw) -> ep.ProcessingRequest:
    request = ep.ProcessingRequest(**kw)
    for key, value in ((":path", path), (":method", method), ("content-type", "application/json")):
        h = request.request_headers.headers.headers.add()
        h.key, h.raw_value = key, value.encode()
    request.request_headers.end_of_stream = end
    return request


def body(payload: dict | bytes, end_of_stream: bool = True) -> ep.ProcessingRequest:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=end_of_stream))


def chat(model: str = "model-a") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}]}


def exchange(stub, messages, metadata=()) -> list[ep.ProcessingResponse]:
    return list(stub.Process(iter(messages), metadata=metadata, timeout=10))


def pick_of(response: ep.ProcessingResponse) -> tuple[list[str], dict[str, str], bool]:
    common = getattr(response, response.WhichOneof("response")).response
    set_headers = {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}
    metadata = response.dynamic_metadata.fields[names.LB_NAMESPACE].struct_value.fields
    value = metadata[names.DESTINATION_KEY].string_value
    assert value == set_headers[names.DESTINATION_KEY]  # header and metadata agree
    return value.split(","), set_headers, common.clear_route_cache


def test_every_message_type_gets_its_own_answer(stub) -> None:
    messages = [
        headers(),
        body(chat(), end_of_stream=False),  # a streamed body: more may follow, the stream stays open
        ep.ProcessingRequest(request_trailers=ep.HttpTrailers()),
        ep.ProcessingRequest(response_headers=ep.HttpHeaders()),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"{}", end_of_stream=True)),
        ep.ProcessingRequest(response_trailers=ep.HttpTrailers()),
    ]
    kinds = [r.WhichOneof("response") for r in exchange(stub, messages)]
    assert kinds == [
        "request_headers",
        "request_body",
        "request_trailers",
        "response_headers",
        "response_body",
        "response_trailers",
    ]


def test_the_picker_ends_the_stream_once_the_request_is_answered(stub) -> None:
    """After the body's last message (or headers without a body) the picker closes the stream with OK, so Envoy
    never has to reset it (grpc.aio keeps native memory for every cancelled stream: server.py)."""
    call = stub.Process(iter([headers(), body(chat())]))
    answers = list(call)
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
    assert call.code() == grpc.StatusCode.OK
    call = stub.Process(iter([headers("/v1/models", "GET", end=True)]))
    assert [a.WhichOneof("response") for a in call] in (["request_headers"], ["immediate_response"])
    assert call.code() == grpc.StatusCode.OK


def test_model_routing_sets_the_pool_header_and_clears_the_route_cache(stub) -> None:
    default_route = Struct()
    default_route.update({names.CLUSTER_ATTRIBUTE: "pool-a", names.ROUTE_ATTRIBUTE: names.DEFAULT_ROUTE})
    first, second = exchange(
        stub, [headers(attributes={"envoy.filters.http.ext_proc": default_route}), body(chat("model-b-alias"))]
    )
    assert first.WhichOneof("response") == "request_headers"
    assert not first.HasField("dynamic_metadata")  # the pick waits for the body
    endpoints, set_headers, cleared = pick_of(second)
    assert endpoints[0] in POOL_B and set(endpoints) == set(POOL_B)
    assert set_headers[names.POOL_HEADER] == "b" and cleared


def test_the_pool_envoy_chose_wins_and_keeps_the_route(stub) -> None:
    _, second = exchange(stub, [headers(), body(chat("model-b"))], metadata=[(names.POOL_METADATA, "a")])
    endpoints, set_headers, cleared = pick_of(second)
    assert set(endpoints) == set(POOL_A)
    assert names.POOL_HEADER not in set_headers and not cleared
    path_route = Struct()
    path_route.update({names.CLUSTER_ATTRIBUTE: "pool-b", names.ROUTE_ATTRIBUTE: "b-by-path"})
    _, second = exchange(stub, [headers(attributes={"envoy.filters.http.ext_proc": path_route}), body(chat())])
    assert set(pick_of(second)[0]) == set(POOL_B)


def test_unknown_pool_from_the_route_is_503(stub) -> None:
    _, second = exchange(stub, [headers(), body(chat())], metadata=[(names.POOL_METADATA, "zzz")])
    assert second.immediate_response.status.code == 503


def test_subset_hint_restricts_the_pick(stub) -> None:
    metadata = ep.ProcessingRequest().metadata_context
    hint = Struct()
    hint.update({names.SUBSET_KEY: [POOL_B[1]]})
    metadata.filter_metadata[names.SUBSET_NAMESPACE].CopyFrom(hint)
    _, second = exchange(stub, [headers(metadata_context=metadata), body(chat("model-b"))])
    assert pick_of(second)[0] == [POOL_B[1]]
    hint.update({names.SUBSET_KEY: ["10.9.9.9:80"]})
    metadata.filter_metadata[names.SUBSET_NAMESPACE].CopyFrom(hint)
    _, second = exchange(stub, [headers(metadata_context=metadata), body(chat("model-b"))])
    assert second.immediate_response.status.code == 503
    assert orjson.loads(second.immediate_response.body)["error"]["code"] == 503


def hinted(*addresses: str, route: Struct | None = None) -> ep.ProcessingRequest:
    """Request headers with a GIE subset hint (and optionally Envoy's route attributes)."""
    metadata = ep.ProcessingRequest().metadata_context
    hint = Struct()
    hint.update({names.SUBSET_KEY: list(addresses)})
    metadata.filter_metadata[names.SUBSET_NAMESPACE].CopyFrom(hint)
    attributes = {"envoy.filters.http.ext_proc": route} if route is not None else {}
    return headers(metadata_context=metadata, attributes=attributes)


def test_a_subset_hint_of_another_models_pool_is_refused_not_rewritten(stub) -> None:
    """The hint names where a request may go; endpoints serving another model never serve it (503, no rewrite)."""
    _, second = exchange(stub, [hinted(POOL_B[0]), body(chat("model-a"))])
    immediate = second.immediate_response
    assert immediate.status.code == 503
    error = orjson.loads(immediate.body)["error"]
    assert error == {
        "message": "no endpoint of the subset hint serves model 'model-a' (they serve model-b, model-b-alias)",
        "type": "unavailable",
        "param": "model",
        "code": 503,
    }
    # A hint over both pools: the pool serving the model, only its hinted endpoint, the body untouched.
    for model, expected in (("model-a", POOL_A[1]), ("model-b-alias", POOL_B[0])):
        _, second = exchange(stub, [hinted(POOL_A[1], POOL_B[0]), body(chat(model))])
        assert pick_of(second)[0] == [expected]
        assert not second.request_body.response.HasField("body_mutation")
    # "auto" asks for any model: the hint's pool serves it under its own name.
    _, second = exchange(stub, [hinted(POOL_B[1]), body(chat("auto"))])
    assert pick_of(second)[0] == [POOL_B[1]]
    assert rewritten_body(second)[0]["model"] == "model-b"
    # An unknown model is 404 whatever the hint.
    _, second = exchange(stub, [hinted(POOL_B[1]), body(chat("no-such-model"))])
    assert second.immediate_response.status.code == 404


def test_a_subset_hint_outside_the_routed_pool_reroutes_envoy(stub) -> None:
    """Envoy's default route holds pool a's cluster: a pick in pool b must move the request there."""
    default_route = Struct()
    default_route.update({names.CLUSTER_ATTRIBUTE: "pool-a", names.ROUTE_ATTRIBUTE: names.DEFAULT_ROUTE})
    _, second = exchange(stub, [hinted(POOL_B[0], route=default_route), body(chat("model-b"))])
    endpoints, set_headers, cleared = pick_of(second)
    assert endpoints == [POOL_B[0]] and set_headers[names.POOL_HEADER] == "b" and cleared
    path_route = Struct()
    path_route.update({names.CLUSTER_ATTRIBUTE: "pool-b", names.ROUTE_ATTRIBUTE: "b-by-path"})
    _, second = exchange(stub, [hinted(POOL_B[0], route=path_route), body(chat("model-b"))])
    endpoints, set_headers, cleared = pick_of(second)
    assert endpoints == [POOL_B[0]] and names.POOL_HEADER not in set_headers and not cleared


def test_a_request_without_body_is_picked_on_its_headers(stub) -> None:
    (only,) = exchange(stub, [headers("/v1/models/model-a", "GET", end=True)])
    assert only.WhichOneof("response") == "request_headers"
    assert pick_of(only)[0][0] in POOL_A


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"{not json", 400),
        (b'"a string"', 400),
        (orjson.dumps({"model": "model-a", "messages": []}), 400),
        (orjson.dumps({"model": "model-a", "messages": "hi"}), 400),
        (orjson.dumps({"model": "model-a", "messages": [{"role": "user", "content": "x"}], "stream": "no"}), 400),
        (orjson.dumps(chat("no-such-model")), 404),
        (b"\xff\xfe\x00", 400),
    ],
)
def test_bad_bodies_get_immediate_json_errors(stub, payload: bytes, status: int) -> None:
    _, second = exchange(stub, [headers(), body(payload)])
    immediate = second.immediate_response
    assert immediate.status.code == status
    error = orjson.loads(immediate.body)["error"]
    assert error["code"] == status and error["message"]
    content_type = {o.header.key: o.header.raw_value for o in immediate.headers.set_headers}["content-type"]
    assert content_type == b"application/json"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


@pytest.mark.parametrize(
    ("path", "payload", "pool"),
    [
        # the parser recurses per level of a prompt list: RecursionError near 500
        ("/v1/completions", b'{"model": "model-a", "prompt": ' + nested(800) + b"}", None),
        # a non-text content part is rendered by orjson, which writes 254 levels (and reads 1,024)
        ("/v1/chat/completions", b'{"messages": [{"role": "u", "content": [' + nested(300) + b"]}]}", None),
        # the model rewrite for the drawn pool re-serialises the body
        ("/v1/chat/completions", orjson.dumps(chat("auto"))[:-1] + b', "x": ' + nested(300) + b"}", "b"),
    ],
    ids=["prompt-lists", "content-part", "model-rewrite"],
)
def test_bodies_nested_too_deeply_are_400_not_a_broken_stream(stub, path: str, payload: bytes, pool: str) -> None:
    metadata = [(names.POOL_METADATA, pool)] if pool else []
    _, second = exchange(stub, [headers(path), body(payload)], metadata=metadata)
    assert second.immediate_response.status.code == 400
    error = orjson.loads(second.immediate_response.body)["error"]
    assert error["message"].endswith("nested too deeply"), error  # the parser's, or the director's, words
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    _, second = exchange(stub, [headers(), body(chat())])  # and the server still serves
    assert second.WhichOneof("response") == "request_body"


def test_bytes_that_are_no_processing_request_end_the_stream_with_invalid_argument(stub, channel) -> None:
    raw = channel.stream_stream(  # without the request serializer: bytes go out as they are
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=None,
        response_deserializer=ep.ProcessingResponse.FromString,
    )
    good = ep.ProcessingRequest(request_trailers=ep.HttpTrailers()).SerializeToString()
    for messages in ([b"\xff\xff\xff"], [good, b"\x0a\x05"]):
        with pytest.raises(grpc.RpcError) as caught:
            list(raw(iter(messages), timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "malformed ProcessingRequest"
    (only,) = exchange(stub, [ep.ProcessingRequest(request_trailers=ep.HttpTrailers())])
    assert only.WhichOneof("response") == "request_trailers"


def test_large_bodies_fit_through_grpc(stub) -> None:
    big = {"model": "model-a", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    _, second = exchange(stub, [headers(), body(big)])
    assert second.WhichOneof("response") == "request_body"
    too_big = {"model": "model-a", "messages": [{"role": "user", "content": "x" * (6 * 1024 * 1024)}]}
    _, second = exchange(stub, [headers(), body(too_big)])
    assert second.immediate_response.status.code == 413


def rewritten_body(response: ep.ProcessingResponse) -> tuple[dict, dict[str, str]]:
    common = response.request_body.response
    set_headers = {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}
    body = common.body_mutation.body
    assert set_headers["content-length"] == str(len(body))
    return orjson.loads(body), set_headers


@pytest.mark.parametrize("asked", ["auto", "model-a"])
def test_the_drawn_pool_rewrites_the_model(stub, asked: str) -> None:
    """On a route that drew pool b (the A/B split), "auto" or pool a's model becomes b's served name."""
    payload = {**chat(asked), "temperature": 0.3, "stream": True}
    _, second = exchange(stub, [headers(), body(payload)], metadata=[(names.POOL_METADATA, "b")])
    assert set(pick_of(second)[0]) == set(POOL_B)
    sent, _ = rewritten_body(second)
    assert sent == {**payload, "model": "model-b"}  # everything else unchanged


def test_a_model_the_pool_serves_is_left_alone(stub) -> None:
    _, second = exchange(stub, [headers(), body(chat("model-b-alias"))], metadata=[(names.POOL_METADATA, "b")])
    assert not second.request_body.response.HasField("body_mutation")


def test_auto_without_a_route_goes_to_the_first_pool(stub) -> None:
    _, second = exchange(stub, [headers(), body(chat("auto"))])
    endpoints, set_headers, cleared = pick_of(second)
    assert set(endpoints) == set(POOL_A) and set_headers[names.POOL_HEADER] == "a" and cleared
    assert rewritten_body(second)[0]["model"] == "model-a"


def test_the_gateway_lists_every_model(stub) -> None:
    (only,) = exchange(stub, [headers("/v1/models", "GET", end=True)])
    assert only.immediate_response.status.code == 200
    listing = orjson.loads(only.immediate_response.body)
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["model-a", "model-b", "model-b-alias"]
    # A pool's own path still reaches that pool's servers.
    (only,) = exchange(stub, [headers("/v1/models", "GET", end=True)], metadata=[(names.POOL_METADATA, "b")])
    assert pick_of(only)[0][0] in POOL_B


def test_route_names_from_the_attributes_cannot_grow_the_metric_series(stub, server) -> None:
    """Envoy sends a handful of route names; a client speaking gRPC directly could send one per request."""
    for i in range(100):
        route = Struct()
        route.update({names.CLUSTER_ATTRIBUTE: "pool-a", names.ROUTE_ATTRIBUTE: f"invented-{i}"})
        _, second = exchange(stub, [headers(attributes={"envoy.filters.http.ext_proc": route}), body(chat())])
        assert second.WhichOneof("response") == "request_body"
    text = urllib.request.urlopen(server[1], timeout=5).read().decode()
    routes = {
        s.labels["route"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if family.name == "extproc_requests"
    }
    assert "other" in routes and len(routes) <= 64 + 1, len(routes)
