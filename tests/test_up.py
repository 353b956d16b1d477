"""`extproc up`: the whole local gateway from one command, and nothing left behind when it stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

from extproc.local.procs import extproc_argv, free_port, port_free
from tests.helpers import post


def test_up_serves_both_pools_and_stops_everything(tmp_path) -> None:
    ports = {name: free_port() for name in ("--port", "--admin-port", "--extproc-port", "--metrics-port")}
    argv = extproc_argv("up", "--log-dir", str(tmp_path), *(x for kv in ports.items() for x in (kv[0], str(kv[1]))))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        output = []
        for line in proc.stdout:
            output.append(line)
            if "Ctrl-C stops everything" in line:
                break
        else:
            raise AssertionError("".join(output))
        gateway = f"http://127.0.0.1:{ports['--port']}"
        for path, model in (
            ("/v1/1b/chat/completions", "llama-3-2-1b"),
            ("/v1/3b/chat/completions", "llama-3-2-3b"),
            ("/v1/chat/completions", "llama-3-2-3b"),
        ):
            reply = post(gateway + path, {"model": model, "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status == 200 and reply.json()["model"] == model
        sim_ports = [
            int(a.rsplit(":", 1)[1]) for line in output if "pool " in line for a in line.split(": ")[1].split(", ")
        ]
        assert len(sim_ports) == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:  # the test failed midway: let `up` stop its children, then make sure it is gone
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    time.sleep(0.5)
    assert all(port_free(p) for p in [*ports.values(), *sim_ports])


def test_up_names_the_option_of_a_taken_port(tmp_path) -> None:
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
