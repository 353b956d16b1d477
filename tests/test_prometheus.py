"""A real Prometheus beside the stack: its config, the missing-binary message, and every target scraped for real."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.config import parse_config
from extproc.local.procs import Child, extproc_argv, free_port
from extproc.local.prometheus import (
    INSTALL_HINT,
    Prometheus,
    PrometheusError,
    PrometheusMissing,
    find_prometheus,
    scrape_config,
    start_prometheus,
)
from extproc.local.stack import PoolSpec, SimReplica, Stack, start_stack
from tests.helpers import post, prometheus_missing

MODELS = {"1b": "llama-3-2-1b", "3b": "llama-3-2-3b"}


MISSING = prometheus_missing()
needs_prometheus = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def _fake_stack(tmp_path: Path) -> Stack:
    """A Stack with made-up addresses and no processes: enough for scrape_config."""
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:19002", "metrics_listen": "0.0.0.0:19090"},
            "pools": [
                {"name": "1b", "models": [MODELS["1b"]], "endpoints": {"static": ["127.0.0.1:18001"]}},
                {"name": "3b", "models": [MODELS["3b"]], "endpoints": {"static": ["127.0.0.1:18002"]}},
            ],
        }
    )
    fake_child: Any = None
    sims = {
        "1b": [SimReplica(fake_child, 18001), SimReplica(fake_child, 18003)],
        "3b": [SimReplica(fake_child, 18002)],
    }
    return Stack(tmp_path, config, tmp_path / "config.yaml", gateway_port=18080, admin_port=19901, sims=sims)


def test_scrape_config_has_one_job_per_kind_and_a_pool_label_per_simulator(tmp_path: Path) -> None:
    config = scrape_config(_fake_stack(tmp_path), scrape_interval=0.5)
    assert config["global"] == {"scrape_interval": "500ms", "scrape_timeout": "500ms", "evaluation_interval": "500ms"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"envoy", "extproc", "vllm"}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"] == [{"targets": ["127.0.0.1:19901"]}]
    assert jobs["extproc"]["static_configs"] == [{"targets": ["127.0.0.1:19090"]}]  # the wildcard host, reachable
    assert jobs["vllm"]["static_configs"] == [
        {"targets": ["127.0.0.1:18001", "127.0.0.1:18003"], "labels": {"pool": "1b"}},
        {"targets": ["127.0.0.1:18002"], "labels": {"pool": "3b"}},
    ]
    assert scrape_config(_fake_stack(tmp_path))["global"]["scrape_interval"] == "1s"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (sudo apt-get install prometheus)")
def test_promtool_accepts_the_config(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(scrape_config(_fake_stack(tmp_path))))
    done = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_find_prometheus_explains_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("EXTPROC_PROMETHEUS", raising=False)
    with pytest.raises(PrometheusMissing) as missing:
        find_prometheus()
    message = str(missing.value)
    assert "sudo apt-get install prometheus" in message
    assert "https://prometheus.io/download/" in message and "EXTPROC_PROMETHEUS" in message
    assert isinstance(missing.value, RuntimeError)

    monkeypatch.setenv("EXTPROC_PROMETHEUS", str(tmp_path / "nowhere" / "prometheus"))
    with pytest.raises(PrometheusMissing, match="EXTPROC_PROMETHEUS="):
        find_prometheus()

    fake = tmp_path / "my-prometheus"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("EXTPROC_PROMETHEUS", str(fake))
    assert find_prometheus() == str(fake)


@pytest.mark.parametrize("command", ["demo", "up"])
def test_a_missing_binary_stops_the_command_before_anything_starts(tmp_path: Path, command: str) -> None:
    ports = [x for option in ("--port", "--admin-port", "--extproc-port", "--metrics-port") for x in (option, "1")]
    done = subprocess.run(
        extproc_argv(command, "--prometheus", "--log-dir", str(tmp_path / "logs"), *ports),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EXTPROC_PROMETHEUS": str(tmp_path / "no-such-prometheus")},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert INSTALL_HINT in done.stderr
    assert not (tmp_path / "logs").exists()  # nothing started, not even a log folder


@pytest.mark.parametrize("clash", ["taken", "metrics-port"])
def test_the_prometheus_port_is_checked_with_the_others(tmp_path: Path, clash: str) -> None:
    fake = tmp_path / "prometheus"  # found, never started: the port check comes first
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    ports = {option: free_port() for option in ("--port", "--admin-port", "--extproc-port", "--metrics-port")}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1] if clash == "taken" else ports["--metrics-port"]
        done = subprocess.run(
            extproc_argv(
                "demo",
                "--prometheus",
                "--prometheus-port",
                str(port),
                "--log-dir",
                str(tmp_path / "logs"),
                *(x for option, p in ports.items() for x in (option, str(p))),
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "EXTPROC_PROMETHEUS": str(fake)},
        )
    assert done.returncode == 2, done.stdout + done.stderr
    if clash == "taken":
        assert f"port {port} on 127.0.0.1 is already in use: choose another with --prometheus-port" in done.stderr
    else:
        assert f"port {port} is given to both --metrics-port and --prometheus-port" in done.stderr
    assert not (tmp_path / "logs").exists()


# ----- end to end ------------------------------------------------------------------------------------


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    if MISSING is not None:
        pytest.skip(MISSING)
    pools = [PoolSpec(name, model, 1, ("--time-scale", "0")) for name, model in MODELS.items()]
    stack = start_stack(tmp_path / "logs", pools)
    try:
        yield stack
    finally:
        stack.stop()


def _poll(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return check()


def _values(prometheus: Prometheus, expr: str) -> list[float]:
    return [float(series["value"][1]) for series in prometheus.query(expr)]


def test_prometheus_scrapes_envoy_the_picker_and_every_simulator(stack: Stack, tmp_path: Path) -> None:
    prometheus = start_prometheus(stack, tmp_path / "logs")
    assert prometheus.child in stack.extras  # stack.stop() stops it too
    assert prometheus.url == f"http://127.0.0.1:{prometheus.port}"

    for i in range(10):
        for pool, model in MODELS.items():
            reply = post(
                f"{stack.gateway}/v1/{pool}/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}]},
            )
            assert reply.status == 200, reply.body

    targets = prometheus.wait_targets_up()
    by_job: dict[str, set[str]] = {}
    for target in targets:
        assert target["health"] == "up", target
        by_job.setdefault(target["labels"]["job"], set()).add(target["labels"]["instance"])
    sims = {r.address: pool for pool, replicas in stack.sims.items() for r in replicas}
    assert by_job == {
        "envoy": {f"127.0.0.1:{stack.admin_port}"},
        "extproc": {stack.config.server.metrics_listen},
        "vllm": set(sims),
    }

    running = prometheus.query("vllm:num_requests_running")
    assert {s["metric"]["instance"]: s["metric"]["pool"] for s in running} == sims
    assert len(running) == len(sims)

    envoy = 'envoy_cluster_upstream_rq_total{envoy_cluster_name="pool-1b"}'
    assert _poll(lambda: (v := _values(prometheus, envoy)) != [] and v[0] >= 10), prometheus.query(envoy)
    picker = "sum(extproc_requests_total)"
    assert _poll(lambda: (v := _values(prometheus, picker)) != [] and v[0] >= 20), prometheus.query(picker)
    assert len(prometheus.query("extproc_requests_total")) >= 2  # one series per pool at least

    with pytest.raises(PrometheusError, match="bad_data"):
        prometheus.query("sum(")

    child: Child = prometheus.child
    stack.stop()
    assert not child.alive()
