"""Settings of one simulated vLLM replica, and the model presets they start from."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any


class SimConfigError(ValueError):
    """A setting is out of range; the message names the option and the fix."""


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's ``--kv-events-config``: whether and where the replica publishes its KV-cache events.

    Keys, defaults and the publisher rule are vLLM's ``KVEventsConfig``, so a router's deployment can
    hand the simulator the very value it gives vLLM. ``max_queue_size`` is accepted for that reason
    only: the simulator publishes from its step loop and queues nothing.
    """

    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def publishes(self) -> bool:
        """Whether events are collected at all (vLLM's publisher factory: enabled and not "null")."""
        return self.enable_kv_cache_events and self.publisher == "zmq"


# key -> (accepted types, description for the error); bool is not an int here, unlike in Python.
_KV_EVENTS_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "enable_kv_cache_events": ((bool,), "true or false"),
    "publisher": ((str, type(None)), '"zmq" or "null"'),
    "endpoint": ((str,), 'a ZeroMQ endpoint string such as "tcp://*:5557"'),
    "replay_endpoint": ((str, type(None)), "a ZeroMQ endpoint string or null"),
    "buffer_steps": ((int,), "an integer >= 0"),
    "hwm": ((int,), "an integer >= 0 (0: no limit)"),
    "max_queue_size": ((int,), "an integer >= 0"),
    "topic": ((str,), "a string"),
}


def parse_kv_events_config(text: str) -> KVEventsConfig:
    """Parse vLLM's ``--kv-events-config`` JSON strictly: a typo must not silently disable events."""
    flag = "--kv-events-config"
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise SimConfigError(
            f"{flag} is not valid JSON ({exc}); pass an object such as "
            '\'{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557"}\''
        ) from None
    if not isinstance(raw, dict):
        raise SimConfigError(f"{flag} must be a JSON object, not {type(raw).__name__}")
    for key, value in raw.items():
        if key not in _KV_EVENTS_KEYS:
            raise SimConfigError(f"{flag}: unknown key {key!r}; known keys: {', '.join(_KV_EVENTS_KEYS)}")
        types, wanted = _KV_EVENTS_KEYS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise SimConfigError(f"{flag}: {key!r} must be {wanted}, not {json.dumps(value)}")
        if int in types and value < 0:
            raise SimConfigError(f"{flag}: {key!r} must be {wanted}, not {value}")
    if raw.get("publisher") not in (None, "zmq", "null"):
        raise SimConfigError(f'{flag}: \'publisher\' must be "zmq" or "null", not {json.dumps(raw["publisher"])}')
    for key in ("endpoint", "replay_endpoint"):
        value = raw.get(key)
        if isinstance(value, str) and "://" not in value:
            raise SimConfigError(f"{flag}: {key!r} must be a ZeroMQ endpoint like tcp://*:5557, not {value!r}")
    enabled = raw.get("enable_kv_cache_events", False)
    publisher = raw.get("publisher") or ("zmq" if enabled else "null")
    return KVEventsConfig(**{**raw, "publisher": publisher})


@dataclass(frozen=True)
class SimConfig:
    """One simulated replica.

    Latency model, in simulated seconds (``time_scale`` turns them into wall-clock time):
    the engine runs in steps like vLLM's; each step lasts
    ``itl * (1 + load_factor * (seqs_in_step - 1)) + prefill_tokens * prefill_per_token
    + new_prefills * prefill_overhead``, so time to first token is prefill overhead plus
    uncached prompt tokens times the per-token prefill time plus queueing, decode is one step per
    output token, and both grow with the number of running requests.
    """

    model: str
    served_model_names: tuple[str, ...] = ()
    preset: str = "llama-3.2-1b"
    # Latency model.
    prefill_overhead: float = 0.008
    prefill_per_token: float = 0.00003
    itl: float = 0.004
    load_factor: float = 0.02
    time_scale: float = 1.0
    # Cache and scheduler.
    block_size: int = 16
    num_gpu_blocks: int = 32768
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    max_model_len: int = 8192
    default_max_tokens: int = 16
    # Token ids are hashes of text chunks reduced to this range, as a real tokenizer's ids stay below it.
    vocab_size: int = 128256
    # Faults, also changeable at run time through /sim/faults.
    error_rate: float = 0.0
    delay: float = 0.0
    seed: int = 0
    engine_label: str = "0"
    # vLLM's --kv-events-config; None publishes nothing (as vLLM without the flag).
    kv_events: KVEventsConfig | None = None
    # A model directory (Hugging Face tokenizer.json + chat template): prompts become that tokenizer's ids.
    tokenizer: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    def validate(self) -> SimConfig:
        checks: list[tuple[bool, str]] = [
            (self.prefill_overhead >= 0, "--prefill-overhead-ms must be >= 0"),
            (self.prefill_per_token >= 0, "--prefill-us-per-token must be >= 0"),
            (self.itl >= 0, "--itl-ms must be >= 0"),
            (self.load_factor >= 0, "--load-factor must be >= 0"),
            (self.time_scale >= 0, "--time-scale must be >= 0 (0 = no simulated waiting, 1 = real time)"),
            (self.block_size >= 1, "--block-size must be >= 1 (vLLM uses 16)"),
            (self.num_gpu_blocks >= 1, "--num-gpu-blocks must be >= 1"),
            (self.max_num_seqs >= 1, "--max-num-seqs must be >= 1"),
            (self.max_num_batched_tokens >= 1, "--max-num-batched-tokens must be >= 1"),
            (self.max_waiting >= 0, "--max-waiting must be >= 0"),
            (self.max_model_len >= 2, "--max-model-len must be >= 2"),
            (self.default_max_tokens >= 1, "--default-max-tokens must be >= 1"),
            (256 <= self.vocab_size <= 2**32, "--vocab-size must be between 256 and 2**32 (Llama 3 uses 128256)"),
            (0.0 <= self.error_rate <= 1.0, "--error-rate must be between 0 and 1"),
            (self.delay >= 0, "--delay-ms must be >= 0"),
            (
                self.max_model_len <= self.num_gpu_blocks * self.block_size,
                f"--max-model-len {self.max_model_len} does not fit in the KV cache "
                f"({self.num_gpu_blocks} blocks x {self.block_size} tokens = "
                f"{self.num_gpu_blocks * self.block_size} tokens): raise --num-gpu-blocks or lower "
                "--max-model-len",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SimConfigError(message)
        return self


# Presets resemble the demo's two models on common data-centre GPUs. The figures are
# round numbers in the range public vLLM benchmarks report, not measurements of a specific card:
# a 1B model decodes a token in about 4 ms and prefills ~30k tokens/s on one GPU; a 3B model on
# two GPUs takes about twice as long for both. With the default 16 output tokens a short chat
# completes in ~70 ms (1B) and ~140 ms (3B), the ranges the demo write-up expects.
PRESETS: dict[str, dict[str, float | int]] = {
    "llama-3.2-1b": {
        "prefill_overhead": 0.008,
        "prefill_per_token": 0.00003,
        "itl": 0.004,
        "load_factor": 0.02,
        "num_gpu_blocks": 32768,  # ~512k tokens: 1B weights leave most of a 24 GB card to KV
        "max_model_len": 8192,
        "vocab_size": 128256,  # Llama 3's tokenizer
    },
    "llama-3.2-3b": {
        "prefill_overhead": 0.015,
        "prefill_per_token": 0.00008,
        "itl": 0.008,
        "load_factor": 0.025,
        "num_gpu_blocks": 20480,  # ~330k tokens over two GPUs (tensor parallel 2)
        "max_model_len": 8192,
        "vocab_size": 128256,
    },
}


def from_preset(preset: str, model: str, **overrides: object) -> SimConfig:
    """Build a config from a preset; ``overrides`` whose value is None keep the preset's value."""
    if preset not in PRESETS:
        raise SimConfigError(f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(SimConfig)}
    values: dict[str, object] = {"model": model, "preset": preset, **PRESETS[preset]}
    for key, value in overrides.items():
        if key not in known:
            raise SimConfigError(f"unknown simulator setting {key!r}")
        if value is not None:
            values[key] = value
    if overrides.get("max_model_len") is None:
        # A small cache set by hand shortens the context rather than failing to start.
        capacity = int(values.get("num_gpu_blocks", 1)) * int(values.get("block_size", 16))  # type: ignore[call-overload]
        values["max_model_len"] = min(int(values["max_model_len"]), capacity)  # type: ignore[call-overload]
    return SimConfig(**values).validate()  # type: ignore[arg-type]
