"""vLLM's /tokenize, /detokenize and render endpoints: shapes, ids shared by every replica, one prefix cache."""

from __future__ import annotations

import random
import string
from typing import Any

import orjson

from extproc.sim.tokens import token_ids
from tests.conftest import Sim
from tests.helpers import post

MODEL = "test-model"


def conversation(seed: int = 1, n_chars: int = 2000) -> list[dict[str, str]]:
    rng = random.Random(seed)
    system = "".join(rng.choice(string.ascii_letters + " ") for _ in range(n_chars))
    return [{"role": "system", "content": system}, {"role": "user", "content": "What now?"}]


def tokenize(sim: Sim, **body: Any) -> dict[str, Any]:
    reply = post(f"{sim.base}/tokenize", {"model": MODEL, **body})
    assert reply.status == 200, reply.body
    return reply.json()


def cached(sim: Sim, path: str, body: dict[str, Any]) -> tuple[int, int]:
    reply = post(f"{sim.base}{path}", {"model": MODEL, "max_tokens": 1, **body})
    assert reply.status == 200, reply.body
    usage = reply.json()["usage"]
    return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]


def test_tokenize_shapes_and_ids_every_replica_agrees_on(start_simulator) -> None:
    a, b = start_simulator("--time-scale", "0"), start_simulator("--time-scale", "0")
    messages = conversation()
    chat = tokenize(a, messages=messages, return_token_strs=True)
    assert set(chat) == {"count", "max_model_len", "tokens", "token_strs"}
    assert chat["max_model_len"] == 8192 and chat["count"] == len(chat["tokens"]) == len(chat["token_strs"])
    assert "".join(chat["token_strs"]).startswith("<|system|>\n") and chat["token_strs"][-1] == "|>\n"
    assert all(type(t) is int and 0 <= t < 128256 for t in chat["tokens"])
    assert len(set(chat["tokens"])) > 0.9 * len(chat["tokens"])  # hashes, not a handful of repeated ids
    assert tokenize(b, messages=messages, return_token_strs=True) == chat  # another replica, another process
    prompt = "".join(chat["token_strs"])
    assert tokenize(a, prompt=prompt) == {**chat, "token_strs": None}  # a chat is its rendered text
    assert token_ids(prompt).tolist() == chat["tokens"]  # and a pure function of it, in this process too
    no_trailer = tokenize(a, messages=messages, add_generation_prompt=False)["tokens"]
    assert chat["tokens"][: len(no_trailer) - 1] == no_trailer[:-1]  # all but a short last token agree
    assert len(no_trailer) < chat["count"]
    small = start_simulator("--time-scale", "0", "--vocab-size", "1000")
    assert max(tokenize(small, prompt=prompt)["tokens"]) < 1000


def test_text_and_its_token_ids_share_cached_blocks(start_simulator) -> None:
    """A prompt sent as text and as the ids /tokenize returned (on any replica) hit the same blocks."""
    a, b = start_simulator("--time-scale", "0"), start_simulator("--time-scale", "0")
    messages = conversation(2)
    ids = tokenize(b, messages=messages)["tokens"]
    full_blocks = (len(ids) - 1) // 16 * 16  # vLLM recomputes at least the last prompt token
    assert cached(a, "/v1/chat/completions", {"messages": messages}) == (0, len(ids))
    assert cached(a, "/v1/completions", {"prompt": ids}) == (full_blocks, len(ids))
    other = conversation(3)
    other_ids = tokenize(a, messages=other)["tokens"]
    assert cached(b, "/v1/completions", {"prompt": other_ids}) == (0, len(other_ids))
    assert cached(b, "/v1/chat/completions", {"messages": other}) == ((len(other_ids) - 1) // 16 * 16, len(other_ids))


def test_render_endpoints_answer_vllm_generate_requests(sim: Sim) -> None:
    messages = conversation(4, 200)
    ids = tokenize(sim, messages=messages)["tokens"]
    body = {"model": MODEL, "messages": messages, "max_tokens": 7, "temperature": 0.2, "ignore_eos": False}
    rendered = post(f"{sim.base}/v1/chat/completions/render", body).json()
    assert set(rendered) == {
        "request_id",
        "token_ids",
        "features",
        "sampling_params",
        "model",
        "stream",
        "stream_options",
        "cache_salt",
        "priority",
        "kv_transfer_params",
    }
    assert rendered["request_id"].startswith("chatcmpl-") and rendered["token_ids"] == ids
    assert rendered["sampling_params"] == {"temperature": 0.2, "max_tokens": 7}  # defaults omitted, as vLLM's
    assert rendered["model"] == MODEL and rendered["stream"] is False and rendered["features"] is None
    completions = post(f"{sim.base}/v1/completions/render", {"model": MODEL, "prompt": "".join("abcd" * 9)}).json()
    assert isinstance(completions, list) and len(completions) == 1
    (only,) = completions
    assert only["request_id"].startswith("cmpl-") and only["token_ids"] == [token_ids("abcd").item()] * 9
    assert only["sampling_params"] == {"max_tokens": 8192 - 9}  # unset: the context left, as vLLM fills it
    passthrough = post(f"{sim.base}/v1/completions/render", {"prompt": [5, 6, 7], "stream": True}).json()[0]
    assert passthrough["token_ids"] == [5, 6, 7] and passthrough["stream"] is True
    assert passthrough["model"] is None  # vLLM echoes the request's model, absent here


def test_detokenize_turns_handed_out_ids_back_into_text(sim: Sim) -> None:
    messages = conversation(5, 300)
    ids = tokenize(sim, messages=messages)["tokens"]
    text = post(f"{sim.base}/detokenize", {"model": MODEL, "tokens": ids}).json()
    assert text == {"prompt": "".join(tokenize(sim, messages=messages, return_token_strs=True)["token_strs"])}
    answer = post(f"{sim.base}/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4}).json()
    generated = answer["choices"][0]["text"]
    assert post(f"{sim.base}/detokenize", {"tokens": token_ids(generated).tolist()}).json() == {"prompt": generated}


ERRORS = [
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", {"model": MODEL, "prompt": ["a"]}, 400, "prompt"),
    ("/tokenize", {"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ("/tokenize", {"messages": "hi"}, 400, "messages"),
    ("/tokenize", {"prompt": "a", "return_token_strs": "yes"}, 400, "return_token_strs"),
    ("/detokenize", {"tokens": [1, -2]}, 400, "tokens"),
    ("/detokenize", {"tokens": [128256]}, 400, "tokens"),
    ("/detokenize", {"tokens": [3]}, 400, "tokens"),  # never handed out by this replica
    ("/v1/chat/completions/render", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions/render", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, None),
    (
        "/v1/chat/completions/render",
        {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True, "continue_final_message": True},
        400,
        None,
    ),
    ("/v1/completions/render", {"prompt": [1, 200000]}, 400, "prompt"),
    ("/v1/completions/render", {"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"prompt": [1, 128256], "max_tokens": 1}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
]


def test_errors_in_vllm_shape(sim: Sim) -> None:
    """Every case on one replica (a simulator per case would cost seconds); each failure names its case."""
    for path, body, status, param in ERRORS:
        reply = post(f"{sim.base}{path}", orjson.dumps(body))
        case = f"{path} {body}: {reply.status} {reply.body[:300]!r}"
        assert reply.status == status, case
        error = reply.json()["error"]
        assert error["code"] == status and error["message"] and error["type"], case
        assert param is None or error["param"] == param, case


def test_continue_final_message_and_role(sim: Sim) -> None:
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi th"}]
    opened = tokenize(sim, messages=messages, continue_final_message=True, return_token_strs=True)
    assert "".join(opened["token_strs"]).endswith("<|assistant|>\nHi th")
    reply = post(
        f"{sim.base}/v1/chat/completions",
        {"model": MODEL, "messages": messages, "add_generation_prompt": False, "max_tokens": 1},
    ).json()
    assert reply["choices"][0]["message"]["role"] == "assistant"  # the last message's role, as vLLM answers
    as_user = post(
        f"{sim.base}/v1/chat/completions",
        {"model": MODEL, "messages": messages[:1], "add_generation_prompt": False, "max_tokens": 1},
    ).json()
    assert as_user["choices"][0]["message"]["role"] == "user"
