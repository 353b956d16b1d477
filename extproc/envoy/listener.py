"""Envoy's downstream side: the gateway listener, whose HTTP connection manager runs ``ext_proc`` then ``router``.

* routes, first match wins: ``/v1/<split>/...`` -> one of the split's pools drawn by weight (per-arm gRPC
  initial metadata ``x-pool: <pool>``; with ``sticky_header`` the draw is the hash of that header);
  ``x-extproc-pool: <name>`` (set by the ext_proc after reading the body's ``model``, with a route cache
  clear) -> that pool, stripping any ``/v1/<pool>/`` prefix to ``/v1/``; ``/v1/<name>/...`` -> that pool,
  rewritten to ``/v1/...``, with ``x-pool: <name>``; anything else -> the first pool. Splits come first so
  that neither a client's nor the ext_proc's ``x-extproc-pool`` header moves a request out of its draw;
* response headers: ``x-gateway-upstream-host``, ``x-gateway-picked-endpoint``, ``x-gateway-pool`` (the pool
  whose cluster served, from the cluster's metadata) and ``x-gateway-routing-us`` (see `ROUTING_US_FORMAT`).
"""

from __future__ import annotations

import datetime

from extproc import names
from extproc.config import Config, Split
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
    ROUTING_US_HEADER,
    UPSTREAM_HOST_HEADER,
)

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


def _split_route(split: Split, timeout: datetime.timedelta) -> route.Route:
    """``/v1/<split>/...`` -> one of the split's pools, drawn by weight, rewritten to ``/v1/...``.

    Each arm carries its own ``x-pool`` metadata for the ext_proc. Envoy draws once per stream: a route cache
    clear re-matches this route but keeps the draw. With ``sticky_header`` the draw is the hash of that header
    (``use_hash_policy``), so one header value always gets the same pool; without the header it stays random.
    """
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
    action = route.RouteAction(weighted_clusters=weighted, prefix_rewrite="/v1/", timeout=timeout)
    if split.sticky_header is not None:
        weighted.use_hash_policy = True
        action.hash_policy = [
            route.RouteActionHashPolicy(header=route.RouteActionHashPolicyHeader(header_name=split.sticky_header))
        ]
    name = split_route_name(split)
    return route.Route(name=name, stat_prefix=name, match=route.RouteMatch(prefix=f"/v1/{split.name}/"), route=action)


def _routes(config: Config, timeout: datetime.timedelta) -> list[route.Route]:
    # 1. Splits come first, so nothing (a client's x-extproc-pool header included) can take a request out of
    # the pool Envoy drew for it; the ext_proc only picks an endpoint inside that pool.
    routes: list[route.Route] = [_split_route(split, timeout) for split in config.splits]
    # The header wins even on a /v1/<pool>/ path (it is matched first), so strip any pool prefix there too:
    # a regex rewrite that does not match leaves the path alone.
    any_pool_prefix = matcher.RegexMatchAndSubstitute(
        pattern=matcher.RegexMatcher(regex="^/v1/(?:" + "|".join(p.name for p in config.pools) + ")/"),
        substitution="/v1/",
    )
    for pool in config.pools:  # 2. the pool the ext_proc picked (header set + route cache cleared)
        routes.append(
            route.Route(
                name=f"{pool.name}-by-header",
                stat_prefix=f"{pool.name}-by-header",
                match=route.RouteMatch(
                    prefix="/",
                    headers=[
                        route.HeaderMatcher(name=POOL_HEADER, string_match=matcher.StringMatcher(exact=pool.name))
                    ],
                ),
                route=route.RouteAction(
                    cluster=pool_cluster_name(pool), regex_rewrite=any_pool_prefix, timeout=timeout
                ),
            )
        )
    for pool in config.pools:  # 3. the pool in the path; the ext_proc learns it from the stream's metadata
        routes.append(
            route.Route(
                name=f"{pool.name}-by-path",
                stat_prefix=f"{pool.name}-by-path",
                match=route.RouteMatch(prefix=f"/v1/{pool.name}/"),
                route=route.RouteAction(cluster=pool_cluster_name(pool), prefix_rewrite="/v1/", timeout=timeout),
                typed_per_filter_config=_pool_metadata(pool.name),
            )
        )
    routes.append(  # 4. before the ext_proc has decided, or while it is down
        route.Route(
            name=DEFAULT_ROUTE,
            stat_prefix=DEFAULT_ROUTE,
            match=route.RouteMatch(prefix="/"),
            route=route.RouteAction(cluster=pool_cluster_name(config.pools[0]), timeout=timeout),
        )
    )
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
            _ext_proc_filter(message_timeout_ms),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=AnyProto.pack(router.Router())),
        ],
    )
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
