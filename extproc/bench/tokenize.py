"""`extproc bench tokenize`: what getting a prompt's token ids costs the picker, each way precise_prefix can.

One simulator (time scale 0) tokenizes with a model directory (``--tokenizer``, or a small BPE trained at
start); the picker's ``RenderTokenizer`` then tokenizes the same requests three ways, one after another, in
this process: through the simulator's render endpoint (a round trip per new prompt), with the same files
here encoding each chat whole, and with the files here message by message (the default: cached pieces).
Two request shapes: ``shared`` (a few tenants' long system prompts, a new question each time, as
`multitenant` and `tenants`) and ``unique`` (every prompt new from its first character). The prompt cache is
off (every request is a new prompt), so each figure is the cost of a prompt not seen before. Reported per
way: wall time per request (mean, p50, p99) and this process's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from extproc.cli import DefaultsHelp

MODEL = "bench-model"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tokenize",
        help="precise_prefix's tokenization cost per new prompt: engine render round trip vs the model's files here",
        formatter_class=DefaultsHelp,
    )
    p.add_argument(
        "--tokenizer",
        help="a model directory (tokenizer.json + chat template); default: a small BPE trained on the workloads' words",
    )
    p.add_argument("--requests", type=int, default=400, help="requests per way and shape")
    p.add_argument("--system-chars", type=int, default=12_000, help="characters of each system prompt (~3,000 tokens)")
    p.add_argument("--question-chars", type=int, default=400, help="characters of each new question")
    p.add_argument("--tenants", type=int, default=8, help="distinct system prompts in the shared shape")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


def _bodies(shape: str, args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    from extproc.bench.workloads import text

    rng = random.Random(seed)
    systems = [text(rng, args.system_chars // 4) for _ in range(args.tenants)]
    bodies = []
    for i in range(args.requests):
        system = rng.choice(systems) if shape == "shared" else text(rng, args.system_chars // 4)
        question = f"question {i}: " + text(rng, args.question_chars // 4)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        bodies.append({"model": MODEL, "messages": messages})
    return bodies


async def _measure(tokenizer: Any, bodies: list[dict[str, Any]]) -> dict[str, float]:
    walls = []
    cpu0 = time.process_time()
    for i, body in enumerate(bodies):
        started = time.perf_counter()
        tokens = await tokenizer.token_ids("bench", MODEL, body, f"prompt-{i}")
        walls.append((time.perf_counter() - started) * 1e3)
        if tokens is None:
            raise SystemExit(f"request {i} got no tokens: {tokenizer.stats}")
    cpu = (time.process_time() - cpu0) * 1e3 / len(bodies)
    walls.sort()
    return {
        "wall_mean_ms": statistics.fmean(walls),
        "wall_p50_ms": walls[len(walls) // 2],
        "wall_p99_ms": walls[min(len(walls) - 1, int(len(walls) * 0.99))],
        "cpu_ms_per_request": cpu,
    }


class _Whole:
    """The files here, each chat encoded whole (no piece cache): what the piece cache saves."""

    def __init__(self, tokenizer: Any) -> None:
        from extproc.datalayer.render import RenderStats

        self._tokenizer = tokenizer
        self.stats = RenderStats()

    async def token_ids(self, _pool: str, _model: str, body: dict[str, Any], _key: str) -> list[int]:
        from extproc.datalayer.render import encode_texts

        text, special = self._tokenizer.prompt_text(body)
        return (await encode_texts(self._tokenizer, [text], special))[0]

    async def close(self) -> None:
        return None


def run(args: argparse.Namespace) -> int:
    from extproc.bench.workloads import write_workload_tokenizer
    from extproc.datalayer.render import RenderTokenizer
    from extproc.datalayer.table import EndpointTable
    from extproc.hf_tokenizer import HfTokenizer, TokenizerError
    from extproc.local.procs import free_port, start_sim

    work = Path(tempfile.mkdtemp(prefix="extproc-bench-tokenize-"))
    try:
        directory = Path(args.tokenizer) if args.tokenizer else write_workload_tokenizer(work / "tokenizer")
        files = HfTokenizer.load(directory)
    except TokenizerError as exc:
        raise SystemExit(f"extproc bench tokenize: {exc}") from None
    port = free_port()
    sim = start_sim("sim", MODEL, port, work, "--time-scale", "0", "--tokenizer", str(directory))
    results: dict[str, dict[str, Any]] = {}
    try:

        async def main() -> None:
            table = EndpointTable(["bench"])
            table.replace_pool("bench", [f"127.0.0.1:{port}"])
            for shape in ("shared", "unique"):
                bodies = _bodies(shape, args, seed=7)
                tokens = len(files.prompt_ids(bodies[0]))
                ways = {
                    "engine render": RenderTokenizer(table, timeout=5.0, cache_entries=0),
                    "files here, whole": _Whole(files),
                    "files here, by message": RenderTokenizer(table, timeout=5.0, cache_entries=0, local={None: files}),
                }
                for way, tokenizer in ways.items():
                    try:
                        await tokenizer.token_ids("bench", MODEL, bodies[0], "warm")  # connections, first calls
                        measured = await _measure(tokenizer, bodies)
                    finally:
                        await tokenizer.close()
                    results[f"{shape} / {way}"] = {"shape": shape, "way": way, "prompt_tokens": tokens, **measured}
                    print(
                        f"{shape:7} {way:24} {tokens:6} tokens: wall mean {measured['wall_mean_ms']:.3f} ms, "
                        f"p50 {measured['wall_p50_ms']:.3f}, p99 {measured['wall_p99_ms']:.3f}; "
                        f"picker CPU {measured['cpu_ms_per_request']:.3f} ms/request",
                        flush=True,
                    )

        asyncio.run(main())
    finally:
        sim.stop()
    print("\n| shape | way | prompt tokens | wall mean ms | p50 | p99 | picker CPU ms/request |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results.values():
        print(
            f"| {r['shape']} | {r['way']} | {r['prompt_tokens']} | {r['wall_mean_ms']:.3f} | {r['wall_p50_ms']:.3f} | "
            f"{r['wall_p99_ms']:.3f} | {r['cpu_ms_per_request']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(list(results.values()), indent=2) + "\n")
    return 0
