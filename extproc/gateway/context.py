"""What the director reads and what it answers: one request as Envoy described it, and two kinds of answer.

The server fills a `RequestContext` from Envoy's messages (gRPC metadata, headers, attributes, body);
the director answers with a `Route` (send it to these endpoints) or a `Reply` (the gateway answers the
client itself), or None (let the message through and wait for the next one). Neither side sees the
other's types: the director never builds a protobuf, the server holds no policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BY_MODEL_ROUTE = "by-model"  # the route label when the pool came from the body's model (Envoy's default route)


@dataclass(slots=True)
class RequestContext:
    """What one ext_proc stream (one HTTP request) has told the picker so far."""

    pool_hint: str | None = None  # gRPC initial metadata set by a path route or a weighted split's arm
    path: str = ""
    method: str = ""
    attributes: dict[str, str] = field(default_factory=dict)  # xds.cluster_name, xds.route_name
    subset: frozenset[str] | None = None  # the GIE candidate-subset hint
    end_of_stream: bool = False  # the headers were the whole request (no body follows)
    body: bytes = b""
    route: str = BY_MODEL_ROUTE  # the metrics' route label, set by the director from the route attribute


@dataclass(frozen=True, slots=True)
class Route:
    """Send the request to ``endpoints`` (pick first, then fallbacks).

    ``pool_header`` (model-based routing) makes Envoy re-route to that pool's cluster; ``body`` replaces
    the request body (the model name rewritten for the drawn pool).
    """

    endpoints: tuple[str, ...]
    pool_header: str | None = None
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the client directly with a JSON body (an OpenAI-style error, or the model list)."""

    status: int
    body: bytes
    details: str  # Envoy's response-code details, e.g. extproc_404
