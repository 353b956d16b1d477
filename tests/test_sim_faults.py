"""Fault injection: errors, slowness, and a replica that stops answering."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from extproc.datalayer.scrape import MetricsParseError, parse_vllm_metrics
from tests.helpers import get, post, run

GOOD = {"model": "test-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def test_error_rate_one_fails_every_inference(start_simulator) -> None:
    s = start_simulator("--time-scale", "0", "--error-rate", "1")
    reply = post(f"{s.base}/v1/chat/completions", GOOD)
    assert reply.status == 500 and reply.json()["error"]["code"] == 500
    assert get(f"{s.base}/health").status == 200  # only inference fails


def test_error_rate_half_fails_about_half(start_simulator) -> None:
    s = start_simulator("--time-scale", "0", "--error-rate", "0.5")
    statuses = [post(f"{s.base}/v1/chat/completions", GOOD).status for _ in range(200)]
    assert 60 <= statuses.count(500) <= 140


def test_delay_and_hang_at_run_time(start_simulator) -> None:
    s = start_simulator("--time-scale", "0")
    assert post(f"{s.base}/sim/faults", {"delay_ms": 300}).json()["delay"] == 0.3
    start = time.monotonic()
    assert post(f"{s.base}/v1/chat/completions", GOOD).status == 200
    assert time.monotonic() - start >= 0.3
    post(f"{s.base}/sim/faults", {"delay_ms": 0, "hang": True})

    async def go() -> int:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.create_task(session.post(f"{s.base}/v1/chat/completions", json=GOOD))
            try:
                async with session.get(f"{s.base}/metrics", timeout=aiohttp.ClientTimeout(total=0.5)):
                    raise AssertionError("a hung simulator answered /metrics")
            except TimeoutError:
                pass
            await asyncio.sleep(0.2)
            assert not pending.done()
            async with session.get(f"{s.base}/sim/state") as r:
                assert r.status == 200  # the control plane still answers
            async with session.post(f"{s.base}/sim/faults", json={"hang": False}) as r:
                assert r.status == 200
            response = await asyncio.wait_for(pending, 5)
            response.release()
            return response.status

    assert run(go()) == 200


def test_slow_and_garbage_metrics_touch_metrics_only(start_simulator) -> None:
    s = start_simulator("--time-scale", "0")
    assert post(f"{s.base}/sim/faults", {"metrics_delay_ms": 400}).json()["metrics_delay"] == 0.4
    start = time.monotonic()
    assert get(f"{s.base}/metrics").status == 200
    assert time.monotonic() - start >= 0.4
    start = time.monotonic()
    assert post(f"{s.base}/v1/chat/completions", GOOD).status == 200
    assert time.monotonic() - start < 0.4  # inference is not delayed
    post(f"{s.base}/sim/faults", {"metrics_delay_ms": 0, "metrics_garbage": True})
    reply = get(f"{s.base}/metrics")
    assert reply.status == 200 and b"vllm:num_requests_waiting " not in reply.body
    with pytest.raises(MetricsParseError):
        parse_vllm_metrics(reply.body)
    post(f"{s.base}/sim/faults", {"metrics_garbage": False})
    assert parse_vllm_metrics(get(f"{s.base}/metrics").body).waiting == 0


def test_bad_fault_settings_are_refused(start_simulator) -> None:
    s = start_simulator("--time-scale", "0")
    bad = ({"error_rate": 2}, {"delay_ms": -1}, {"hang": "yes"}, {"unknown": 1})
    for body in (*bad, {"metrics_delay_ms": -5}, {"metrics_garbage": 1}):
        assert post(f"{s.base}/sim/faults", body).status == 400


def test_bad_cli_settings_exit_with_a_clear_message(tmp_path) -> None:
    import subprocess

    from extproc.local.procs import extproc_argv

    for args, needle in (
        (["--block-size", "0"], "--block-size"),
        (["--num-gpu-blocks", "4", "--max-model-len", "4096"], "--max-model-len"),
        (["--error-rate", "3"], "--error-rate"),
    ):
        done = subprocess.run(
            extproc_argv("sim", "--model", "m", "--port", "1", *args), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2
        assert needle in done.stderr


def test_port_in_use_is_reported(start_simulator) -> None:
    import subprocess

    from extproc.local.procs import extproc_argv

    s = start_simulator("--time-scale", "0")
    done = subprocess.run(
        extproc_argv("sim", "--model", "m", "--port", str(s.port)), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "already in use" in done.stderr
