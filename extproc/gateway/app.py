"""Everything `extproc serve` runs, wired together, with an orderly start and stop.

The data layer (endpoint table, discovery, scraper, EDS files), the scheduler, the director, the
gRPC server (ExternalProcessor + health), the metrics endpoint and, with ``state.backend: redis``, the
replicator that shares picks with the other replicas, and with ``precise_prefix`` the KV-event subscriber;
the config file is watched for new pool membership (and re-read on SIGHUP), which discovery applies.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from extproc.config import Config, ConfigError, load_config
from extproc.datalayer.discovery import Discovery
from extproc.datalayer.eds import write_eds
from extproc.datalayer.kv_events import KvEventsSubscriber
from extproc.datalayer.render import RenderCollector
from extproc.datalayer.scrape import Scraper
from extproc.datalayer.table import EndpointTable
from extproc.gateway.command import LOG_FORMAT
from extproc.gateway.director import Director
from extproc.gateway.heap import fix_mmap_threshold
from extproc.gateway.server import SERVICE_NAME, ExternalProcessor
from extproc.gateway.telemetry import StateCollector, Telemetry
from extproc.scheduling.prefix.precise import PrecisePrefixScorer
from extproc.scheduling.scheduler import Scheduler
from extproc.state.replicator import Replicator
from extproc.tls import CertificateFiles, grpc_server_credentials

log = logging.getLogger("extproc")

HEALTH_SERVICES = ("liveness", "readiness", SERVICE_NAME, "")


class App:
    """Everything `extproc serve` runs, with an orderly start and stop."""

    def __init__(self, config: Config, config_path: Path | None = None, *, reuse_port: bool = False) -> None:
        self.config = config
        self.reuse_port = reuse_port  # a worker of `serve --workers N`: the gRPC port is shared (SO_REUSEPORT)
        self.config_path = config_path
        self._config_mtime = config_path.stat().st_mtime_ns if config_path else 0
        self._reload_task: asyncio.Task[None] | None = None
        self.table = EndpointTable(stale_after=config.scrape.stale_after)
        self.telemetry = Telemetry()
        self.scheduler = Scheduler.from_config(config)
        self.table.on_removed(self.scheduler.forget_endpoint)
        self.discovery = Discovery(config, self.table)
        self.scraper = Scraper(config, self.table)
        self.director = Director(config, self.table, self.scheduler, self.telemetry)
        self.table.on_removed(self.telemetry.forget_endpoint)
        self.telemetry.watch(StateCollector(config, self.table, self.scraper.stats, self.scheduler))
        self.replicator = (
            Replicator(config, self.scheduler, self.table, self.telemetry.registry)
            if config.state.backend == "redis"
            else None
        )
        if self.replicator is not None and config.state.share_scrapes:
            self.scraper.share(self.replicator.covered, self.replicator.scraped)
        precise = next((p for p in self.scheduler.plugins() if isinstance(p, PrecisePrefixScorer)), None)
        self.kv_events = KvEventsSubscriber(precise, self.table) if precise is not None else None
        if self.kv_events is not None:
            self.telemetry.registry.register(self.kv_events)
        if self.director.tokenizer is not None:
            self.telemetry.registry.register(RenderCollector(self.director.tokenizer.stats))
        self.health = health.aio.HealthServicer()
        # server.tls: the files are checked here, before anything starts (ConfigError naming the field).
        self.tls = CertificateFiles.from_config(config.server.tls) if config.server.tls is not None else None
        self.server: grpc.aio.Server | None = None
        self.bound_port: int | None = None
        if config.server.eds_dir is not None:
            eds_dir = config.server.eds_dir
            self.table.on_changed(lambda pool, addresses: write_eds(eds_dir, pool, addresses))

    async def start(self) -> None:
        """Start everything; if any part cannot start (a port in use), stop what did and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        await self.discovery.start()
        await self.scraper.start()
        if self.kv_events is not None:
            await self.kv_events.start()
        # Whole request bodies arrive in one message: the gRPC limit must exceed the body limit.
        max_message = self.config.limits.grpc_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),  # off: a port in use is an error
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
            ]
        )
        ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(self.director), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        listen = self.config.server.listen
        try:
            if self.tls is None:
                self.bound_port = server.add_insecure_port(listen)
            else:
                self.bound_port = server.add_secure_port(listen, grpc_server_credentials(self.tls))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {listen}: {exc} (is the address in use?)") from None
        await server.start()
        self.server = server
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        if self.replicator is not None:  # ready once the shared history is applied (bounded by warmup_timeout)
            await self.replicator.start()
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.telemetry.serve(self.config.server.metrics_listen, self.tls)
        if self.config_path is not None and self.config.server.reload_interval > 0:
            self._reload_task = asyncio.create_task(self._watch_config())
        # Everything allocated at start-up is long-lived: keep it out of the collector's full passes,
        # which otherwise pause the request path for milliseconds.
        gc.freeze()

    def reload(self) -> bool:
        """Re-read the config file and let discovery apply new static endpoint lists; returns whether any changed.

        An invalid file is logged and ignored: the running configuration stays.
        """
        assert self.config_path is not None
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config reload: keeping the running configuration: %s", exc)
            return False
        return self.discovery.apply_config(new)

    async def _watch_config(self) -> None:
        assert self.config_path is not None
        while True:
            await asyncio.sleep(self.config.server.reload_interval)
            try:
                mtime = self.config_path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime != self._config_mtime:
                self._config_mtime = mtime
                self.reload()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: report not-serving, stop accepting, let in-flight streams finish (``grace``), then stop."""
        if self._reload_task is not None:
            self._reload_task.cancel()
        for name in HEALTH_SERVICES:
            if name != "liveness":
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(self.config.server.grace_period if grace is None else grace)
        if self.replicator is not None:
            await self.replicator.stop()
        if self.kv_events is not None:
            await self.kv_events.stop()
        if self.director.tokenizer is not None:
            await self.director.tokenizer.close()
        await self.scraper.stop()
        await self.discovery.stop()


async def serve(
    config: Config, config_path: Path | None = None, reuse_port: bool = False, late: LateReplyFilter | None = None
) -> None:
    app = App(config, config_path, reuse_port=reuse_port)
    if late is not None:
        late.telemetry = app.telemetry
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, app.reload)
    pools = ", ".join(f"{p.name} ({', '.join(p.models)})" for p in config.pools)
    print(
        f"extproc serve: ext_proc on {config.server.listen}{' (TLS)' if config.server.tls else ''}, metrics on "
        f"{'https' if config.server.tls else 'http'}://{config.server.metrics_listen}/metrics, "
        f"pools: {pools}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        print("extproc serve: stopping (finishing in-flight requests)", flush=True)
        await app.stop()


class LateReplyFilter(logging.Filter):
    """Drop grpc.aio's ERROR-with-traceback for a reply written to a stream its client had just cancelled.

    The core refuses the write (``ExecuteBatchError``) because the call is over: a race with a departing client
    (Envoy ending a request, the fuzzer cancelling), not a fault, and nothing is lost. Counted in ``dropped`` and,
    once ``telemetry`` is set, in its ``extproc_late_replies_total``.
    """

    MESSAGE = "ExecuteBatchError raised in core by servicer method"

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0
        self.telemetry: Telemetry | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.MESSAGE):
            self.dropped += 1
            if self.telemetry is not None:
                self.telemetry.late_replies.inc()
            return False
        return True


def run(config: Config, config_path: Path | None = None, reuse_port: bool = False) -> int:
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    late = LateReplyFilter()
    logging.getLogger("grpc._cython.cygrpc").addFilter(late)
    fix_mmap_threshold()  # large freed blocks go back to the system (gateway/heap.py)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        runner(serve(config, config_path, reuse_port, late))
    except OSError as exc:
        print(f"extproc serve: error: {exc}", flush=True)
        return 2
    except ConfigError as exc:  # server.tls: a file missing, unreadable, not PEM, or the key not the certificate's
        print(f"extproc serve: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
