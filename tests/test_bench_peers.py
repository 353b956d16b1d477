"""`extproc bench peers`: the client's measurements against a scripted stream, the checks, and a short real run.

The smoke run (about 30 s: three routers, one workload, cells of 3 s) needs sglang-router and vllm-router
(`pip install -e '.[peers]'`) and is skipped, saying so, without them. Like the routing benchmark's test, every
process it starts carries a unique environment variable, so whatever it left behind is found and stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from extproc.bench.peers.checks import done_when
from extproc.bench.peers.cpu import tree_seconds
from extproc.bench.peers.report import ROWS
from extproc.bench.peers.routers import INSTALL_HINT, find_program
from extproc.bench.peers.stream import Timing, stream_one, streaming
from extproc.bench.peers.summary import LATENCIES
from extproc.bench.workloads import make_workload
from tests.helpers import TAG_VARIABLE, run_tagged, tagged

SMOKE_ROUTERS = ("extproc", "sglang-cache_aware", "vllm-round_robin")


def _chunk(delta: dict[str, str] | None = None, usage: dict[str, object] | None = None) -> bytes:
    body = {"choices": [] if delta is None else [{"index": 0, "delta": delta}], **({"usage": usage} if usage else {})}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def _scripted(request: web.Request) -> web.StreamResponse:
    """vLLM's shape: the role chunk at once, text 200 ms later, then 50 ms later, usage, [DONE]."""
    if not (await request.json()).get("stream"):
        return web.json_response({"error": "expected stream: true"}, status=400)
    if request.path.endswith("/fail"):
        return web.json_response({"error": "busy"}, status=503)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_chunk({"role": "assistant", "content": ""}))
    await asyncio.sleep(0.2)
    await response.write(_chunk({"content": "Hello"}))
    await asyncio.sleep(0.05)
    await response.write(_chunk({"content": " there"}))
    usage = {"prompt_tokens": 100, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 64}}
    await response.write(_chunk(usage=usage) + b"data: [DONE]\n\n")
    return response


def test_client_times_the_first_text_chunk_not_the_role_chunk() -> None:
    async def main() -> tuple[Timing, str | None, Timing]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", _scripted)
        app.router.add_post("/v1/chat/completions/fail", _scripted)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        try:
            async with aiohttp.ClientSession() as session:
                good, bad = Timing(0, 0.0), Timing(1, 0.0)
                text = await stream_one(session, url, body, good, time.monotonic())
                await stream_one(session, url + "/fail", body, bad, time.monotonic())
        finally:
            await runner.cleanup()
        return good, text, bad

    good, text, bad = asyncio.run(main())
    assert good.ok and text == "Hello there" and good.chunks == 2
    assert 190 <= good.ttft_ms < 400, good  # the role chunk came at once; the text 200 ms later
    assert 40 <= good.itl_ms < 200 and good.e2e_ms >= good.ttft_ms + good.itl_ms, good
    assert (good.prompt_tokens, good.cached_tokens) == (100, 64)
    assert not bad.ok and bad.status == 503 and "busy" in bad.error and math.isnan(bad.ttft_ms)


def test_streaming_bodies_workloads_and_cpu() -> None:
    body = make_workload("multitenant", 1, 20.0, 10, 16).next(0).body
    sent = json.loads(streaming(body))
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == json.loads(body)["messages"]
    with pytest.raises(ValueError):
        streaming(streaming(body))
    # Sessions of one tenant share its system prompt; tenants' prompts differ.
    workload = make_workload("multitenant", 1, 20.0, 200, 16)
    systems = {}
    for i in range(200):
        turn = workload.next(i)
        messages = json.loads(turn.body)["messages"]
        systems.setdefault(messages[0]["content"][:40], set()).add(turn.key)
        workload.answered(turn, "answer")
    assert len(systems) == 32 and all(len(keys) >= 2 for keys in systems.values())
    spent = tree_seconds({"me": [os.getpid()], "gone": [2**22 + 7]})
    assert spent["me"] > 0 and spent["gone"] == 0


def test_done_when_checks_compare_the_right_routers() -> None:
    base = {"workload": "multitenant", "rate": 20.0, "ttft_p99_ms": 100.0, "router_log": {"render_lines": 0}}
    cells = [
        {**base, "router": "extproc", "ttft_mean_ms": 30.0, "hit_rate": 0.93},
        {**base, "router": "sglang-cache_aware", "ttft_mean_ms": 25.0, "hit_rate": 0.935},
        {**base, "router": "extproc-rr", "ttft_mean_ms": 66.0, "hit_rate": 0.45},
        {**base, "router": "sglang-round_robin", "ttft_mean_ms": 63.0, "hit_rate": 0.45},
        {**base, "router": "vllm-cache_aware", "ttft_mean_ms": 40.0, "hit_rate": 0.8},
        {**base, "router": "vllm-round_robin", "ttft_mean_ms": 63.0, "hit_rate": 0.44},
        {**base, "workload": "random", "router": "extproc", "ttft_mean_ms": 52.0, "hit_rate": 0.0},
        {**base, "workload": "random", "router": "sglang-power_of_two", "ttft_mean_ms": 50.0, "hit_rate": 0.0},
        {**base, "workload": "random", "router": "vllm-round_robin", "ttft_mean_ms": 55.0, "hit_rate": 0.0},
        {**base, "workload": "tenants", "router": "extproc-rr", "ttft_mean_ms": 90.0, "hit_rate": 0.1},
    ]
    rows = {(r["workload"], r["check"]): r for r in done_when(cells)}
    mean = rows[("multitenant", "extproc TTFT mean / sglang cache_aware's")]
    assert mean["value"] == pytest.approx(1.2) and mean["passed"] is False
    assert rows[("multitenant", "extproc TTFT p99 / sglang cache_aware's")]["passed"] is True
    assert rows[("multitenant", "extproc hit rate - sglang cache_aware's")]["passed"] is True  # -0.005
    assert rows[("multitenant", "extproc-rr TTFT mean - sglang round_robin's (ms)")]["value"] == pytest.approx(3.0)
    assert rows[("multitenant", "vllm cache_aware hit rate - round_robin's")]["passed"] is True
    best = rows[("random", "extproc TTFT mean / best peer's (sglang-power_of_two)")]
    assert best["value"] == pytest.approx(1.04) and best["passed"] is True
    assert rows[("tenants", "extproc-rr TTFT mean - sglang round_robin's (ms)")]["passed"] is None  # one side run
    assert ("random", "extproc-rr TTFT mean - sglang round_robin's (ms)") not in rows  # neither run
    assert ("tenants", "extproc TTFT mean / sglang cache_aware's") not in rows


def smoke_run(tmp_path: Path, bench: str, *options: str) -> tuple[str, dict[str, Any]]:
    """`extproc bench BENCH --quick` on multitenant at 20 req/s with 3 s cells: its stdout and its JSON; it must
    exit 0 and leave no process behind."""
    tag = uuid.uuid4().hex
    argv = [sys.executable, "-m", "extproc", "bench", bench, "--quick", "--workloads", "multitenant", "--rates", "20"]
    argv += ["--duration", "3", "--min-requests", "40", *options]
    argv += ["--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs")]
    result = run_tagged(argv, {**os.environ, TAG_VARIABLE: tag}, tag, timeout=180)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    time.sleep(0.5)
    assert tagged(tag) == [], "the benchmark left processes running"
    return result.stdout, json.loads((tmp_path / "out" / f"{bench}.json").read_text())


def test_quick_run_answers_every_request_through_every_router(tmp_path: Path) -> None:
    missing = [kind for kind in ("sglang", "vllm") if find_program(kind) is None]
    if missing:
        pytest.skip(f"{' and '.join(f'{k}-router' for k in missing)} not installed: {INSTALL_HINT}")
    stdout, data = smoke_run(tmp_path, "peers", "--routers", ",".join(SMOKE_ROUTERS))
    assert "[cell 3/3]" in stdout and "done-when checks" in stdout
    assert data["skipped"] == {} and data["failed_cells"] == []
    cells = {c["router"]: c for c in data["cells"]}
    assert set(cells) == set(SMOKE_ROUTERS)
    fields = [key for key, _, _ in ROWS] + [f"{n}_{s}_ms" for n in LATENCIES for s in ("mean", "p50", "p90", "p99")]
    fields += ["requests", "measured", "ok", "hit_rate_responses", "per_replica", "cpu_parts_ms_per_request"]
    for name, cell in cells.items():
        for key in fields:
            assert key in cell, f"{name}: {key} missing"
        # 20 req/s is under a third of what round robin sustains on multitenant: every request must be answered.
        assert cell["failed"] == 0 and cell["failed_warmup"] == 0, f"{name}: {cell['statuses']} {cell['errors']}"
        assert cell["ok"] == cell["measured"] > 20 and cell["requests"] >= 40, name
        assert sum(cell["per_replica"].values()) >= cell["ok"], name  # every replica's finished requests
        assert 0 < cell["ttft_p50_ms"] <= cell["ttft_p99_ms"] and cell["itl_mean_ms"] > 0, name
        assert 0.0 <= cell["hit_rate"] <= 1.0 and abs(cell["hit_rate"] - cell["hit_rate_responses"]) < 0.05, name
        assert cell["cpu_ms_per_request"] > 0 and cell["router_log"]["error_lines"] == 0, name
    assert set(cells["extproc"]["cpu_parts_ms_per_request"]) == {"envoy", "picker"}
    assert cells["extproc"]["picker_bypassed"] == 0
    checks = [r for r in data["checks"] if r["check"].startswith("extproc TTFT mean / sglang")]
    assert checks and checks[0]["value"] is not None
    out_dir = tmp_path / "out"
    assert (out_dir / "peers-multitenant.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| TTFT mean ms |" in (out_dir / "peers.md").read_text()


def test_policy_variants_take_a_scheduler_section_or_top_level_sections() -> None:
    from extproc.bench.peers.plan import policy_variants

    plain, whole = policy_variants(
        ["p={scorers: [{name: prefix}]}", "slow={scrape: {interval: 0.2}, scheduler: {picker: random}}"]
    )
    assert (plain.name, plain.scheduler, plain.settings) == ("extproc:p", {"scorers": [{"name": "prefix"}]}, None)
    assert (whole.name, whole.scheduler, whole.settings) == (
        "extproc:slow",
        {"picker": "random"},
        {"scrape": {"interval": 0.2}},
    )
    with pytest.raises(SystemExit, match="expected NAME="):
        policy_variants(["nothing"])


def test_replica_checks_compare_two_pickers_on_redis_with_one() -> None:
    base = {"workload": "tenants", "rate": 18.0, "router_log": {"render_lines": 0}}
    cells = [
        {**base, "router": "extproc", "ttft_mean_ms": 40.0, "ttft_p99_ms": 90.0, "hit_rate": 0.90},
        {**base, "router": "extproc-x2", "ttft_mean_ms": 60.0, "ttft_p99_ms": 150.0, "hit_rate": 0.80},
        {**base, "router": "extproc-x2-redis", "ttft_mean_ms": 42.0, "ttft_p99_ms": 95.0, "hit_rate": 0.88},
    ]
    rows = {r["check"]: r for r in done_when(cells)}
    assert set(rows) == {"2 pickers on Redis: hit rate / one picker's", "2 pickers on Redis: TTFT mean / one picker's"}
    hit = rows["2 pickers on Redis: hit rate / one picker's"]
    assert hit["value"] == pytest.approx(0.88 / 0.90) and hit["passed"] is True
    cells[2]["ttft_mean_ms"] = 45.0  # 1.125x one picker's
    assert {r["check"]: r for r in done_when(cells)}["2 pickers on Redis: TTFT mean / one picker's"]["passed"] is False


def test_bench_replicas_quick_run_answers_through_two_pickers_sharing_redis(tmp_path: Path) -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (Debian: apt-get install redis-server)")
    stdout, data = smoke_run(tmp_path, "replicas")
    assert "[cell 4/4]" in stdout and "2 pickers on Redis: hit rate / one picker's" in stdout
    assert "--workers 2 on Redis: picker CPU per request / one's" in stdout
    cells = {c["router"]: c for c in data["cells"]}
    assert set(cells) == {"extproc", "extproc-x2", "extproc-x2-redis", "extproc-w2-redis"}
    assert data["failed_cells"] == []
    for cell in cells.values():
        assert cell["failed"] == 0 and cell["ok"] == cell["measured"]
    assert set(cells["extproc-x2-redis"]["cpu_parts_ms_per_request"]) == {"envoy", "picker", "picker-2", "redis"}
