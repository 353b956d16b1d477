"""A model's own tokenizer and chat template, read from its Hugging Face files.

A model directory (a Hugging Face snapshot, as vLLM loads it) holds ``tokenizer.json`` (the `tokenizers`
library's complete description: vocabulary, merges, normalizer, pre-tokenizer, special tokens) and the chat
template, in ``chat_template.jinja`` or in ``tokenizer_config.json``'s ``chat_template``. With both, a chat
request's token ids can be computed without asking the engine: the template renders the messages into text
(``bos_token`` and all) and the text is encoded without adding special tokens again, as vLLM and
transformers do. A completions prompt is encoded with the special tokens (vLLM's ``add_special_tokens``
default for completions).

Used by the picker (``precise_prefix``'s ``tokenizer`` param: no render round trip per new prompt) and by the
simulator (``extproc sim --tokenizer``: its ids are the model's ids, so the two can be checked against each
other). ``tokenizers`` and ``jinja2`` are the optional ``tokenizer`` extra: imported when a file is loaded.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'extproc-router[tokenizer]' (the tokenizers and jinja2 packages)"


class TokenizerError(ValueError):
    """The tokenizer files cannot be used, or a request cannot be rendered with them; the message says why."""


@dataclass(frozen=True, slots=True)
class HfTokenizer:
    """Encode prompts as the model's engine will; immutable, safe to share between tasks and threads."""

    path: Path
    encoder: Any  # tokenizers.Tokenizer
    template: Any | None  # jinja2.Template; None when the files carry no chat template
    special: Mapping[str, str]  # bos_token, eos_token, ... as the template sees them
    # Splits text at the added tokens (<|eot_id|> and the like) when pieces between them encode independently
    # (see `pieces`); None when an added token's options could make a piece depend on its neighbours.
    splitter: re.Pattern[str] | None = None
    added: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> HfTokenizer:
        """Read a model directory (or its ``tokenizer.json``); a clear error for anything missing."""
        try:
            import jinja2.sandbox
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise TokenizerError(f"a tokenizer file needs the {exc.name} package: {INSTALL_HINT}") from None
        given = Path(path).expanduser()
        file = given / "tokenizer.json" if given.is_dir() else given
        if not file.is_file():
            raise TokenizerError(
                f"{given}: no tokenizer.json there; give the model's directory (a Hugging Face snapshot) "
                "or its tokenizer.json file"
            )
        try:
            encoder = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library raises a plain Exception for any malformed file
            raise TokenizerError(f"{file}: not a tokenizers file ({exc})") from None
        config = _read_json(file.parent / "tokenizer_config.json")
        special = {k: _token_text(v) for k, v in config.items() if k.endswith("_token") and _token_text(v)}
        source = _template_source(file.parent, config)
        template = None
        if source is not None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                template = env.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerError(f"{file.parent}: the chat template does not parse: {exc}") from None
        return cls(file, encoder, template, special, *_splitter(encoder))

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self.encoder.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def encode_releasing(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """``encode`` of each text, for another thread: the library's batch call releases the GIL (its single
        call holds it: the event loop kept 37 % of its pace beside a thread in ``encode``, 96 % beside this)."""
        return [e.ids for e in self.encoder.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def pieces(self, text: str) -> list[str] | None:
        """``text`` cut at every added token, each kept as a piece of its own; None when it cannot be.

        The library extracts added tokens first and then normalizes, pre-tokenizes and encodes each stretch
        between them on its own, so encoding the pieces one by one and joining the ids gives exactly
        ``encode(text, add_special_tokens=False)`` (``tests/test_hf_tokenizer.py`` checks it). A chat's pieces
        are its messages: a conversation's earlier turns and a tenant's system prompt repeat from request to
        request, and ``PieceCache`` encodes each only once."""
        if self.splitter is None:
            return None
        return [p for p in self.splitter.split(text) if p]

    def decode(self, ids: list[int]) -> str:
        text: str = self.encoder.decode(ids, skip_special_tokens=False)
        return text

    def render_chat(
        self,
        messages: list[Any],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The text the model sees for ``messages``. As vLLM does for templates written for string contents,
        a list of text parts is joined with newlines."""
        if self.template is None:
            raise TokenizerError(f"{self.path.parent}: no chat template (chat_template.jinja or tokenizer_config)")
        flat = [_flatten(m, i) for i, m in enumerate(messages)]
        try:
            text: str = self.template.render(
                **{**(extra or {}), **self.special},
                messages=flat,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
            )
        except TokenizerError:
            raise
        except Exception as exc:  # anything the template's own logic raises (a bad role, a missing field)
            raise TokenizerError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        if continue_final_message:  # leave the last message open: cut what the template closed it with
            last = flat[-1]["content"].strip()
            end = text.rfind(last) if last else -1
            if end < 0:
                raise TokenizerError("continue_final_message: the last message is not in the rendered prompt")
            text = text[: end + len(last)]
        return text

    def prompt_ids(self, body: Mapping[str, Any]) -> list[int]:
        """The token ids of a chat or completions request body, as the engine computes them."""
        return self.encode(*self.prompt_text(body))

    def prompt_text(self, body: Mapping[str, Any]) -> tuple[str, bool]:
        """What to encode for a chat or completions request body: the text, and whether to add special tokens."""
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise TokenizerError("'messages' must be a non-empty list")
            extra = body.get("chat_template_kwargs")
            text = self.render_chat(
                messages,
                body.get("add_generation_prompt", True) is not False,
                body.get("continue_final_message") is True,
                extra if isinstance(extra, Mapping) else None,
            )
            return text, body.get("add_special_tokens") is True
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise TokenizerError("'prompt' must be a string (or token ids, which need no tokenizer)")
        return prompt, body.get("add_special_tokens") is not False


class PieceCache:
    """Token ids of chat pieces (see ``HfTokenizer.pieces``), least recently used first out, at most
    ``max_tokens`` ids in all. One per process: the picker's and the simulator's hold their own."""

    def __init__(self, max_tokens: int = 2_000_000) -> None:
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._tokens = 0
        self.max_tokens = max_tokens

    def get(self, piece: str) -> list[int] | None:
        ids = self._ids.get(piece)
        if ids is not None:
            self._ids.move_to_end(piece)
        return ids

    def put(self, piece: str, ids: list[int]) -> None:
        if len(ids) > self.max_tokens // 4 or piece in self._ids:
            return
        self._ids[piece] = ids
        self._tokens += len(ids)
        while self._tokens > self.max_tokens:
            _, old = self._ids.popitem(last=False)
            self._tokens -= len(old)

    def missing(self, tokenizer: HfTokenizer, pieces: list[str]) -> list[str]:
        """The pieces to encode: neither an added token nor cached (each once)."""
        return list(dict.fromkeys(p for p in pieces if p not in tokenizer.added and p not in self._ids))

    def join(self, tokenizer: HfTokenizer, pieces: list[str], fresh: Mapping[str, list[int]]) -> list[int]:
        """The ids of ``pieces`` in order: added tokens, ``fresh`` encodings (now cached), cached ones (a piece
        evicted since ``missing`` is encoded again here)."""
        for piece, ids in fresh.items():
            self.put(piece, ids)
        out: list[int] = []
        for piece in pieces:
            added = tokenizer.added.get(piece)
            if added is not None:
                out.append(added)
                continue
            ids = fresh.get(piece) or self.get(piece)
            out += ids if ids is not None else tokenizer.encode(piece, add_special_tokens=False)
        return out

    def chat_ids(self, tokenizer: HfTokenizer, text: str) -> list[int]:
        """``tokenizer.encode(text, False)``, encoding only the pieces not seen lately (on this thread)."""
        pieces = tokenizer.pieces(text)
        if pieces is None:
            return tokenizer.encode(text, add_special_tokens=False)
        fresh = {p: tokenizer.encode(p, add_special_tokens=False) for p in self.missing(tokenizer, pieces)}
        return self.join(tokenizer, pieces, fresh)


def _splitter(encoder: Any) -> tuple[re.Pattern[str] | None, dict[str, int]]:
    """A pattern cutting text at the encoder's added tokens, when every one of them is matched verbatim (not
    normalized, no whitespace stripped around it, not whole-word only), as chat templates' markers are."""
    added = encoder.get_added_tokens_decoder()
    if not added or any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added.values()):
        return None, {}
    contents = sorted((t.content for t in added.values()), key=len, reverse=True)  # longest first
    return re.compile("(" + "|".join(re.escape(c) for c in contents) + ")"), {t.content: i for i, t in added.items()}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template_source(directory: Path, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` (newer snapshots), else the config's template (a string or named list)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _flatten(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise TokenizerError(f"messages[{index}] must be an object with 'role' and 'content'")
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise TokenizerError(f"messages[{index}].content: only text parts can be tokenized here")
        content = "\n".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise TokenizerError(f"messages[{index}].content must be a string or a list of text parts")
    return {**message, "content": content}


def _tojson(value: Any, indent: int | None = None) -> str:
    # jinja2's own tojson escapes <, > and & for HTML; chat templates expect the JSON as written.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> None:
    raise TokenizerError(f"the chat template refused the request: {message}")
