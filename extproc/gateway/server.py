"""`extproc serve`: the grpc.aio ExternalProcessor, health, metrics, discovery and scraping.

The servicer is a thin adapter: it reads Envoy's messages, hands them to the EndpointPicker, and
writes back exactly one response per message.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import names
from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from extproc.config import Config, ConfigError, load_config
from extproc.datalayer.discovery import Discovery
from extproc.datalayer.eds import write_eds
from extproc.datalayer.scrape import Scraper
from extproc.datalayer.table import EndpointTable
from extproc.gateway import protocol
from extproc.gateway.director import EndpointPicker, StreamState
from extproc.gateway.telemetry import StateCollector, Telemetry
from extproc.scheduling.scheduler import Scheduler

log = logging.getLogger("extproc")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("liveness", "readiness", SERVICE_NAME, "")


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, picker: EndpointPicker) -> None:
        self.picker = picker

    async def Process(
        self, request_iterator: AsyncIterator[protocol.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[protocol.ProcessingResponse]:
        state = StreamState()
        for key, value in context.invocation_metadata() or ():
            if key == names.POOL_METADATA:
                state.pool_hint = value if isinstance(value, str) else value.decode()
        picker = self.picker
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "request_body":
                yield picker.on_request_body(request, state)
            elif kind == "request_headers":
                yield picker.on_request_headers(request, state)
            elif kind is not None:
                yield protocol.passthrough(kind)


class App:
    """Everything `extproc serve` runs, with an orderly start and stop."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self._config_mtime = config_path.stat().st_mtime_ns if config_path else 0
        self._reload_task: asyncio.Task[None] | None = None
        self.table = EndpointTable()
        self.telemetry = Telemetry()
        self.scheduler = Scheduler.from_config(config)
        self.table.on_removed(self.scheduler.forget)
        self.discovery = Discovery(config, self.table)
        self.scraper = Scraper(config, self.table)
        self.picker = EndpointPicker(config, self.table, self.scheduler, self.telemetry)
        self.table.on_removed(self.telemetry.forget_endpoint)
        self.telemetry.watch(StateCollector(config, self.table, self.scraper.stats, self.scheduler.prefix_index))
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.bound_port: int | None = None
        if config.server.eds_dir is not None:
            eds_dir = config.server.eds_dir
            self.table.on_changed(lambda pool, addresses: write_eds(eds_dir, pool, addresses))

    async def start(self) -> None:
        await self.discovery.start()
        await self.scraper.start()
        # Whole request bodies arrive in one message: the gRPC limit must exceed the body limit.
        max_message = self.config.limits.grpc_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
            ]
        )
        ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(self.picker), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        listen = self.config.server.listen
        try:
            self.bound_port = server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {listen}: {exc} (is the address in use?)") from None
        await server.start()
        self.server = server
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.telemetry.serve(self.config.server.metrics_listen)
        if self.config_path is not None and self.config.server.reload_interval > 0:
            self._reload_task = asyncio.create_task(self._watch_config())
        # Everything allocated at start-up is long-lived: keep it out of the collector's full passes,
        # which otherwise pause the request path for milliseconds.
        gc.freeze()

    def reload(self) -> bool:
        """Re-read the config file and apply new static endpoint lists; returns whether anything changed.

        Pool membership is what scaling changes, and it is applied live (the prefix index forgets
        removed endpoints, the scraper starts on new ones, EDS files follow). Any other change is logged
        and waits for a restart; an invalid file is logged and ignored.
        """
        assert self.config_path is not None
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config reload: keeping the running configuration: %s", exc)
            return False
        changed = False
        old_pools = {p.name: p for p in self.config.pools}
        for pool in new.pools:
            old = old_pools.get(pool.name)
            if old is None or pool.model_copy(update={"endpoints": old.endpoints}) != old:
                log.warning("config reload: pool %s changed beyond its endpoints; restart to apply", pool.name)
                continue
            if pool.endpoints.static is not None and old.endpoints.static is not None:
                added, removed = self.table.replace_pool(pool.name, pool.endpoints.static)
                if added or removed:
                    changed = True
                    log.info("config reload: pool %s +%s -%s", pool.name, added, removed)
            elif pool.endpoints != old.endpoints:
                log.warning("config reload: pool %s changed its endpoint source; restart to apply", pool.name)
        if {p.name for p in new.pools} != set(old_pools):
            log.warning("config reload: pools were added or removed; restart to apply")
        return changed

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

    async def stop(self) -> None:
        """Graceful: report not-serving, stop accepting, let in-flight streams finish, then stop."""
        if self._reload_task is not None:
            self._reload_task.cancel()
        for name in HEALTH_SERVICES:
            if name != "liveness":
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(self.config.server.grace_period)
        await self.scraper.stop()
        await self.discovery.stop()


async def serve(config: Config, config_path: Path | None = None) -> None:
    app = App(config, config_path)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, app.reload)
    pools = ", ".join(f"{p.name} ({', '.join(p.models)})" for p in config.pools)
    print(
        f"extproc serve: ext_proc on {config.server.listen}, metrics on http://{config.server.metrics_listen}/metrics, "
        f"pools: {pools}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        print("extproc serve: stopping (finishing in-flight requests)", flush=True)
        await app.stop()


def run(config: Config, config_path: Path | None = None) -> int:
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        runner(serve(config, config_path))
    except OSError as exc:
        print(f"extproc serve: error: {exc}", flush=True)
        return 2
    return 0
