"""Small HTTP helpers the tests share: real requests to real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(
    method: str,
    url: str,
    body: bytes | dict[str, Any] | None = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> Reply:
    data = orjson.dumps(body) if isinstance(body, dict) else body
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Reply(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read(), dict(exc.headers))


def post(url: str, body: bytes | dict[str, Any], timeout: float = 30.0, **kw: Any) -> Reply:
    return request("POST", url, body, timeout, **kw)


def get(url: str, timeout: float = 30.0) -> Reply:
    return request("GET", url, None, timeout)


def envoy_stat(admin_port: int, name: str) -> int:
    """One counter from Envoy's admin /stats (e.g. http.gateway.ext_proc.failure_mode_allowed); 0 if absent."""
    for line in get(f"http://127.0.0.1:{admin_port}/stats?filter=^{name}$").body.decode().splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def metrics(base: str) -> dict[str, float]:
    """Every sample of a /metrics page, keyed by name plus sorted labels except model/engine."""
    text = get(f"{base}/metrics").body.decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
            key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = sample.value
    return out


async def stream_chat(base: str, body: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
    """Send a streaming chat request; return the client-side time to first token and the events."""
    events: list[dict[str, Any]] = []
    ttft = float("nan")
    start = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.strip()
            if not line:
                continue
            assert line.startswith(b"data: "), line
            payload = line[6:]
            if payload == b"[DONE]":
                events.append({"done": True})
                break
            event = orjson.loads(payload)
            if ttft != ttft and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                ttft = time.monotonic() - start
            events.append(event)
    return ttft, events


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def prometheus_missing() -> str | None:
    """Why there is no prometheus binary to start (the install hint), or None when there is one."""
    from extproc.local.prometheus import PrometheusMissing, find_prometheus

    try:
        find_prometheus()
    except PrometheusMissing as exc:
        return f"no prometheus binary (sudo apt-get install prometheus): {exc}"
    return None


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``condition`` on the running event loop until it holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


# ----- benchmark runs: every process a run starts is found by its environment and stopped by PID -----------

TAG_VARIABLE = "EXTPROC_TEST_TAG"


def tagged(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``TAG_VARIABLE=tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def run_tagged(argv: list[str], env: dict[str, str], tag: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a benchmark to its end (SIGTERM after ``timeout``), then SIGKILL whatever carrying ``tag`` it left."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmarks stop their children on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"benchmark took over {timeout:.0f}s\n{out[-3000:]}\n{err[-3000:]}") from None
    finally:
        for pid in tagged(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
