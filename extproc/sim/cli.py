"""``extproc sim``: the command line of one simulated vLLM replica (its flags mirror vLLM's where they exist)."""

from __future__ import annotations

import argparse
import sys

from extproc.cli import DefaultsHelp


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from extproc.sim.config import PRESETS

    p = sub.add_parser(
        "sim",
        help="serve one simulated vLLM replica (OpenAI API, /metrics, prefix cache, latency model)",
        description=(
            "Serve one simulated vLLM replica: OpenAI chat/completions (streaming too), /v1/models, "
            "/tokenize, /detokenize, the render endpoints, /health and vLLM's /metrics, with a block-based "
            "prefix cache and a latency model. "
            "Latency options default to the chosen --preset."
        ),
        formatter_class=DefaultsHelp,
    )
    p.add_argument("--model", required=True, help="model name the replica serves (as vLLM's --model)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="names to serve instead of --model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS), help="latency and cache defaults")
    lat = p.add_argument_group("latency model (defaults come from --preset)")
    lat.add_argument("--prefill-overhead-ms", type=float, help="fixed cost of starting a prefill")
    lat.add_argument("--prefill-us-per-token", type=float, help="prefill time per uncached prompt token")
    lat.add_argument("--itl-ms", type=float, help="decode time per output token with one running request")
    lat.add_argument("--load-factor", type=float, help="step-time growth per extra request in the batch")
    lat.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per simulated second; 0 = no waiting")
    cache = p.add_argument_group("KV cache and scheduler")
    cache.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    cache.add_argument("--num-gpu-blocks", type=int, help="KV-cache capacity in blocks")
    cache.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once")
    cache.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill token budget per step")
    cache.add_argument("--max-waiting", type=int, default=1024, help="waiting requests before answering 429")
    cache.add_argument("--max-model-len", type=int, help="context length: prompt + max_tokens")
    cache.add_argument("--default-max-tokens", type=int, default=16, help="output length when max_tokens is unset")
    p.add_argument(
        "--vocab-size", type=int, help="token ids stay below this (/tokenize, render, prompt ids); preset's default"
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="a model directory (Hugging Face tokenizer.json, and a chat template in tokenizer_config.json or "
        "chat_template.jinja): prompts, /tokenize and the render endpoints use that tokenizer's ids instead of "
        "the built-in stand-in (4 characters per token). Needs the tokenizer extra",
    )
    faults = p.add_argument_group("fault injection (also at run time: POST /sim/faults)")
    faults.add_argument("--error-rate", type=float, default=0.0, help="share of inference requests answered 500")
    faults.add_argument("--delay-ms", type=float, default=0.0, help="wall-clock delay before every answer")
    faults.add_argument("--seed", type=int, default=0, help="seed of the fault dice")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body accepted (413 above)")
    events = p.add_argument_group("KV-cache events (vLLM's publisher; docs/simulator.md)")
    events.add_argument(
        "--kv-events-config",
        metavar="JSON",
        help=(
            "publish KV-cache events (BlockStored, BlockRemoved, AllBlocksCleared) over ZeroMQ exactly as vLLM "
            "does; the value is vLLM's own flag value, e.g. "
            '\'{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557", '
            '"replay_endpoint": "tcp://*:5558", "topic": "kv@127.0.0.1@llama"}\'. Keys: enable_kv_cache_events, '
            "publisher (zmq|null; zmq when enabled and unset), endpoint (tcp://*:5557), replay_endpoint (none), "
            "buffer_steps (10000 batches kept for replay), hwm (100000), max_queue_size (accepted, unused), "
            "topic (empty); an endpoint with * or :: or ipc:// is bound, any other is connected to. "
            "Off without the flag, as in vLLM"
        ),
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from extproc.sim.config import SimConfigError, from_preset, parse_kv_events_config
    from extproc.sim.run import run as serve_replica

    def ms(value: float | None) -> float | None:
        return None if value is None else value / 1000.0

    try:
        kv_events = None if args.kv_events_config is None else parse_kv_events_config(args.kv_events_config)
        config = from_preset(
            args.preset,
            args.model,
            served_model_names=tuple(args.served_model_name or ()),
            prefill_overhead=ms(args.prefill_overhead_ms),
            prefill_per_token=None if args.prefill_us_per_token is None else args.prefill_us_per_token / 1e6,
            itl=ms(args.itl_ms),
            load_factor=args.load_factor,
            time_scale=args.time_scale,
            block_size=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting=args.max_waiting,
            max_model_len=args.max_model_len,
            default_max_tokens=args.default_max_tokens,
            vocab_size=args.vocab_size,
            error_rate=args.error_rate,
            delay=ms(args.delay_ms),
            seed=args.seed,
            kv_events=kv_events,
            tokenizer=args.tokenizer,
        )
    except SimConfigError as exc:
        print(f"extproc sim: error: {exc}", file=sys.stderr)
        return 2
    return serve_replica(config, args.host, args.port, int(args.max_body_mb * 1024 * 1024))
