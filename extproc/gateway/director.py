"""One request's journey from Envoy's messages to an answer: pool, parse, schedule, respond.

This is the glue between the wire (protocol) and the policy (scheduling); it holds no policy of its
own beyond which pool a request belongs to, and it never awaits anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson

from extproc import names
from extproc.config import Config, Pool
from extproc.datalayer.table import EndpointTable
from extproc.gateway import protocol
from extproc.gateway.openai import ParsedRequest, RequestError, parse_body
from extproc.gateway.telemetry import BY_MODEL_ROUTE, Telemetry, route_label
from extproc.scheduling import Decision, RoutingRequest
from extproc.scheduling.scheduler import Scheduler

_WANTED_HEADERS = frozenset((":path", ":method"))
AUTO_MODEL = "auto"  # "any model": the pool is left to the route (e.g. the A/B split)
MODELS_PATH = "/v1/models"


@dataclass(slots=True)
class StreamState:
    """What one ext_proc stream (one HTTP request) has learnt so far."""

    pool_hint: str | None = None  # from gRPC initial metadata set by the route
    path: str = ""
    method: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    route: str = BY_MODEL_ROUTE  # the metrics' route label, from the route attribute
    subset: frozenset[str] | None = None


class EndpointPicker:
    def __init__(self, config: Config, table: EndpointTable, scheduler: Scheduler, telemetry: Telemetry) -> None:
        self.config = config
        self.table = table
        self.scheduler = scheduler
        self.telemetry = telemetry
        self._pools = {p.name: p for p in config.pools}
        self._pool_by_model = {m: p for p in config.pools for m in p.models}
        self._max_body = config.limits.max_body_bytes
        created = int(time.time())
        listing = {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": created, "owned_by": f"pool {pool.name}"}
                for pool in config.pools
                for model in pool.models
            ],
        }
        self._models_response = protocol.immediate(200, orjson.dumps(listing), "extproc_models")

    # ----- messages -------------------------------------------------------------------------

    def on_request_headers(
        self, request: protocol.ProcessingRequest, state: StreamState
    ) -> protocol.ProcessingResponse:
        headers = protocol.header_values(request.request_headers.headers, _WANTED_HEADERS)
        state.path = headers.get(":path", "")
        state.method = headers.get(":method", "")
        state.attributes = protocol.attributes(request)
        state.route = route_label(state.attributes.get(names.ROUTE_ATTRIBUTE))
        state.subset = protocol.subset_hint(request)
        if not request.request_headers.end_of_stream:
            return protocol.passthrough("request_headers")  # the body carries the prompt: pick then
        if state.path.split("?", 1)[0] == MODELS_PATH and state.pool_hint is None and state.method == "GET":
            return self._models_response  # the gateway's own list: every model behind it
        # No body (GET and the like): route by load alone.
        return self._decide("request_headers", state, None)

    def on_request_body(self, request: protocol.ProcessingRequest, state: StreamState) -> protocol.ProcessingResponse:
        raw = request.request_body.body
        if len(raw) > self._max_body:
            return self._refuse(
                state,
                None,
                RequestError(413, f"request body is larger than {self._max_body} bytes", "invalid_request_error"),
            )
        try:
            parsed = parse_body(raw, state.path)
        except RequestError as error:
            return self._refuse(state, None, error)
        return self._decide("request_body", state, parsed)

    # ----- decisions ------------------------------------------------------------------------

    def _pool_from_envoy(self, state: StreamState) -> Pool | None:
        """The pool Envoy's route chose, if it told us (initial metadata, then the cluster attribute)."""
        if state.pool_hint is not None:
            return self._pools.get(state.pool_hint)
        cluster = state.attributes.get(names.CLUSTER_ATTRIBUTE, "")
        route_name = state.attributes.get(names.ROUTE_ATTRIBUTE)
        if cluster.startswith(names.CLUSTER_PREFIX) and route_name != names.DEFAULT_ROUTE:
            return self._pools.get(cluster.removeprefix(names.CLUSTER_PREFIX))
        return None

    def _pool_from_subset(self, subset: frozenset[str]) -> Pool | None:
        for pool in self.config.pools:
            if any(e.address in subset for e in self.table.pool_endpoints(pool.name)):
                return pool
        return None

    def _resolve_pool(self, state: StreamState, model: str | None) -> tuple[Pool, bool]:
        """The request's pool, and whether Envoy must be told to re-route to it (model-based routing).

        In order: the GIE subset hint, the pool Envoy's route chose, the body's model.
        """
        if state.subset is not None:
            pool = self._pool_from_subset(state.subset)
            if pool is None:
                raise RequestError(503, "no endpoint of the subset hint is known", "unavailable")
        else:
            pool = self._pool_from_envoy(state)
            if pool is None and state.pool_hint is not None:
                raise RequestError(503, f"the route names an unknown pool {state.pool_hint!r}", "unavailable")
        if model == AUTO_MODEL:
            model = None
        if model is not None and model not in self._pool_by_model:
            known = ", ".join(sorted(self._pool_by_model))
            raise RequestError(404, f"model {model!r} is not served here; known: {known}", "not_found", "model")
        if pool is not None:
            return pool, False
        if model is not None:
            return self._pool_by_model[model], True
        return self.config.pools[0], True

    def _decide(self, kind: str, state: StreamState, parsed: ParsedRequest | None) -> protocol.ProcessingResponse:
        start = time.perf_counter()
        model = parsed.model if parsed is not None else None
        try:
            pool, reroute = self._resolve_pool(state, model)
        except RequestError as error:
            return self._refuse(state, model, error)
        pool_header = pool.name if reroute else None

        hashes: tuple[int, ...] = ()
        prompt_chars = 0
        if parsed is not None and parsed.prompt:
            hashes = self.scheduler.hash_prompt(parsed.prompt, pool.served_name)
            prompt_chars = len(parsed.prompt)
        routing = RoutingRequest(
            pool=pool.name, model=model, prefix_hashes=hashes, prompt_chars=prompt_chars, subset=state.subset
        )
        decision: Decision = self.scheduler.schedule(routing, self.table.pool_endpoints(pool.name), time.monotonic())
        telemetry = self.telemetry
        telemetry.decided(pool.name, time.perf_counter() - start)
        if not decision.routed:
            kind_name = "rate_limited" if decision.status == 429 else "unavailable"
            return self._refuse(state, model, RequestError(decision.status, decision.reason, kind_name), pool.name)
        body: bytes | None = None
        asked = model or ""
        if parsed is not None and model is not None and model not in pool.models:
            # "auto", or another pool's model on a route that drew this pool (the A/B split): ask the
            # drawn pool's vLLM for the model it serves.
            parsed.body["model"] = model = pool.served_name
            body = orjson.dumps(parsed.body)
        telemetry.routed(
            pool.name,
            asked,
            model or "",
            state.route,
            decision.endpoints[0],
            decision.fail_open,
            decision.prompt_blocks,
            decision.matched_blocks,
        )
        return protocol.route(kind, decision.endpoints, pool_header, body)

    def _refuse(
        self, state: StreamState, model: str | None, error: RequestError, pool: str = ""
    ) -> protocol.ProcessingResponse:
        # Only served model names (and "auto") become label values: a client's invented names must not grow
        # the series.
        asked = model if model in self._pool_by_model or model == AUTO_MODEL else ""
        served = self._pools[pool].served_name if pool in self._pools else ""
        self.telemetry.refused(pool, asked, served, state.route, error.status)
        return protocol.immediate(error.status, error.body(), f"extproc_{error.status}")
