"""The model's own tokenizer files, on both sides: the simulator tokenizes with them (``extproc sim --tokenizer``)
and the picker (``precise_prefix``'s ``tokenizer``) computes the same ids without asking an engine.

The files are a small byte-level BPE tokenizer trained here (``write_example_tokenizer``), laid out as a
Hugging Face snapshot with a Llama-3-style chat template: what a user points both at is a model directory.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("tokenizers", reason="the tokenizer extra is not installed: pip install -e '.[test]'")

from extproc.config import ConfigError
from extproc.datalayer.render import RenderTokenizer
from extproc.datalayer.table import EndpointTable
from extproc.gateway.command import check_config
from extproc.hf_tokenizer import HfTokenizer, PieceCache, TokenizerError
from extproc.local.stack import KV_EVENTS_PORT_OFFSET, KV_REPLAY_PORT_OFFSET, PoolSpec
from extproc.local.stack import start_stack as start
from extproc.scheduling.framework import PluginError
from extproc.sim.example_tokenizer import SPECIAL, write_example_tokenizer
from tests.conftest import Sim
from tests.helpers import metrics, post
from tests.test_picker_e2e import MODEL, UPSTREAM, text
from tests.test_precise_e2e import ask, picker_metric, wait_for, warm_past_the_gateway


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example_tokenizer(tmp_path_factory.mktemp("model"))


MESSAGES = [
    {"role": "system", "content": "You answer in one line. " * 30},
    {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "the time?"}]},
]


def test_chat_goes_through_the_template_once_with_its_special_tokens(model_dir: Path) -> None:
    tok = HfTokenizer.load(model_dir)
    specials = {tok.encoder.token_to_id(t) for t in SPECIAL}
    ids = tok.prompt_ids({"messages": MESSAGES})
    bos, header, eot = (tok.encoder.token_to_id(t) for t in (SPECIAL[0], SPECIAL[2], SPECIAL[4]))
    assert ids[0] == bos and ids.count(bos) == 1  # the template's bos_token; none added again
    assert ids.count(header) == 3 and ids.count(eot) == 2  # system, user, and the assistant's generation header
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "What is\nthe time?" in tok.decode(ids)  # text parts joined by newlines
    # without the generation prompt, and a final message left open for the model to continue
    closed = tok.prompt_ids({"messages": MESSAGES, "add_generation_prompt": False})
    assert closed == ids[: len(closed)] and closed[-1] == eot
    open_ended = [*MESSAGES, {"role": "assistant", "content": "It is"}]
    continued = tok.decode(tok.prompt_ids({"messages": open_ended, "continue_final_message": True}))
    assert continued.endswith("<|end_header_id|>\n\nIt is")
    # a completions prompt: the post-processor's bos, unless add_special_tokens is false
    plain = tok.prompt_ids({"prompt": "Once upon a time"})
    assert plain[0] == bos and tok.prompt_ids({"prompt": "Once upon a time", "add_special_tokens": False}) == plain[1:]
    assert not specials.intersection(plain[1:])


def test_a_chat_encoded_message_by_message_is_the_whole_prompt_encoded(model_dir: Path) -> None:
    """The picker and the simulator encode a chat piece by piece (cut at the added tokens), caching the pieces:
    the ids must be those of the whole text, whatever the messages hold (marker strings included)."""
    tok = HfTokenizer.load(model_dir)
    cache = PieceCache(max_tokens=3000)  # small: pieces are evicted and encoded again along the way
    rng = random.Random(5)
    systems = [text(1500, i) for i in range(4)]
    odd = ["", " ", "\n\n", "<|eot_id|>", "x<|start_header_id|>y", "<|eot_id", "é ü 漢字 🙂", "  trailing  "]
    for i in range(200):
        messages = [{"role": "system", "content": rng.choice(systems)}]
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": rng.choice(odd) + text(rng.randint(1, 300), i)})
            messages.append({"role": "assistant", "content": rng.choice(odd)})
        whole_text, special = tok.prompt_text({"messages": messages, "add_generation_prompt": i % 2 == 0})
        assert not special
        assert cache.chat_ids(tok, whole_text) == tok.encode(whole_text, add_special_tokens=False), i
    assert tok.pieces("a<|eot_id|>b") == ["a", "<|eot_id|>", "b"]


def test_bad_files_and_requests_are_named(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json there"):
        HfTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="not a tokenizers file"):
        HfTokenizer.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (broken / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(TokenizerError, match="chat template does not parse"):
        HfTokenizer.load(broken)
    tok = HfTokenizer.load(model_dir / "tokenizer.json")  # the file itself works too
    with pytest.raises(TokenizerError, match="refused the request: unknown role wizard"):
        tok.prompt_ids({"messages": [{"role": "wizard", "content": "hi"}]})
    with pytest.raises(TokenizerError, match=r"messages\[0\].content"):
        tok.prompt_ids({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    with pytest.raises(TokenizerError, match="'prompt' must be a string"):
        tok.prompt_ids({"prompt": {"text": "x"}})


def test_the_simulator_renders_and_tokenizes_with_the_models_files(
    model_dir: Path, start_simulator: Callable[..., Sim]
) -> None:
    tok = HfTokenizer.load(model_dir)
    sim = start_simulator("--time-scale", "0", "--tokenizer", str(model_dir))
    expected = tok.prompt_ids({"messages": MESSAGES})
    rendered = post(f"{sim.base}/v1/chat/completions/render", {"messages": MESSAGES}).json()
    assert rendered["token_ids"] == expected
    assert post(f"{sim.base}/tokenize", {"messages": MESSAGES}).json()["tokens"] == expected
    completion = post(f"{sim.base}/v1/completions/render", {"prompt": "Once upon a time"}).json()
    assert completion[0]["token_ids"] == tok.prompt_ids({"prompt": "Once upon a time"})
    answer = post(f"{sim.base}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4})
    assert answer.status == 200 and answer.json()["usage"]["prompt_tokens"] == len(expected)
    detok = post(f"{sim.base}/detokenize", {"tokens": expected[:3]}).json()["prompt"]
    assert detok.startswith(SPECIAL[0])
    size = tok.encoder.get_vocab_size()  # the model's vocabulary bounds ids, not --vocab-size
    beyond = post(f"{sim.base}/detokenize", {"tokens": [size]})
    assert beyond.status == 400 and f"Token id {size} is out of vocabulary" in beyond.json()["error"]["message"]
    refused = post(f"{sim.base}/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert refused.status == 400 and "unknown role wizard" in refused.json()["error"]["message"]


def test_the_picker_tokenizes_here_and_asks_an_engine_only_when_the_files_cannot(
    model_dir: Path, start_simulator: Callable[..., Sim]
) -> None:
    tok = HfTokenizer.load(model_dir)
    sim = start_simulator("--time-scale", "0", "--tokenizer", str(model_dir))

    async def main() -> None:
        table = EndpointTable(["p"])
        table.replace_pool("p", [sim.address])
        tokenizer = RenderTokenizer(table, timeout=2.0, cache_entries=10, local={None: tok})
        try:
            body = {"messages": MESSAGES}
            ids = await tokenizer.token_ids("p", "test-model", body, "key-1")
            engine = post(f"{sim.base}/v1/chat/completions/render", body).json()["token_ids"]
            assert ids is not None and list(ids) == engine
            assert (tokenizer.stats.local, tokenizer.stats.misses) == (1, 0)  # no round trip
            assert await tokenizer.token_ids("p", "test-model", body, "key-1") is ids and tokenizer.stats.hits == 1
            long = {"messages": [{"role": "user", "content": text(20_000, 3)}]}  # encoded on a worker thread
            long_ids = await tokenizer.token_ids("p", "test-model", long, "key-long")
            assert long_ids is not None and list(long_ids) == tok.prompt_ids(long) and len(long_ids) > 2000
            # content the files cannot render here: the engine is asked (and refuses it too: no tokens, no error)
            odd = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
            assert await tokenizer.token_ids("p", "test-model", odd, "key-2") is None
            assert tokenizer.stats.local_errors == 1 and tokenizer.stats.errors == 1
        finally:
            await tokenizer.close()

    asyncio.run(main())


def config_with(tmp_path: Path, tokenizer: object) -> Path:
    params = {"port": 5557, "tokenizer": tokenizer}
    config = {
        "pools": [{"name": "1b", "models": ["m"], "endpoints": {"static": ["127.0.0.1:1"]}}],
        "scheduler": {"scorers": [{"name": "precise_prefix", "weight": 1, "params": params}]},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_a_bad_tokenizer_param_is_refused_at_start_naming_the_field(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"tokenizer: .*no tokenizer.json there"):
        check_config(config_with(tmp_path, str(tmp_path / "nowhere")))
    with pytest.raises(PluginError, match=r"tokenizer.1b must be a path"):
        check_config(config_with(tmp_path, {"1b": 7}))
    with pytest.raises(
        ConfigError,
        match=r"scheduler.scorers\[0\].params.tokenizer names pool\(s\) 3b, which the config does not define; "
        r"its pools: 1b",
    ):
        check_config(config_with(tmp_path, {"3b": str(model_dir)}))
    _config, scheduler = check_config(config_with(tmp_path, {"1b": str(model_dir)}))
    assert scheduler.needs_tokens


def test_precise_routing_on_ids_computed_here_finds_what_an_engine_holds(model_dir: Path, tmp_path: Path) -> None:
    """A prompt sent straight to one replica, past the gateway: only its engine's events can tell the picker,
    and only ids equal to the engine's can match them. The picker computes them itself: no render call."""
    sim_args = ("--time-scale", "0.05", "--num-gpu-blocks", "400", "--tokenizer", str(model_dir))
    params = {
        "port_offset": KV_EVENTS_PORT_OFFSET,
        "replay_port_offset": KV_REPLAY_PORT_OFFSET,
        "tokenizer": str(model_dir),
    }
    scheduler = {"scorers": [{"name": "precise_prefix", "weight": 4, "params": params}, {"name": "queue", "weight": 1}]}
    stack = start(tmp_path, [PoolSpec("1b", MODEL, 3, sim_args, kv_events=True)], settings={"scheduler": scheduler})
    try:
        replicas = stack.sims["1b"]
        wait_for(
            lambda: all(picker_metric(stack, "extproc_kv_events_connected", r.address) == 1 for r in replicas),
            20,
            "every event stream to connect",
        )
        target = replicas[1]
        document = text(2500, 11)
        warm_past_the_gateway(stack, target, document, 20)
        for i in range(4):
            assert ask(stack.gateway, document, f"question {i}").headers[UPSTREAM] == target.address
            if i == 0:  # the first, before any pick of ours: its blocks matched only in the engine's own report
                first = metrics(stack.metrics_url.removesuffix("/metrics"))
                assert first["extproc_precise_prefix_hit_ratio_count{pool=1b}"] == 1
                assert first["extproc_precise_prefix_hit_ratio_sum{pool=1b}"] > 0.8
        values = metrics(stack.metrics_url.removesuffix("/metrics"))
        assert values["extproc_render_requests_total{result=local}"] >= 4
        assert values["extproc_render_requests_total{result=miss}"] == 0  # no engine was asked
        assert values["extproc_tokenize_seconds_total"] > 0
    finally:
        stack.stop()


def test_bench_tokenize_measures_each_way_and_every_request_gets_tokens(tmp_path: Path) -> None:
    out = tmp_path / "tokenize.json"
    argv = [sys.executable, "-m", "extproc", "bench", "tokenize", "--requests", "20", "--json", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())
    ways = ["engine render", "files here, whole", "files here, by message"]
    assert [(r["shape"], r["way"]) for r in rows] == [(s, w) for s in ("shared", "unique") for w in ways]
    assert all(r["prompt_tokens"] > 2000 and r["wall_mean_ms"] > 0 for r in rows)
    assert "| shared | files here, by message |" in result.stdout


def test_sim_with_a_directory_without_tokenizer_files_stops_with_the_reason(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "extproc", "sim", "--model", "m", "--port", "0", "--tokenizer", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"extproc sim: error: {tmp_path}: no tokenizer.json there" in result.stderr
