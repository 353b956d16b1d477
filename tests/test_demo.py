"""`extproc demo`: the three scenarios end to end as a real subprocess, and nothing left running after Ctrl-C.

Every process the demo starts inherits a unique environment variable, so the tests can find (and, if a
test fails, stop by PID) whatever it left behind, wherever it was reparented.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.local.procs import extproc_argv, free_port, port_free

PORT_OPTIONS = ("--port", "--admin-port", "--extproc-port", "--metrics-port")
CHARTS = ("requests.png", "latency.png", "ab_split.png", "cache_hit_rate.png", "routing_overhead.png", "traffic.png")


def demo_argv(*args: str) -> list[str]:
    return extproc_argv("demo", *args)


class Demo:
    """One `extproc demo` subprocess, its output read line by line in a thread, its descendants tagged."""

    def __init__(self, tmp_path: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.ports = {option: free_port() for option in PORT_OPTIONS}
        self.tmp_path = tmp_path
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc: subprocess.Popen[str] | None = None

    def start(self, *args: str) -> None:
        port_args = [x for option, port in self.ports.items() for x in (option, str(port))]
        self.proc = subprocess.Popen(
            demo_argv(*port_args, "--log-dir", str(self.tmp_path / "logs"), *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "EXTPROC_DEMO_TEST_TAG": self.tag},
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        """Read output until a line containing ``text``; fail with the output so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} after {timeout:.0f}s:\n{self.output}")

    def finish(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def sim_ports(self) -> list[int]:
        """The replicas' ports, from the `pool NAME (MODEL): ADDR, ADDR` lines."""
        return [
            int(address.rsplit(":", 1)[1])
            for line in self.lines
            if line.startswith("  pool ")
            for address in line.split(": ", 1)[1].split(", ")
        ]

    def leftovers(self) -> list[int]:
        """PIDs of live processes carrying this run's tag (the demo and everything it started)."""
        needle = f"EXTPROC_DEMO_TEST_TAG={self.tag}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in environ.split(b"\0") and state != "Z":
                pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        """Whatever happened: stop the demo, then any tagged process it left, by PID."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    run = Demo(tmp_path)
    try:
        yield run
    finally:
        run.cleanup()


def assert_nothing_left(run: Demo, ports: list[int]) -> None:
    deadline = time.monotonic() + 5
    while (run.leftovers() or not all(port_free(p) for p in ports)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.leftovers() == [], f"processes left running:\n{run.output}"
    taken = [p for p in ports if not port_free(p)]
    assert taken == [], f"ports still in use: {taken}"


def test_demo_runs_the_three_scenarios_and_reports_every_figure(demo: Demo, tmp_path: Path) -> None:
    out, report = tmp_path / "out.json", tmp_path / "report"
    demo.start("--duration", "25", "--json", str(out), "--report", str(report))
    demo.wait_for("stopped every process", timeout=90)
    assert demo.finish(timeout=10) == 0, demo.output

    # progress: a line per phase and periodic status lines
    for phase in ("phase 1/3", "phase 2/3", "phase 3/3"):
        assert phase in demo.output
    assert sum(" req/s" in line and " sent " in line for line in demo.lines) >= 5

    s = json.loads(out.read_text())
    assert s["requests"]["failed"] == 0, s["requests"]
    assert s["requests"]["ok"] == s["requests"]["sent"] > 300
    assert [p["name"] for p in s["phases"]] == ["path-routing", "ab-split", "load-test"]
    assert all(p["requests"] > 0 for p in s["phases"])
    assert set(s["by_route"]) == {"1b", "3b", "ab-test"}
    assert all(route["requests"] > 0 and route["failed"] == 0 for route in s["by_route"].values())

    models = s["by_model"]
    assert set(models) == {"llama-3-2-1b", "llama-3-2-3b"}
    for model in models.values():
        assert model["requests"] > 0
        assert model["latency_ms"]["p50"] > 0 and model["latency_ms"]["p95"] >= model["latency_ms"]["p50"]
        assert model["expected_latency_ms"] is not None
        assert 0 < model["prefix_cache"]["hit_rate"] <= 1  # shared system prompts and multi-turn histories
    assert models["llama-3-2-1b"]["latency_ms"]["p50"] < models["llama-3-2-3b"]["latency_ms"]["p50"]
    assert sum(m["requests"] for m in models.values()) == s["requests"]["ok"]
    replicas = s["by_replica"]
    assert len(replicas) == 4 and all(r["requests"] > 0 for r in replicas.values())
    assert sum(r["requests"] for r in replicas.values()) == s["requests"]["ok"]

    ab = s["ab_split"]
    n = ab["independent_requests"]
    assert n >= 100 and ab["mismatches"] == 0
    share = ab["observed_share"]["1b"]
    assert abs(share - 0.7) <= 4 * math.sqrt(0.7 * 0.3 / n), ab  # 4 standard errors: fails ~1 run in 16,000
    lo, hi = ab["ci95"]["1b"]
    assert lo <= share <= hi and hi - lo < 0.25
    assert ab["target_share"] == {"1b": 0.7, "3b": 0.3}
    assert ab["sticky"]["users"] > 0 and ab["sticky"]["consistent_users"] == ab["sticky"]["users"]

    overhead = s["routing_overhead"]
    assert overhead["source"] is not None and overhead["count"] > 0
    assert 0 <= overhead["p50_ms"] <= overhead["p95_ms"]
    assert overhead["p50_ms"] < overhead["target_ms"] == 10
    assert overhead["picker_decision_ms"]["p50"] is not None

    for name in CHARTS:
        assert (report / name).stat().st_size > 5000, name
        assert f'src="{name}"' in (report / "index.html").read_text()

    assert_nothing_left(demo, [*demo.ports.values(), *demo.sim_ports()])


def test_ctrl_c_mid_run_stops_every_process(demo: Demo) -> None:
    demo.start()  # no --duration: 60 s of scenarios, then the gateway stays up until Ctrl-C
    demo.wait_for("phase 1/3", timeout=60)
    demo.wait_for(" req/s", timeout=10)  # the first status line: requests are in flight
    assert demo.proc is not None
    demo.proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    demo.wait_for("stopped every process", timeout=30)
    assert demo.finish(timeout=10) in (0, 130), demo.output
    assert time.monotonic() - started < 20
    assert "summary (interrupted)" in demo.output
    assert_nothing_left(demo, [*demo.ports.values(), *demo.sim_ports()])


def test_ctrl_c_while_starting_stops_what_had_started(demo: Demo) -> None:
    demo.start("--duration", "5")
    demo.wait_for("starting 4 simulated vLLM replicas", timeout=30)
    time.sleep(1.5)  # some replicas are up, the rest still starting
    assert demo.proc is not None
    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(timeout=30) in (0, 130), demo.output
    assert_nothing_left(demo, list(demo.ports.values()))


def test_demo_names_the_option_of_a_taken_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        others = [x for option in PORT_OPTIONS[:3] for x in (option, str(free_port()))]
        done = subprocess.run(
            demo_argv(*others, "--metrics-port", str(port), "--duration", "1"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert f"port {port}" in done.stderr and "--metrics-port" in done.stderr
