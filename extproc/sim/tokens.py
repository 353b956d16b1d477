"""A deterministic stand-in for a tokenizer and a chat template.

Routing quality depends on prefix structure, not on real token ids, so a token here is simply
``CHARS_PER_TOKEN`` characters of the rendered prompt. Two prompts that share their first N
characters therefore share their first N/4 tokens, exactly as two vLLM prompts that share a system
prompt and earlier turns share their leading tokens.

A token's id is a hash of its characters reduced to the vocabulary: a pure function of the text, so
every replica and every run gives the same ids, and a router that tokenizes through one replica (vLLM's
``/tokenize`` and render endpoints) can predict another's prefix cache. The cache itself hashes ids, so
a prompt sent as text and the same prompt sent as the ids ``/tokenize`` returned share their blocks.
Hashes are not invertible: :class:`Vocabulary` remembers the text of the ids it handed out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

CHARS_PER_TOKEN = 4
DEFAULT_VOCAB_SIZE = 128256  # Llama 3's tokenizer

# A prompt is either rendered text or, for /v1/completions, a list of token ids.
Prompt = str | Sequence[int]

# Odd 64-bit constants: each character position gets its own multiplier, then the sum is mixed.
_POSITION = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], np.uint64)
_MIX = np.uint64(0x94D049BB133111EB)
_SHIFT_A, _SHIFT_B = np.uint64(31), np.uint64(29)
_PAD = 0x110000  # beyond Unicode: pads the last, short token without colliding with any character


class PromptError(ValueError):
    """The request's messages or prompt cannot be rendered; the message names the field."""


def count_tokens(prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return -(-len(prompt) // CHARS_PER_TOKEN)
    return len(prompt)


def render_chat(messages: Any, add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """Render every message, in order, with role markers, plus the assistant generation prompt.

    The layout is fixed so that a conversation that grows turn by turn keeps its earlier rendering
    as an exact prefix, which is what makes multi-turn prefix caching work in vLLM. As with vLLM's
    chat templates, ``continue_final_message`` leaves the last message open (no end marker, no
    generation prompt) so the model continues it.
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
    if continue_final_message:
        parts[-1] = parts[-1].removesuffix("<|end|>\n")
    elif add_generation_prompt:
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
        if all(type(t) is int and t >= 0 for t in prompt):
            return prompt
        if len(prompt) == 1 and isinstance(prompt[0], str | list):
            return parse_completion_prompt(prompt[0])
        raise PromptError(
            "'prompt' must be a string, a list of token ids, or a one-element list of either; "
            "the simulator serves one prompt per request"
        )
    raise PromptError("'prompt' must be a non-empty string or a list of non-negative token ids")


def token_ids(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> np.ndarray:
    """The ids of ``text``'s tokens, one per ``CHARS_PER_TOKEN`` characters (the last may be shorter).

    Vectorised over Unicode code points, so a long prompt costs microseconds, not a Python loop.
    """
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    short = -len(points) % CHARS_PER_TOKEN
    if short:
        points = np.concatenate((points, np.full(short, _PAD, dtype="<u4")))
    mixed = points.reshape(-1, CHARS_PER_TOKEN).astype(np.uint64) @ _POSITION  # wraps mod 2**64
    mixed ^= mixed >> _SHIFT_A
    mixed *= _MIX
    mixed ^= mixed >> _SHIFT_B
    return (mixed % np.uint64(vocab_size)).astype("<u4")


def token_texts(text: str) -> list[str]:
    """The text of each token of ``text``, in order (vLLM's ``token_strs``)."""
    return [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]


def block_hashes(
    prompt: Prompt, block_size: int, vocab_size: int = DEFAULT_VOCAB_SIZE, limit_tokens: int | None = None
) -> list[int]:
    """Chained hashes of the token ids of the prompt's full blocks: block i's hash covers blocks 0..i.

    Only full blocks are hashed (vLLM caches nothing smaller). ``limit_tokens`` caps how many
    leading tokens are considered. Text is hashed through its token ids, so text and ids agree.
    """
    n_tokens = count_tokens(prompt)
    if limit_tokens is not None:
        n_tokens = min(n_tokens, limit_tokens)
    n_blocks = n_tokens // block_size
    if not n_blocks:
        return []
    covered = n_blocks * block_size
    if isinstance(prompt, str):
        ids = token_ids(prompt[: covered * CHARS_PER_TOKEN], vocab_size)
    else:
        ids = np.asarray(prompt[:covered], dtype="<u4")
    data = ids.tobytes()
    step = block_size * 4  # bytes of one block's ids
    hashes: list[int] = []
    prev = 0
    digest = xxhash.xxh3_64_intdigest
    for start in range(0, covered * 4, step):
        prev = digest(data[start : start + step], prev)
        hashes.append(prev)
    return hashes


class UnknownTokens(KeyError):
    """Ids this replica cannot turn back into text; the message says which."""


class Vocabulary:
    """Token ids both ways for one replica.

    Encoding is the pure function :func:`token_ids`; decoding looks ids up in the text this replica
    has encoded (and the simulator's own output words), newest text first when two chunks share an id.
    The table holds at most ``size`` entries, one per id.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._text: dict[int, str] = {}
        for word in _WORDS:
            self.encode(word)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = token_ids(text, self.size).tolist()
        self._text.update(zip(ids, token_texts(text), strict=True))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        table = self._text
        unknown = [t for t in ids if t not in table]
        if unknown:
            shown = ", ".join(str(t) for t in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise UnknownTokens(
                f"{len(unknown)} token id(s) were never produced by this replica's /tokenize or render "
                f"endpoints ({shown}); the simulator's ids are hashes and only those it handed out can be "
                "decoded"
            )
        return "".join(table[t] for t in ids)


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
