"""`extproc serve --workers N`: N processes on one gRPC port, connections spread over them, each its metrics."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import grpc
import yaml

from extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from extproc.local.procs import Child, extproc_argv, free_port, free_ports, port_free
from tests.helpers import metrics
from tests.test_server_grpc import body, chat, headers


def handled(base: str) -> float:
    return sum(v for k, v in metrics(base).items() if k.startswith("extproc_requests_total"))


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def test_two_workers_share_the_port_and_each_serves_its_own_metrics(tmp_path: Path) -> None:
    port = free_port()
    metrics_port = free_ports(2)
    config = {
        "server": {"listen": f"127.0.0.1:{port}", "metrics_listen": f"127.0.0.1:{metrics_port}", "grace_period": 1},
        "pools": [{"name": "a", "models": ["model-a"], "endpoints": {"static": ["127.0.0.1:1", "127.0.0.1:2"]}}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    parent = Child("workers", extproc_argv("serve", "--config", str(path), "--workers", "2"), tmp_path)
    bases = [f"http://127.0.0.1:{metrics_port}", f"http://127.0.0.1:{metrics_port + 1}"]
    try:
        parent.wait_http(bases[0] + "/metrics")
        parent.wait_http(bases[1] + "/metrics")
        # Each new channel is a new connection, which the kernel hands to one of the two listeners.
        for _ in range(40):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = ep_grpc.ExternalProcessorStub(channel)
                answers = list(stub.Process(iter([headers(), body(chat())])))
                assert len(answers) == 2
        counts = [handled(b) for b in bases]
        print(counts)
        assert sum(counts) == 40 and min(counts) >= 5, counts  # both workers served connections
        assert "without state.backend: redis" in parent.log_tail(50)  # said at start

        workers = children_of(parent.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)  # a worker that dies is started again
        deadline = time.monotonic() + 20
        while not (len(children_of(parent.pid)) == 2 and workers[0] not in children_of(parent.pid)):
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.05)
        parent.wait_http(bases[0] + "/metrics")
    finally:
        parent.stop()
    assert parent.proc.returncode == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers[1:]), "a worker outlived the parent"


def _config(tmp_path: Path, listen: str, metrics_listen: str) -> Path:
    config = {
        "server": {"listen": listen, "metrics_listen": metrics_listen, "grace_period": 1},
        "pools": [{"name": "a", "models": ["m"], "endpoints": {"static": ["127.0.0.1:1"]}}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_worker_metrics_port_in_use_is_an_error_naming_it_not_a_restart_loop(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_ports(2)
    path = _config(tmp_path, f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}")
    with socket.socket() as holder:  # another program holds worker 1's metrics port
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", metrics_port + 1))
        holder.listen()
        parent = Child("workers", extproc_argv("serve", "--config", str(path), "--workers", "2"), tmp_path)
        assert parent.proc.wait(30) == 2
        parent.stop()
        assert f"127.0.0.1:{metrics_port + 1} is in use" in parent.log_path.read_text()

        # The same worker started alone (as when the port is taken between the check and the start): it
        # says which address, exits 2, and leaves the gRPC port it had bound free again.
        worker = Child(
            "worker", extproc_argv("serve", "--config", str(path), "--workers", "2", "--worker-index", "1"), tmp_path
        )
        assert worker.proc.wait(30) == 2
        worker.stop()
        assert f"cannot serve metrics on 127.0.0.1:{metrics_port + 1}" in worker.log_path.read_text()
        assert port_free(port)


def test_a_worker_that_cannot_start_stops_all_workers(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: binding it fails (nothing is sent anywhere).
    path = _config(tmp_path, f"192.0.2.1:{free_port()}", f"127.0.0.1:{free_ports(2)}")
    parent = Child("workers", extproc_argv("serve", "--config", str(path), "--workers", "2"), tmp_path)
    assert parent.proc.wait(30) == 2
    parent.stop()
    log = parent.log_path.read_text()
    assert "cannot listen on 192.0.2.1" in log and "stopping all workers" in log
    assert "starting it again" not in log


def test_workers_need_a_tcp_port(tmp_path: Path) -> None:
    path = _config(tmp_path, "unix:/tmp/x.sock", f"127.0.0.1:{free_port()}")
    child = Child("workers", extproc_argv("serve", "--config", str(path), "--workers", "2"), tmp_path)
    assert child.proc.wait(30) == 2
    child.stop()
    assert "SO_REUSEPORT does not apply to unix sockets" in child.log_path.read_text()


def test_bench_picker_drives_one_and_two_workers_over_grpc(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "picker.json"
    argv = [sys.executable, "-m", "extproc", "bench", "picker", "--workers", "1,2", "--duration", "1.5"]
    argv += ["--clients", "1", "--connections", "4", "--streams", "2", "--replicas", "2", "--json", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"1", "2"}
    for workers, case in cases.items():
        assert case["completed"] > 10 and case["picker_cpu_us_per_request"] > 0 and case["decision_mean_us"] > 0
        assert len(case["per_worker"]) == int(workers)
    assert "2 workers: picker CPU per request" in result.stdout
