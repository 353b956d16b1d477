"""``extproc serve --workers N``: N picker processes on one gRPC port, so the picker can use more than one core.

Each worker is a whole `extproc serve` (its own event loop, scraper and scheduler) that binds the gRPC port
with ``SO_REUSEPORT``: the kernel spreads incoming *connections* over the workers (each Envoy worker thread
holds its own HTTP/2 connection to the picker, and its ext_proc streams follow that connection). Worker ``i``
serves its metrics on the configured metrics port + ``i``. This process only starts the workers, restarts
one that dies, and passes SIGTERM/SIGINT on.

What the workers learn from their picks is shared only through ``state.backend: redis``; without it each
worker keeps its own prefix index, and a tenant's requests are scored against 1/N of its history (said
at start).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from extproc.config import Config, parse_host_port

log = logging.getLogger("extproc")

RESTART_DELAY = 1.0  # seconds before a worker that died is started again
START_ERROR = 2  # a worker's exit code for "cannot start" (bad config, a port in use): restarting cannot help


def metrics_listen(config: Config, index: int) -> str:
    """Worker ``index``'s metrics address: the configured port + ``index``."""
    host, port = parse_host_port(config.server.metrics_listen, "metrics_listen")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + index}"


def check_workers(config: Config, workers: int) -> str | None:
    """Why ``workers`` cannot run with ``config`` (None if they can)."""
    if workers < 1:
        return "--workers must be at least 1"
    if workers > 1 and config.server.listen.startswith("unix:"):
        return "--workers needs a TCP server.listen (SO_REUSEPORT does not apply to unix sockets)"
    return None


def metrics_ports_in_use(config: Config, workers: int) -> str | None:
    """Which of the workers' metrics ports another process holds (None if all are free), as an error."""
    for i in range(workers):
        listen = metrics_listen(config, i)
        if not _can_listen(listen):
            what = "server.metrics_listen" if i == 0 else f"worker {i}'s metrics port (server.metrics_listen + {i})"
            return f"{what}: {listen} is in use; choose a metrics port with the next {workers - 1} free too"
    return None


def _can_listen(listen: str) -> bool:
    host, port = parse_host_port(listen, "metrics_listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def supervise(config: Config, config_path: Path, workers: int) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; restart any that dies meanwhile.

    A worker that exits with a start error (a port in use, say) stops them all with that error: restarting it
    would only bind and drop the shared gRPC port over and over, losing the connections the kernel hands it.
    """
    if config.state.backend != "redis":
        log.warning(
            "--workers %d without state.backend: redis: each worker keeps its own prefix index, so a tenant's "
            "requests are scored against about 1/%d of its history; share it with state: {backend: redis, url: ...}",
            workers,
            workers,
        )
    problem = metrics_ports_in_use(config, workers)
    if problem:
        print(f"extproc serve: {problem}", file=sys.stderr)
        return START_ERROR
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for i in range(workers):
            procs[i] = _start(config_path, i, workers)
        print(
            f"extproc serve: {workers} workers on {config.server.listen} (SO_REUSEPORT), metrics on "
            + ", ".join(metrics_listen(config, i) for i in range(workers)),
            flush=True,
        )
        while not stopping:
            time.sleep(0.2)
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code == START_ERROR and not stopping:
                    log.error("worker %d could not start (its error is above); stopping all workers", i)
                    return START_ERROR
                if code is not None and not stopping:
                    log.error(
                        "worker %d (pid %d) exited with %s; starting it again in %.0fs",
                        i,
                        proc.pid,
                        code,
                        RESTART_DELAY,
                    )
                    time.sleep(RESTART_DELAY)
                    procs[i] = _start(config_path, i, workers)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.server.grace_period + 5
        for proc in procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _start(config_path: Path, index: int, workers: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "extproc", "serve", "--config", str(config_path)]
    return subprocess.Popen([*argv, "--worker-index", str(index), "--workers", str(workers)])
