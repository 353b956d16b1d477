"""Envoy's typed configuration messages (envoy-data-plane), imported in one place, and the builders every part uses.

The messages are betterproto2 + pydantic classes, so a misspelt field or a wrong type fails while the bootstrap
is built, naming the field, rather than in Envoy; Envoy's own rules (ranges, required fields) are still only
checked by ``envoy --mode validate``, which the tests run. Any-typed fields (``typed_config``) are packed with
``Any.pack`` and unpacked by ``to_dict``, which needs every packed type registered, i.e. its module imported:
hence one module importing them all (the c-ares resolver is imported where a pool names nameservers). Costs:
the imports take ~1 s, the first build ~0.4 s (pydantic warm-up), later builds ~50 ms: fine for a generator,
never for a request path, so only the generator imports this.
"""

from __future__ import annotations

import datetime
import warnings

import betterproto2

from extproc.config import parse_host_port

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

__all__ = [
    "SNAKE",
    "AnyProto",
    "Struct",
    "accesslog",
    "address",
    "bootstrap",
    "cluster",
    "core",
    "dns_cluster",
    "dns_common",
    "endpoint",
    "ext_proc_v3",
    "hcm",
    "least_request",
    "listener",
    "matcher",
    "metadata",
    "override_host",
    "round_robin",
    "route",
    "router",
    "seconds",
    "stream_log",
    "typed",
    "upstream_http",
]

SNAKE = betterproto2.Casing.SNAKE  # the YAML uses Envoy's snake_case field names


def seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def typed(name: str, message: betterproto2.Message) -> core.TypedExtensionConfig:
    return core.TypedExtensionConfig(name=name, typed_config=AnyProto.pack(message))


def address(value: str) -> core.Address:
    """``host:port`` / ``[v6]:port`` -> socket address; ``unix:/path`` (or ``unix:@abstract``) -> pipe."""
    if value.startswith("unix:"):
        return core.Address(pipe=core.Pipe(path=value.removeprefix("unix:")))
    host, port = parse_host_port(value)
    return core.Address(socket_address=core.SocketAddress(address=host, port_value=port))
