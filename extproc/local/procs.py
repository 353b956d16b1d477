"""Child processes the benchmarks, the demo and the tests start: launch, wait until ready, stop by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free ports (`serve --workers N` serves metrics on port + i)."""
    while True:
        first = free_port(host)
        if first + count <= 65536 and all(port_free(first + i, host) for i in range(count)):
            return first


def free_port_blocks(count: int, width: int = 1, taken: set[int] | None = None, host: str = "127.0.0.1") -> list[int]:
    """The first ports of ``count`` blocks of ``width`` consecutive free ports, none overlapping another or
    ``taken`` (which gets the new blocks): for servers started together, none of which has bound its ports yet
    when the next one's are chosen."""
    taken = set() if taken is None else taken
    firsts: list[int] = []
    while len(firsts) < count:
        first = free_ports(width, host)
        block = range(first, first + width)
        if not taken.intersection(block):
            firsts.append(first)
            taken.update(block)
    return firsts


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now (connections in TIME_WAIT do not count, as for servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Child:
    """One child process with its output in a log file; stopped by PID, never by name."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop the child
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float = 20.0) -> None:
        """Wait until ``url`` answers 200; raise with the child's log if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready at {url} after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def cpu_seconds(self) -> float:
        """User + system CPU time the child has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks


def extproc_argv(*args: str) -> list[str]:
    """Run this package's CLI with the current interpreter, whatever PATH says."""
    return [sys.executable, "-m", "extproc", *args]


def start_sim(
    name: str, model: str, port: int, log_dir: Path, *extra: str, host: str = "127.0.0.1", timeout: float = 20.0
) -> Child:
    return start_sims([SimStart(name, model, port, extra)], log_dir, host=host, timeout=timeout)[0]


@dataclass(frozen=True)
class SimStart:
    """One simulator to start: its process name, served model, HTTP port and extra ``extproc sim`` options."""

    name: str
    model: str
    port: int
    extra: Sequence[str] = ()


def start_sims(sims: Sequence[SimStart], log_dir: Path, host: str = "127.0.0.1", timeout: float = 20.0) -> list[Child]:
    """Start every simulator at once, then wait for each to answer /health: the interpreters start in parallel
    (a second each, most of a stack's start when done one after another). If one fails, all are stopped."""
    children: list[Child] = []
    try:
        for sim in sims:
            argv = extproc_argv("sim", "--model", sim.model, "--host", host, "--port", str(sim.port), *sim.extra)
            children.append(Child(sim.name, argv, log_dir))
        for sim, child in zip(sims, children, strict=True):
            child.wait_http(f"http://{host}:{sim.port}/health", timeout)
    except BaseException:
        for child in children:
            child.stop()
        raise
    return children
