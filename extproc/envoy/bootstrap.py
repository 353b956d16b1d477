"""Envoy's bootstrap, generated from the same `Config` the ext_proc reads, so pools and clusters cannot drift.

The gateway Envoy has one listener whose HTTP connection manager runs ``ext_proc`` then ``router``:

* one cluster ``pool-<name>`` per pool with the ``override_host`` load-balancing policy: it sends a request
  to the endpoint the ext_proc named (dynamic metadata ``envoy.lb`` / ``x-gateway-destination-endpoint``,
  then the header of that name) **only if that endpoint is a member of the cluster**, and otherwise falls
  back to round robin (or least request). So an ext_proc outage (``failure_mode_allow``) or a spoofed
  client header degrades to Envoy's own balancing inside the right pool, never to an arbitrary address.
  Members are STATIC / strict DNS from the configuration, or, with ``eds_dir``, EDS read from one file per
  pool that the ext_proc rewrites when membership changes (Envoy watches the directory: no restart);
* routes, first match wins: ``/v1/<split>/...`` -> one of the split's pools drawn by weight (per-arm gRPC
  initial metadata ``x-pool: <pool>``; with ``sticky_header`` the draw is the hash of that header);
  ``x-extproc-pool: <name>`` (set by the ext_proc after reading the body's ``model``, with a route cache
  clear) -> that pool, stripping any ``/v1/<pool>/`` prefix to ``/v1/``; ``/v1/<name>/...`` -> that pool,
  rewritten to ``/v1/...``, with ``x-pool: <name>``; anything else -> the first pool. Splits come first so
  that neither a client's nor the ext_proc's ``x-extproc-pool`` header moves a request out of its draw;
* response headers: ``x-gateway-upstream-host``, ``x-gateway-picked-endpoint``, ``x-gateway-pool`` (the pool
  whose cluster served, from the cluster's metadata) and ``x-gateway-routing-us`` (see `ROUTING_US_FORMAT`);
* a cluster ``extproc`` (HTTP/2, TCP or unix socket) for the ext_proc itself.

It is built from envoy-data-plane's typed (betterproto2 + pydantic) messages, so a misspelt field or a
wrong type fails here, naming the field, rather than in Envoy; Envoy's own rules (ranges, required
fields) are still only checked by ``envoy --mode validate``, which the tests run. Any-typed fields
(``typed_config``) are packed with ``Any.pack`` and unpacked by ``to_dict``, which needs every packed type
registered, i.e. its module imported here. Costs: the imports take ~1 s, the first build ~0.4 s (pydantic
warm-up), later builds ~50 ms: fine for a generator, never for a request path. ``to_dict`` drops enums at
their zero value (``type: STATIC``, ``response_body_mode: NONE``); they are written back so the YAML
shows every choice.
"""

from __future__ import annotations

import datetime
import ipaddress
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import betterproto2
import yaml

from extproc.config import Config, Pool, Split, parse_host_port
from extproc.datalayer.eds import eds_path, write_eds

# envoy-data-plane's generated classes trip pydantic deprecation warnings when imported; they are not ours.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.accesslog import v3 as accesslog
    from envoy_data_plane.envoy.config.bootstrap import v3 as bootstrap
    from envoy_data_plane.envoy.config.cluster import v3 as cluster
    from envoy_data_plane.envoy.config.core import v3 as core
    from envoy_data_plane.envoy.config.endpoint import v3 as endpoint
    from envoy_data_plane.envoy.config.listener import v3 as listener
    from envoy_data_plane.envoy.config.route import v3 as route
    from envoy_data_plane.envoy.extensions.access_loggers.stream import v3 as stream_log
    from envoy_data_plane.envoy.extensions.clusters.common.dns import v3 as dns_common
    from envoy_data_plane.envoy.extensions.clusters.dns import v3 as dns_cluster
    from envoy_data_plane.envoy.extensions.filters.http.ext_proc import v3 as ext_proc_v3
    from envoy_data_plane.envoy.extensions.filters.http.router import v3 as router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager import v3 as hcm
    from envoy_data_plane.envoy.extensions.load_balancing_policies.least_request import v3 as least_request
    from envoy_data_plane.envoy.extensions.load_balancing_policies.override_host import v3 as override_host
    from envoy_data_plane.envoy.extensions.load_balancing_policies.round_robin import v3 as round_robin
    from envoy_data_plane.envoy.extensions.upstreams.http import v3 as upstream_http
    from envoy_data_plane.envoy.type.matcher import v3 as matcher
    from envoy_data_plane.envoy.type.metadata import v3 as metadata
    from envoy_data_plane.google.protobuf import Any as AnyProto
    from envoy_data_plane.google.protobuf import Struct

from extproc import names
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

# Response headers the route configuration adds (beside UPSTREAM_HOST_HEADER and PICKED_HEADER of names.py).
# Pool clusters carry their pool name as metadata, so a formatter can name the pool without the "pool-" prefix.
CLUSTER_METADATA_NAMESPACE = "extproc"
CLUSTER_METADATA_POOL = "pool"
POOL_FORMAT = f"%CLUSTER_METADATA({CLUSTER_METADATA_NAMESPACE}:{CLUSTER_METADATA_POOL})%"
# Microseconds from the last byte of the request reaching Envoy to the first byte sent upstream: the ext_proc's
# round trips that were still outstanding (the body message, and the headers message if the body came first),
# the picker's own work, route and host selection, and the connect time when no pooled upstream connection was
# free. A client's slow upload is not counted (DS_RX_BEG would count it). No header when there was no upstream
# request (a local 503, an ImmediateResponse), nor when the upstream request began before the last request byte
# (ext_proc down: fail-open streams the body unbuffered; Envoy's formatter leaves a negative span empty).
# Checked in 1.40: a picker sleeping 20 ms adds ~20,800 to it.
ROUTING_US_FORMAT = "%COMMON_DURATION(DS_RX_END:US_TX_BEG:us)%"
RESPONSE_HEADERS = {
    UPSTREAM_HOST_HEADER: "%UPSTREAM_HOST%",
    PICKED_HEADER: f"%REQ({DESTINATION_KEY})%",
    POOL_RESPONSE_HEADER: POOL_FORMAT,
    ROUTING_US_HEADER: ROUTING_US_FORMAT,
}

EXT_PROC_CLUSTER = "extproc"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

Fallback = Literal["round_robin", "least_request"]
_SNAKE = betterproto2.Casing.SNAKE


def pool_cluster_name(pool: Pool | str) -> str:
    return f"pool-{pool if isinstance(pool, str) else pool.name}"


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def _typed(name: str, message: betterproto2.Message) -> core.TypedExtensionConfig:
    return core.TypedExtensionConfig(name=name, typed_config=AnyProto.pack(message))


def _address(value: str) -> core.Address:
    """``host:port`` / ``[v6]:port`` -> socket address; ``unix:/path`` (or ``unix:@abstract``) -> pipe."""
    if value.startswith("unix:"):
        return core.Address(pipe=core.Pipe(path=value.removeprefix("unix:")))
    host, port = parse_host_port(value)
    return core.Address(socket_address=core.SocketAddress(address=host, port_value=port))


def _load_assignment(name: str, addresses: Sequence[core.Address]) -> endpoint.ClusterLoadAssignment:
    return endpoint.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint.LocalityLbEndpoints(
                lb_endpoints=[endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=a)) for a in addresses]
            )
        ],
    )


def _protocol_options(http2: bool) -> dict[str, AnyProto]:
    explicit = (
        upstream_http.HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=core.Http2ProtocolOptions())
        if http2
        else upstream_http.HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=core.Http1ProtocolOptions())
    )
    return {HTTP_PROTOCOL_OPTIONS: AnyProto.pack(upstream_http.HttpProtocolOptions(explicit_http_config=explicit))}


def _override_host_policy(fallback: Fallback) -> cluster.LoadBalancingPolicy:
    """Endpoint from the ext_proc's metadata, else from the header; non-members are skipped; else fallback."""
    if fallback == "round_robin":
        fallback_lb = _typed("envoy.load_balancing_policies.round_robin", round_robin.RoundRobin())
    elif fallback == "least_request":
        fallback_lb = _typed("envoy.load_balancing_policies.least_request", least_request.LeastRequest())
    else:
        raise ValueError(f"fallback must be 'round_robin' or 'least_request', not {fallback!r}")
    policy = override_host.OverrideHost(
        override_host_sources=[
            override_host.OverrideHostOverrideHostSource(
                metadata=metadata.MetadataKey(
                    key=LB_NAMESPACE, path=[metadata.MetadataKeyPathSegment(key=DESTINATION_KEY)]
                )
            ),
            override_host.OverrideHostOverrideHostSource(header=DESTINATION_KEY),
        ],
        fallback_policy=cluster.LoadBalancingPolicy(policies=[cluster.LoadBalancingPolicyPolicy(fallback_lb)]),
    )
    return cluster.LoadBalancingPolicy(
        policies=[cluster.LoadBalancingPolicyPolicy(_typed("envoy.load_balancing_policies.override_host", policy))]
    )


def _pool_cluster(pool: Pool, fallback: Fallback, eds_dir: str | None = None) -> cluster.Cluster:
    name = pool_cluster_name(pool)
    common: dict[str, Any] = {
        "name": name,
        "connect_timeout": _seconds(1),
        "typed_extension_protocol_options": _protocol_options(http2=False),
        "load_balancing_policy": _override_host_policy(fallback),
        # The pool's name without the cluster prefix, for the x-gateway-pool response header (CLUSTER_METADATA).
        "metadata": core.Metadata(
            filter_metadata={CLUSTER_METADATA_NAMESPACE: Struct.from_dict({CLUSTER_METADATA_POOL: pool.name})}
        ),
    }
    if eds_dir is not None:
        # Membership from a file the ext_proc rewrites (datalayer.eds.write_eds: write, then rename into eds_dir).
        # Envoy watches the directory for files moved into it, and re-reads the path on each such event.
        source = core.ConfigSource(
            path_config_source=core.PathConfigSource(
                path=str(eds_path(eds_dir, pool.name)), watched_directory=core.WatchedDirectory(path=eds_dir)
            ),
            resource_api_version=core.ApiVersion.V3,
        )
        return cluster.Cluster(
            type=cluster.ClusterDiscoveryType.EDS,
            eds_cluster_config=cluster.ClusterEdsClusterConfig(eds_config=source),
            **common,
        )
    if pool.endpoints.static is not None:
        return cluster.Cluster(
            type=cluster.ClusterDiscoveryType.STATIC,
            load_assignment=_load_assignment(name, [_address(a) for a in pool.endpoints.static]),
            **common,
        )
    dns = pool.endpoints.dns
    assert dns is not None  # Config guarantees exactly one source
    # Strict DNS semantics (every address is an endpoint) through the `envoy.clusters.dns` extension: the
    # Cluster-level dns_refresh_rate that STRICT_DNS uses is deprecated in 1.40 and warns at every start.
    discovery = dns_cluster.DnsCluster(
        dns_refresh_rate=_seconds(dns.interval),
        respect_dns_ttl=False,
        # ALL: every A and AAAA record is a member, as the ext_proc's DNS discovery sees them.
        dns_lookup_family=dns_common.DnsLookupFamily.ALL,
        all_addresses_in_single_endpoint=False,
    )
    if dns.nameservers is not None:  # the same DNS servers the ext_proc asks
        from envoy_data_plane.envoy.extensions.network.dns_resolver.cares import v3 as cares

        resolver = cares.CaresDnsResolverConfig(
            resolvers=[
                core.Address(socket_address=core.SocketAddress(address=ip, port_value=port))
                for ip, port in dns.nameserver_addresses()
            ]
        )
        discovery.typed_dns_resolver_config = _typed("envoy.network.dns_resolver.cares", resolver)
    return cluster.Cluster(
        cluster_type=cluster.ClusterCustomClusterType(name="envoy.clusters.dns", typed_config=AnyProto.pack(discovery)),
        load_assignment=_load_assignment(
            name, [core.Address(socket_address=core.SocketAddress(address=dns.name, port_value=dns.port))]
        ),
        **common,
    )


def write_initial_eds(config: Config, eds_dir: str) -> list[Path]:
    """The EDS files Envoy reads at start: static pools from the configuration, others empty if missing.

    Envoy refuses a bootstrap whose EDS path does not exist, so every pool gets a file. A DNS pool's file
    is left alone when it exists (the ext_proc resolves the name and keeps it current), else written empty
    until the ext_proc's first resolution.
    """
    written = []
    for pool in config.pools:
        if pool.endpoints.static is not None:
            written.append(write_eds(eds_dir, pool.name, pool.endpoints.static))
        elif not eds_path(eds_dir, pool.name).exists():
            written.append(write_eds(eds_dir, pool.name, []))
    return written


def _is_hostname(address: str) -> bool:
    if address.startswith("unix:"):
        return False
    host, _port = parse_host_port(address)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _ext_proc_cluster(address: str) -> cluster.Cluster:
    """A STATIC cluster for an IP or unix socket; for a name (a compose service, a Kubernetes Service) DNS, one
    logical host re-resolved every few seconds, so the ext_proc can move without an Envoy restart."""
    common: dict[str, Any] = {
        "name": EXT_PROC_CLUSTER,
        "connect_timeout": _seconds(0.25),
        "typed_extension_protocol_options": _protocol_options(http2=True),
        "load_assignment": _load_assignment(EXT_PROC_CLUSTER, [_address(address)]),
    }
    if not _is_hostname(address):
        return cluster.Cluster(type=cluster.ClusterDiscoveryType.STATIC, **common)
    discovery = dns_cluster.DnsCluster(
        dns_refresh_rate=_seconds(5),
        respect_dns_ttl=False,
        dns_lookup_family=dns_common.DnsLookupFamily.V4_PREFERRED,
        all_addresses_in_single_endpoint=True,  # logical DNS: one connection target, whichever address answers
    )
    return cluster.Cluster(
        cluster_type=cluster.ClusterCustomClusterType(name="envoy.clusters.dns", typed_config=AnyProto.pack(discovery)),
        **common,
    )


_H = ext_proc_v3.ProcessingModeHeaderSendMode
_B = ext_proc_v3.ProcessingModeBodySendMode
_PROCESSING_MODE = ext_proc_v3.ProcessingMode(
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
            timeout=_seconds(30),
        ),
        failure_mode_allow=True,  # ext_proc down -> the pools' fallback policy balances on its own
        message_timeout=datetime.timedelta(milliseconds=message_timeout_ms),
        processing_mode=_PROCESSING_MODE,
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


def build_bootstrap_message(
    config: Config,
    *,
    listen: str = "127.0.0.1:8080",
    admin: str = "127.0.0.1:9901",
    ext_proc: str | None = None,
    message_timeout_ms: int = 200,
    max_request_bytes: int | None = None,
    fallback: Fallback = "round_robin",
    route_timeout_s: float = 300.0,
    access_log: bool = False,
    node_id: str = "extproc-gateway",
    eds_dir: str | None = None,
    write_eds_files: bool = True,
) -> bootstrap.Bootstrap:
    """The typed bootstrap.

    ``ext_proc`` defaults to ``config.server.listen`` (``host:port`` or ``unix:/path``);
    ``max_request_bytes`` (default ``config.limits.envoy_buffer_bytes``) is the largest request Envoy buffers
    for the ext_proc; ``fallback`` is the pools' policy when the ext_proc names no member endpoint.

    ``eds_dir`` (default ``config.server.eds_dir``) makes every pool cluster an EDS cluster fed by
    ``<eds_dir>/pool-<name>.json``; unless ``write_eds_files`` is False, the files Envoy needs to start are
    written here (`write_initial_eds`: static pools' members; DNS pools empty unless already there, the
    ext_proc resolves them). Envoy rejects a bootstrap whose EDS file is missing.
    """
    if message_timeout_ms < 0:
        raise ValueError("message_timeout_ms must be >= 0")
    buffer_limit = config.limits.envoy_buffer_bytes if max_request_bytes is None else max_request_bytes
    if not 0 < buffer_limit < 2**32:
        raise ValueError("max_request_bytes must be between 1 and 2**32 - 1")
    eds_dir = eds_dir or config.server.eds_dir
    if eds_dir is not None and write_eds_files:
        write_initial_eds(config, eds_dir)
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
                route.VirtualHost(name="gateway", domains=["*"], routes=_routes(config, _seconds(route_timeout_s)))
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
    gateway = listener.Listener(
        name="gateway",
        address=_address(listen),
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
    return bootstrap.Bootstrap(
        node=core.Node(id=node_id, cluster=node_id),
        admin=bootstrap.Admin(address=_address(admin)),
        static_resources=bootstrap.BootstrapStaticResources(
            listeners=[gateway],
            clusters=[
                _ext_proc_cluster(ext_proc or config.server.listen),
                *(_pool_cluster(pool, fallback, eds_dir) for pool in config.pools),
            ],
        ),
    )


def build_bootstrap(config: Config, **options: Any) -> dict[str, Any]:
    """Envoy's bootstrap as a plain dict (snake_case, ready for YAML/JSON); options as `build_bootstrap_message`."""
    return _explicit_defaults(build_bootstrap_message(config, **options).to_dict(casing=_SNAKE))


def _explicit_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Restore the zero-valued enums ``to_dict`` drops, so a reader of the YAML sees every choice made."""
    for item in data["static_resources"]["clusters"]:
        if "cluster_type" not in item:
            item.setdefault("type", "STATIC")
    for item in data["static_resources"]["listeners"]:
        for chain in item["filter_chains"]:
            for net_filter in chain["filters"]:
                for http_filter in net_filter["typed_config"].get("http_filters", []):
                    if http_filter["name"] == EXT_PROC_FILTER:
                        http_filter["typed_config"]["processing_mode"] = _PROCESSING_MODE.to_dict(
                            casing=_SNAKE, include_default_values=True
                        )
    return data


def render_bootstrap(config: Config, **kwargs: Any) -> str:
    """The bootstrap as YAML; keyword arguments as for `build_bootstrap`."""
    header = "# Generated by `extproc envoy-config` from the extproc configuration; edit that, not this.\n"
    return header + yaml.safe_dump(build_bootstrap(config, **kwargs), sort_keys=False, width=120)
