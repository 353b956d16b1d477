"""Envoy's bootstrap, generated from the same `Config` the ext_proc reads, so pools and clusters cannot drift.

The gateway Envoy has one listener (`extproc.envoy.listener`: the ext_proc filter, routes, weighted splits,
response headers), one ``override_host`` cluster per pool and a cluster for the ext_proc itself
(`extproc.envoy.clusters`). This module assembles them and renders the YAML. ``to_dict`` drops enums at their
zero value (``type: STATIC``, ``response_body_mode: NONE``); they are written back so the YAML shows every
choice. The typed messages and their import cost: `extproc.envoy.proto`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import yaml

from extproc.config import Config
from extproc.envoy.clusters import Fallback, ext_proc_cluster, pool_cluster, write_initial_eds
from extproc.envoy.listener import EXT_PROC_FILTER, PROCESSING_MODE, gateway_listener
from extproc.envoy.proto import SNAKE, address, bootstrap, core

if TYPE_CHECKING:
    from extproc.tls import ClientTls


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
    ext_proc_tls: ClientTls | None = None,
    secrets_dir: str | None = None,
) -> bootstrap.Bootstrap:
    """The typed bootstrap.

    ``ext_proc`` defaults to ``config.server.listen`` (``host:port`` or ``unix:/path``);
    ``max_request_bytes`` (default ``config.limits.envoy_buffer_bytes``: the body limit itself with JSON errors)
    is the largest request Envoy buffers for the ext_proc; ``fallback`` is the pools' policy when the ext_proc
    names no member endpoint.

    ``eds_dir`` (default ``config.server.eds_dir``) makes every pool cluster an EDS cluster fed by
    ``<eds_dir>/pool-<name>.json``; unless ``write_eds_files`` is False, the files Envoy needs to start are
    written here (`write_initial_eds`: static pools' members; DNS pools empty unless already there, the
    ext_proc resolves them). Envoy rejects a bootstrap whose EDS file is missing.

    ``ext_proc_tls`` makes Envoy reach the ext_proc over TLS (mTLS with a client certificate); a configuration with
    ``server.tls`` requires it, since its picker accepts nothing else. ``secrets_dir`` is where the SDS files of
    the client certificate and the CA are written (`write_client_secret`, `write_ca_secret`), so Envoy follows
    their renewals; without it Envoy reads them once, at start.
    """
    tls = config.server.tls
    if tls is not None and ext_proc_tls is None:
        raise ValueError(
            "server.tls is set, so the picker accepts only TLS: give Envoy the CA of its certificate (--ext-proc-ca)"
            + (
                ", and a client certificate from server.tls.client_ca_file's CA (--ext-proc-cert, --ext-proc-key)"
                if tls.client_ca_file
                else ""
            )
        )
    if tls is not None and tls.client_ca_file and ext_proc_tls is not None and ext_proc_tls.cert_file is None:
        raise ValueError(
            "server.tls.client_ca_file is set, so the picker refuses clients without a certificate: give Envoy one "
            "signed by that CA (--ext-proc-cert, --ext-proc-key)"
        )
    if message_timeout_ms < 0:
        raise ValueError("message_timeout_ms must be >= 0")
    buffer_limit = max_request_bytes
    if buffer_limit is None:
        buffer_limit = config.limits.envoy_buffer_bytes(config.gateway.json_errors)
    if not 0 < buffer_limit < 2**32:
        raise ValueError("max_request_bytes must be between 1 and 2**32 - 1")
    eds_dir = eds_dir or config.server.eds_dir
    if eds_dir is not None and write_eds_files:
        write_initial_eds(config, eds_dir)
    gateway = gateway_listener(
        config,
        listen=listen,
        buffer_limit=buffer_limit,
        message_timeout_ms=message_timeout_ms,
        route_timeout_s=route_timeout_s,
        access_log=access_log,
    )
    return bootstrap.Bootstrap(
        node=core.Node(id=node_id, cluster=node_id),
        admin=bootstrap.Admin(address=address(admin)),
        static_resources=bootstrap.BootstrapStaticResources(
            listeners=[gateway],
            clusters=[
                ext_proc_cluster(ext_proc or config.server.listen, ext_proc_tls, secrets_dir),
                *(pool_cluster(pool, fallback, eds_dir, config.gateway) for pool in config.pools),
            ],
        ),
    )


def build_bootstrap(config: Config, **options: Any) -> dict[str, Any]:
    """Envoy's bootstrap as a plain dict (snake_case, ready for YAML/JSON); options as `build_bootstrap_message`."""
    return _explicit_defaults(build_bootstrap_message(config, **options).to_dict(casing=SNAKE))


def _explicit_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Restore the zero-valued enums ``to_dict`` drops, so a reader of the YAML sees every choice made."""
    for item in data["static_resources"]["clusters"]:
        if "cluster_type" not in item:
            item.setdefault("type", "STATIC")
    for manager in connection_managers(data):
        for http_filter in manager.get("http_filters", []):
            if http_filter["name"] == EXT_PROC_FILTER:
                http_filter["typed_config"]["processing_mode"] = PROCESSING_MODE.to_dict(
                    casing=SNAKE, include_default_values=True
                )
    return data


def connection_managers(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every HTTP connection manager (a network filter's ``typed_config``) of a bootstrap dict, to edit in place."""
    for item in data["static_resources"]["listeners"]:
        for chain in item["filter_chains"]:
            for net_filter in chain["filters"]:
                yield net_filter["typed_config"]


def render_bootstrap(config: Config, **kwargs: Any) -> str:
    """The bootstrap as YAML; keyword arguments as for `build_bootstrap`."""
    header = "# Generated by `extproc envoy-config` from the extproc configuration; edit that, not this.\n"
    return header + yaml.safe_dump(build_bootstrap(config, **kwargs), sort_keys=False, width=120)
