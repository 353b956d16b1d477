"""The picker's tokenization through a real simulated vLLM's render endpoints: the engine's ids, cached."""

from __future__ import annotations

import asyncio
from pathlib import Path

from extproc.datalayer.render import RenderTokenizer
from extproc.datalayer.table import EndpointTable
from extproc.local.procs import free_port, start_sim
from tests.helpers import post

MODEL = "llama-3-2-1b"


def test_prompts_are_tokenized_by_the_engine_cached_and_a_dead_engine_gives_none(tmp_path: Path) -> None:
    port = free_port()
    sim = start_sim("sim", MODEL, port, tmp_path, "--time-scale", "0")
    try:
        messages = [{"role": "system", "content": "You are terse. " * 50}, {"role": "user", "content": "hi"}]
        expected = post(f"http://127.0.0.1:{port}/tokenize", {"model": MODEL, "messages": messages}).json()["tokens"]

        async def main() -> None:
            table = EndpointTable(["p"])
            table.replace_pool("p", [f"127.0.0.1:{port}"])
            tokenizer = RenderTokenizer(table, timeout=2.0, cache_entries=10)
            try:
                body = {"model": "auto", "messages": messages, "stream": True}
                first = await tokenizer.token_ids("p", MODEL, body, "key-1")
                assert first is not None and list(first) == expected
                again = await tokenizer.token_ids("p", MODEL, body, "key-1")
                assert again is first and tokenizer.stats.hits == 1 and tokenizer.stats.misses == 1
                ids = await tokenizer.token_ids("p", MODEL, {"prompt": [5, 6, 7]}, "ids")
                assert ids is not None and list(ids) == [5, 6, 7] and tokenizer.stats.misses == 1  # no round trip
                completion = await tokenizer.token_ids("p", MODEL, {"prompt": "Once upon a time " * 20}, "c")
                assert completion is not None and len(completion) > 10
                # the pool's only engine is gone: no tokens, no exception (the request is scored approximately)
                table.replace_pool("p", [f"127.0.0.1:{free_port()}"])
                assert await tokenizer.token_ids("p", MODEL, body, "key-2") is None
                assert tokenizer.stats.errors == 1
            finally:
                await tokenizer.close()

        asyncio.run(main())
    finally:
        sim.stop()
