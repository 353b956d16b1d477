"""One typed configuration for the ext_proc server and the Envoy bootstrap generated from it.

Both `extproc serve` and the Envoy bootstrap generator read this file, so the pools the picker scores
and the clusters Envoy balances over cannot drift apart. Errors name the field and the fix.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extproc import config_legacy as legacy


class ConfigError(ValueError):
    """The configuration is invalid; the message lists each bad field and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_host_port(value: str, what: str = "address") -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; the port must be 1..65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {value!r} must be host:port, e.g. 127.0.0.1:8000")
    return host.strip("[]"), int(port)


def _check_endpoint(value: str) -> str:
    host, port = parse_host_port(value, "endpoint")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"endpoint {value!r} must be an IP address and port (Envoy's override_host matches pod IPs); "
            "for a DNS name use 'dns: {name: ..., port: ...}'"
        ) from None
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_nameserver(value: str) -> tuple[str, int]:
    """``ip`` (port 53) or ``ip:port`` / ``[v6]:port``: a DNS server to ask instead of the system resolver."""
    text = value.strip()
    try:
        return str(ipaddress.ip_address(text.strip("[]"))), 53
    except ValueError:
        pass
    try:
        host, port = parse_host_port(text, "nameserver")
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(
            f"nameserver {value!r} must be an IP address, optionally with a port: 10.96.0.10 or 127.0.0.1:5353"
        ) from None


class DnsDiscovery(_Strict):
    """Endpoints are the A/AAAA records of a (headless Service) name, re-resolved periodically.

    ``nameservers`` (optional) asks these DNS servers directly, with the name taken as fully qualified, instead of
    the system resolver (which applies /etc/hosts and the pod's search domains); Envoy's own DNS clusters then ask
    the same servers.
    """

    name: str = Field(min_length=1)
    port: int = Field(gt=0, lt=65536)
    interval: float = Field(default=5.0, gt=0, description="seconds between resolutions")
    nameservers: list[str] | None = Field(default=None, min_length=1)

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        out = []
        for item in value:
            ip, port = parse_nameserver(item)
            out.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
        return out

    def nameserver_addresses(self) -> list[tuple[str, int]]:
        return [parse_nameserver(n) for n in self.nameservers or ()]


class PoolEndpoints(_Strict):
    static: list[str] | None = None
    dns: DnsDiscovery | None = None

    @field_validator("static")
    @classmethod
    def _static_addresses(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        out = [_check_endpoint(v) for v in value]
        if len(set(out)) != len(out):
            raise ValueError("static endpoints repeat an address; list each ip:port once")
        return out

    @model_validator(mode="after")
    def _one_source(self) -> PoolEndpoints:
        if (self.static is None) == (self.dns is None):
            raise ValueError("give exactly one of 'static' (a list of ip:port) or 'dns' (name and port)")
        return self


class MetricsSource(_Strict):
    """Where an endpoint's vLLM /metrics are: same host, this path, this port (None = the serving port)."""

    path: str = "/metrics"
    port: int | None = Field(default=None, gt=0, lt=65536)


class Pool(_Strict):
    name: str = Field(min_length=1, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    models: list[str] = Field(min_length=1, description="model names requests may ask for")
    served_model_name: str | None = Field(
        default=None, description="the name vLLM serves in this pool; default: the first of 'models'"
    )
    endpoints: PoolEndpoints
    metrics: MetricsSource = MetricsSource()
    paths: list[str] | None = Field(
        default=None, min_length=1, description="the gateway.paths this pool serves (default: all of them)"
    )

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.models[0]


class SplitBackend(_Strict):
    pool: str
    weight: int = Field(ge=0, le=10000)


class Split(_Strict):
    """A weighted split between pools on its own path, ``/v1/<name>/...`` (Envoy's weighted_clusters).

    Envoy draws the pool; the picker then picks an endpoint inside that pool and, if the body asks for
    another model (or ``auto``), rewrites the body's ``model`` to the drawn pool's served name.
    """

    name: str = Field(min_length=1, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    backends: list[SplitBackend] = Field(min_length=2)
    sticky_header: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]+$",
        description="requests with the same value of this header (e.g. x-user-id) always get the same pool",
    )


class Scrape(_Strict):
    interval: float = Field(default=0.05, gt=0, description="seconds between scrapes of one endpoint")
    timeout: float = Field(default=1.0, gt=0, description="seconds before a scrape counts as failed")
    stale_after: float = Field(default=2.0, gt=0, description="seconds after which a snapshot is stale")
    only_needed_series: bool = Field(
        default=True,
        description="ask /metrics only for the series the picker reads (name[]=..., honoured by vLLM's "
        "prometheus_client endpoint); a server that ignores it sends the whole page, which works too",
    )


class PluginSpec(_Strict):
    """A scheduling plugin (filter or picker): its registered name and its constructor's ``params``.

    In YAML a bare name is short for ``{name: NAME}``.
    """

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class WeightedPlugin(PluginSpec):
    """A scorer, its weight and its ``params`` (e.g. prefix: ``{min_blocks: 16, block_chars: 64}``)."""

    weight: float = Field(default=1.0, ge=0)


def _spec(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


# The subset hint comes first: it defines the candidate set, inside which health may fail open.
DEFAULT_FILTERS = ("subset", "healthy", "not_saturated")
DEFAULT_SCORERS = (("queue", 2.0), ("kv_cache", 2.0), ("prefix", 4.0))  # GIE's, prefix 3 -> 4: docs/peers.md


class Scheduler(_Strict):
    """The scheduling policy: filters, then weighted scorers, then a picker; each entry builds one plugin."""

    filters: list[PluginSpec] = Field(default_factory=lambda: [PluginSpec(name=n) for n in DEFAULT_FILTERS])
    scorers: list[WeightedPlugin] = Field(
        default_factory=lambda: [WeightedPlugin(name=n, weight=w) for n, w in DEFAULT_SCORERS]
    )
    picker: PluginSpec = PluginSpec(name="max_score")
    fallbacks: int = Field(default=2, ge=0, description="extra endpoints after the pick, for Envoy to retry")

    @field_validator("filters", mode="before")
    @classmethod
    def _filter_names(cls, value: Any) -> Any:
        return [_spec(v) for v in value] if isinstance(value, list | tuple) else value

    @field_validator("picker", mode="before")
    @classmethod
    def _picker_name(cls, value: Any) -> Any:
        return _spec(value)

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        return legacy.move_saturation(data, DEFAULT_FILTERS) if isinstance(data, dict) else data


HEADER_ROOM_BYTES = 128 * 1024  # Envoy's connection buffer holds headers too: room for a 431 above 60 KiB


class Limits(_Strict):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0, description="larger bodies get 413")

    def envoy_buffer_bytes(self, json_errors: bool = True) -> int:
        """How much the generated Envoy buffers for the ext_proc. With ``gateway.json_errors`` exactly the limit:
        Envoy answers a larger body with a JSON 413 itself, so an oversized body never reaches the picker (nor
        a replica when the picker fails open). Without, twice the limit, so the picker's JSON 413 answers most
        oversized bodies and only those above get Envoy's plain-text one. Never below 128 KiB: the same
        per-connection buffer holds the request headers (up to Envoy's 60 KiB, answered 431 above)."""
        return max(HEADER_ROOM_BYTES, self.max_body_bytes if json_errors else 2 * self.max_body_bytes)

    @property
    def grpc_message_bytes(self) -> int:
        """The ext_proc's gRPC message limit: a whole buffered body plus the rest of the message, for an Envoy
        that buffers twice the limit (Envoy Gateway's ``requestBuffer``, docs/deployment.md)."""
        return self.envoy_buffer_bytes(json_errors=False) + 64 * 1024


class ServerTls(_Strict):
    """TLS for the ext_proc gRPC port and the metrics port (docs/tls.md). The files are checked when the picker
    starts (not here: `extproc envoy-config` reads this file where they are not mounted) and re-read when they
    change, so cert-manager's or OpenShift's rotations need no restart."""

    cert_file: str = Field(min_length=1, description="PEM certificate (chain) the picker serves, e.g. tls.crt")
    key_file: str = Field(min_length=1, description="PEM private key of cert_file, unencrypted, e.g. tls.key")
    client_ca_file: str | None = Field(
        default=None,
        min_length=1,
        description="require client certificates signed by this CA (mTLS); without it any client may connect",
    )


class Server(_Strict):
    listen: str = Field(default="127.0.0.1:9002", description="host:port, or unix:/path for a socket")
    metrics_listen: str = Field(default="127.0.0.1:9090", description="host:port of the Prometheus endpoint")
    grace_period: float = Field(default=10.0, ge=0, description="seconds in-flight streams get on SIGTERM")
    reload_interval: float = Field(
        default=1.0, ge=0, description="seconds between checks of the config file for new pool endpoints (0 = off)"
    )
    eds_dir: str | None = Field(
        default=None,
        description="write each pool's endpoints here as Envoy EDS files, so Envoy follows membership changes",
    )
    tls: ServerTls | None = Field(
        default=None, description="serve the gRPC and metrics ports over TLS (default: plaintext, for localhost)"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value.startswith("unix:"):
            if len(value) <= len("unix:"):
                raise ValueError("a unix socket address needs a path, e.g. unix:/run/extproc.sock")
            return value
        parse_host_port(value, "listen")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str) -> str:
        parse_host_port(value, "metrics_listen")
        return value


REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel")


class State(_Strict):
    """Where what the picker learns from its picks lives: this process alone, or shared through Redis.

    With ``redis`` every replica keeps deciding on its own in-memory index (no Redis round trip on the
    request path), publishes what it records and applies what the others publish (docs/state.md).
    """

    backend: Literal["local", "redis"] = Field(
        default="local", description="local: this process only; redis: replicas share picks through Redis"
    )
    url: str | None = Field(
        default=None,
        description="redis://host:6379/0, rediss:// for TLS, redis+cluster://host:port (any node of a cluster), "
        "redis+sentinel://host:26379,host2:26379/MASTER[/db]; no password here (password_file, password_env)",
    )
    username: str | None = Field(default=None, description="ACL user (the password comes from a file or the env)")
    password_file: str | None = Field(default=None, description="file whose first line is the password")
    password_env: str | None = Field(default=None, description="environment variable holding the password")
    ca_file: str | None = Field(default=None, description="CA bundle for rediss:// (default: the system's)")
    key: str = Field(default="extproc:picks", min_length=1, description="the Redis stream the replicas share")
    max_entries: int = Field(
        default=20_000, ge=100, description="entries (batches of picks) the stream keeps: the warm-up history"
    )
    publish_interval: float = Field(
        default=0.005, gt=0, le=1.0, description="seconds a replica gathers picks into one batch before publishing"
    )
    warmup_timeout: float = Field(
        default=5.0, ge=0, description="seconds a starting replica may spend reading the history before it is ready"
    )
    timeout: float = Field(default=1.0, gt=0, description="seconds before a Redis command counts as failed")
    max_outbox: int = Field(
        default=50_000, ge=100, description="picks buffered while Redis is unreachable; older ones are dropped"
    )
    share_scrapes: bool = Field(
        default=True,
        description="replicas share their /metrics scrapes, so each endpoint is scraped by one replica, not all",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in REDIS_SCHEMES or not rest:
            raise ValueError(f"url {value!r} must start with one of {', '.join(s + '://' for s in REDIS_SCHEMES)}")
        userinfo, at, _ = rest.rpartition("@")
        if at and ":" in userinfo:
            raise ValueError(
                "url must not hold a password (it would sit in the config file): put the user in 'username' "
                "and the password in a file ('password_file') or an environment variable ('password_env')"
            )
        return value

    @model_validator(mode="after")
    def _backend(self) -> State:
        if self.backend == "redis" and not self.url:
            raise ValueError("backend 'redis' needs 'url', e.g. url: redis://redis:6379/0")
        if self.password_file and self.password_env:
            raise ValueError("give the password one way: 'password_file' or 'password_env', not both")
        return self


# Envoy's retry conditions (x-envoy-retry-on) that apply to an HTTP model server.
RETRY_CONDITIONS = (
    "connect-failure",
    "reset",
    "reset-before-request",
    "refused-stream",
    "5xx",
    "gateway-error",
    "retriable-4xx",
    "envoy-ratelimited",
    "http3-post-connect-failure",
)
DEFAULT_RETRY_ON = ("connect-failure", "reset", "refused-stream")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
DEFAULT_PATHS = {"/v1/chat/completions": ("POST",), "/v1/completions": ("POST",), "/v1/models": ("GET",)}
_PATH_SEGMENT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


class Gateway(_Strict):
    """What the generated Envoy does around the pick: retries, the idle timeout of streams, which API paths it
    forwards, and its own errors as OpenAI-style JSON (docs/gateway.md, "When a replica fails")."""

    retries: int = Field(default=2, ge=0, le=10, description="retries of a failed attempt, each on another endpoint")
    retry_on: list[str] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON),
        description="Envoy retry conditions; reset covers a replica dying before its response headers",
    )
    retry_budget_percent: float = Field(
        default=50.0, gt=0, le=100, description="retries in flight at most this share of a pool's active requests"
    )
    retry_budget_min_concurrency: int = Field(
        default=10, ge=1, description="retries in flight always allowed per pool, whatever the share"
    )
    per_try_idle_timeout: float = Field(
        default=10.0,
        ge=0,
        description="streaming requests: seconds an attempt may send no byte before it is abandoned (and retried "
        "elsewhere if nothing reached the client yet); above the worst time to first token; 0 = off",
    )
    per_try_timeout: float = Field(
        default=0.0, ge=0, description="non-streaming requests: seconds an attempt may take before a retry; 0 = off"
    )
    request_timeout: float = Field(
        default=60.0,
        ge=0,
        description="seconds a client has to send its whole request (headers and body) before Envoy answers a "
        "JSON 408; a stalled upload otherwise holds a stream and a picker stream for 5 minutes; 0 = off",
    )
    json_errors: bool = Field(default=True, description="Envoy's own error replies as OpenAI-style JSON")
    paths: dict[str, list[str]] = Field(
        default_factory=lambda: {path: list(methods) for path, methods in DEFAULT_PATHS.items()},
        min_length=1,
        description="API paths forwarded to the pools, each with its methods; others get a JSON 404 (405)",
    )

    @field_validator("retry_on")
    @classmethod
    def _retry_on(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in RETRY_CONDITIONS:
                raise ValueError(f"{item!r} is not an Envoy retry condition; use any of {', '.join(RETRY_CONDITIONS)}")
        if len(set(value)) != len(value):
            raise ValueError("retry conditions repeat; list each once")
        return value

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for path, methods in value.items():
            segments = path.split("/")[1:]
            if not path.startswith("/v1/") or not all(s and set(s) <= set(_PATH_SEGMENT) for s in segments):
                raise ValueError(f"path {path!r} must start with /v1/, its segments letters, digits, '.', '_', '-'")
            upper = [m.upper() for m in methods]
            if not upper or not set(upper) <= set(HTTP_METHODS) or len(set(upper)) != len(upper):
                raise ValueError(f"path {path!r}: give its methods once each, among {', '.join(HTTP_METHODS)}")
            out[path] = upper
        return out


class Config(_Strict):
    """The whole file: the picker's server, its pools and splits, scraping, the scheduling policy, limits."""

    server: Server = Server()
    pools: Annotated[list[Pool], Field(min_length=1)]
    splits: list[Split] = Field(default_factory=list)
    scrape: Scrape = Scrape()
    scheduler: Scheduler = Scheduler()
    limits: Limits = Limits()
    state: State = State()
    gateway: Gateway = Gateway()

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        return legacy.move_prefix(data, DEFAULT_SCORERS) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names = [p.name for p in self.pools]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(sorted(dup))}")
        for split in self.splits:
            if split.name in names:
                raise ValueError(f"split {split.name!r} has the name of a pool; paths /v1/<name>/ must be unique")
            for backend in split.backends:
                if backend.pool not in names:
                    raise ValueError(
                        f"split {split.name!r} names pool {backend.pool!r}, which is not defined; "
                        f"known pools: {', '.join(names)}"
                    )
            if not any(b.weight for b in split.backends):
                raise ValueError(f"split {split.name!r}: at least one backend needs a weight above 0")
        seen: dict[str, str] = {}
        for pool in self.pools:
            for model in pool.models:
                if model in seen:
                    raise ValueError(
                        f"model {model!r} is listed by pools {seen[model]!r} and {pool.name!r}; "
                        "a model name must select one pool"
                    )
                seen[model] = pool.name
        return self

    @model_validator(mode="after")
    def _paths(self) -> Config:
        """Each pool's paths are gateway paths, and no pool or split is named like a path's first segment
        (``/v1/chat/...`` would be both that pool's prefix and the chat API)."""
        for pool in self.pools:
            for path in pool.paths or ():
                if path not in self.gateway.paths:
                    raise ValueError(
                        f"pool {pool.name!r} lists path {path!r}, which gateway.paths does not: add it there with "
                        f"its methods (gateway: {{paths: {{{path}: [POST]}}}}) or remove it from the pool"
                    )
        firsts = {path.split("/")[2] for path in self.gateway.paths}
        for name in [p.name for p in self.pools] + [s.name for s in self.splits]:
            if name in firsts:
                raise ValueError(
                    f"pool or split {name!r} is named like the first segment of a gateway path (/v1/{name}/...), "
                    "so its path prefix and the API would collide: rename it"
                )
        for split in self.splits:
            if not set.intersection(*(set(self.pool_paths(b.pool)) for b in split.backends)):
                raise ValueError(f"split {split.name!r}: its pools serve no gateway path in common")
        return self

    def pool(self, name: str) -> Pool | None:
        return next((p for p in self.pools if p.name == name), None)

    def pool_paths(self, name: str) -> dict[str, list[str]]:
        """The gateway paths (with their methods) pool ``name`` serves."""
        pool = self.pool(name)
        served = pool.paths if pool is not None and pool.paths is not None else self.gateway.paths
        return {path: methods for path, methods in self.gateway.paths.items() if path in served}


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field: remove it or check its spelling"
        elif error["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  {where}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(data: Any) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with at least 'pools'")
    return parse_config(data)
