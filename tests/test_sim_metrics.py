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
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_params_n": "histogram",
    "vllm:request_params_max_tokens": "histogram",
    "vllm:iteration_tokens_total": "histogram",
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


def bucket_bounds(family: str, m: dict[str, float]) -> list[str]:
    prefix = f"{family}_bucket{{le="
    return [key[len(prefix) : -1] for key in m if key.startswith(prefix)]


def test_request_and_iteration_histograms(start_simulator) -> None:
    """n, max_tokens, inference time and tokens per engine step, observed when and as vLLM observes them."""
    s = start_simulator("--time-scale", "0")
    requests = [
        ({"prompt": "a" * 1200, "max_tokens": 5}, 300),  # 300 tokens: its first step holds 301
        ({"prompt": "b" * 12000, "max_tokens": 3}, 3000),  # chunked prefill: steps without output observe nothing
        ({"prompt": "c" * 40}, 10),  # no max_tokens: vLLM's sampling params hold the context left
        ({"prompt": list(range(7, 71)), "max_tokens": 2}, 64),
    ]
    inference = 0.0
    for body, prompt_tokens in requests:
        reply = post(f"{s.base}/v1/completions", {"model": "test-model", **body})
        assert reply.json()["usage"]["prompt_tokens"] == prompt_tokens
        headers = reply.headers
        inference += (float(headers["x-sim-e2e-ms"]) - float(headers["x-sim-queue-ms"])) / 1000
    m = metrics(s.base)
    generated = m["vllm:generation_tokens_total"]
    assert generated == 5 + 3 + 16 + 2
    assert m["vllm:request_params_n_count"] == 4 and m["vllm:request_params_n_sum"] == 4
    assert m["vllm:request_params_n_bucket{le=1.0}"] == 4
    assert bucket_bounds("vllm:request_params_n", m) == ["1.0", "2.0", "5.0", "10.0", "20.0", "+Inf"]
    assert m["vllm:request_params_max_tokens_sum"] == 5 + 3 + (8192 - 10) + 2
    assert m["vllm:request_params_max_tokens_bucket{le=2.0}"] == 1
    assert m["vllm:request_params_max_tokens_bucket{le=5000.0}"] == 3  # 8,182 only in +Inf
    # vLLM's token-count buckets: 1-2-5 up to max_model_len (8192 here).
    assert bucket_bounds("vllm:request_params_max_tokens", m)[-2:] == ["5000.0", "+Inf"]
    assert bucket_bounds("vllm:request_prompt_tokens", m) == bucket_bounds("vllm:request_params_max_tokens", m)
    assert m["vllm:request_inference_time_seconds_count"] == 4
    assert abs(m["vllm:request_inference_time_seconds_sum"] - inference) < 1e-4
    # One observation per step that produced tokens (one request at a time: one token each); the step that
    # finishes a prefill also counts the whole prompt.
    assert m["vllm:iteration_tokens_total_count"] == generated
    assert m["vllm:iteration_tokens_total_sum"] == m["vllm:prompt_tokens_total"] + generated
    assert m["vllm:iteration_tokens_total_bucket{le=1.0}"] == generated - 4
    assert m["vllm:iteration_tokens_total_bucket{le=16.0}"] == generated - 3  # + the 10-token prompt's step
    assert m["vllm:iteration_tokens_total_bucket{le=256.0}"] == generated - 2  # + the 64-token one
    assert m["vllm:iteration_tokens_total_bucket{le=512.0}"] == generated - 1  # + the 300-token one
    assert m["vllm:iteration_tokens_total_bucket{le=4096.0}"] == generated
    assert bucket_bounds("vllm:iteration_tokens_total", m)[:3] == ["1.0", "8.0", "16.0"]


def test_name_filter_answers_only_the_series_asked_for(sim: Sim) -> None:
    """``?name[]=`` as prometheus_client's exposition answers it (vLLM mounts that at /metrics): what the
    picker's scraper asks for, so a scrape does not make the replica render every histogram."""
    post(f"{sim.base}/v1/chat/completions", {"model": "test-model", "messages": [{"role": "user", "content": "x"}]})
    wanted = ["vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:cache_config_info", "vllm:e2e_latency"]
    query = "&".join(f"name[]={name}" for name in wanted)
    reply = get(f"{sim.base}/metrics?{query}")
    families = {f.name for f in text_string_to_metric_families(reply.body.decode())}
    assert families == {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:cache_config_info"}
    histogram = get(f"{sim.base}/metrics?name[]=vllm:e2e_request_latency_seconds_count").body.decode()
    assert "vllm:e2e_request_latency_seconds_count" in histogram and "_bucket" not in histogram
    assert len(get(f"{sim.base}/metrics").body) > 20 * len(reply.body)
