"""A deterministic stand-in for a tokenizer and a chat template.

Routing quality depends on prefix structure, not on real token ids, so a token here is simply
``CHARS_PER_TOKEN`` characters of the rendered prompt. Two prompts that share their first N
characters therefore share their first N/4 tokens, exactly as two vLLM prompts that share a system
prompt and earlier turns share their leading tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import xxhash

CHARS_PER_TOKEN = 4
MAX_TOKEN_ID = 2**31

# A prompt is either rendered text or, for /v1/completions, a list of token ids.
Prompt = str | Sequence[int]


class PromptError(ValueError):
    """The request's messages or prompt cannot be rendered; the message names the field."""


def count_tokens(prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return -(-len(prompt) // CHARS_PER_TOKEN)
    return len(prompt)


def render_chat(messages: Any) -> str:
    """Render every message, in order, with role markers, plus the assistant generation prompt.

    The layout is fixed so that a conversation that grows turn by turn keeps its earlier rendering
    as an exact prefix, which is what makes multi-turn prefix caching work in vLLM.
    """
    if not isinstance(messages, list):
        raise PromptError("'messages' must be a list of message objects")
    if not messages:
        raise PromptError("'messages' must contain at least one message")
    parts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise PromptError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise PromptError(f"messages[{i}].role must be a non-empty string")
        parts.append(f"<|{role}|>\n{_content_text(message.get('content'), i)}<|end|>\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise PromptError(
                    f"messages[{index}].content[{j}] must be a text part "
                    "({'type': 'text', 'text': ...}); the simulator serves text only"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise PromptError(f"messages[{index}].content must be a string or a list of text parts")


def parse_completion_prompt(prompt: Any) -> Prompt:
    """Accept the prompt shapes of /v1/completions that carry exactly one prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(type(t) is int and 0 <= t < MAX_TOKEN_ID for t in prompt):
            return prompt
        if len(prompt) == 1 and isinstance(prompt[0], str | list):
            return parse_completion_prompt(prompt[0])
        raise PromptError(
            "'prompt' must be a string, a list of token ids, or a one-element list of either; "
            "the simulator serves one prompt per request"
        )
    raise PromptError(f"'prompt' must be a non-empty string or a list of token ids in [0, {MAX_TOKEN_ID})")


def block_hashes(prompt: Prompt, block_size: int, limit_tokens: int | None = None) -> list[int]:
    """Chained hashes of the prompt's full blocks: block i's hash covers blocks 0..i.

    Only full blocks are hashed (vLLM caches nothing smaller). ``limit_tokens`` caps how many
    leading tokens are considered.
    """
    n_tokens = count_tokens(prompt)
    if limit_tokens is not None:
        n_tokens = min(n_tokens, limit_tokens)
    n_blocks = n_tokens // block_size
    step = block_size * CHARS_PER_TOKEN
    chunks: Iterable[bytes]
    if isinstance(prompt, str) and prompt.isascii():
        data = prompt.encode()
        chunks = (data[i * step : (i + 1) * step] for i in range(n_blocks))
    elif isinstance(prompt, str):
        # Slice characters, not bytes, so that blocks line up with tokens.
        chunks = (prompt[i * step : (i + 1) * step].encode("utf-8", "surrogatepass") for i in range(n_blocks))
    else:
        ids = prompt
        chunks = (
            b"".join(t.to_bytes(4, "little") for t in ids[i * block_size : (i + 1) * block_size])
            for i in range(n_blocks)
        )
    hashes: list[int] = []
    prev = 0
    digest = xxhash.xxh3_64_intdigest
    for chunk in chunks:
        prev = digest(chunk, prev)
        hashes.append(prev)
    return hashes


_WORDS = (
    " the",
    " sim",
    " ans",
    "wer ",
    "is a",
    " det",
    "ermi",
    "nist",
    "ic s",
    "tand",
    "-in ",
    "for ",
    "a re",
    "al m",
    "odel",
    " out",
    "put.",
)


def generated_text(index: int) -> str:
    """The text of the ``index``-th generated token: fixed, four characters, deterministic."""
    return _WORDS[index % len(_WORDS)]
