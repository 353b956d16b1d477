"""The simulator's HTTP surface: vLLM's OpenAI-compatible API, /health, /metrics, and fault controls."""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from aiohttp import web

from extproc.hf_tokenizer import HfTokenizer, PieceCache, TokenizerError
from extproc.sim.config import SimConfig
from extproc.sim.engine import Engine, EngineRequest, QueueFull
from extproc.sim.metrics import SimMetrics
from extproc.sim.render import generate_request
from extproc.sim.tokens import (
    Prompt,
    PromptError,
    UnknownTokens,
    Vocabulary,
    count_tokens,
    generated_text,
    parse_completion_prompt,
    render_chat,
    token_texts,
)

JSON = "application/json"


def error_response(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    """An error in the shape vLLM's OpenAI server uses: ``{"error": {message, type, param, code}}``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON)


def bad_request(message: str, param: str | None = None) -> web.Response:
    return error_response(400, message, "BadRequestError", param)


@dataclass
class Faults:
    """Injected misbehaviour, for testing what a router does with a sick replica."""

    error_rate: float = 0.0  # share of inference requests answered 500
    delay: float = 0.0  # wall-clock seconds added before every answer (metrics and health too)
    hang: bool = False  # accept connections but answer nothing until cleared
    metrics_delay: float = 0.0  # wall-clock seconds added before /metrics answers only (a slow exporter)
    metrics_garbage: bool = False  # /metrics answers 200 with bytes that are not Prometheus text


FAULT_FIELDS = {"error_rate", "delay_ms", "hang", "metrics_delay_ms", "metrics_garbage"}
# What a broken exporter might send: a truncated sample line, a value that is not a number, binary noise.
METRICS_GARBAGE = b'vllm:num_requests_waiting{model_name="x"\nvllm:kv_cache_usage_perc NaN-ish\n\x00\xff\xfe'


class _Invalid(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


Handler = Callable[["SimServer", web.Request], Awaitable[web.StreamResponse]]


def _answers_invalid(handler: Handler) -> Handler:
    """Let a handler raise ``_Invalid`` from any depth; its response is the answer."""

    @functools.wraps(handler)
    async def wrapper(self: SimServer, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except _Invalid as invalid:
            return invalid.response

    return wrapper


class SimServer:
    """One simulated vLLM replica: an engine, its metrics and the HTTP app around them."""

    def __init__(self, config: SimConfig, max_body_bytes: int = 32 * 1024 * 1024) -> None:
        self.config = config
        self.engine = Engine(config)
        self.metrics = SimMetrics(
            config.names[0],
            config.engine_label,
            self.engine.state,
            config.block_size,
            config.num_gpu_blocks,
            config.max_model_len,
        )
        self.engine.metrics = self.metrics
        self.vocabulary = Vocabulary(config.vocab_size)
        # The model's own tokenizer when given: its ids replace the stand-in's everywhere a prompt is tokenized.
        self.tokenizer = HfTokenizer.load(config.tokenizer) if config.tokenizer else None
        self._pieces = PieceCache()
        self.faults = Faults(error_rate=config.error_rate, delay=config.delay)
        self._unhang = asyncio.Event()
        self._unhang.set()
        self._random = random.Random(config.seed)
        self._created = int(time.time())
        self.max_body_bytes = max_body_bytes
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._fault_middleware])
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions/render", self.render_chat_completion)
        self.app.router.add_post("/v1/completions/render", self.render_completion)
        self.app.router.add_post("/tokenize", self.tokenize)
        self.app.router.add_post("/detokenize", self.detokenize)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics_handler)
        self.app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        self.app.router.add_get("/sim/faults", self.get_faults)
        self.app.router.add_post("/sim/faults", self.set_faults)
        self.app.router.add_get("/sim/state", self.state)
        self.app.on_shutdown.append(self._release_hung)
        self.app.on_cleanup.append(self._cleanup)

    async def _release_hung(self, _app: web.Application) -> None:
        # Hung requests would otherwise hold a graceful shutdown until its timeout.
        self.faults.hang = False
        self._unhang.set()

    async def _cleanup(self, _app: web.Application) -> None:
        await self.engine.close()

    # ----- faults ---------------------------------------------------------------------------

    @web.middleware
    async def _fault_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/sim/"):
            return await handler(request)
        faults = self.faults
        if faults.hang:
            await self._unhang.wait()
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if (
            faults.error_rate
            and request.method == "POST"
            and request.path.startswith("/v1/")
            and self._random.random() < faults.error_rate
        ):
            return error_response(500, "injected fault (--error-rate)", "InternalServerError")
        return await handler(request)

    async def get_faults(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(asdict(self.faults)), content_type=JSON)

    async def set_faults(self, request: web.Request) -> web.Response:
        """Change faults at run time: any of ``error_rate``, ``delay_ms``, ``hang``, ``metrics_delay_ms``,
        ``metrics_garbage``."""
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return bad_request(f"malformed JSON: {exc}")
        if not isinstance(body, dict) or not set(body) <= FAULT_FIELDS:
            return bad_request(
                "send an object with any of 'error_rate' (0..1), 'delay_ms' (>= 0), 'hang' (bool), "
                "'metrics_delay_ms' (>= 0), 'metrics_garbage' (bool)"
            )
        metrics_delay, garbage = body.get("metrics_delay_ms"), body.get("metrics_garbage")
        if metrics_delay is not None and not (_is_number(metrics_delay) and metrics_delay >= 0):
            return bad_request("'metrics_delay_ms' must be a number >= 0", "metrics_delay_ms")
        if garbage is not None and not isinstance(garbage, bool):
            return bad_request("'metrics_garbage' must be true or false", "metrics_garbage")
        if metrics_delay is not None:
            self.faults.metrics_delay = float(metrics_delay) / 1000.0
        if garbage is not None:
            self.faults.metrics_garbage = garbage
        rate, delay, hang = body.get("error_rate"), body.get("delay_ms"), body.get("hang")
        if rate is not None and not (_is_number(rate) and 0 <= rate <= 1):
            return bad_request("'error_rate' must be a number between 0 and 1", "error_rate")
        if delay is not None and not (_is_number(delay) and delay >= 0):
            return bad_request("'delay_ms' must be a number >= 0", "delay_ms")
        if hang is not None and not isinstance(hang, bool):
            return bad_request("'hang' must be true or false", "hang")
        if rate is not None:
            self.faults.error_rate = float(rate)
        if delay is not None:
            self.faults.delay = float(delay) / 1000.0
        if hang is not None:
            self.faults.hang = hang
            if hang:
                self._unhang.clear()
            else:
                self._unhang.set()
        return await self.get_faults(request)

    # ----- plain endpoints ------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        if self.faults.metrics_delay:
            await asyncio.sleep(self.faults.metrics_delay)
        if self.faults.metrics_garbage:
            return web.Response(body=METRICS_GARBAGE, headers={"Content-Type": "text/plain; version=0.0.4"})
        names = request.query.getall("name[]", ())
        return web.Response(
            body=self.metrics.exposition(names), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    async def models(self, _request: web.Request) -> web.Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": self.config.model,
                "parent": None,
                "max_model_len": self.config.max_model_len,
            }
            for name in self.config.names
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=JSON)

    async def reset_prefix_cache(self, _request: web.Request) -> web.Response:
        self.engine.reset_prefix_cache()
        return web.Response(status=200)

    async def state(self, _request: web.Request) -> web.Response:
        engine = self.engine
        body = {
            "model": self.config.names[0],
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "kv_cache_usage": engine.cache.usage,
            "cached_blocks": engine.cache.cached_blocks,
            "evictions": engine.cache.evictions,
            "steps": engine.steps,
            "config": asdict(self.config),
        }
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    # ----- inference ------------------------------------------------------------------------

    @_answers_invalid
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._read_request(request)
        prompt, role = self._chat_prompt(body)
        return await self._generate(request, body, model, prompt, role=role)

    @_answers_invalid
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._read_request(request)
        return await self._generate(request, body, model, self._completion_prompt(body), role=None)

    # ----- tokenization: vLLM's /tokenize, /detokenize and render endpoints -----------------

    @_answers_invalid
    async def render_chat_completion(self, request: web.Request) -> web.StreamResponse:
        """vLLM's ``GenerateRequest`` for a chat request: the ids the engine would see, and its sampling."""
        body, _model = await self._read_request(request)
        prompt, _role = self._chat_prompt(body)
        return _json(self._render(body, prompt, "chatcmpl-"))

    @_answers_invalid
    async def render_completion(self, request: web.Request) -> web.StreamResponse:
        """A list of ``GenerateRequest``, as vLLM answers (one prompt per request here)."""
        body, _model = await self._read_request(request)
        return _json([self._render(body, self._completion_prompt(body), "cmpl-")])

    @_answers_invalid
    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        body, _model = await self._read_request(request)
        prompt: Prompt
        if "messages" in body:
            prompt, _role = self._chat_prompt(body)
        elif isinstance(body.get("prompt"), str):
            prompt = self._completion_prompt(body)  # the text, or the model's ids with --tokenizer
        else:
            raise _Invalid(bad_request("send 'prompt' (a string) or 'messages' (a chat)", "prompt"))
        strs = body.get("return_token_strs")
        if strs is not None and not isinstance(strs, bool):
            raise _Invalid(bad_request("'return_token_strs' must be true or false", "return_token_strs"))
        if isinstance(prompt, str):
            tokens = self.vocabulary.encode(prompt)
            texts = token_texts(prompt) if strs else None
        else:
            assert self.tokenizer is not None  # only the model's tokenizer turns a text prompt into ids here
            tokens = list(prompt)
            texts = [self.tokenizer.decode([t]) for t in tokens] if strs else None
        return _json(
            {"count": len(tokens), "max_model_len": self.config.max_model_len, "tokens": tokens, "token_strs": texts}
        )

    @_answers_invalid
    async def detokenize(self, request: web.Request) -> web.StreamResponse:
        body, _model = await self._read_request(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
            raise _Invalid(bad_request("'tokens' must be a list of non-negative token ids", "tokens"))
        self._check_vocabulary(tokens, "tokens")
        if self.tokenizer is not None:
            return _json({"prompt": self.tokenizer.decode(tokens)})
        try:
            return _json({"prompt": self.vocabulary.decode(tokens)})
        except UnknownTokens as exc:
            raise _Invalid(bad_request(exc.args[0], "tokens")) from None

    def _render(self, body: dict[str, Any], prompt: Prompt, id_prefix: str) -> dict[str, Any]:
        """Tokenize ``prompt`` (ids pass through) and wrap it as vLLM's render endpoints do."""
        ids = list(prompt) if not isinstance(prompt, str) else self.vocabulary.encode(prompt)
        budget = self._output_budget(body, len(ids))
        max_tokens = budget if budget is not None else self.config.max_model_len - len(ids)
        return generate_request(id_prefix + uuid.uuid4().hex, ids, body, max_tokens)

    # ----- request parsing shared by inference and rendering --------------------------------

    def _chat_prompt(self, body: dict[str, Any]) -> tuple[Prompt, str]:
        """The rendered chat prompt, and the role vLLM answers with."""
        add_generation_prompt = _flag(body, "add_generation_prompt", True)
        continue_final_message = _flag(body, "continue_final_message", False)
        if continue_final_message and body.get("add_generation_prompt") is True:
            raise _Invalid(bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True."))
        messages = body.get("messages")
        prompt: Prompt
        try:
            if self.tokenizer is not None:
                text, special = self.tokenizer.prompt_text(body)
                prompt = self.tokenizer.encode(text, True) if special else self._pieces.chat_ids(self.tokenizer, text)
            else:
                prompt = render_chat(messages, add_generation_prompt, continue_final_message)
        except (PromptError, TokenizerError) as exc:
            raise _Invalid(bad_request(str(exc), "messages")) from None
        return prompt, "assistant" if add_generation_prompt else messages[-1]["role"]

    def _completion_prompt(self, body: dict[str, Any]) -> Prompt:
        if "prompt" not in body:
            raise _Invalid(bad_request("'prompt' is required", "prompt"))
        try:
            prompt = parse_completion_prompt(body["prompt"])
        except PromptError as exc:
            raise _Invalid(bad_request(str(exc), "prompt")) from None
        if not isinstance(prompt, str):
            self._check_vocabulary(prompt, "prompt")
        elif self.tokenizer is not None:
            return self.tokenizer.encode(prompt, add_special_tokens=body.get("add_special_tokens") is not False)
        return prompt

    def _check_vocabulary(self, ids: Sequence[int], param: str) -> None:
        """vLLM refuses ids its tokenizer could never produce; so does the simulator, by ``--vocab-size``."""
        top = max(ids, default=0)
        size = self.tokenizer.encoder.get_vocab_size() if self.tokenizer is not None else self.config.vocab_size
        if top >= size:
            raise _Invalid(bad_request(f"Token id {top} is out of vocabulary", param))

    async def _read_request(self, request: web.Request) -> tuple[dict[str, Any], str]:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Invalid(
                error_response(
                    413,
                    f"request body is larger than the simulator's limit of {self.max_body_bytes} bytes",
                    "RequestEntityTooLarge",
                )
            ) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Invalid(bad_request(f"malformed JSON body: {exc}")) from None
        if not isinstance(body, dict):
            raise _Invalid(bad_request("the request body must be a JSON object"))
        model = body.get("model")
        if model is None:
            model = self.config.names[0]
        elif not isinstance(model, str):
            raise _Invalid(bad_request("'model' must be a string", "model"))
        elif model not in self.config.names:
            raise _Invalid(error_response(404, f"The model `{model}` does not exist.", "NotFoundError", "model"))
        return body, model

    def _output_budget(self, body: dict[str, Any], prompt_tokens: int) -> int | None:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        limit = self.config.max_model_len
        if prompt_tokens >= limit:
            raise _Invalid(
                bad_request(
                    f"This model's maximum context length is {limit} tokens. However, your request has "
                    f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
                    "messages",
                )
            )
        if value is None:
            return None
        if type(value) is not int or value < 1:
            raise _Invalid(bad_request(f"'{param}' must be an integer >= 1, got {value!r}", param))
        if prompt_tokens + value > limit:
            raise _Invalid(
                bad_request(
                    f"'{param}' is too large: {value}. This model's maximum context length is {limit} tokens "
                    f"and your request has {prompt_tokens} input tokens ({value} > {limit} - {prompt_tokens}).",
                    param,
                )
            )
        return value

    async def _generate(
        self, http: web.Request, body: dict[str, Any], model: str, prompt: Prompt, *, role: str | None
    ) -> web.StreamResponse:
        """Run one request through the engine; ``role`` is the chat answer's role, None for completions."""
        chat = role is not None
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            return bad_request("'stream' must be true or false", "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            return bad_request("'stream_options' must be an object", "stream_options")
        include_usage = bool(options and options.get("include_usage"))
        n = body.get("n")
        if n is not None and n != 1:
            # One choice per request keeps every token, metric and cache figure the request's own.
            return bad_request(f"'n' must be 1: the simulator generates one choice per request, got {n!r}", "n")
        engine = self.engine
        req = engine.make_request(prompt, self._output_budget(body, count_tokens(prompt)), stream)
        try:
            engine.submit(req)
        except QueueFull:
            return error_response(
                429,
                f"The server is overloaded: {self.config.max_waiting} requests are already waiting.",
                "TooManyRequestsError",
            )
        if stream:
            return await self._stream(http, req, model, role, include_usage)
        try:
            assert req.done is not None
            await req.done
        except asyncio.CancelledError:
            engine.abort(req)
            raise
        except RuntimeError as exc:
            return error_response(500, str(exc), "InternalServerError")
        text = "".join(generated_text(i) for i in range(req.generated))
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {"role": role, "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": req.finish_reason,
                "stop_reason": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": req.finish_reason,
                "stop_reason": None,
            }
        response = {
            "id": _new_id(chat),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": _usage(req),
        }
        return web.Response(body=orjson.dumps(response), content_type=JSON, headers=_timing_headers(req))

    async def _stream(
        self, http: web.Request, req: EngineRequest, model: str, role: str | None, include_usage: bool
    ) -> web.StreamResponse:
        """Server-sent events as vLLM writes them.

        Chat's first chunk (the role, empty content) goes out with the first token, not on arrival: vLLM
        sends it when the engine's first output arrives, so a client's time to first chunk includes
        queueing and prefill.
        """
        chat = role is not None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)
        request_id = _new_id(chat)
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            payload: dict[str, Any] = {"id": request_id, "object": kind, "created": created, "model": model}
            payload["choices"] = choices
            if usage is not None:
                payload["usage"] = usage
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        pending = b""
        if chat:
            pending = chunk(
                [{"index": 0, "delta": {"role": role, "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        assert req.tokens is not None
        try:
            while True:
                index = await req.tokens.get()
                if index is None:
                    break
                last = index + 1 >= req.max_tokens
                reason = req.finish_reason if last else None
                text = generated_text(index)
                choice: dict[str, Any]
                if chat:
                    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
                if reason is not None:
                    choice["stop_reason"] = None
                await response.write(pending + chunk([choice]))
                pending = b""
            if req.finished is None or req.generated < req.max_tokens:
                # The engine gave up on the request (it can never fit): say so in-band.
                error = {
                    "error": {
                        "message": "request aborted by the engine",
                        "type": "InternalServerError",
                        "param": None,
                        "code": 500,
                    }
                }
                await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
            elif include_usage:
                await response.write(chunk([], _usage(req)))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.engine.abort(req)
            raise
        return response


def _timing_headers(req: EngineRequest) -> dict[str, str]:
    """The engine's own view of the request, in simulated milliseconds (not part of vLLM's API).

    Benchmarks read these instead of wall-clock times, so results do not depend on ``--time-scale`` or on
    how busy the host is; the prefix these headers share marks them as the simulator's.
    """
    arrival = req.arrival
    first = req.first_token if req.first_token is not None else arrival
    admitted = req.admitted if req.admitted is not None else arrival
    finished = req.finished if req.finished is not None else first
    return {
        "x-sim-ttft-ms": f"{(first - arrival) * 1e3:.3f}",
        "x-sim-queue-ms": f"{(admitted - arrival) * 1e3:.3f}",
        "x-sim-e2e-ms": f"{(finished - arrival) * 1e3:.3f}",
    }


def _usage(req: EngineRequest) -> dict[str, Any]:
    return {
        "prompt_tokens": req.prompt_tokens,
        "total_tokens": req.prompt_tokens + req.generated,
        "completion_tokens": req.generated,
        "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
    }


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type=JSON)


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise _Invalid(bad_request(f"'{name}' must be true or false", name))
    return value


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
