"""Pure parts of the simulator: tokens, chat template, block hashes, the KV cache."""

from __future__ import annotations

import pytest

from extproc.sim.config import SimConfigError, from_preset
from extproc.sim.kvcache import KVCache
from extproc.sim.metrics import build_1_2_5_buckets
from extproc.sim.tokens import (
    PromptError,
    UnknownTokens,
    Vocabulary,
    block_hashes,
    count_tokens,
    render_chat,
    token_ids,
    token_texts,
)


def test_chat_template_keeps_earlier_turns_as_a_prefix() -> None:
    turn1 = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]
    turn2 = [*turn1, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    first, second = render_chat(turn1), render_chat(turn2)
    assert second.startswith(first)
    assert first.index("S") < first.index("Q1")


def test_chat_template_rejects_bad_shapes() -> None:
    for bad in ([], "x", [1], [{"content": "x"}], [{"role": "user", "content": {"a": 1}}]):
        with pytest.raises(PromptError):
            render_chat(bad)


def test_block_hashes_are_chained_and_cover_full_blocks_only() -> None:
    a = "a" * 64 + "b" * 64 + "c" * 10
    b = "z" * 64 + "b" * 64
    assert count_tokens(a) == 35
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 2 and len(hb) == 2
    assert ha[1] != hb[1]  # same second block, different first: no reuse
    assert block_hashes("a" * 64 + "q" * 64, 16)[0] == ha[0]
    assert block_hashes("é" * 64, 16) == block_hashes("é" * 64, 16)
    assert len(block_hashes(list(range(40)), 16)) == 2


def test_kv_cache_reuse_sharing_and_usage() -> None:
    cache = KVCache(num_blocks=10, block_size=16)
    h = [1, 2, 3]
    first = cache.allocate(h, 3, 3 * 16 + 1)
    assert first is not None and first.cached_blocks == 0 and first.num_blocks == 4
    assert cache.usage == pytest.approx(0.4)
    second = cache.allocate(h, 3, 3 * 16 + 1)  # shared while both run
    assert second is not None and second.cached_blocks == 3
    assert cache.held_blocks == 5
    cache.release(first)
    cache.release(second)
    assert cache.usage == 0 and cache.cached_blocks == 3
    assert cache.match([1, 2, 3, 4]) == 3
    assert cache.match([9, 2, 3]) == 0


def test_kv_cache_evicts_lru_tail_first_and_refuses_when_full() -> None:
    cache = KVCache(num_blocks=4, block_size=16)
    a = cache.allocate([1, 2], 2, 32)
    assert a is not None
    cache.release(a)
    b = cache.allocate([7, 8, 9], 3, 48)  # needs 3 of 4 blocks: evicts a's tail (2) before its head (1)
    assert b is not None
    assert cache.match([1, 2]) == 1 and cache.evictions == 1
    assert cache.allocate([5, 6], 2, 32) is None  # only one block is free
    assert not cache.grow(b, 5 * 16)
    assert cache.grow(b, 4 * 16)
    assert cache.usage == 1.0


def test_presets_and_validation() -> None:
    small = from_preset("llama-3.2-1b", "m", num_gpu_blocks=8)
    assert small.max_model_len == 128  # shortened to fit the cache
    with pytest.raises(SimConfigError, match="--max-model-len"):
        from_preset("llama-3.2-1b", "m", num_gpu_blocks=8, max_model_len=4096)
    with pytest.raises(SimConfigError, match="--preset"):
        from_preset("gpt-5", "m")
    big = from_preset("llama-3.2-3b", "m")
    one = from_preset("llama-3.2-1b", "m")
    assert big.itl > one.itl and big.prefill_per_token > one.prefill_per_token


def test_token_ids_are_a_fixed_function_of_each_chunk() -> None:
    # Pinned: replicas of different builds must agree, so a change here breaks routing across a fleet.
    assert token_ids("abcd").tolist() == [44579]
    assert token_ids("abcdefg").tolist() == [44579, 52555]  # a short last token gets its own id
    assert token_ids("").tolist() == []
    text = "Ünïcödé and ascii, " * 50
    ids = token_ids(text)
    assert len(ids) == count_tokens(text) and ids.max() < 128256
    assert token_ids(text, 1000).max() < 1000
    assert token_texts("abcdefg") == ["abcd", "efg"]


def test_text_and_its_ids_hash_to_the_same_blocks() -> None:
    text = "".join(chr(ord("a") + i % 26) + chr(0x400 + i % 50) for i in range(500))
    ids = token_ids(text).tolist()
    assert block_hashes(text, 16) == block_hashes(ids, 16) != []
    assert block_hashes(text, 16, limit_tokens=40) == block_hashes(ids, 16)[:2]
    assert block_hashes(text, 16, 1000) != block_hashes(text, 16)  # ids depend on the vocabulary


def test_vocabulary_decodes_what_it_encoded_and_says_what_it_cannot() -> None:
    vocabulary = Vocabulary(128256)
    ids = vocabulary.encode("hello, simulated world")
    assert vocabulary.decode(ids) == "hello, simulated world"
    assert vocabulary.decode(token_ids(" the sim").tolist()) == " the sim"  # output words are known from the start
    known = {*ids, *vocabulary.encode(" the sim ans")}
    unknown = next(i for i in range(128256) if i not in known)
    with pytest.raises(UnknownTokens, match=str(unknown)):
        vocabulary.decode([*ids, unknown])


def test_chat_template_generation_prompt_options() -> None:
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A par"}]
    assert render_chat(messages).endswith("A par<|end|>\n<|assistant|>\n")
    assert render_chat(messages, add_generation_prompt=False).endswith("A par<|end|>\n")
    assert render_chat(messages, continue_final_message=True).endswith("<|assistant|>\nA par")


def test_token_count_buckets_follow_the_context_length() -> None:
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(8192)[-3:] == (1000, 2000, 5000)
