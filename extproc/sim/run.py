"""Start a simulator process: bind, announce, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import signal
import sys

from aiohttp import web
from prometheus_client import disable_created_metrics

from extproc.hf_tokenizer import TokenizerError
from extproc.sim.api import SimServer
from extproc.sim.config import SimConfig
from extproc.sim.kv_events import KVEventsBindError


class PortInUse(RuntimeError):
    pass


async def serve(config: SimConfig, host: str, port: int, max_body_bytes: int) -> None:
    # Binds the KV-events sockets, if enabled; loads --tokenizer's files (TokenizerError names what is wrong).
    server = SimServer(config, max_body_bytes=max_body_bytes)
    runner = web.AppRunner(server.app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is already in use: choose another --port") from None
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    names = ", ".join(config.names)
    print(
        f"extproc sim: serving {names} on http://{host}:{port} "
        f"(preset {config.preset}, time scale {config.time_scale:g}, {config.num_gpu_blocks} KV blocks "
        f"of {config.block_size} tokens, max {config.max_num_seqs} running)",
        flush=True,
    )
    events = config.kv_events
    if events is not None and events.publishes:
        replay = f", replay on {events.replay_endpoint}" if events.replay_endpoint else ""
        print(f"extproc sim: KV-cache events on {events.endpoint} (topic {events.topic!r}){replay}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(config: SimConfig, host: str, port: int, max_body_bytes: int) -> int:
    disable_created_metrics()  # vLLM's exposition carries no *_created series
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        runner(serve(config, host, port, max_body_bytes))
    except (PortInUse, KVEventsBindError, TokenizerError) as exc:
        print(f"extproc sim: error: {exc}", file=sys.stderr)
        return 2
    return 0
