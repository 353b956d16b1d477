from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from extproc.local.procs import Child, free_port, start_sim


class Sim:
    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"


@pytest.fixture
def start_simulator(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    """Start real `extproc sim` processes; every one is stopped by PID when the test ends."""
    started: list[Child] = []

    def start(*args: str, model: str = "test-model", name: str | None = None) -> Sim:
        port = free_port()
        child = start_sim(name or f"sim-{port}", model, port, tmp_path / "logs", *args)
        started.append(child)
        return Sim(child, port)

    yield start
    for child in started:
        child.stop()


@pytest.fixture
def sim(start_simulator: Callable[..., Sim]) -> Sim:
    """One simulator at a tenth of real time: fast, but with the latency model still in play."""
    return start_simulator("--time-scale", "0.1")
