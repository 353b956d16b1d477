"""Between cells: restart the picker with the next policy and leave every replica idle with an empty cache."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from extproc.bench.routing.cell import COUNTERS
from extproc.bench.workloads import MODEL
from extproc.local import promtext
from extproc.names import PICKED_HEADER

if TYPE_CHECKING:
    from extproc.local.stack import Stack


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:
        return 0, {}


def _replica_metrics(bases: Sequence[str]) -> dict[str, dict[str, float]]:
    return {base: promtext.sum_samples(_get(f"{base}/metrics").decode(), COUNTERS) for base in bases}


def _wait_idle(bases: Sequence[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        snapshot = _replica_metrics(bases)
        busy = sum(m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"] for m in snapshot.values())
        if busy == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas still busy after {timeout:.0f}s: {busy:.0f} requests")
        time.sleep(0.05)


def _write_scheduler(stack: Stack, section: dict[str, Any]) -> dict[str, Any]:
    """Put ``section`` in the stack's config file as ``scheduler:``; return the effective scheduler settings."""
    from extproc.config import ConfigError, parse_config

    data = yaml.safe_load(stack.config_path.read_text())
    data["scheduler"] = section
    try:
        effective = parse_config(data).scheduler.model_dump(mode="json")
    except ConfigError as exc:
        raise SystemExit(f"scheduler section {section!r}: {exc}") from None
    stack.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return effective


def switch_policy(stack: Stack, section: dict[str, Any], bases: Sequence[str], settle: float) -> dict[str, Any]:
    """Restart the ext_proc with ``section``; leave every replica idle with an empty prefix cache."""
    if stack.extproc is not None:
        stack.extproc.stop()
        stack.extproc = None
    effective = _write_scheduler(stack, section)
    _wait_idle(bases)
    stack.start_extproc()
    # Envoy reconnects to the new ext_proc on the next request: probe until the picker answers (a prompt
    # shorter than one block, so it leaves nothing in any cache or prefix index).
    probe = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})
    deadline = time.monotonic() + 20
    while True:
        status, headers = post(stack.gateway + "/v1/chat/completions", probe)
        if status == 200 and headers.get(PICKED_HEADER, "-") not in ("", "-"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the picker did not answer through Envoy (last status {status})")
        time.sleep(0.05)
    _wait_idle(bases)
    for base in bases:
        post(f"{base}/reset_prefix_cache", b"")
    time.sleep(settle)  # a few fresh scrapes of the idle pool
    return effective
