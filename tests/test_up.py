"""`extproc up`: the whole local gateway from one command, the write-up's `curl` scenarios against it, the user's
own configuration file with `--config`, and nothing left behind when it stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import yaml

from extproc.local.multi_model import AB_ROUTE, STICKY_HEADER
from extproc.local.procs import extproc_argv, free_port, port_free
from tests.conftest import Sim
from tests.helpers import get, post, prometheus_missing

MODELS = {"1b": "llama-3-2-1b", "3b": "llama-3-2-3b"}
AB_REQUESTS = 60  # 70/30 draws: 42 +- 3.5 answers from 1b; the bounds below are 4 standard deviations away


class Up:
    """One `extproc up` subprocess, read until it says it is running; stopped by PID whatever happens."""

    def __init__(self, *args: str, timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            extproc_argv("up", *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        assert self.proc.stdout is not None
        watchdog = threading.Timer(timeout, self.proc.terminate)  # a start that hangs ends the read below
        watchdog.start()
        try:
            for line in self.proc.stdout:
                self.output.append(line)
                if "Ctrl-C stops everything" in line:
                    break
            else:
                self.cleanup()
                raise AssertionError("".join(self.output))
        finally:
            watchdog.cancel()

    @property
    def text(self) -> str:
        return "".join(self.output)

    def pool_addresses(self) -> dict[str, list[str]]:
        """The `pool NAME (MODELS): ADDR, ADDR` lines."""
        return {
            line.split()[1]: line.split(": ", 1)[1].strip().split(", ")
            for line in self.output
            if line.startswith("  pool ")
        }

    def stop(self) -> int:
        """Ctrl-C, as a user would; its exit status."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        self.cleanup()
        return code

    def cleanup(self) -> None:
        if self.proc.poll() is None:  # a test failed midway: let `up` stop its children, then make sure it is gone
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def assert_ports_freed(ports: list[int]) -> None:
    deadline = time.monotonic() + 5
    while not all(port_free(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in ports if not port_free(p)] == []


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, dict[str, int]]]:
    """One `extproc up` for the tests of the simulated gateway; the last test stops it."""
    ports = {name: free_port() for name in ("--port", "--admin-port", "--extproc-port", "--metrics-port")}
    log_dir = tmp_path_factory.mktemp("up")
    running = Up("--log-dir", str(log_dir), *(x for kv in ports.items() for x in (kv[0], str(kv[1]))))
    try:
        yield running, ports
    finally:
        running.cleanup()


def chat(model: str, content: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def test_up_serves_both_pools(up: tuple[Up, dict[str, int]]) -> None:
    running, ports = up
    gateway = f"http://127.0.0.1:{ports['--port']}"
    for path, model in (
        ("/v1/1b/chat/completions", "llama-3-2-1b"),
        ("/v1/3b/chat/completions", "llama-3-2-3b"),
        ("/v1/chat/completions", "llama-3-2-3b"),
    ):
        reply = post(gateway + path, {"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status == 200 and reply.json()["model"] == model
    assert [len(addresses) for addresses in running.pool_addresses().values()] == [2, 2]


def json_answer(reply_headers: dict[str, str], body: bytes) -> dict[str, object]:
    """The answer as JSON, failing on any other content type or an unparsable body."""
    content_type = {k.lower(): v for k, v in reply_headers.items()}.get("content-type", "")
    assert content_type.startswith("application/json"), (content_type, body[:200])
    answer = orjson.loads(body)
    assert isinstance(answer, dict)
    return answer


def test_the_write_ups_curl_scenarios_get_json_from_the_right_pool(up: tuple[Up, dict[str, int]]) -> None:
    """../shared/seed/multi-model-demo.md: 1B by path, 3B by path, and the A/B loop with "model": "auto"."""
    running, ports = up
    gateway = f"http://127.0.0.1:{ports['--port']}"
    for pool in ("1b", "3b"):
        reply = post(f"{gateway}/v1/{pool}/chat/completions", chat(MODELS[pool], f"Hello from {pool.upper()} model!"))
        assert reply.status == 200, reply.body
        assert json_answer(reply.headers, reply.body)["model"] == MODELS[pool]
        assert reply.headers["x-gateway-pool"] == pool

    served: Counter[str] = Counter()
    for i in range(1, AB_REQUESTS + 1):
        reply = post(f"{gateway}/v1/{AB_ROUTE}/chat/completions", chat("auto", f"Test A/B routing #{i}"))
        assert reply.status == 200, reply.body
        pool = reply.headers["x-gateway-pool"]
        assert json_answer(reply.headers, reply.body)["model"] == MODELS[pool]  # the drawn pool answered
        served[pool] += 1
    assert set(served) == {"1b", "3b"}
    assert 27 <= served["1b"] <= 56, served  # 70% of 60 is 42

    # What `up` prints for a new user to try includes the A/B split and its curl command.
    assert f"A/B split /v1/{AB_ROUTE}/...: 1b 70% / 3b 30%, sticky on {STICKY_HEADER}" in running.text
    assert f"curl -s {gateway}/v1/{AB_ROUTE}/chat/completions" in running.text


def test_ctrl_c_stops_everything(up: tuple[Up, dict[str, int]]) -> None:
    running, ports = up
    sims = [int(a.rsplit(":", 1)[1]) for addresses in running.pool_addresses().values() for a in addresses]
    assert len(sims) == 4
    assert running.stop() == 0
    assert_ports_freed([*ports.values(), *sims])


def test_up_names_the_option_of_a_taken_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            extproc_argv(
                "up",
                "--metrics-port",
                str(port),
                "--port",
                str(free_port()),
                "--admin-port",
                str(free_port()),
                "--extproc-port",
                str(free_port()),
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert f"port {port}" in done.stderr and "--metrics-port" in done.stderr


# ----- --config FILE: the user's own file, in front of model servers the test starts ----------------------------


def user_config(tmp_path: Path, small: str, large: str) -> tuple[Path, dict[str, int]]:
    """A file as a user writes it: two pools of their own model servers (addresses) and a 50/50 split."""
    listen = {"listen": free_port(), "metrics_listen": free_port()}
    data = {
        "server": {key: f"127.0.0.1:{port}" for key, port in listen.items()},
        "pools": [
            {"name": "small", "models": ["small-model"], "endpoints": {"static": [small]}},
            {"name": "large", "models": ["large-model"], "endpoints": {"static": [large]}},
        ],
        "splits": [{"name": "canary", "backends": [{"pool": "small", "weight": 1}, {"pool": "large", "weight": 1}]}],
    }
    path = tmp_path / "my-gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, listen


@pytest.fixture
def user_servers(start_simulator: Callable[..., Sim]) -> tuple[Sim, Sim]:
    return start_simulator(model="small-model"), start_simulator(model="large-model")


def test_up_config_runs_the_gateway_of_the_users_file(tmp_path: Path, user_servers: tuple[Sim, Sim]) -> None:
    small, large = user_servers
    config, listen = user_config(tmp_path, small.address, large.address)
    ports = {"--port": free_port(), "--admin-port": free_port()}
    running = Up("--config", str(config), "--log-dir", str(tmp_path / "logs"), *(f"{k}={v}" for k, v in ports.items()))
    try:
        assert "simulated" not in running.text  # no simulators: the file's endpoints are the model servers
        assert f"extproc serve --config {config}" in running.text
        assert running.pool_addresses() == {"small": [small.address], "large": [large.address]}
        assert "A/B split /v1/canary/...: small 50% / large 50%" in running.text
        assert get(f"http://127.0.0.1:{listen['metrics_listen']}/metrics").status == 200  # where the file says

        gateway = f"http://127.0.0.1:{ports['--port']}"
        for path, model, pool in (
            ("/v1/small/chat/completions", "small-model", "small"),
            ("/v1/chat/completions", "large-model", "large"),
        ):
            reply = post(gateway + path, chat(model, "hi"))
            assert reply.status == 200, reply.body
            assert reply.json()["model"] == model and reply.headers["x-gateway-pool"] == pool
        reply = post(f"{gateway}/v1/canary/chat/completions", chat("auto", "hi"))
        assert reply.status == 200 and reply.json()["model"] in ("small-model", "large-model")

        assert running.stop() == 0
    finally:
        running.cleanup()
    assert_ports_freed([*ports.values(), *listen.values()])
    assert small.child.alive() and large.child.alive()  # the user's servers are not `up`'s to stop


@pytest.mark.skipif(prometheus_missing() is not None, reason=str(prometheus_missing()))
def test_up_config_with_prometheus_scrapes_the_files_endpoints(tmp_path: Path, user_servers: tuple[Sim, Sim]) -> None:
    small, large = user_servers
    config, listen = user_config(tmp_path, small.address, large.address)
    ports = {"--port": free_port(), "--admin-port": free_port(), "--prometheus-port": free_port()}
    args = ["--config", str(config), "--prometheus", *(f"{k}={v}" for k, v in ports.items())]
    running = Up(*args, "--log-dir", str(tmp_path / "logs"))
    try:
        assert "scrapes Envoy, the picker and 2 model servers" in running.text
        reply = get(f"http://127.0.0.1:{ports['--prometheus-port']}/api/v1/targets?state=active")
        targets = orjson.loads(reply.body)["data"]["activeTargets"]
        scraped: dict[str, list[str]] = defaultdict(list)
        for t in targets:
            scraped[t["labels"]["job"]].append(t["scrapeUrl"])
        assert sorted(scraped["vllm"]) == sorted(f"http://{s.address}/metrics" for s in (small, large))
        assert scraped["extproc"] == [f"http://127.0.0.1:{listen['metrics_listen']}/metrics"]
        assert running.stop() == 0
    finally:
        running.cleanup()
    assert_ports_freed([*ports.values(), *listen.values()])


@pytest.mark.parametrize(
    ("option", "field"), [("--extproc-port", "server.listen"), ("--metrics-port", "server.metrics_listen")]
)
def test_up_config_refuses_the_ports_its_file_decides(tmp_path: Path, option: str, field: str) -> None:
    config, _listen = user_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2")  # refused before anything is reached
    done = subprocess.run(
        extproc_argv("up", "--config", str(config), option, str(free_port()), "--log-dir", str(tmp_path / "logs")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert option in done.stderr and field in done.stderr and str(config) in done.stderr
    assert not (tmp_path / "logs").exists()  # nothing started


def test_up_config_fails_on_an_invalid_file_before_anything_starts(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"pools": [{"name": "x", "models": ["m"], "endpoints": {"static": ["vllm:80"]}}]}))
    done = subprocess.run(
        extproc_argv("up", "--config", str(config), "--log-dir", str(tmp_path / "logs")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(config) in done.stderr and "pools.0.endpoints.static" in done.stderr
    assert not (tmp_path / "logs").exists()
