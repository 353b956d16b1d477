"""The prefix cache: chained blocks, reuse, partial reuse, eviction."""

from __future__ import annotations

import random
import string

from tests.conftest import Sim
from tests.helpers import metrics, post, run, stream_chat


def text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n_chars))


def test_repeated_prompt_is_cached_and_faster(start_simulator) -> None:
    # Real time, so the client sees the latency model: ~4,000 uncached tokens cost ~130 ms of prefill.
    s = start_simulator("--time-scale", "1")
    body = {
        "model": "test-model",
        "max_tokens": 2,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": text(16000, 1)}, {"role": "user", "content": "Q?"}],
    }
    first_ttft, first = run(stream_chat(s.base, body))
    second_ttft, second = run(stream_chat(s.base, body))
    first_usage, second_usage = first[-2]["usage"], second[-2]["usage"]
    assert first_usage["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second_usage["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0.95 * second_usage["prompt_tokens"]
    assert cached % 16 == 0 and cached < second_usage["prompt_tokens"]
    assert second_ttft < 0.5 * first_ttft, (first_ttft, second_ttft)


def test_shared_first_half_gets_half_its_blocks(sim: Sim) -> None:
    common = text(8000, 2)
    a = {"model": "test-model", "max_tokens": 1, "messages": [{"role": "user", "content": common + text(8000, 3)}]}
    b = {"model": "test-model", "max_tokens": 1, "messages": [{"role": "user", "content": common + text(8000, 4)}]}
    post(f"{sim.base}/v1/chat/completions", a)
    usage = post(f"{sim.base}/v1/chat/completions", b).json()["usage"]
    share = usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"]
    assert 0.45 <= share <= 0.52, share


def test_multi_turn_conversation_reuses_earlier_turns(sim: Sim) -> None:
    messages = [{"role": "system", "content": text(2000, 5)}]
    cached: list[int] = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"question {turn}: " + text(400, 10 + turn)})
        reply = post(
            f"{sim.base}/v1/chat/completions", {"model": "test-model", "messages": messages, "max_tokens": 8}
        ).json()
        cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
        messages.append(reply["choices"][0]["message"])
    assert cached[0] == 0
    assert cached[1] > 0 and cached[1] < cached[2] < cached[3]


def hit_rate(base: str) -> float:
    m = metrics(base)
    return m["vllm:prefix_cache_hits_total"] / m["vllm:prefix_cache_queries_total"]


def test_eviction_under_a_small_cache_lowers_the_hit_rate(start_simulator) -> None:
    big = start_simulator("--time-scale", "0")
    small = start_simulator("--time-scale", "0", "--num-gpu-blocks", "64")
    prompts = [text(1920, 100 + i) for i in range(8)]  # 8 prompts x 30 blocks; 64 blocks hold two
    for s in (big, small):
        for _ in range(3):
            for p in prompts:
                reply = post(f"{s.base}/v1/completions", {"model": "test-model", "prompt": p, "max_tokens": 1})
                assert reply.status == 200
    big_rate, small_rate = hit_rate(big.base), hit_rate(small.base)
    assert big_rate > 0.6, big_rate
    assert small_rate < 0.5 * big_rate, (big_rate, small_rate)


def test_reset_prefix_cache(sim: Sim) -> None:
    body = {"model": "test-model", "prompt": text(640, 7), "max_tokens": 1}
    post(f"{sim.base}/v1/completions", body)
    assert post(f"{sim.base}/v1/completions", body).json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert post(f"{sim.base}/reset_prefix_cache", b"").status == 200
    assert post(f"{sim.base}/v1/completions", body).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
