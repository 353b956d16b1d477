"""vLLM's render answer: the ``GenerateRequest`` a router or a disaggregated front end hands to the engine.

vLLM builds it in ``vllm/entrypoints/serve/render/serving.py`` from the tokenized prompt and the request's
sampling parameters; its ``SamplingParams`` serialises without defaults, so only what the request changed
(and ``max_tokens``, which vLLM always fills) appears.
"""

from __future__ import annotations

from typing import Any

# The sampling fields a chat or completions body may set, with vLLM's SamplingParams defaults.
_SAMPLING_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": None,
    "stop_token_ids": None,
    "ignore_eos": False,
    "min_tokens": 0,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
}


def sampling_params(body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The request's sampling parameters as vLLM serialises them: ``max_tokens`` and non-defaults."""
    params = {k: body[k] for k, default in _SAMPLING_DEFAULTS.items() if body.get(k, default) != default}
    params["max_tokens"] = max_tokens
    return params


def generate_request(request_id: str, token_ids: list[int], body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """One ``GenerateRequest`` (vllm/entrypoints/serve/disagg/protocol.py), every field present as vLLM dumps it."""
    stream = body.get("stream") is True
    return {
        "request_id": request_id,
        "token_ids": token_ids,
        "features": None,
        "sampling_params": sampling_params(body, max_tokens),
        "model": body.get("model"),
        "stream": stream,
        "stream_options": body.get("stream_options") if stream else None,
        "cache_salt": body.get("cache_salt"),
        "priority": body.get("priority", 0),
        "kv_transfer_params": body.get("kv_transfer_params"),
    }
