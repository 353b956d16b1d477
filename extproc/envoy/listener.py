"""Envoy's downstream side: the gateway listener, whose HTTP connection manager runs ``ext_proc`` then ``router``.

* routes, first match wins: ``/v1/<split>/...`` -> one of the split's pools drawn by weight (per-arm gRPC
  initial metadata ``x-pool: <pool>``; with ``sticky_header`` the draw is the hash of that header);
  ``x-extproc-pool: <name>`` (set by the ext_proc after reading the body's ``model``, with a route cache
  clear) -> that pool, stripping any ``/v1/<pool>/`` prefix to ``/v1/``; ``/v1/<name>/...`` -> that pool,
  rewritten to ``/v1/...``, with ``x-pool: <name>``; anything else -> the first pool. Splits come first so
  that neither a client's nor the ext_proc's ``x-extproc-pool`` header moves a request out of its draw;
* response headers: ``x-gateway-upstream-host``, ``x-gateway-picked-endpoint``, ``x-gateway-pool`` (the pool
  whose cluster served, from the cluster's metadata) and ``x-gateway-routing-us`` (see `ROUTING_US_FORMAT`);
* failures (``config.gateway``): routes match only the API paths a pool serves (``gateway.paths``), anything else
  is answered by Envoy itself, 404 or 405; forwarding routes retry a failed attempt on another endpoint; streaming
  requests (``"stream": true``, read by ``json_to_metadata`` before the ext_proc) get routes of their own with a
  per-try idle timeout; Envoy's own replies are rewritten to the OpenAI error JSON the picker uses.
"""

from __future__ import annotations

import datetime
import re
import warnings
from collections.abc import Callable, Mapping, Sequence

from extproc import names
from extproc.config import Config, Gateway, Split
from extproc.envoy.clusters import (
    CLUSTER_METADATA_NAMESPACE,
    CLUSTER_METADATA_POOL,
    EXT_PROC_CLUSTER,
    pool_cluster_name,
)
from extproc.envoy.proto import (
    AnyProto,
    accesslog,
    address,
    core,
    ext_proc_v3,
    hcm,
    listener,
    matcher,
    route,
    router,
    seconds,
    stream_log,
)
from extproc.names import (
    DEFAULT_ROUTE,
    DESTINATION_KEY,
    LB_NAMESPACE,
    PICKED_HEADER,
    POOL_HEADER,
    POOL_METADATA,
    POOL_RESPONSE_HEADER,
    REPLY_DETAILS_PREFIX,
    ROUTING_US_HEADER,
    UPSTREAM_HOST_HEADER,
)

with warnings.catch_warnings():  # envoy-data-plane's classes trip pydantic deprecation warnings on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.extensions.access_loggers.filters.cel import v3 as cel_filter
    from envoy_data_plane.envoy.extensions.filters.http.json_to_metadata import v3 as json_to_metadata
    from envoy_data_plane.envoy.extensions.retry.host.previous_hosts import v3 as previous_hosts
    from envoy_data_plane.google.protobuf import Struct

POOL_FORMAT = f"%CLUSTER_METADATA({CLUSTER_METADATA_NAMESPACE}:{CLUSTER_METADATA_POOL})%"
# Microseconds from the last byte of the request reaching Envoy to the first byte sent upstream: the ext_proc's
# round trips that were still outstanding (the body message, and the headers message if the body came first),
# the picker's own work, route and host selection, and the connect time when no pooled upstream connection was
# free. A client's slow upload is not counted (DS_RX_BEG would count it). No header when there was no upstream
# request (a local 503, an ImmediateResponse), nor when the upstream request began before the last request byte
# (ext_proc down: fail-open streams the body unbuffered; Envoy's formatter leaves a negative span empty).
# Checked in 1.40: a picker sleeping 20 ms adds ~20,800 to it.
ROUTING_US_FORMAT = "%COMMON_DURATION(DS_RX_END:US_TX_BEG:us)%"
# Response headers the route configuration adds, names from names.py.
RESPONSE_HEADERS = {
    UPSTREAM_HOST_HEADER: "%UPSTREAM_HOST%",
    PICKED_HEADER: f"%REQ({DESTINATION_KEY})%",
    POOL_RESPONSE_HEADER: POOL_FORMAT,
    ROUTING_US_HEADER: ROUTING_US_FORMAT,
}

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
JSON_TO_METADATA_FILTER = "envoy.filters.http.json_to_metadata"
# json_to_metadata copies the body's "stream" here; the streaming variant of each route matches on it.
STREAM_NAMESPACE = "extproc.request"
STREAM_KEY = "stream"

_H = ext_proc_v3.ProcessingModeHeaderSendMode
_B = ext_proc_v3.ProcessingModeBodySendMode
PROCESSING_MODE = ext_proc_v3.ProcessingMode(
    request_header_mode=_H.SEND,
    response_header_mode=_H.SKIP,
    request_body_mode=_B.BUFFERED,
    response_body_mode=_B.NONE,
    request_trailer_mode=_H.SKIP,
    response_trailer_mode=_H.SKIP,
)


def _ext_proc_filter(message_timeout_ms: int) -> hcm.HttpFilter:
    config = ext_proc_v3.ExternalProcessor(
        grpc_service=core.GrpcService(
            envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=EXT_PROC_CLUSTER),
            # Checked in 1.40: this is no deadline on the ext_proc stream (1 s cut neither a 2.5 s upload nor
            # a 2.5 s response); message_timeout bounds each answer. Generous in case that ever changes.
            timeout=seconds(30),
        ),
        failure_mode_allow=True,  # ext_proc down -> the pools' fallback policy balances on its own
        message_timeout=datetime.timedelta(milliseconds=message_timeout_ms),
        processing_mode=PROCESSING_MODE,
        metadata_options=ext_proc_v3.MetadataOptions(
            receiving_namespaces=ext_proc_v3.MetadataOptionsMetadataNamespaces(untyped=[LB_NAMESPACE])
        ),
        request_attributes=["xds.cluster_name", "xds.route_name"],
    )
    return hcm.HttpFilter(name=EXT_PROC_FILTER, typed_config=AnyProto.pack(config))


def _pool_metadata(pool: str) -> dict[str, AnyProto]:
    """typed_per_filter_config telling the ext_proc, in its stream's gRPC initial metadata, which pool Envoy chose."""
    per_route = ext_proc_v3.ExtProcPerRoute(
        overrides=ext_proc_v3.ExtProcOverrides(grpc_initial_metadata=[core.HeaderValue(key=POOL_METADATA, value=pool)])
    )
    return {EXT_PROC_FILTER: AnyProto.pack(per_route)}


def split_route_name(split: Split | str) -> str:
    return names.split_route_name(split if isinstance(split, str) else split.name)


# ----- failures: retries, the streaming idle timeout, Envoy's own replies as JSON ---------------------------------


def _retry_policy(gateway: Gateway, *, streaming: bool) -> route.RetryPolicy:
    """Retry a failed attempt on another endpoint of the pool: the picker's fallbacks, then the pool's balancer.

    override_host takes the next address of the picker's list on each attempt (the pick, then its fallbacks), and
    the ``previous_hosts`` predicate makes the fallback balancer skip endpoints already tried. Envoy retries only
    before it has sent response headers downstream: a stream already flowing is never replayed. The per-try idle
    timeout is for streaming requests only: a non-streaming answer sends nothing until generation ends.
    """
    policy = route.RetryPolicy(
        retry_on=",".join(gateway.retry_on),
        num_retries=gateway.retries,
        retry_host_predicate=[
            route.RetryPolicyRetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=AnyProto.pack(previous_hosts.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=5,
    )
    if streaming and gateway.per_try_idle_timeout > 0:
        policy.per_try_idle_timeout = seconds(gateway.per_try_idle_timeout)
    if not streaming and gateway.per_try_timeout > 0:
        policy.per_try_timeout = seconds(gateway.per_try_timeout)
    return policy


def _stream_filter() -> hcm.HttpFilter:
    """Copy the body's ``stream`` flag into dynamic metadata before the ext_proc runs, so the first route match
    (made when the ext_proc reads its per-route configuration) can choose the streaming variant of a route.

    Any content type is read as JSON, as the picker does; a body that is not JSON leaves no metadata (the
    non-streaming route), and the picker answers it 400 anyway."""
    rule = json_to_metadata.JsonToMetadataRule(
        selectors=[json_to_metadata.JsonToMetadataSelector(key=STREAM_KEY)],
        on_present=json_to_metadata.JsonToMetadataKeyValuePair(metadata_namespace=STREAM_NAMESPACE, key=STREAM_KEY),
    )
    config = json_to_metadata.JsonToMetadata(
        request_rules=json_to_metadata.JsonToMetadataMatchRules(
            rules=[rule],
            allow_empty_content_type=True,
            allow_content_types_regex=matcher.RegexMatcher(regex=".*"),
        )
    )
    return hcm.HttpFilter(name=JSON_TO_METADATA_FILTER, typed_config=AnyProto.pack(config))


def _streaming_match() -> list[matcher.MetadataMatcher]:
    return [
        matcher.MetadataMatcher(
            filter=STREAM_NAMESPACE,
            path=[matcher.MetadataMatcherPathSegment(key=STREAM_KEY)],
            value=matcher.ValueMatcher(bool_match=True),
        )
    ]


def _forward(
    name: str,
    match: Callable[[], route.RouteMatch],
    action: Callable[[], route.RouteAction],
    gateway: Gateway,
    per_filter: dict[str, AnyProto] | None = None,
) -> list[route.Route]:
    """A forwarding route with its retry policy, preceded by its streaming twin when streams have an idle timeout.

    Both carry the same name: the picker reads ``xds.route_name`` (``default`` means "no pool chosen yet") and
    labels its metrics with it, and the stats of the two add up under one ``stat_prefix``.
    """
    variants = [True, False] if gateway.per_try_idle_timeout > 0 else [False]
    out = []
    for streaming in variants:
        route_match, route_action = match(), action()
        if streaming:
            route_match.dynamic_metadata = _streaming_match()
        if gateway.retries > 0 or streaming or gateway.per_try_timeout > 0:
            route_action.retry_policy = _retry_policy(gateway, streaming=streaming)
        out.append(
            route.Route(
                name=name,
                stat_prefix=name,
                match=route_match,
                route=route_action,
                typed_per_filter_config=per_filter or {},
            )
        )
    return out


def _ext_proc_off() -> dict[str, AnyProto]:
    """Per-route config turning the ext_proc off where Envoy answers by itself: no pick is made (or counted)."""
    return {EXT_PROC_FILTER: AnyProto.pack(ext_proc_v3.ExtProcPerRoute(disabled=True))}


def _direct(
    name: str, match: route.RouteMatch, status: int, message: str, headers: Mapping[str, str] | None = None
) -> route.Route:
    """A reply from Envoy itself; its plain-text ``message`` becomes the OpenAI JSON error (`_local_replies`)."""
    return route.Route(
        name=name,
        stat_prefix=name,
        match=match,
        direct_response=route.DirectResponseAction(status=status, body=core.DataSource(inline_string=message)),
        response_headers_to_add=[
            core.HeaderValueOption(header=core.HeaderValue(key=k, value=v)) for k, v in (headers or {}).items()
        ],
        typed_per_filter_config=_ext_proc_off(),
    )


# Error types by status, as the picker names them (RequestError kinds); other 4xx are invalid_request_error.
ERROR_TYPES = {404: "not_found", 408: "timeout", 429: "rate_limited", 504: "timeout"}
SERVER_ERROR_TYPE = "unavailable"  # every other 5xx: 503 no healthy upstream, upstream reset, 502


def _error_format(kind: str) -> core.SubstitutionFormatString:
    """The picker's error shape, ``{"error": {"message", "type", "param", "code"}}``, around Envoy's reply text."""
    body = {"error": {"message": "%LOCAL_REPLY_BODY%", "type": kind, "param": None, "code": "%RESPONSE_CODE%"}}
    return core.SubstitutionFormatString(json_format=Struct.from_dict(body))


def _status_is(op: accesslog.ComparisonFilterOp, status: int) -> accesslog.AccessLogFilter:
    comparison = accesslog.ComparisonFilter(
        op=op, value=core.RuntimeUInt32(default_value=status, runtime_key=f"extproc.local_reply.{status}")
    )
    return accesslog.AccessLogFilter(status_code_filter=accesslog.StatusCodeFilter(comparison=comparison))


def _local_replies(buffer_limit: int) -> hcm.LocalReplyConfig:
    """Envoy's own replies (no healthy upstream, upstream reset, 413, 408, 431, 504, the 404/405 routes) as the
    OpenAI error JSON; the picker's replies, already JSON, pass unchanged (first mapper). Checked in 1.40: the
    JSON formatter keeps ``code`` a number and ``param`` null. Envoy's 413 (a body above its buffer) says what
    the picker's would: the limit."""
    eq = accesslog.ComparisonFilterOp.EQ
    picker = f"response.code_details.startsWith('{REPLY_DETAILS_PREFIX}')"
    mappers = [
        hcm.ResponseMapper(
            filter=accesslog.AccessLogFilter(
                extension_filter=accesslog.ExtensionFilter(
                    name="envoy.access_loggers.extension_filters.cel",
                    typed_config=AnyProto.pack(cel_filter.ExpressionFilter(expression=picker)),
                )
            ),
            body_format_override=core.SubstitutionFormatString(
                text_format_source=core.DataSource(inline_string="%LOCAL_REPLY_BODY%"), content_type="application/json"
            ),
        )
    ]
    too_large = {
        "error": {
            "message": f"request body is larger than {buffer_limit} bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": "%RESPONSE_CODE%",
        }
    }
    mappers.append(
        hcm.ResponseMapper(
            filter=_status_is(eq, 413),
            body_format_override=core.SubstitutionFormatString(json_format=Struct.from_dict(too_large)),
        )
    )
    by_kind: dict[str, list[int]] = {}
    for status, kind in ERROR_TYPES.items():
        by_kind.setdefault(kind, []).append(status)
    for kind, statuses in by_kind.items():
        filters = [_status_is(eq, status) for status in statuses]
        either = filters[0] if len(filters) == 1 else accesslog.AccessLogFilter(or_filter=accesslog.OrFilter(filters))
        mappers.append(hcm.ResponseMapper(filter=either, body_format_override=_error_format(kind)))
    mappers.append(
        hcm.ResponseMapper(
            filter=_status_is(accesslog.ComparisonFilterOp.GE, 500),
            body_format_override=_error_format(SERVER_ERROR_TYPE),
        )
    )
    return hcm.LocalReplyConfig(mappers=mappers, body_format=_error_format("invalid_request_error"))


# ----- routes ------------------------------------------------------------------------------------------------------


def _one_of(paths: Sequence[str]) -> str:
    """Regex alternatives for API paths without their ``/v1/``: ``(?:chat/completions|completions)``."""
    return "(?:" + "|".join(re.escape(p.removeprefix("/v1/")) for p in paths) + ")"


def _regex(pattern: str) -> route.RouteMatch:
    """A match on the path (the query string removed, as Envoy does for path matches)."""
    return route.RouteMatch(safe_regex=matcher.RegexMatcher(regex=pattern))


def _strip(prefix: str) -> matcher.RegexMatchAndSubstitute:
    return matcher.RegexMatchAndSubstitute(pattern=matcher.RegexMatcher(regex=prefix), substitution="/v1/")


def _describe(paths: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(f"{'/'.join(methods)} {path}" for path, methods in paths.items())


def _split_routes(config: Config, split: Split, timeout: datetime.timedelta) -> list[route.Route]:
    """``/v1/<split>/<path>`` -> one of the split's pools, drawn by weight, rewritten to ``/v1/<path>``, for the
    paths every arm serves.

    Each arm carries its own ``x-pool`` metadata for the ext_proc. Envoy draws once per stream: a route cache
    clear re-matches this route but keeps the draw. With ``sticky_header`` the draw is the hash of that header
    (``use_hash_policy``), so one header value always gets the same pool; without the header it stays random.
    """
    served = [p for p in config.gateway.paths if all(p in config.pool_paths(b.pool) for b in split.backends)]
    prefix = f"^/v1/{split.name}/"

    def action() -> route.RouteAction:
        weighted = route.WeightedCluster(
            clusters=[
                route.WeightedClusterClusterWeight(
                    name=pool_cluster_name(backend.pool),
                    weight=backend.weight,
                    typed_per_filter_config=_pool_metadata(backend.pool),
                )
                for backend in split.backends
            ],
        )
        out = route.RouteAction(weighted_clusters=weighted, regex_rewrite=_strip(prefix), timeout=timeout)
        if split.sticky_header is not None:
            weighted.use_hash_policy = True
            out.hash_policy = [
                route.RouteActionHashPolicy(header=route.RouteActionHashPolicyHeader(header_name=split.sticky_header))
            ]
        return out

    return _forward(split_route_name(split), lambda: _regex(prefix + _one_of(served) + "$"), action, config.gateway)


def _routes(config: Config, timeout: datetime.timedelta) -> list[route.Route]:
    gateway = config.gateway
    pools = [p.name for p in config.pools]
    # Pool and split names are [a-z0-9-] (Config): nothing to escape in a regex.
    scopes = "(?:(?:" + "|".join([*pools, *(s.name for s in config.splits)]) + ")/)?"
    # 0. A known path with a method it does not take: 405, whatever the pool or split prefix.
    routes: list[route.Route] = []
    for path, methods in gateway.paths.items():
        wrong_method = _regex("^/v1/" + scopes + _one_of([path]) + "$")
        wrong_method.headers = [
            route.HeaderMatcher(
                name=":method",
                string_match=matcher.StringMatcher(
                    safe_regex=matcher.RegexMatcher(regex="^(?:" + "|".join(methods) + ")$")
                ),
                invert_match=True,
            )
        ]
        routes.append(
            _direct(
                "method-not-allowed",
                wrong_method,
                405,
                f"method not allowed: {path} takes {' or '.join(methods)}",
                {"allow": ", ".join(methods)},
            )
        )
    # 1. Splits come first, so nothing (a client's x-extproc-pool header included) can take a request out of
    # the pool Envoy drew for it; the ext_proc only picks an endpoint inside that pool.
    for split in config.splits:
        routes += _split_routes(config, split, timeout)
    # 2. The pool the ext_proc picked (header set + route cache clear). The header wins even on a /v1/<pool>/
    # path (it is matched first), so any pool prefix is stripped there too.
    any_pool = "^/v1/(?:(?:" + "|".join(pools) + ")/)?"
    for pool in config.pools:
        paths = list(config.pool_paths(pool.name))
        header = route.HeaderMatcher(name=POOL_HEADER, string_match=matcher.StringMatcher(exact=pool.name))

        def by_header(paths: list[str] = paths, header: route.HeaderMatcher = header) -> route.RouteMatch:
            out = _regex(any_pool + _one_of(paths) + "$")
            out.headers = [header]
            return out

        def to_pool(name: str = pool.name) -> route.RouteAction:
            return route.RouteAction(
                cluster=pool_cluster_name(name), regex_rewrite=_strip(any_pool.removesuffix("?")), timeout=timeout
            )

        routes += _forward(f"{pool.name}-by-header", by_header, to_pool, gateway)
    # 3. The pool in the path; the ext_proc learns it from the stream's metadata.
    for pool in config.pools:
        prefix = f"^/v1/{pool.name}/"
        paths = list(config.pool_paths(pool.name))

        def by_path(prefix: str = prefix, paths: list[str] = paths) -> route.RouteMatch:
            return _regex(prefix + _one_of(paths) + "$")

        def rewrite(name: str = pool.name, prefix: str = prefix) -> route.RouteAction:
            return route.RouteAction(cluster=pool_cluster_name(name), regex_rewrite=_strip(prefix), timeout=timeout)

        routes += _forward(f"{pool.name}-by-path", by_path, rewrite, gateway, _pool_metadata(pool.name))
    # 4. Re-routed by model to a pool that does not serve the path (e.g. /v1/embeddings on a chat pool): 404,
    # rather than the default route's first pool.
    for pool in config.pools:
        served = config.pool_paths(pool.name)
        if len(served) < len(gateway.paths):
            header = route.HeaderMatcher(name=POOL_HEADER, string_match=matcher.StringMatcher(exact=pool.name))
            match = route.RouteMatch(prefix="/", headers=[header])
            message = f"pool {pool.name} does not serve this path; it serves {_describe(served)}"
            routes.append(_direct(f"{pool.name}-not-served", match, 404, message))
    # 5. Before the ext_proc has decided, or while it is down: the first pool serving the path. One route per
    # such pool, all named "default" (the picker reads that name as "no pool chosen yet").
    first_pool: dict[str, list[str]] = {}
    for path in gateway.paths:
        owner = next(p.name for p in config.pools if path in config.pool_paths(p.name))
        first_pool.setdefault(owner, []).append(path)
    for owner, paths in first_pool.items():

        def default(paths: list[str] = paths) -> route.RouteMatch:
            return _regex("^/v1/" + _one_of(paths) + "$")

        def to_owner(name: str = owner) -> route.RouteAction:
            return route.RouteAction(cluster=pool_cluster_name(name), timeout=timeout)

        routes += _forward(DEFAULT_ROUTE, default, to_owner, gateway)
    # 6. Anything else is no API of this gateway: 404 from Envoy, never forwarded to a model server.
    message = f"no such path; this gateway serves {_describe(gateway.paths)}, also under /v1/<pool>/ and /v1/<split>/"
    routes.append(_direct("not-found", route.RouteMatch(prefix="/"), 404, message))
    return routes


def gateway_listener(
    config: Config,
    *,
    listen: str,
    buffer_limit: int,
    message_timeout_ms: int,
    route_timeout_s: float,
    access_log: bool,
) -> listener.Listener:
    """The ``gateway`` listener on ``listen``, buffering requests up to ``buffer_limit`` bytes for the ext_proc."""
    manager = hcm.HttpConnectionManager(
        stat_prefix="gateway",
        codec_type=hcm.HttpConnectionManagerCodecType.AUTO,
        route_config=route.RouteConfiguration(
            name="gateway",
            # Tell the client where its request went: the upstream Envoy used, the ext_proc's pick, the pool
            # that served, and how long Envoy held the request before sending it upstream (see ROUTING_US_FORMAT).
            response_headers_to_add=[
                core.HeaderValueOption(header=core.HeaderValue(key=key, value=value))
                for key, value in RESPONSE_HEADERS.items()
            ],
            virtual_hosts=[
                route.VirtualHost(name="gateway", domains=["*"], routes=_routes(config, seconds(route_timeout_s)))
            ],
        ),
        http_filters=[
            *([_stream_filter()] if config.gateway.per_try_idle_timeout > 0 else []),
            _ext_proc_filter(message_timeout_ms),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=AnyProto.pack(router.Router())),
        ],
    )
    if config.gateway.request_timeout > 0:  # disarmed once the request is sent upstream: streams are not cut
        manager.request_timeout = seconds(config.gateway.request_timeout)
    if config.gateway.json_errors:
        manager.local_reply_config = _local_replies(buffer_limit)
    if access_log:
        manager.access_log = [
            accesslog.AccessLog(
                name="envoy.access_loggers.stdout", typed_config=AnyProto.pack(stream_log.StdoutAccessLog())
            )
        ]
    return listener.Listener(
        name="gateway",
        address=address(listen),
        # The ext_proc needs whole bodies (BUFFERED); Envoy buffers up to this and answers 413 above it.
        per_connection_buffer_limit_bytes=buffer_limit,
        filter_chains=[
            listener.FilterChain(
                filters=[
                    listener.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=AnyProto.pack(manager)
                    )
                ]
            )
        ],
    )
