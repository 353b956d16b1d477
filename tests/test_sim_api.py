"""The simulator speaks vLLM's OpenAI API: shapes, streaming, models, health."""

from __future__ import annotations

import random
import string
import time

import aiohttp
import orjson

from tests.conftest import Sim
from tests.helpers import get, post, run, stream_chat


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": "test-model", "messages": [{"role": "user", "content": content}], **extra}


def test_chat_completion_shape(sim: Sim) -> None:
    reply = post(f"{sim.base}/v1/chat/completions", chat("Hello from 1B model!", max_tokens=5))
    assert reply.status == 200
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "test-model"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_default_output_length_ends_with_stop(sim: Sim) -> None:
    body = post(f"{sim.base}/v1/chat/completions", chat("hi")).json()
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completions_string_and_token_ids(sim: Sim) -> None:
    body = post(f"{sim.base}/v1/completions", {"model": "test-model", "prompt": "Once upon", "max_tokens": 3}).json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 3
    ids = list(range(100, 140))
    body = post(f"{sim.base}/v1/completions", {"model": "test-model", "prompt": ids, "max_tokens": 2}).json()
    assert body["usage"]["prompt_tokens"] == 40
    again = post(f"{sim.base}/v1/completions", {"model": "test-model", "prompt": [ids], "max_tokens": 2}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


def test_streaming_chat_with_usage(sim: Sim) -> None:
    ttft, events = run(
        stream_chat(sim.base, chat("stream please", max_tokens=4, stream_options={"include_usage": True}))
    )
    assert ttft > 0
    assert events[-1] == {"done": True}
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [e["choices"][0]["delta"]["content"] for e in chunks[1:] if e["choices"]]
    assert len(content) == 4
    finishing = [e["choices"][0]["finish_reason"] for e in chunks if e["choices"]]
    assert finishing[-1] == "length" and all(f is None for f in finishing[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4


def test_streaming_without_usage_has_no_usage_chunk(sim: Sim) -> None:
    _, events = run(stream_chat(sim.base, chat("no usage", max_tokens=2)))
    assert events[-1] == {"done": True}
    assert all("usage" not in e for e in events[:-1])


def test_streaming_completions(sim: Sim) -> None:
    reply = post(
        f"{sim.base}/v1/completions",
        {
            "model": "test-model",
            "prompt": "abc",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in reply.body.decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert '"object":"text_completion"' in lines[0]
    assert '"usage"' in lines[-2]


def test_models_health_and_unknown_fields(sim: Sim) -> None:
    models = get(f"{sim.base}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["test-model"]
    assert models["data"][0]["owned_by"] == "vllm"
    assert get(f"{sim.base}/health").status == 200
    reply = post(
        f"{sim.base}/v1/chat/completions",
        chat(
            "extra fields",
            max_tokens=1,
            temperature=0.2,
            top_p=0.9,
            seed=3,
            x_router_hint={"any": "thing"},
            user="u1",
            logit_bias={},
        ),
    )
    assert reply.status == 200


def test_served_model_names(start_simulator) -> None:
    s = start_simulator("--time-scale", "0", "--served-model-name", "llama-3-2-1b", "alias-1b")
    assert [m["id"] for m in get(f"{s.base}/v1/models").json()["data"]] == ["llama-3-2-1b", "alias-1b"]
    for name in ("llama-3-2-1b", "alias-1b"):
        body = post(
            f"{s.base}/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]}
        ).json()
        assert body["model"] == name
    missing = post(
        f"{s.base}/v1/chat/completions", {"model": "test-model", "messages": [{"role": "user", "content": "x"}]}
    )
    assert missing.status == 404


def test_omitted_model_uses_the_served_one(sim: Sim) -> None:
    body = post(f"{sim.base}/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}).json()
    assert body["model"] == "test-model"


def test_presets_match_the_demo_latency_ranges(start_simulator) -> None:
    """Short prompts: ~50-100 ms for the 1B preset and ~100-200 ms for the 3B one (simulated time)."""
    from tests.helpers import metrics

    for preset, low, high in (("llama-3.2-1b", 0.05, 0.1), ("llama-3.2-3b", 0.1, 0.2)):
        s = start_simulator("--preset", preset, "--time-scale", "0")
        for i in range(5):
            assert post(f"{s.base}/v1/chat/completions", chat(f"Hello from the demo #{i}!")).status == 200
        m = metrics(s.base)
        mean = m["vllm:e2e_request_latency_seconds_sum"] / m["vllm:e2e_request_latency_seconds_count"]
        assert low <= mean <= high, (preset, mean)


def test_timing_headers_report_simulated_time(start_simulator) -> None:
    s = start_simulator("--time-scale", "0")  # no waiting at all, yet the model's time is reported
    reply = post(f"{s.base}/v1/chat/completions", chat("x" * 8000, max_tokens=10))
    ttft, queue, e2e = (float(reply.headers[f"x-sim-{k}-ms"]) for k in ("ttft", "queue", "e2e"))
    assert queue == 0
    assert 60 < ttft < 120  # 8 ms overhead + ~2,000 tokens x 30 us + one step
    assert abs(e2e - (ttft + 9 * 4.0)) < 1  # nine more decode steps of 4 ms


async def first_chunks(base: str, path: str, body: dict[str, object]) -> tuple[float, float]:
    """Client-side seconds to the first SSE event of any kind, and to the first one that carries text."""
    start = time.monotonic()
    first_event = first_text = float("nan")
    async with aiohttp.ClientSession() as session, session.post(f"{base}{path}", json=body) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            now = time.monotonic() - start
            if first_event != first_event:
                first_event = now
            choice = orjson.loads(line[6:])["choices"][0]
            if choice.get("text") or choice.get("delta", {}).get("content"):
                first_text = now
                break
    return first_event, first_text


def test_stream_starts_with_the_first_token_so_the_client_sees_prefill(start_simulator) -> None:
    """vLLM sends chat's role chunk with the first token: time to the first chunk includes prefill."""
    s = start_simulator("--time-scale", "1")
    rng = random.Random(3)
    long = "".join(rng.choice(string.ascii_letters) for _ in range(24000))  # 6,000 tokens
    shared = "".join(rng.choice(string.ascii_letters) for _ in range(4000))

    def chat_body(content: str) -> dict[str, object]:
        return {"model": "test-model", "messages": [{"role": "user", "content": content}], "max_tokens": 2}

    async def measure() -> dict[str, tuple[float, float]]:
        chat = "/v1/chat/completions"
        await first_chunks(s.base, chat, {**chat_body(shared), "stream": True})  # warms the cache
        # A stall of the machine only adds time, so the cached case takes the best of three (a CI run once
        # measured 378 ms for one of its ~13 ms requests).
        cached = [await first_chunks(s.base, chat, {**chat_body(shared), "stream": True}) for _ in range(3)]
        return {
            "cached": min(cached, key=lambda t: t[1]),
            "long": await first_chunks(s.base, chat, {**chat_body(long), "stream": True}),
            "completion": await first_chunks(
                s.base,
                "/v1/completions",
                {"model": "test-model", "prompt": long[::-1], "max_tokens": 2, "stream": True},
            ),
        }

    times = run(measure())
    # Simulated prefill of 6,000 uncached tokens: 8 ms + 6,000 x 30 us + three 4 ms steps = ~200 ms; a cached
    # 1,000-token prompt prefills its last block only: ~13 ms. Wall time can only add to simulated time.
    for case in ("long", "completion"):
        first_event, first_text = times[case]
        assert 0.18 < first_event <= first_text < 2.0, (case, times)
    cached_event, cached_text = times["cached"]
    assert cached_text < 0.5 * times["long"][1], times
    assert cached_event <= cached_text
