"""Envoy's upstream side: one cluster per pool, which only lets the picker choose among the pool's members, and
the cluster of the ext_proc itself.

A pool cluster ``pool-<name>`` has the ``override_host`` load-balancing policy: it sends a request to the endpoint
the ext_proc named (dynamic metadata ``envoy.lb`` / ``x-gateway-destination-endpoint``, then the header of that
name) **only if that endpoint is a member of the cluster**, and otherwise falls back to round robin (or least
request). So an ext_proc outage (``failure_mode_allow``) or a spoofed client header degrades to Envoy's own
balancing inside the right pool, never to an arbitrary address. Members are STATIC / strict DNS from the
configuration, or, with ``eds_dir``, EDS read from one file per pool that the ext_proc rewrites when membership
changes (Envoy watches the directory: no restart).
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from extproc.config import Config, Gateway, Pool, parse_host_port
from extproc.datalayer.eds import eds_path, write_eds
from extproc.envoy.proto import (
    SNAKE,
    AnyProto,
    Struct,
    address,
    cluster,
    core,
    dns_cluster,
    dns_common,
    endpoint,
    least_request,
    matcher,
    metadata,
    override_host,
    round_robin,
    seconds,
    typed,
    upstream_http,
)
from extproc.names import DESTINATION_KEY, LB_NAMESPACE

with warnings.catch_warnings():  # envoy-data-plane's classes trip pydantic deprecation warnings on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.type import v3 as envoy_type

if TYPE_CHECKING:
    from extproc.tls import ClientTls

# Pool clusters carry their pool name as metadata, so a formatter can name the pool without the "pool-" prefix.
CLUSTER_METADATA_NAMESPACE = "extproc"
CLUSTER_METADATA_POOL = "pool"

EXT_PROC_CLUSTER = "extproc"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

Fallback = Literal["round_robin", "least_request"]


def pool_cluster_name(pool: Pool | str) -> str:
    return f"pool-{pool if isinstance(pool, str) else pool.name}"


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
        fallback_lb = typed("envoy.load_balancing_policies.round_robin", round_robin.RoundRobin())
    elif fallback == "least_request":
        fallback_lb = typed("envoy.load_balancing_policies.least_request", least_request.LeastRequest())
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
        policies=[cluster.LoadBalancingPolicyPolicy(typed("envoy.load_balancing_policies.override_host", policy))]
    )


def _retry_budget(gateway: Gateway) -> cluster.CircuitBreakers:
    """Retries in flight per pool: at most ``retry_budget_percent`` of its active requests, at least
    ``retry_budget_min_concurrency``. Without a budget Envoy allows 3 retries at once per cluster, fewer than the
    requests in flight on one replica that dies; with it, a pool that fails as a whole is not hammered by retries."""
    budget = cluster.CircuitBreakersThresholdsRetryBudget(
        budget_percent=envoy_type.Percent(value=gateway.retry_budget_percent),
        min_retry_concurrency=gateway.retry_budget_min_concurrency,
    )
    return cluster.CircuitBreakers(thresholds=[cluster.CircuitBreakersThresholds(retry_budget=budget)])


def pool_cluster(
    pool: Pool, fallback: Fallback, eds_dir: str | None = None, gateway: Gateway | None = None
) -> cluster.Cluster:
    """The pool's cluster: EDS from ``eds_dir`` if given, else its static members or its DNS name; ``gateway``
    (default: its defaults) sets the retry budget."""
    name = pool_cluster_name(pool)
    common: dict[str, Any] = {
        "name": name,
        "connect_timeout": seconds(1),
        "typed_extension_protocol_options": _protocol_options(http2=False),
        "load_balancing_policy": _override_host_policy(fallback),
        "circuit_breakers": _retry_budget(gateway or Gateway()),
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
            load_assignment=_load_assignment(name, [address(a) for a in pool.endpoints.static]),
            **common,
        )
    dns = pool.endpoints.dns
    assert dns is not None  # Config guarantees exactly one source
    # Strict DNS semantics (every address is an endpoint) through the `envoy.clusters.dns` extension: the
    # Cluster-level dns_refresh_rate that STRICT_DNS uses is deprecated in 1.40 and warns at every start.
    discovery = dns_cluster.DnsCluster(
        dns_refresh_rate=seconds(dns.interval),
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
        discovery.typed_dns_resolver_config = typed("envoy.network.dns_resolver.cares", resolver)
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


def _is_hostname(value: str) -> bool:
    if value.startswith("unix:"):
        return False
    host, _port = parse_host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


CLIENT_SECRET = "extproc-client"  # the SDS secret of Envoy's client certificate for the picker
CLIENT_SECRET_FILE = "extproc-client-sds.yaml"
CA_SECRET = "extproc-picker-ca"  # the SDS secret of the CA Envoy trusts for the picker's certificate
CA_SECRET_FILE = "extproc-picker-ca-sds.yaml"


def write_client_secret(secrets_dir: str | Path, certificate: Any) -> Path:
    """Write the file-based SDS resource of Envoy's client certificate (a ``TlsCertificate`` of file names) into
    ``secrets_dir``; returns its path.

    Envoy re-reads a certificate served this way when its files change, so cert-manager's or OpenShift's renewal
    reaches Envoy without a restart (certificates given inline in the bootstrap are read once). The certificate's
    directory is watched as a whole: a Kubernetes Secret volume renews both files with one rename of ``..data``.
    """
    from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls_v3

    cert = Path(certificate.certificate_chain.filename)
    if cert.parent == Path(certificate.private_key.filename).parent:
        certificate.watched_directory = core.WatchedDirectory(path=str(cert.parent))
    return _write_secret(
        secrets_dir, CLIENT_SECRET_FILE, tls_v3.Secret(name=CLIENT_SECRET, tls_certificate=certificate)
    )


def write_ca_secret(secrets_dir: str | Path, ca_file: str) -> Path:
    """Write the file-based SDS resource of the CA bundle Envoy checks the picker's certificate against, its
    directory watched as for `write_client_secret`: a new CA added to the bundle (before the picker's certificate
    is renewed by it) reaches Envoy without a restart."""
    from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls_v3

    context = tls_v3.CertificateValidationContext(
        trusted_ca=core.DataSource(filename=ca_file),
        watched_directory=core.WatchedDirectory(path=str(Path(ca_file).parent)),
    )
    return _write_secret(secrets_dir, CA_SECRET_FILE, tls_v3.Secret(name=CA_SECRET, validation_context=context))


def _write_secret(secrets_dir: str | Path, file_name: str, secret: Any) -> Path:
    resource = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        **secret.to_dict(casing=SNAKE),
    }
    path = Path(secrets_dir) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(yaml.safe_dump({"resources": [resource]}, sort_keys=False))
    temporary.replace(path)  # Envoy watches this file too: never let it read half of one
    return path


def _sds(name: str, path: Path) -> Any:
    from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls_v3

    source = core.ConfigSource(
        path_config_source=core.PathConfigSource(path=str(path)), resource_api_version=core.ApiVersion.V3
    )
    return tls_v3.SdsSecretConfig(name=name, sds_config=source)


def _ext_proc_tls(targets: Sequence[str], tls: ClientTls, secrets_dir: str | None = None) -> core.TransportSocket:
    """Envoy's TLS to the picker (server.tls): its certificate must chain to ``tls.ca_file`` and name
    ``tls.server_name`` (default: one of the targets' hosts), and with a client certificate Envoy presents it (mTLS).

    With ``secrets_dir`` the client certificate and the CA come through file-based SDS (`write_client_secret`,
    `write_ca_secret`) and are re-read when they change; without, Envoy reads them at start only."""
    from envoy_data_plane.envoy.extensions.transport_sockets.tls import v3 as tls_v3

    san = tls_v3.SubjectAltNameMatcherSanType
    if tls.server_name:
        names = [tls.server_name]
    else:
        names = list(dict.fromkeys(parse_host_port(t)[0] for t in targets if not t.startswith("unix:")))
    if not names:
        raise ValueError("ext_proc TLS over a unix socket: give the name in the picker's certificate (server_name)")
    ips = {n for n in names if _is_ip(n)}
    matchers = [
        tls_v3.SubjectAltNameMatcher(
            san_type=san.IP_ADDRESS if n in ips else san.DNS, matcher=matcher.StringMatcher(exact=n)
        )
        for n in names
    ]
    common_tls = tls_v3.CommonTlsContext(alpn_protocols=["h2"])
    if secrets_dir is None:
        common_tls.validation_context = tls_v3.CertificateValidationContext(
            trusted_ca=core.DataSource(filename=tls.ca_file), match_typed_subject_alt_names=matchers
        )
    else:  # the names checked here, the CA from its SDS file (Envoy merges the two)
        common_tls.combined_validation_context = tls_v3.CommonTlsContextCombinedCertificateValidationContext(
            default_validation_context=tls_v3.CertificateValidationContext(match_typed_subject_alt_names=matchers),
            validation_context_sds_secret_config=_sds(CA_SECRET, write_ca_secret(secrets_dir, tls.ca_file)),
        )
    if tls.cert_file and tls.key_file:
        certificate = tls_v3.TlsCertificate(
            certificate_chain=core.DataSource(filename=tls.cert_file),
            private_key=core.DataSource(filename=tls.key_file),
        )
        if secrets_dir is None:
            common_tls.tls_certificates = [certificate]
        else:
            common_tls.tls_certificate_sds_secret_configs = [
                _sds(CLIENT_SECRET, write_client_secret(secrets_dir, certificate))
            ]
    sni = next((n for n in names if n not in ips), "")  # SNI carries a name, never an IP address
    context = tls_v3.UpstreamTlsContext(common_tls_context=common_tls, sni=sni)
    return core.TransportSocket(name="envoy.transport_sockets.tls", typed_config=AnyProto.pack(context))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ext_proc_cluster(ext_proc: str, tls: ClientTls | None = None, secrets_dir: str | None = None) -> cluster.Cluster:
    """HTTP/2 to the ext_proc: a STATIC cluster for IPs or unix sockets; for a name (a compose service, a Kubernetes
    Service) DNS, one logical host re-resolved every few seconds, so the ext_proc can move without an Envoy restart.

    ``ext_proc`` may list several replicas, comma-separated (``10.0.0.5:9002,10.0.0.6:9002``, or compose service
    names): each is a host of the cluster, and Envoy spreads the ext_proc streams (one per request) over them
    round robin. Replicas that should decide alike share their state (``state.backend: redis``). With ``tls`` the
    connections are TLS (mTLS with a client certificate), for a picker with ``server.tls``; ``secrets_dir`` as for
    `_ext_proc_tls`."""
    targets = [t.strip() for t in ext_proc.split(",") if t.strip()]
    if not targets:
        raise ValueError("ext_proc: no address given")
    common: dict[str, Any] = {
        "name": EXT_PROC_CLUSTER,
        "connect_timeout": seconds(0.25),
        "typed_extension_protocol_options": _protocol_options(http2=True),
        "load_assignment": _load_assignment(EXT_PROC_CLUSTER, [address(t) for t in targets]),
    }
    if tls is not None:
        common["transport_socket"] = _ext_proc_tls(targets, tls, secrets_dir)
    if not any(_is_hostname(t) for t in targets):
        return cluster.Cluster(type=cluster.ClusterDiscoveryType.STATIC, **common)
    discovery = dns_cluster.DnsCluster(
        dns_refresh_rate=seconds(5),
        respect_dns_ttl=False,
        dns_lookup_family=dns_common.DnsLookupFamily.V4_PREFERRED,
        # one name: logical DNS, one connection target whichever address answers; several: one host per name
        all_addresses_in_single_endpoint=len(targets) == 1,
    )
    return cluster.Cluster(
        cluster_type=cluster.ClusterCustomClusterType(name="envoy.clusters.dns", typed_config=AnyProto.pack(discovery)),
        **common,
    )
