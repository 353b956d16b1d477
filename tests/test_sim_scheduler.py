"""The scheduler: max running, FIFO waiting, 429 when the queue is full, load slows everyone."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.helpers import metrics, run


async def concurrent(base: str, n: int, body: dict, watch: bool = False) -> tuple[list[int], set[tuple[int, int]]]:
    """Send ``n`` requests at once; while they run, poll /metrics for the (running, waiting) pairs seen."""
    seen: set[tuple[int, int]] = set()
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.post(f"{base}/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        while watch and not all(t.done() for t in tasks):
            async with session.get(f"{base}/metrics") as r:
                gauges = {}
                for line in (await r.text()).splitlines():
                    name = line.split("{", 1)[0]
                    if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                        gauges[name] = int(float(line.rsplit(" ", 1)[1]))
                seen.add((gauges["vllm:num_requests_running"], gauges["vllm:num_requests_waiting"]))
            await asyncio.sleep(0.01)
        statuses = await asyncio.gather(*tasks)
    return list(statuses), seen


BODY = {"model": "test-model", "messages": [{"role": "user", "content": "wait your turn"}], "max_tokens": 40}


def test_max_num_seqs_2_leaves_8_of_10_waiting(start_simulator) -> None:
    s = start_simulator("--time-scale", "1", "--max-num-seqs", "2")
    statuses, seen = run(concurrent(s.base, 10, BODY, watch=True))
    assert statuses == [200] * 10
    # Never more than two run. A request is admitted at the next step boundary, so a scrape in
    # the step that admitted the first may show (1, 9); once both run, the other 8 wait.
    assert max(running for running, _ in seen) == 2
    assert (2, 8) in seen, sorted(seen)
    m = metrics(s.base)
    assert m["vllm:num_requests_waiting"] == 0 and m["vllm:num_requests_running"] == 0
    # Queue time is real: later requests waited for earlier ones.
    assert m["vllm:request_queue_time_seconds_sum"] > 0.5


def test_full_waiting_queue_answers_429_and_keeps_serving(start_simulator) -> None:
    s = start_simulator("--time-scale", "1", "--max-num-seqs", "1", "--max-waiting", "2")
    statuses, _ = run(concurrent(s.base, 8, BODY))
    assert statuses.count(200) == 3
    assert statuses.count(429) == 5
    statuses, _ = run(concurrent(s.base, 1, BODY))
    assert statuses == [200]


def test_429_body_is_a_vllm_error(start_simulator) -> None:
    s = start_simulator("--time-scale", "1", "--max-num-seqs", "1", "--max-waiting", "0")

    async def go() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(session.post(f"{s.base}/v1/chat/completions", json=BODY))
            await asyncio.sleep(0.05)
            async with session.post(f"{s.base}/v1/chat/completions", json=BODY) as r:
                result = (r.status, await r.json())
            (await first).release()
            return result

    status, body = run(go())
    assert status == 429
    assert body["error"]["code"] == 429 and "overloaded" in body["error"]["message"]


def test_load_raises_latency(start_simulator) -> None:
    s = start_simulator("--time-scale", "0")
    run(concurrent(s.base, 1, BODY))
    alone = metrics(s.base)
    run(concurrent(s.base, 64, BODY))
    loaded = metrics(s.base)
    itl_alone = alone["vllm:inter_token_latency_seconds_sum"] / alone["vllm:inter_token_latency_seconds_count"]
    itl_loaded = (loaded["vllm:inter_token_latency_seconds_sum"] - alone["vllm:inter_token_latency_seconds_sum"]) / (
        loaded["vllm:inter_token_latency_seconds_count"] - alone["vllm:inter_token_latency_seconds_count"]
    )
    assert itl_loaded > 1.5 * itl_alone


def test_small_cache_preempts_and_still_finishes_everything(start_simulator) -> None:
    # 40 blocks; 6 requests that each grow to ~16 blocks cannot all stay resident.
    s = start_simulator("--time-scale", "0", "--num-gpu-blocks", "40", "--max-model-len", "640")
    body = {"model": "test-model", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 150}
    statuses, _ = run(concurrent(s.base, 6, body))
    assert statuses == [200] * 6
    m = metrics(s.base)
    assert m["vllm:num_preemptions_total"] > 0
    assert m["vllm:generation_tokens_total"] == 6 * 150
    assert m["vllm:kv_cache_usage_perc"] == 0


def test_time_scale_zero_is_fast(start_simulator) -> None:
    s = start_simulator("--time-scale", "0")
    start = time.monotonic()
    statuses, _ = run(concurrent(s.base, 200, BODY))
    assert statuses == [200] * 200
    m = metrics(s.base)
    # 200 requests of 40 tokens are seconds of simulated work, done in well under that.
    assert m["vllm:e2e_request_latency_seconds_sum"] > 10 * (time.monotonic() - start)
