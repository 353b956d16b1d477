"""The Endpoint Picker Protocol on the wire: what the ext_proc reads from Envoy and answers.

Reading fills a `RequestContext`; answering turns the director's `Route` / `Reply` into a
ProcessingResponse. Every answer sets the ProcessingResponse oneof matching the message it answers;
Envoy treats a response without it (even one carrying only dynamic metadata) as spurious and fails the
stream.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from google.protobuf.struct_pb2 import Struct

from extproc._proto.envoy.config.core.v3 import base_pb2
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from extproc._proto.envoy.type.v3 import http_status_pb2
from extproc.gateway.context import Reply, RequestContext, Route
from extproc.names import (
    DESTINATION_KEY as DESTINATION_HEADER,
)
from extproc.names import (
    LB_NAMESPACE as DESTINATION_NAMESPACE,
)
from extproc.names import (
    POOL_HEADER,
    POOL_METADATA,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
)

ProcessingRequest = ep.ProcessingRequest
ProcessingResponse = ep.ProcessingResponse

_CONTINUE_HEADERS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_CONTINUE_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
_CONTINUE = {
    "request_headers": _CONTINUE_HEADERS,
    "request_body": _CONTINUE_BODY,
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


def passthrough(kind: str) -> ProcessingResponse:
    """Let a message through unchanged (shared, immutable instances: never modify them)."""
    return _CONTINUE[kind]


def _set_headers(mutation: ep.HeaderMutation, headers: dict[str, str]) -> None:
    for key, value in headers.items():
        option = mutation.set_headers.add()
        option.header.key = key
        option.header.raw_value = value.encode()
        option.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def route(
    kind: str, endpoints: tuple[str, ...], pool_header: str | None = None, body: bytes | None = None
) -> ProcessingResponse:
    """Send the request to ``endpoints`` (pick first, then fallbacks), answering a ``kind`` message.

    ``pool_header`` (model-based routing) also sets the pool header and clears the route cache so
    Envoy re-routes to that pool's cluster. ``body`` replaces the request body (BUFFERED mode).
    Without a body the answer depends only on the arguments, and a pool has few distinct
    pick-and-fallback orders, so those answers are built once and reused (never modify them).
    """
    if body is None:
        return _cached_route(kind, endpoints, pool_header)
    return _build_route(kind, endpoints, pool_header, body)


def _build_route(
    kind: str, endpoints: tuple[str, ...], pool_header: str | None, body: bytes | None
) -> ProcessingResponse:
    value = ",".join(endpoints)
    headers = {DESTINATION_HEADER: value}
    if pool_header is not None:
        headers[POOL_HEADER] = pool_header
    response = ep.ProcessingResponse()
    common = response.request_headers.response if kind == "request_headers" else response.request_body.response
    _set_headers(common.header_mutation, headers)
    if pool_header is not None:
        common.clear_route_cache = True
    if body is not None:
        common.body_mutation.body = body
        _set_headers(common.header_mutation, {"content-length": str(len(body))})
    metadata = Struct()
    metadata.get_or_create_struct(DESTINATION_NAMESPACE)[DESTINATION_HEADER] = value
    response.dynamic_metadata.CopyFrom(metadata)
    return response


_cached_route = functools.lru_cache(maxsize=4096)(
    lambda kind, endpoints, pool_header: _build_route(kind, endpoints, pool_header, None)
)


def immediate(status: int, body: bytes, details: str) -> ProcessingResponse:
    """Answer the client directly (no upstream), with a JSON body."""
    response = ep.ProcessingResponse()
    immediate_response = response.immediate_response
    immediate_response.status.code = http_status_pb2.StatusCode.Value(_STATUS_NAMES.get(status, "ServiceUnavailable"))
    immediate_response.body = body
    immediate_response.details = details
    _set_headers(immediate_response.headers, {"content-type": "application/json"})
    return response


_STATUS_NAMES = {
    200: "OK",
    400: "BadRequest",
    404: "NotFound",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}


def header_values(headers: base_pb2.HeaderMap, wanted: frozenset[str]) -> dict[str, str]:
    """The ``wanted`` headers; Envoy sends values in ``raw_value`` (bytes), ``value`` is usually empty."""
    out: dict[str, str] = {}
    for h in headers.headers:
        if h.key in wanted:
            out[h.key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


def subset_hint(request: ProcessingRequest) -> frozenset[str] | None:
    """The GIE candidate-subset hint from the request's filter metadata, if Envoy sent one."""
    if not request.HasField("metadata_context"):
        return None
    namespaces = request.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in namespaces:
        return None
    value = namespaces[SUBSET_NAMESPACE].fields.get(SUBSET_KEY)
    if value is None:
        return None
    if value.HasField("list_value"):
        return frozenset(v.string_value for v in value.list_value.values if v.string_value)
    if value.HasField("string_value"):
        return frozenset(a.strip() for a in value.string_value.split(",") if a.strip())
    return frozenset()


def attributes(request: ProcessingRequest) -> dict[str, str]:
    """Request attributes Envoy sent with this message (e.g. xds.cluster_name), as strings."""
    out: dict[str, str] = {}
    for struct in request.attributes.values():
        for key, value in struct.fields.items():
            if value.HasField("string_value"):
                out[key] = value.string_value
    return out


# ----- reading ---------------------------------------------------------------------------------------

_WANTED_HEADERS = frozenset((":path", ":method"))


def pool_hint(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The pool Envoy's route chose, from the stream's gRPC initial metadata (``x-pool``), if set."""
    for key, value in metadata or ():
        if key == POOL_METADATA:
            return value if isinstance(value, str) else value.decode()
    return None


def read_headers(message: ProcessingRequest, request: RequestContext) -> None:
    """The request-headers message: path, method, attributes, the subset hint, whether a body follows."""
    headers = message.request_headers
    values = header_values(headers.headers, _WANTED_HEADERS)
    request.path = values.get(":path", "")
    request.method = values.get(":method", "")
    request.attributes = attributes(message)
    request.subset = subset_hint(message)
    request.end_of_stream = headers.end_of_stream


# ----- answering -------------------------------------------------------------------------------------


def answer(kind: str, outcome: Route | Reply | None) -> ProcessingResponse:
    """The response to a ``kind`` message carrying the director's outcome (None: let it through)."""
    if outcome is None:
        return passthrough(kind)
    if isinstance(outcome, Route):
        return route(kind, outcome.endpoints, outcome.pool_header, outcome.body)
    return immediate(outcome.status, outcome.body, outcome.details)
