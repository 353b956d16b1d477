"""Bad input gets a clear 4xx JSON error, and the simulator keeps serving."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import Sim
from tests.helpers import post

CHAT = "/v1/chat/completions"
GOOD = {"model": "test-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}

CASES = [
    ("malformed json", CHAT, b'{"model": "test-model", "messages": [', 400, None),
    ("not an object", CHAT, b"[1, 2, 3]", 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("non-utf8 bytes", CHAT, b'{"model": "test-model", "messages": "\xff\xfe"}', 400, None),
    ("missing messages", CHAT, {"model": "test-model"}, 400, "messages"),
    ("messages not a list", CHAT, {"model": "test-model", "messages": "hi"}, 400, "messages"),
    ("empty messages", CHAT, {"model": "test-model", "messages": []}, 400, "messages"),
    ("message not an object", CHAT, {"model": "test-model", "messages": ["hi"]}, 400, "messages"),
    ("message without role", CHAT, {"model": "test-model", "messages": [{"content": "x"}]}, 400, "messages"),
    (
        "content wrong type",
        CHAT,
        {"model": "test-model", "messages": [{"role": "user", "content": 5}]},
        400,
        "messages",
    ),
    (
        "image part",
        CHAT,
        {
            "model": "test-model",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        400,
        "messages",
    ),
    ("model not a string", CHAT, {**GOOD, "model": 7}, 400, "model"),
    ("unknown model", CHAT, {**GOOD, "model": "gpt-9"}, 404, "model"),
    ("max_tokens string", CHAT, {**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    ("max_tokens zero", CHAT, {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", CHAT, {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens absurd", CHAT, {**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    ("max_tokens float", CHAT, {**GOOD, "max_tokens": 2.5}, 400, "max_tokens"),
    ("max_completion_tokens absurd", CHAT, {**GOOD, "max_completion_tokens": 10**9}, 400, "max_completion_tokens"),
    ("stream not bool", CHAT, {**GOOD, "stream": "yes"}, 400, "stream"),
    ("stream_options not object", CHAT, {**GOOD, "stream_options": 3}, 400, "stream_options"),
    ("missing prompt", "/v1/completions", {"model": "test-model"}, 400, "prompt"),
    ("prompt wrong type", "/v1/completions", {"model": "test-model", "prompt": 12}, 400, "prompt"),
    ("prompt negative ids", "/v1/completions", {"model": "test-model", "prompt": [1, -2]}, 400, "prompt"),
    ("several prompts", "/v1/completions", {"model": "test-model", "prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt too long", "/v1/completions", {"model": "test-model", "prompt": "z" * 40000}, 400, "messages"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_json_error(
    sim: Sim, name: str, path: str, body: object, status: int, param: str | None
) -> None:
    reply = post(f"{sim.base}{path}", body if isinstance(body, bytes) else orjson.dumps(body))
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == status
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert post(f"{sim.base}{CHAT}", GOOD).status == 200


def test_ten_megabyte_bodies(start_simulator) -> None:
    s = start_simulator("--time-scale", "0")
    huge_prompt = orjson.dumps({"model": "test-model", "messages": [{"role": "user", "content": "a" * 10_000_000}]})
    reply = post(f"{s.base}{CHAT}", huge_prompt)
    assert reply.status == 400 and "maximum context length" in reply.json()["error"]["message"]
    reply = post(f"{s.base}{CHAT}", b"\x00" * 10_000_000)
    assert reply.status == 400
    assert post(f"{s.base}{CHAT}", GOOD).status == 200
    limited = start_simulator("--time-scale", "0", "--max-body-mb", "1")
    reply = post(f"{limited.base}{CHAT}", huge_prompt)
    assert reply.status == 413 and reply.json()["error"]["code"] == 413
    assert post(f"{limited.base}{CHAT}", GOOD).status == 200
