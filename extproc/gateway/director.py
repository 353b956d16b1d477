"""Request control: one request from what Envoy said to an outcome, routed or refused.

The director resolves the request's pool, parses its body, asks the scheduler, rewrites the model
name for the drawn pool and keeps the per-request metrics. It reads a `RequestContext` and answers with
a `Route`, a `Reply` or None; it never sees a protobuf. It awaits nothing, except when a plugin scores the
engine's tokens of the prompt (``precise_prefix``): then ``on_body_tokenized`` first asks an engine to
render them (``extproc/datalayer/render.py``). A scheduling plugin that raises does not fail the request:
see ``_plugin_failed``.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence

import orjson

from extproc import names
from extproc.config import Config, Pool
from extproc.datalayer.endpoint import EndpointState
from extproc.datalayer.render import RenderTokenizer
from extproc.datalayer.table import EndpointTable
from extproc.gateway.context import Reply, RequestContext, Route
from extproc.gateway.openai import ParsedRequest, RequestError, parse_body
from extproc.gateway.telemetry import Telemetry, route_label
from extproc.scheduling import Decision, RoutingRequest
from extproc.scheduling.scheduler import Scheduler

log = logging.getLogger("extproc")

AUTO_MODEL = "auto"  # "any model": the pool is left to the route (e.g. the A/B split)
TOO_DEEP = "request body is nested too deeply"
MAX_ROUTE_LABELS = 64  # distinct Envoy route names kept as metric labels; later ones count as OTHER_ROUTE
OTHER_ROUTE = "other"
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
        settings = config.scheduler
        plugin_names = [f.name for f in settings.filters] + [s.name for s in settings.scorers if s.weight > 0]
        # The scheduler lists its plugins in the order of the configuration: id -> the configured name.
        self._plugin_names = {
            id(p): n for p, n in zip(scheduler.plugins(), [*plugin_names, settings.picker.name], strict=False)
        }
        self._failed_plugins: set[str] = set()  # logged once each (with the traceback), then only counted
        self._routes: set[str] = set()  # route labels seen (see _route)
        tokens_for = next((p for p in scheduler.plugins() if getattr(p, "needs_tokens", False)), None)
        self.tokenizer = (
            RenderTokenizer(table, tokens_for.render_timeout, tokens_for.render_cache, tokens_for.tokenizers)
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
        self._models_reply = Reply(200, orjson.dumps(listing), f"{names.REPLY_DETAILS_PREFIX}models")

    # ----- messages -------------------------------------------------------------------------

    def on_headers(self, request: RequestContext) -> Outcome:
        """The headers arrived: wait for the body, or (no body) answer now."""
        route = route_label(request.attributes.get(names.ROUTE_ATTRIBUTE))
        request.route = route if route in self._routes else self._route(route)
        if not request.end_of_stream:
            return None  # the body carries the prompt: pick then
        if request.path.split("?", 1)[0] == MODELS_PATH and request.pool_hint is None and request.method == "GET":
            return self._models_reply  # the gateway's own list: every model behind it
        # No body (GET and the like): route by load alone.
        return self._decide(request, None)

    def _route(self, route: str) -> str:
        """A route label not seen before. Envoy's route names come from its configuration, a handful; anything
        else speaking gRPC to the picker could send a new one per request and grow the metric series without
        bound, so past MAX_ROUTE_LABELS names the rest count as ``other``."""
        if len(self._routes) >= MAX_ROUTE_LABELS:
            return OTHER_ROUTE
        self._routes.add(route)
        return route

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
        except (RecursionError, orjson.JSONEncodeError):  # the parser recursing per level, or orjson's 254
            return self._refuse(request, None, RequestError(400, TOO_DEEP))

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

    def _pool_from_subset(self, subset: frozenset[str], model: str | None) -> Pool:
        """The pool of the GIE subset hint's endpoints that serves ``model`` (None: any model).

        The hint says where the request may go, the body what it asks for: endpoints of a pool serving
        another model never serve it, since the model rewrite would answer with a model the client did not
        ask for. 503 (as for a hint with no known endpoint) names both.
        """
        hinted = [p for p in self.config.pools if any(e.address in subset for e in self.table.pool_endpoints(p.name))]
        if not hinted:
            raise RequestError(503, "no endpoint of the subset hint is known", "unavailable")
        for pool in hinted:
            if model is None or model in pool.models:
                return pool
        served = ", ".join(m for p in hinted for m in p.models)
        raise RequestError(
            503, f"no endpoint of the subset hint serves model {model!r} (they serve {served})", "unavailable", "model"
        )

    def _resolve_pool(self, request: RequestContext, model: str | None) -> tuple[Pool, bool]:
        """The request's pool, and whether Envoy must be told to re-route to it (model-based routing).

        In order: the GIE subset hint (only a pool of it serving the model), the pool Envoy's route chose,
        the body's model. A model no pool serves is 404 whatever the route.
        """
        if model == AUTO_MODEL:
            model = None
        if model is not None and model not in self._pool_by_model:
            known = ", ".join(sorted(self._pool_by_model))
            raise RequestError(404, f"model {model!r} is not served here; known: {known}", "not_found", "model")
        if request.subset is not None:
            pool = self._pool_from_subset(request.subset, model)
            return pool, pool is not self._pool_from_envoy(request)
        pool = self._pool_from_envoy(request)
        if pool is None and request.pool_hint is not None:
            raise RequestError(503, f"the route names an unknown pool {request.pool_hint!r}", "unavailable")
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
        body: bytes | None = None
        served = model
        if parsed is not None and model is not None and model not in pool.models:
            # "auto", or another pool's model on a route that drew this pool (the A/B split): ask the
            # drawn pool's vLLM for the model it serves.
            parsed.body["model"] = served = pool.served_name
            try:
                body = orjson.dumps(parsed.body)
            except orjson.JSONEncodeError:  # deeper than orjson writes (254 levels; it reads 1,024)
                return self._refuse(request, model, RequestError(400, TOO_DEEP), pool.name)
        routing = RoutingRequest(
            pool=pool.name,
            model=model,
            prompt=parsed.prompt if parsed is not None else "",
            subset=request.subset,
            target_model=pool.served_name,
            token_ids=tokens,
        )
        endpoints = self.table.pool_endpoints(pool.name)
        now = time.monotonic()
        try:
            decision = self.scheduler.schedule(routing, endpoints, now)
        except Exception as exc:  # a plugin's bug: route anyway (see _plugin_failed)
            decision = self._plugin_failed(exc, routing, endpoints, now)
        telemetry = self.telemetry
        telemetry.decided(pool.name, time.perf_counter() - start)
        if not decision.routed:
            kind_name = "rate_limited" if decision.status == 429 else "unavailable"
            return self._refuse(request, model, RequestError(decision.status, decision.reason, kind_name), pool.name)
        telemetry.routed(pool.name, model or "", served or "", request.route, decision.endpoints[0], decision.fail_open)
        return Route(decision.endpoints, pool.name if reroute else None, body)

    def _plugin_failed(
        self, exc: Exception, request: RoutingRequest, endpoints: Sequence[EndpointState], now: float
    ) -> Decision:
        """A scheduling plugin raised: route fail-open by load, count it, log its traceback once per plugin.

        Nothing is wrong with the request or the endpoints, only with one plugin's code, so the picker does
        what it does for the other faults on its side (every scrape stale, the picker itself down under
        Envoy's ``failure_mode_allow``): it still routes, here among the pool's endpoints (inside the subset
        hint; fresh ones first) by the load last scraped, with the usual fallbacks, counted as outcome
        ``fallback``. A JSON 500 would turn one plugin's bug into an outage of every pool it runs in; a bug
        that raises on every request would also flood the log, hence one traceback per plugin and the
        ``extproc_plugin_errors_total{plugin}`` counter after it.
        """
        name = self._plugin_name(exc)
        self.telemetry.plugin_failed(name)
        if name not in self._failed_plugins:
            self._failed_plugins.add(name)
            log.error(
                "scheduler plugin %r raised; routing by load instead (logged once per plugin; counted in "
                "extproc_plugin_errors_total)",
                name,
                exc_info=exc,
            )
        candidates = [e for e in endpoints if request.subset is None or e.address in request.subset]
        if not candidates:
            where = "the subset hint" if request.subset is not None else f"pool {request.pool!r}"
            return Decision(status=503, reason=f"no endpoint in {where}")
        candidates.sort(key=lambda e: (not e.fresh(now), e.waiting + e.pending, e.kv_usage))
        picked = candidates[: 1 + self.config.scheduler.fallbacks]
        picked[0].pending += 1
        return Decision(tuple(e.address for e in picked), reason=f"plugin {name!r} raised", fail_open=True)

    def _plugin_name(self, exc: BaseException) -> str:
        """The configured name of the plugin whose method raised (the outermost one in the traceback)."""
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            name = self._plugin_names.get(id(frame.f_locals.get("self")))
            if name is not None:
                return name
        return "scheduler"

    def _refuse(self, request: RequestContext, model: str | None, error: RequestError, pool: str = "") -> Reply:
        # Only served model names (and "auto") become label values: a client's invented names must not grow
        # the series.
        asked = model if model in self._pool_by_model or model == AUTO_MODEL else ""
        served = self._pools[pool].served_name if pool in self._pools else ""
        self.telemetry.refused(pool, asked, served, request.route, error.status)
        return Reply(error.status, error.body(), f"{names.REPLY_DETAILS_PREFIX}{error.status}")
