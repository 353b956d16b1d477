"""A local redis-server for the stack, the benchmarks and the tests: 127.0.0.1 only, nothing written to disk."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from extproc.local.procs import Child, free_port

INSTALL_HINT = "install redis-server (Debian/Ubuntu: apt-get install redis-server)"


def redis_answers(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server on 127.0.0.1:``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    log_dir: Path, port: int | None = None, name: str = "redis", timeout: float = 10.0
) -> tuple[Child, str]:
    """Start ``redis-server`` (no persistence) and wait for PING; returns the child and its ``redis://`` URL."""
    program = shutil.which("redis-server")
    if program is None:
        raise RuntimeError(f"redis-server not found: {INSTALL_HINT}")
    port = port or free_port()
    argv = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = Child(name, [*argv, "--dir", str(log_dir)], log_dir)
    deadline = time.monotonic() + timeout
    while not redis_answers(port):
        if not child.alive() or time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"redis-server did not answer on port {port}:\n{child.log_tail()}")
        time.sleep(0.02)
    return child, f"redis://127.0.0.1:{port}/0"
