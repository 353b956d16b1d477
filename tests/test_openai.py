"""OpenAI request bodies as the picker reads them (`extproc.gateway.openai.parse_body`): what each shape yields,
and for each malformed one the status, message and param the client gets back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.gateway.openai import CHAT_PATH, COMPLETIONS_PATH, RequestError, parse_body


def parse(body: dict[str, Any] | bytes, path: str = CHAT_PATH) -> Any:
    return parse_body(body if isinstance(body, bytes) else orjson.dumps(body), path)


def refused(body: dict[str, Any] | bytes, path: str = CHAT_PATH) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(body, path)
    return caught.value


# ----- prompts (completions) -------------------------------------------------------------------------


def test_a_string_prompt_is_the_prompt() -> None:
    parsed = parse({"model": "m", "prompt": "Once upon a time", "stream": True}, COMPLETIONS_PATH)
    assert (parsed.model, parsed.prompt, parsed.stream) == ("m", "Once upon a time", True)


def test_token_id_prompts_keep_shared_id_prefixes_as_string_prefixes() -> None:
    short = parse({"prompt": [101, 2023, 7]}, COMPLETIONS_PATH).prompt
    longer = parse({"prompt": [101, 2023, 7, 99]}, COMPLETIONS_PATH).prompt
    assert short == "101 2023 7 " and longer.startswith(short)
    assert parse({"prompt": [1]}, COMPLETIONS_PATH).prompt != parse({"prompt": [11]}, COMPLETIONS_PATH).prompt


def test_list_and_nested_prompts_render_in_order() -> None:
    assert parse({"prompt": ["a", "b"]}, COMPLETIONS_PATH).prompt == "a\nb"
    assert parse({"prompt": [[1, 2], [3]]}, COMPLETIONS_PATH).prompt == "1 2 \n3 "  # a batch of token lists
    assert parse({"prompt": [["a"], ["b", "c"]]}, COMPLETIONS_PATH).prompt == "a\nb\nc"


@pytest.mark.parametrize(
    "prompt",
    [[], [1, "a"], [1, True], [True, False], [1.5], [None], {"text": "a"}, 7, None, [[1], "a"], [[]]],
    ids=repr,
)
def test_malformed_prompts_are_400(prompt: Any) -> None:
    error = refused({"model": "m", "prompt": prompt}, COMPLETIONS_PATH)
    assert (error.status, error.kind, error.param) == (400, "invalid_request_error", "prompt")
    assert error.message == "'prompt' must be a string, a list of strings, or token ids"


def test_a_deeply_nested_prompt_is_a_400_not_a_recursion_error() -> None:
    for depth in (6, 600, 1000):
        raw = b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
        error = refused(raw, COMPLETIONS_PATH)
        assert error.status == 400 and "nested too deeply" in error.message


def test_a_deeply_nested_content_part_is_a_400_not_an_encode_error() -> None:
    raw = b'{"messages": [{"role": "user", "content": [' + b"[" * 300 + b"]" * 300 + b"]}]}"
    error = refused(raw, CHAT_PATH)
    assert error.status == 400 and "nested too deeply" in error.message


def test_orjson_depth_limit_is_a_400() -> None:
    error = refused(b'{"prompt": ' + b"[" * 1100 + b"1" + b"]" * 1100 + b"}", COMPLETIONS_PATH)
    assert error.status == 400 and error.message.startswith("request body is not valid JSON: depth limit exceeded")


# ----- chat messages ---------------------------------------------------------------------------------


def test_messages_render_every_turn_in_order_with_its_role() -> None:
    parsed = parse(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
            ],
        }
    )
    assert parsed.prompt == "<system>Be brief.\n<user>Hi\n<assistant>\n"
    assert parsed.stream is False and parsed.body["model"] == "m"


def test_multi_part_content_keeps_text_and_counts_the_other_parts() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    content = [{"type": "text", "text": "look: "}, image, {"type": "text", "text": " ok?"}]
    prompt = parse({"messages": [{"role": "user", "content": content}]}).prompt
    assert prompt == "<user>look: " + orjson.dumps(image).decode() + " ok?\n"
    other = parse({"messages": [{"role": "user", "content": [image | {"image_url": {"url": "B"}}]}]}).prompt
    assert other != prompt  # two images differ in the prompt the prefix index hashes
    # Parts that are not objects, or whose text is not a string, still count by their JSON.
    assert parse({"messages": [{"role": "user", "content": ["a", 1]}]}).prompt == '<user>"a"1\n'
    assert parse({"messages": [{"role": "user", "content": [{"text": 5}]}]}).prompt == '<user>{"text":5}\n'


def test_roles_are_only_checked_to_be_strings() -> None:
    """The picker routes; vLLM's chat template judges the role. Any string passes, nothing else does."""
    assert parse({"messages": [{"role": "robot", "content": "x"}]}).prompt == "<robot>x\n"
    assert parse({"messages": [{"role": "", "content": "x"}]}).prompt == "<>x\n"
    for role in (None, 1, ["user"], {"name": "user"}):
        error = refused({"messages": [{"role": "user", "content": "ok"}, {"role": role, "content": "x"}]})
        assert (error.status, error.message, error.param) == (400, "messages[1].role must be a string", "messages")
    error = refused({"messages": [{"content": "no role"}]})
    assert error.message == "messages[0].role must be a string"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (None, "'messages' must be a non-empty list"),
        ([], "'messages' must be a non-empty list"),
        ("hello", "'messages' must be a non-empty list"),
        ({"role": "user"}, "'messages' must be a non-empty list"),
        (["hello"], "messages[0] must be an object"),
        ([{"role": "user", "content": "ok"}, 7], "messages[1] must be an object"),
        ([{"role": "user", "content": 7}], "messages[0].content must be a string or a list of parts"),
        ([{"role": "user", "content": {"text": "x"}}], "messages[0].content must be a string or a list of parts"),
        ([{"role": "user", "content": True}], "messages[0].content must be a string or a list of parts"),
    ],
    ids=repr,
)
def test_malformed_messages_are_400(messages: Any, message: str) -> None:
    error = refused({"model": "m", "messages": messages})
    assert (error.status, error.message, error.param, error.kind) == (400, message, "messages", "invalid_request_error")


def test_the_chat_path_requires_messages_and_messages_win_anywhere() -> None:
    assert refused({"model": "m", "prompt": "x"}).message == "'messages' must be a non-empty list"
    both = parse({"prompt": "ignored", "messages": [{"role": "user", "content": "used"}]}, COMPLETIONS_PATH)
    assert both.prompt == "<user>used\n"


def test_other_endpoints_carry_no_prompt() -> None:
    parsed = parse({"model": "m", "input": "embed me"}, "/v1/embeddings")
    assert (parsed.model, parsed.prompt) == ("m", "")


# ----- top-level fields and the body itself ----------------------------------------------------------


@pytest.mark.parametrize("model", [1, 1.5, True, ["m"], {"name": "m"}], ids=repr)
def test_a_model_that_is_not_a_string_is_400(model: Any) -> None:
    error = refused({"model": model, "messages": [{"role": "user", "content": "x"}]})
    assert (error.status, error.message, error.param) == (400, "'model' must be a string", "model")


def test_no_model_or_null_model_is_any_model() -> None:
    assert parse({"messages": [{"role": "user", "content": "x"}]}).model is None
    assert parse({"model": None, "messages": [{"role": "user", "content": "x"}]}).model is None


@pytest.mark.parametrize("stream", ["yes", 1, 0, [], {}], ids=repr)
def test_a_stream_flag_that_is_not_a_boolean_is_400(stream: Any) -> None:
    error = refused({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "x"}]})
    assert (error.status, error.message, error.param) == (400, "'stream' must be true or false", "stream")


def test_stream_null_means_not_streaming() -> None:
    assert parse({"model": "m", "stream": None, "messages": [{"role": "user", "content": "x"}]}).stream is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "request body is not valid JSON: "),
        (b"{not json", "request body is not valid JSON: "),
        (b'{"model": "m", "messages": [', "request body is not valid JSON: "),
        (b"\xff\xfe{}", "request body is not valid JSON: "),
        (b'{"model": "m\xff"}', "request body is not valid JSON: "),
        (b'{"a": "\\ud800"}', "request body is not valid JSON: "),  # a lone surrogate
        (b'{"a": NaN}', "request body is not valid JSON: "),
        (b"[1, 2]", "request body must be a JSON object"),
        (b'"a string"', "request body must be a JSON object"),
        (b"null", "request body must be a JSON object"),
    ],
    ids=repr,
)
def test_bodies_that_are_not_a_json_object_are_400(raw: bytes, message: str) -> None:
    error = refused(raw)
    assert error.status == 400 and error.message.startswith(message) and error.param is None


def test_the_error_body_is_openai_shaped() -> None:
    error = RequestError(404, "model 'x' is not served here", "not_found", "model")
    assert orjson.loads(error.body()) == {
        "error": {"message": "model 'x' is not served here", "type": "not_found", "param": "model", "code": 404}
    }
    assert orjson.loads(refused(b"[]").body())["error"] == {
        "message": "request body must be a JSON object",
        "type": "invalid_request_error",
        "param": None,
        "code": 400,
    }


def test_the_parsed_body_is_the_clients_whole_body() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.2, "extra": {"k": [1]}}
    assert parse(body).body == body
