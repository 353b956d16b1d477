"""OpenAI request bodies -> what routing needs (model, the prompt as one prefix-ordered string, stream).

The prompt string exists only to be hashed into prefix blocks, so it need not match vLLM's chat
template byte for byte; it must be deterministic and keep every message in order, so that a shared
system prompt and earlier turns of a conversation become a shared prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


class RequestError(Exception):
    """A request the gateway answers itself, with an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        )


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    model: str | None
    prompt: str
    stream: bool
    body: dict[str, Any]


def parse_body(raw: bytes, path: str) -> ParsedRequest:
    """Parse a chat or completions body; anything malformed raises RequestError(400)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", param="model")
    stream = body.get("stream", False)
    if stream is None:  # OpenAI's API and vLLM take a null flag as false
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", param="stream")
    if "messages" in body or path.endswith(CHAT_PATH):
        prompt = _render_messages(body.get("messages"))
    elif "prompt" in body:
        prompt = _render_prompt(body["prompt"])
    else:
        # Other endpoints (embeddings, responses, ...) carry no prompt we can hash: load decides.
        prompt = ""
    return ParsedRequest(model=model, prompt=prompt, stream=stream, body=body)


def _render_messages(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    parts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(400, f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestError(400, f"messages[{i}].role must be a string", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif content is None:
            text = ""
        elif isinstance(content, list):
            # Multi-part content: text parts in order; other parts by their JSON, so they still count.
            try:
                text = "".join(
                    p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else orjson.dumps(p).decode()
                    for p in content
                )
            except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
                raise RequestError(400, f"messages[{i}].content is nested too deeply", param="messages") from None
        else:
            raise RequestError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        parts.append(f"<{role}>{text}\n")
    return "".join(parts)


MAX_PROMPT_DEPTH = 4  # a prompt is a string, ids, or lists of them: nothing deeper is a prompt


def _render_prompt(prompt: Any, depth: int = 0) -> str:
    if depth > MAX_PROMPT_DEPTH:
        raise RequestError(400, "'prompt' is nested too deeply", param="prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            # Token ids: their decimal text keeps shared id prefixes as shared string prefixes.
            return "".join(f"{t} " for t in prompt)
        if all(isinstance(p, list) for p in prompt):
            return "\n".join(_render_prompt(p, depth + 1) for p in prompt)
    raise RequestError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
