"""Request control: one request from what Envoy said to an outcome, routed or refused.

The director resolves the request's pool, parses its body, asks the scheduler, rewrites the model
name for the drawn pool and keeps the per-request metrics. It reads a `RequestContext` and answers with
a `Route`, a `Reply` or None; it never sees a protobuf. It awaits nothing, except when a plugin scores the
engine's tokens of the prompt (``precise_prefix``): then ``on_body_tokenized`` first asks an engine to
render them (``extproc/datalayer/render.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson

from extproc import names
from extproc.config import Config, Pool
from extproc.datalayer.render import RenderTokenizer
from extproc.datalayer.table import EndpointTable
from extproc.gateway.context import Reply, RequestContext, Route
from extproc.gateway.openai import ParsedRequest, RequestError, parse_body
from extproc.gateway.telemetry import Telemetry, route_label
from extproc.scheduling import RoutingRequest
from extproc.scheduling.scheduler import Scheduler

AUTO_MODEL = "auto"  # "any model": the pool is left to the route (e.g. the A/B split)
MODELS_PATH = "/v1/models"
Outcome = Route | Reply | None


class Director:
    def __init__(self, config: Config, table: EndpointTable, scheduler: Scheduler, telemetry: Telemetry) -> None:
        self.config = config
        self.table = table
        self.scheduler = scheduler
        self.telemetry = telemetry
        self._pools = {p.name: p for p in config.pools}
        self._pool_by_model = {m: p for p in config.pools for m in p.models}
        self._max_body = config.limits.max_body_bytes
        tokens_for = next((p for p in scheduler.plugins() if getattr(p, "needs_tokens", False)), None)
        self.tokenizer = (
            RenderTokenizer(table, tokens_for.render_timeout, tokens_for.render_cache)
            if tokens_for is not None
            else None
        )
        created = int(time.time())
        listing = {
            "object": "list",
            "data": [
                {"id": model, "object": "model", "created": created, "owned_by": f"pool {pool.name}"}
                for pool in config.pools
                for model in pool.models
            ],
        }
        self._models_reply = Reply(200, orjson.dumps(listing), "extproc_models")

    # ----- messages -------------------------------------------------------------------------

    def on_headers(self, request: RequestContext) -> Outcome:
        """The headers arrived: wait for the body, or (no body) answer now."""
        request.route = route_label(request.attributes.get(names.ROUTE_ATTRIBUTE))
        if not request.end_of_stream:
            return None  # the body carries the prompt: pick then
        if request.path.split("?", 1)[0] == MODELS_PATH and request.pool_hint is None and request.method == "GET":
            return self._models_reply  # the gateway's own list: every model behind it
        # No body (GET and the like): route by load alone.
        return self._decide(request, None)

    def on_body(self, request: RequestContext) -> Outcome:
        parsed = self._parse(request)
        return parsed if not isinstance(parsed, ParsedRequest) else self._decide(request, parsed)

    async def on_body_tokenized(self, request: RequestContext) -> Outcome:
        """``on_body`` with the engine's tokens of the prompt (None if they could not be had in time)."""
        parsed = self._parse(request)
        if not isinstance(parsed, ParsedRequest):
            return parsed
        tokens = None
        if parsed.prompt and self.tokenizer is not None:
            try:
                pool, _ = self._resolve_pool(request, parsed.model)
            except RequestError:
                pool = None  # _decide refuses it
            if pool is not None:
                tokens = await self.tokenizer.token_ids(pool.name, pool.served_name, parsed.body, parsed.prompt)
        return self._decide(request, parsed, tokens)

    def _parse(self, request: RequestContext) -> ParsedRequest | Reply:
        raw = request.body
        if len(raw) > self._max_body:
            error = RequestError(413, f"request body is larger than {self._max_body} bytes", "invalid_request_error")
            return self._refuse(request, None, error)
        try:
            return parse_body(raw, request.path)
        except RequestError as error:
            return self._refuse(request, None, error)

    # ----- decisions ------------------------------------------------------------------------

    def _pool_from_envoy(self, request: RequestContext) -> Pool | None:
        """The pool Envoy's route chose, if it told us (initial metadata, then the cluster attribute)."""
        if request.pool_hint is not None:
            return self._pools.get(request.pool_hint)
        cluster = request.attributes.get(names.CLUSTER_ATTRIBUTE, "")
        route_name = request.attributes.get(names.ROUTE_ATTRIBUTE)
        if cluster.startswith(names.CLUSTER_PREFIX) and route_name != names.DEFAULT_ROUTE:
            return self._pools.get(cluster.removeprefix(names.CLUSTER_PREFIX))
        return None

    def _pool_from_subset(self, subset: frozenset[str]) -> Pool | None:
        for pool in self.config.pools:
            if any(e.address in subset for e in self.table.pool_endpoints(pool.name)):
                return pool
        return None

    def _resolve_pool(self, request: RequestContext, model: str | None) -> tuple[Pool, bool]:
        """The request's pool, and whether Envoy must be told to re-route to it (model-based routing).

        In order: the GIE subset hint, the pool Envoy's route chose, the body's model.
        """
        if request.subset is not None:
            pool = self._pool_from_subset(request.subset)
            if pool is None:
                raise RequestError(503, "no endpoint of the subset hint is known", "unavailable")
        else:
            pool = self._pool_from_envoy(request)
            if pool is None and request.pool_hint is not None:
                raise RequestError(503, f"the route names an unknown pool {request.pool_hint!r}", "unavailable")
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

    def _decide(
        self, request: RequestContext, parsed: ParsedRequest | None, tokens: Sequence[int] | None = None
    ) -> Outcome:
        start = time.perf_counter()
        model = parsed.model if parsed is not None else None
        try:
            pool, reroute = self._resolve_pool(request, model)
        except RequestError as error:
            return self._refuse(request, model, error)
        routing = RoutingRequest(
            pool=pool.name,
            model=model,
            prompt=parsed.prompt if parsed is not None else "",
            subset=request.subset,
            target_model=pool.served_name,
            token_ids=tokens,
        )
        decision = self.scheduler.schedule(routing, self.table.pool_endpoints(pool.name), time.monotonic())
        telemetry = self.telemetry
        telemetry.decided(pool.name, time.perf_counter() - start)
        if not decision.routed:
            kind_name = "rate_limited" if decision.status == 429 else "unavailable"
            return self._refuse(request, model, RequestError(decision.status, decision.reason, kind_name), pool.name)
        body: bytes | None = None
        asked = model or ""
        if parsed is not None and model is not None and model not in pool.models:
            # "auto", or another pool's model on a route that drew this pool (the A/B split): ask the
            # drawn pool's vLLM for the model it serves.
            parsed.body["model"] = model = pool.served_name
            body = orjson.dumps(parsed.body)
        telemetry.routed(pool.name, asked, model or "", request.route, decision.endpoints[0], decision.fail_open)
        return Route(decision.endpoints, pool.name if reroute else None, body)

    def _refuse(self, request: RequestContext, model: str | None, error: RequestError, pool: str = "") -> Reply:
        # Only served model names (and "auto") become label values: a client's invented names must not grow
        # the series.
        asked = model if model in self._pool_by_model or model == AUTO_MODEL else ""
        served = self._pools[pool].served_name if pool in self._pools else ""
        self.telemetry.refused(pool, asked, served, request.route, error.status)
        return Reply(error.status, error.body(), f"extproc_{error.status}")
