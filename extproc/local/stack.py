"""A whole local gateway as child processes: simulated vLLM pools, the ext_proc, and Envoy.

The demo, `extproc up`, the benchmarks and the end-to-end tests all start the same stack from here, so
what the tests prove is what the demo runs; `extproc up --config` starts the same picker and Envoy for a
user's own file, in front of model servers that are already running.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from extproc.config import Config, parse_config, parse_host_port
from extproc.local.procs import Child, SimStart, extproc_argv, free_port, free_port_blocks, free_ports, start_sims

if TYPE_CHECKING:
    from extproc.local.certs import LocalCerts


def local_address(listen: str) -> str:
    """A listen address as this machine reaches it: a wildcard host (0.0.0.0, ::, empty) becomes 127.0.0.1."""
    host, port = parse_host_port(listen, "listen")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class PoolSpec:
    """One model pool of simulated replicas."""

    name: str
    model: str
    replicas: int = 2
    sim_args: tuple[str, ...] = ()  # extra `extproc sim` options for every replica
    kv_events: bool = False  # replicas publish vLLM KV-cache events on their port + 1 (replay: + 2)


KV_EVENTS_PORT_OFFSET, KV_REPLAY_PORT_OFFSET = 1, 2  # a simulated replica's event sockets, from its HTTP port


def kv_events_args(port: int, model: str) -> tuple[str, ...]:
    """``extproc sim`` options that publish KV events as vLLM's ``--kv-events-config`` does, beside ``port``."""
    settings = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port + KV_EVENTS_PORT_OFFSET}",
        "replay_endpoint": f"tcp://*:{port + KV_REPLAY_PORT_OFFSET}",
        "topic": f"kv@127.0.0.1:{port}@{model}",
    }
    return ("--kv-events-config", json.dumps(settings))


@dataclass
class SimReplica:
    child: Child
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return f"http://{self.address}"


@dataclass
class Stack:
    log_dir: Path
    config: Config
    config_path: Path
    gateway_port: int
    admin_port: int
    sims: dict[str, list[SimReplica]] = field(default_factory=dict)
    extproc: Child | None = None
    envoy: Child | None = None
    extras: list[Child] = field(default_factory=list)
    # pickers beyond the first (``start_stack(pickers=N)``): their config files (own ports) and processes
    more_configs: list[tuple[Config, Path]] = field(default_factory=list)
    more_pickers: list[Child] = field(default_factory=list)
    workers: int = 1  # `extproc serve --workers N` per picker: worker i serves metrics on the metrics port + i
    tls: LocalCerts | None = None  # the pickers serve TLS with these (server.tls), Envoy and waits use the client's

    @property
    def pickers(self) -> list[Child]:
        return ([self.extproc] if self.extproc is not None else []) + self.more_pickers

    @property
    def picker_configs(self) -> list[Config]:
        """Every picker's configuration, the first one's first (they differ only in their ports)."""
        return [self.config, *(c for c, _ in self.more_configs)]

    @property
    def ext_proc_targets(self) -> str:
        """Every picker's gRPC address, comma-separated, as Envoy's ext_proc cluster lists them."""
        listens = [c.server.listen for c in self.picker_configs]
        return ",".join(local_address(x) if not x.startswith("unix:") else x for x in listens)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def metrics_url(self) -> str:
        scheme = "https" if self.config.server.tls is not None else "http"
        return f"{scheme}://{local_address(self.config.server.metrics_listen)}/metrics"

    def replica_by_address(self, address: str) -> SimReplica | None:
        for replicas in self.sims.values():
            for replica in replicas:
                if replica.address == address:
                    return replica
        return None

    def start_extproc(self) -> Child:
        """Start the picker (and any more pickers of ``start_stack(pickers=N)``); returns the first."""
        started: list[tuple[Config, Child]] = []
        # All at once, then wait for each: the interpreters start in parallel.
        for i, (config, path) in enumerate([(self.config, self.config_path), *self.more_configs], start=1):
            argv = extproc_argv("serve", "--config", str(path))
            if self.workers > 1:
                argv += ["--workers", str(self.workers)]
            child = Child("extproc" if i == 1 else f"extproc-{i}", argv, self.log_dir)
            if i == 1:
                self.extproc = child
            else:
                self.more_pickers.append(child)
            started.append((config, child))
        for config, child in started:
            host, _, port = local_address(config.server.metrics_listen).rpartition(":")  # [v6] keeps its brackets
            for k in range(self.workers):  # every worker ready, not only the first
                if self.tls is None:
                    child.wait_http(f"http://{host}:{int(port) + k}/metrics")
                else:
                    from extproc.local.certs import wait_https

                    wait_https(child, f"https://{host}:{int(port) + k}/metrics", self.tls.client())
        assert self.extproc is not None
        return self.extproc

    def stop(self) -> None:
        """Stop everything this stack started, by PID, Envoy first so no request meets a dead upstream."""
        children = [self.envoy, self.extproc, *self.more_pickers, *self.extras]
        children += [r.child for replicas in self.sims.values() for r in replicas]
        for child in children:
            if child is not None:
                child.stop()


def start_stack(
    log_dir: Path,
    pools: Sequence[PoolSpec],
    *,
    settings: dict[str, Any] | None = None,
    with_extproc: bool = True,
    gateway_port: int | None = None,
    admin_port: int | None = None,
    extproc_port: int | None = None,
    metrics_port: int | None = None,
    bootstrap_options: dict[str, Any] | None = None,
    pickers: int = 1,
    workers: int = 1,
    tls: LocalCerts | None = None,
) -> Stack:
    """Start simulators for ``pools``, then the ext_proc (unless ``with_extproc`` is False), then Envoy.

    ``settings`` are extra top-level config sections (scheduler, scrape, limits, state) merged over
    the defaults. With ``pickers`` above 1, that many `extproc serve` replicas run the same configuration
    on their own ports, and Envoy's ext_proc cluster holds them all; with ``workers`` above 1 each of them is an
    `extproc serve --workers N` (metrics ports allocated in blocks of N). With ``tls`` (`extproc certs` files) the
    pickers serve mTLS (server.tls) and Envoy presents the client certificate. If anything fails to start, whatever
    did start is stopped before the error propagates.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    started: list[Child] = []
    try:
        planned: list[tuple[str, SimStart]] = []
        taken: set[int] = set()
        for spec in pools:
            width = 3 if spec.kv_events else 1  # HTTP, then KV events and replay on + 1, + 2
            for i, port in enumerate(free_port_blocks(spec.replicas, width, taken)):
                events = kv_events_args(port, spec.model) if spec.kv_events else ()
                sim = SimStart(f"sim-{spec.name}-{i}", spec.model, port, (*spec.sim_args, *events))
                planned.append((spec.name, sim))
        started += start_sims([sim for _, sim in planned], log_dir)
        sims: dict[str, list[SimReplica]] = {spec.name: [] for spec in pools}
        for (pool, sim), child in zip(planned, started, strict=True):
            sims[pool].append(SimReplica(child, sim.port))
        data: dict[str, Any] = {
            "server": {
                "listen": f"127.0.0.1:{extproc_port or free_port()}",
                "metrics_listen": f"127.0.0.1:{metrics_port or free_ports(workers)}",
                "grace_period": 2,
                **({"tls": tls.server_tls()} if tls is not None else {}),
            },
            "pools": [
                {
                    "name": spec.name,
                    "models": [spec.model],
                    "endpoints": {"static": [r.address for r in sims[spec.name]]},
                }
                for spec in pools
            ],
        }
        for key, value in (settings or {}).items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        config = parse_config(data)
        config_path = log_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        stack = Stack(
            log_dir=log_dir,
            config=config,
            config_path=config_path,
            gateway_port=gateway_port or free_port(),
            admin_port=admin_port or free_port(),
            sims=sims,
            workers=workers,
            tls=tls,
        )
        for i in range(2, pickers + 1):
            server = {
                **data["server"],
                "listen": f"127.0.0.1:{free_port()}",
                "metrics_listen": f"127.0.0.1:{free_ports(workers)}",
            }
            more = {**data, "server": server}
            path = log_dir / f"config-{i}.yaml"
            path.write_text(yaml.safe_dump(more, sort_keys=False))
            stack.more_configs.append((parse_config(more), path))
    except BaseException:
        for child in started:
            child.stop()
        raise
    return start_picker_and_envoy(stack, with_extproc=with_extproc, bootstrap_options=bootstrap_options)


def start_picker_and_envoy(
    stack: Stack, *, with_extproc: bool = True, bootstrap_options: dict[str, Any] | None = None
) -> Stack:
    """Start the ext_proc for ``stack.config_path`` (unless ``with_extproc`` is False), then Envoy in front of it.

    The one start of the gateway, for the simulated stack and for a user's own file (`extproc up --config`),
    whose model servers are already running. Envoy's bootstrap comes from the same config, listening on
    ``gateway_port`` with its admin on ``admin_port``. If anything fails to start, everything the stack holds
    (its simulators too) is stopped before the error propagates.
    """
    # Envoy's typed config classes take a second to import: only when a stack really starts.
    from extproc.envoy.bootstrap import build_bootstrap
    from extproc.envoy.run import start_envoy

    stack.log_dir.mkdir(parents=True, exist_ok=True)
    if stack.config.server.tls is not None and stack.tls is None:  # `extproc up --config` with server.tls
        from extproc.local.certs import LocalCerts

        stack.tls = LocalCerts.beside(stack.config.server.tls.cert_file)
        if stack.tls is None:
            stack.stop()
            raise RuntimeError(
                "server.tls is set, and Envoy needs the picker's CA and a client certificate: keep server.tls's "
                "files where `extproc certs --out DIR` wrote them (DIR/server.crt, with ca.crt, client.crt and "
                "client.key beside it), or run Envoy from `extproc envoy-config --ext-proc-ca ...` (docs/tls.md)"
            )
    try:
        if with_extproc:
            stack.start_extproc()
        options = dict(bootstrap_options or {})
        if stack.tls is not None:
            options.setdefault("ext_proc_tls", stack.tls.client())
            options.setdefault("secrets_dir", str(stack.log_dir))  # Envoy follows renewals of its cert and the CA
        if stack.more_configs:
            options.setdefault("ext_proc", stack.ext_proc_targets)
        bootstrap = build_bootstrap(
            stack.config,
            listen=f"127.0.0.1:{stack.gateway_port}",
            admin=f"127.0.0.1:{stack.admin_port}",
            **options,
        )
        stack.envoy = start_envoy(bootstrap, stack.log_dir, stack.admin_port)
        return stack
    except BaseException:
        stack.stop()
        raise
