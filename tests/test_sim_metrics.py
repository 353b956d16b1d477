"""/metrics: vLLM's names, types and labels, carrying the simulator's real state."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Sim
from tests.helpers import get, metrics, post, run

EXPECTED = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
}


def test_names_types_and_labels_parse(sim: Sim) -> None:
    post(f"{sim.base}/v1/chat/completions", {"model": "test-model", "messages": [{"role": "user", "content": "x"}]})
    reply = get(f"{sim.base}/metrics")
    assert reply.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    for name, kind in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
    for name in EXPECTED:
        if name == "vllm:cache_config_info":
            continue
        for sample in families[name].samples:
            assert sample.labels["model_name"] == "test-model" and sample.labels["engine"] == "0", sample
    info = families["vllm:cache_config_info"].samples[0]
    assert info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == "32768"
    assert {s.labels.get("finished_reason") for s in families["vllm:request_success"].samples} >= {"stop", "length"}
    assert "_created" not in reply.body.decode()
    assert "vllm:request_success_total" in reply.body.decode()


def test_counters_equal_what_responses_report(sim: Sim) -> None:
    prompt_tokens = cached_tokens = completion_tokens = 0
    for i in range(6):
        usage = post(
            f"{sim.base}/v1/completions",
            {"model": "test-model", "prompt": "shared prefix " * 40 + str(i % 2), "max_tokens": 3 + i},
        ).json()["usage"]
        prompt_tokens += usage["prompt_tokens"]
        cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        completion_tokens += usage["completion_tokens"]
    m = metrics(sim.base)
    assert cached_tokens > 0
    assert m["vllm:prefix_cache_queries_total"] == prompt_tokens
    assert m["vllm:prompt_tokens_total"] == prompt_tokens
    assert m["vllm:prefix_cache_hits_total"] == cached_tokens
    assert m["vllm:generation_tokens_total"] == completion_tokens
    assert m["vllm:request_success_total{finished_reason=length}"] == 6
    assert m["vllm:time_to_first_token_seconds_count"] == 6
    assert m["vllm:inter_token_latency_seconds_count"] == completion_tokens - 6


def test_gauges_show_live_state(start_simulator) -> None:
    s = start_simulator("--time-scale", "1")
    body = {"model": "test-model", "messages": [{"role": "user", "content": "y" * 4000}], "max_tokens": 100}

    async def go() -> list[dict[str, float]]:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(session.post(f"{s.base}/v1/chat/completions", json=body)) for _ in range(4)]
            await asyncio.sleep(0.2)
            during = metrics(s.base)
            for t in tasks:
                (await t).release()
            return [during, metrics(s.base)]

    during, after = run(go())
    assert during["vllm:num_requests_running"] == 4
    assert during["vllm:kv_cache_usage_perc"] > 0
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
