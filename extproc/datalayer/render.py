"""A request's prompt as the engine tokenizes it: vLLM's render endpoints, cached.

Only the engine knows its tokenizer and chat template; vLLM exposes both through
``POST /v1/chat/completions/render`` and ``POST /v1/completions/render``, which answer the token ids the
engine would run without running anything. The ``precise_prefix`` scorer needs those ids to look the
prompt up in what the engines report holding, so the director asks here before scheduling. One round trip
to a model server is on the request path for every prompt not seen before; a prompt seen before (a retry,
a repeated system prompt with the same messages) comes from the cache. A prompt of token ids needs nothing.
A failure or a timeout returns None: the request is scored without tokens (the approximate index), never
failed.

With the model's tokenizer files configured for a pool (``precise_prefix``'s ``tokenizer`` param), its
prompts are tokenized here instead (``extproc/hf_tokenizer.py``): no round trip, a little picker CPU per
token (docs/precise-prefix.md); a request the files cannot render (a template that refuses it) still goes to
an engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import xxhash
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from extproc.datalayer.table import EndpointTable
from extproc.hf_tokenizer import HfTokenizer, PieceCache, TokenizerError

log = logging.getLogger(__name__)

CHAT_RENDER = "/v1/chat/completions/render"
COMPLETION_RENDER = "/v1/completions/render"
# More new text than this is encoded on a worker thread (the tokenizer releases the GIL there), so one long
# prompt (0.5-1.6 us per token measured) does not hold every other stream; less costs less than the hand-off.
THREAD_CHARS = 4096
MAX_CACHED_TOKENS = 4_000_000  # ~16 MB of ids (4 bytes each) across the cache, whatever its entry count


@dataclass(slots=True)
class RenderStats:
    hits: int = 0
    misses: int = 0  # rendered by an engine
    errors: int = 0  # no answer, a bad status or a malformed answer: scored without tokens
    seconds: float = 0.0  # time spent waiting for engines (misses and errors)
    local: int = 0  # tokenized here with the pool's tokenizer files
    local_errors: int = 0  # the files could not render it: asked an engine instead
    local_seconds: float = 0.0  # time spent tokenizing here


class RenderTokenizer:
    """``token_ids(...)`` of a request through one of its pool's engines, with an LRU cache."""

    def __init__(
        self,
        table: EndpointTable,
        timeout: float,
        cache_entries: int,
        local: Mapping[str | None, HfTokenizer] | None = None,
    ) -> None:
        self._table = table
        self._local = dict(local or {})  # pool (None: any pool) -> the model's tokenizer files
        self._pieces = {id(t): PieceCache() for t in self._local.values()}  # their chats' messages, encoded
        self._timeout = timeout
        self._cache_entries = cache_entries
        self._cache: OrderedDict[int, array] = OrderedDict()
        self._cached_tokens = 0
        self._session: aiohttp.ClientSession | None = None
        self._turn = 0
        self.stats = RenderStats()
        self._warned = False
        self._warned_local = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def token_ids(self, pool: str, served_model: str, body: dict[str, Any], prompt_key: str) -> array | None:
        """The engine's tokens of ``body``'s prompt (chat messages or a completions prompt), or None."""
        prompt = body.get("prompt")
        if "messages" not in body and isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            try:
                return array("I", prompt)  # already tokens
            except OverflowError:
                return None
        path = CHAT_RENDER if "messages" in body else COMPLETION_RENDER if prompt is not None else None
        if path is None or not prompt_key:
            return None
        key = xxhash.xxh3_64_intdigest(prompt_key.encode(), len(path)) ^ hash(served_model)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.stats.hits += 1
            return cached
        local = self._local.get(pool) or self._local.get(None)
        if local is not None:
            tokens = await self._tokenize_here(local, body)
            if tokens is not None:
                self._remember(key, tokens)
                return tokens
        endpoints = [e for e in self._table.pool_endpoints(pool) if e.scrape_ok] or list(
            self._table.pool_endpoints(pool)
        )
        if not endpoints:
            return None
        self._turn = (self._turn + 1) % len(endpoints)
        address = endpoints[self._turn].address
        loop = asyncio.get_running_loop()
        started = loop.time()
        tokens = await self._render(address, path, {**body, "model": served_model, "stream": False})
        self.stats.seconds += loop.time() - started
        if tokens is None:
            self.stats.errors += 1
            return None
        self.stats.misses += 1
        self._remember(key, tokens)
        return tokens

    async def _tokenize_here(self, tokenizer: HfTokenizer, body: dict[str, Any]) -> array | None:
        started = time.perf_counter()
        try:
            text, special = tokenizer.prompt_text(body)
            pieces = None if special else tokenizer.pieces(text)
            if pieces is None:  # a completions prompt (special tokens added), or a tokenizer that cannot be cut
                ids = (await encode_texts(tokenizer, [text], special))[0]
            else:  # a chat: only the messages not seen lately are encoded
                cache = self._pieces[id(tokenizer)]
                missing = cache.missing(tokenizer, pieces)
                fresh = dict(zip(missing, await encode_texts(tokenizer, missing, False), strict=True))
                ids = cache.join(tokenizer, pieces, fresh)
            tokens = array("I", ids)
        except (TokenizerError, OverflowError) as exc:
            self.stats.local_errors += 1
            if not self._warned_local:
                log.warning("tokenizer %s could not render a request (%s); asking an engine", tokenizer.path, exc)
                self._warned_local = True
            return None
        finally:
            self.stats.local_seconds += time.perf_counter() - started
        self.stats.local += 1
        return tokens

    async def _render(self, address: str, path: str, body: dict[str, Any]) -> array | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            async with self._session.post(
                f"http://{address}{path}", data=orjson.dumps(body), headers={"Content-Type": "application/json"}
            ) as response:
                raw = await response.read()
                if response.status != 200:
                    return self._failed(address, f"HTTP {response.status}: {raw[:200]!r}")
            answer = orjson.loads(raw)
            if isinstance(answer, list):  # completions: one entry per prompt
                answer = answer[0] if answer else None
            ids = answer.get("token_ids") if isinstance(answer, dict) else None
            if not isinstance(ids, list):
                return self._failed(address, "the answer has no token_ids list")
            return array("I", ids)
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError, TypeError, OverflowError) as exc:
            return self._failed(address, f"{type(exc).__name__}: {exc}")

    def _failed(self, address: str, why: str) -> None:
        if not self._warned:  # once: a pool without render endpoints would log on every request
            log.warning("render through %s failed (%s); scoring such requests without tokens", address, why)
            self._warned = True
        return None

    def _remember(self, key: int, tokens: array) -> None:
        if not self._cache_entries or len(tokens) > MAX_CACHED_TOKENS // 4:
            return
        self._cache[key] = tokens
        self._cached_tokens += len(tokens)
        while len(self._cache) > self._cache_entries or self._cached_tokens > MAX_CACHED_TOKENS:
            _, old = self._cache.popitem(last=False)
            self._cached_tokens -= len(old)


async def encode_texts(tokenizer: HfTokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """The ids of each text: here, or on a worker thread past ``THREAD_CHARS`` characters in all."""
    if sum(map(len, texts)) > THREAD_CHARS:
        return await asyncio.to_thread(tokenizer.encode_releasing, texts, special)
    return [tokenizer.encode(t, special) for t in texts]


class RenderCollector:
    """The tokenizer's counters, read at Prometheus scrape time (the request path only adds integers)."""

    def __init__(self, stats: RenderStats) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        s = self._stats
        requests = CounterMetricFamily(
            "extproc_render_requests",
            "Prompts tokenized for precise_prefix, by result: hit (cache), miss (an engine rendered it), "
            "error (no tokens in time: scored approximately), local (the model's tokenizer files, here), "
            "local_error (the files could not render it: an engine was asked).",
            labels=["result"],
        )
        results = (("hit", s.hits), ("miss", s.misses), ("error", s.errors))
        for result, value in (*results, ("local", s.local), ("local_error", s.local_errors)):
            requests.add_metric([result], float(value))
        seconds = CounterMetricFamily(
            "extproc_render_seconds", "Time requests waited for an engine to render their prompt (misses, errors)."
        )
        seconds.add_metric([], s.seconds)
        local = CounterMetricFamily(
            "extproc_tokenize_seconds", "Time spent tokenizing prompts here with the model's tokenizer files."
        )
        local.add_metric([], s.local_seconds)
        return [requests, seconds, local]
