"""Prompt block hashing and the bounded prefix index: pure, no network."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from extproc.scheduling.prefix.hashing import prompt_hashes
from extproc.scheduling.prefix.index import PrefixIndex

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def text_of(tag: str, blocks: int) -> str:
    return "".join(f"{tag}-{i:06d}-".ljust(16, ".") for i in range(blocks))


def chain(tag: str, blocks: int, model: str = "m") -> tuple[int, ...]:
    return prompt_hashes(text_of(tag, blocks), model, block_chars=16, max_blocks=10_000)


def assert_consistent(index: PrefixIndex) -> None:
    """The global hash -> endpoints map is exactly the union of the per-endpoint LRUs."""
    expected: dict[int, set[str]] = {}
    for address, lru in index._lru.items():
        assert len(lru) <= index.max_blocks
        for h in lru:
            expected.setdefault(h, set()).add(address)
    assert set(index._holders) == set(expected)
    for h, owners in expected.items():
        assert set(index.holders(h)) == owners


def linear_match(index: PrefixIndex, hashes: Sequence[int], candidates: Sequence[str]) -> dict[str, int]:
    """The reference: walk block by block, each endpoint stops at its first miss."""
    out = {}
    for address in candidates:
        lru = index._lru.get(address, {})
        n = 0
        while n < len(hashes) and hashes[n] in lru:
            n += 1
        out[address] = n
    return out


# --- hashing -----------------------------------------------------------------------------------------


def test_full_blocks_only_and_bounded() -> None:
    text = "x" * 64 * 3 + "tail"
    hashes = prompt_hashes(text, "m", 64, 256)
    assert len(hashes) == 3
    assert prompt_hashes(text, "m", 64, 2) == hashes[:2]
    assert prompt_hashes("", "m", 64, 256) == ()


def test_short_prompt_gets_one_hash_of_the_partial_block() -> None:
    assert len(prompt_hashes("Hi there", "m", 64, 256)) == 1
    assert prompt_hashes("Hi there", "m", 64, 256) == prompt_hashes("Hi there", "m", 64, 256)
    assert prompt_hashes("Hi there", "m", 64, 256) != prompt_hashes("Hi therf", "m", 64, 256)


def test_hashes_are_chained() -> None:
    """Equal hash i means equal text up to block i: a change in block 0 changes every later hash."""
    base = "a" * 64 + "b" * 64 + "c" * 64
    changed = "A" + base[1:]
    assert not set(prompt_hashes(base, "m", 64, 256)) & set(prompt_hashes(changed, "m", 64, 256))
    extended = base + "d" * 100
    assert prompt_hashes(extended, "m", 64, 256)[:3] == prompt_hashes(base, "m", 64, 256)


def test_model_seeds_the_chain() -> None:
    text = "same prompt " * 20
    assert not set(prompt_hashes(text, "llama-1b", 64, 256)) & set(prompt_hashes(text, "llama-3b", 64, 256))


def test_non_ascii_blocks_are_counted_in_characters() -> None:
    ascii_head = "a" * 128
    hashes = prompt_hashes(ascii_head + "é" * 64 + "ü" * 10, "m", 64, 256)
    assert len(hashes) == 3
    assert hashes[:2] == prompt_hashes(ascii_head + "b" * 64, "m", 64, 256)[:2]


# --- the index ---------------------------------------------------------------------------------------


def test_longest_prefix_match_across_endpoints() -> None:
    index = PrefixIndex(max_blocks=100)
    conversation = chain("conv", 10)
    index.record(A, conversation)
    index.record(B, conversation[:4])
    index.record(C, chain("other", 10))
    assert index.match(conversation, [A, B, C, "10.0.0.9:8000"]) == {A: 10, B: 4, C: 0, "10.0.0.9:8000": 0}
    assert index.match(conversation[:3], [A, B]) == {A: 3, B: 3}
    assert index.match((), [A]) == {A: 0}
    assert index.match(conversation, []) == {}
    # a conversation that diverges after block 4 matches only the shared head
    fork = prompt_hashes(text_of("conv", 4) + text_of("fork", 3), "m", 16, 10_000)
    assert fork[:4] == conversation[:4]
    assert index.match(fork, [A, B]) == {A: 4, B: 4}


def test_lru_bound_evicts_tails_first_and_keeps_the_map_consistent() -> None:
    index = PrefixIndex(max_blocks=8)
    first, second = chain("first", 5), chain("second", 5)
    index.record(A, first)
    index.record(B, first)
    index.record(A, second)
    assert index.size(A) == 8
    # A lost the two least recently used blocks: the tail of the first prompt, not its head
    assert index.match(first, [A, B]) == {A: 3, B: 5}
    assert index.match(second, [A]) == {A: 5}
    assert index.holders(first[4]) == [B]
    assert_consistent(index)


def test_record_refreshes_recency() -> None:
    index = PrefixIndex(max_blocks=10)
    one, two, three = chain("one", 5), chain("two", 5), chain("three", 5)
    index.record(A, one)
    index.record(A, two)
    index.record(A, one)  # one is now more recent than two
    index.record(A, three)
    assert index.match(one, [A]) == {A: 5}
    assert index.match(two, [A]) == {A: 0}
    assert_consistent(index)


def test_prompt_longer_than_the_bound_keeps_its_head() -> None:
    index = PrefixIndex(max_blocks=4)
    long = chain("long", 10)
    index.record(A, long)
    assert index.size(A) == 4
    assert index.match(long, [A]) == {A: 4}
    assert_consistent(index)


def test_purge_forgets_an_endpoint_and_reuses_its_slot() -> None:
    index = PrefixIndex(max_blocks=100)
    conversation = chain("conv", 6)
    index.record(A, conversation)
    index.record(B, conversation)
    assert index.purge(A) == 6
    assert index.purge(A) == 0
    assert index.size(A) == 0
    assert index.addresses() == [B]
    assert index.match(conversation, [A, B]) == {A: 0, B: 6}
    index.record(C, conversation[:2])  # takes A's freed slot
    assert index.match(conversation, [A, B, C]) == {A: 0, B: 6, C: 2}
    assert_consistent(index)
    index.purge(B)
    index.purge(C)
    assert index.total_blocks() == 0
    assert index.distinct_blocks() == 0


def test_different_models_never_match() -> None:
    index = PrefixIndex()
    text = "You are a helpful assistant. " * 20
    index.record(A, prompt_hashes(text, "llama-1b", 64, 256))
    assert index.match(prompt_hashes(text, "llama-3b", 64, 256), [A]) == {A: 0}
    assert index.match(prompt_hashes(text, "llama-1b", 64, 256), [A]) == {A: 9}


def test_match_equals_the_block_by_block_walk_under_random_traffic() -> None:
    """The binary-searching match relies on prefix-closed LRUs; check it against the plain walk."""
    rng = random.Random(3)
    index = PrefixIndex(max_blocks=60)
    endpoints = [f"10.0.0.{i}:8000" for i in range(1, 9)]
    # conversations that share heads of various lengths, so endpoints hold many different depths
    heads = [text_of(f"head{i}", rng.randint(1, 12)) for i in range(6)]
    texts = [rng.choice(heads) + text_of(f"tail{i}", rng.randint(0, 30)) for i in range(40)]
    texts = [t[: 16 * rng.randint(1, len(t) // 16)] for t in texts for _ in range(2)]  # earlier turns
    prompts = [prompt_hashes(t, "m", 16, 10_000) for t in texts]
    for step in range(3000):
        prompt = rng.choice(prompts)
        candidates = rng.sample(endpoints, rng.randint(1, len(endpoints)))
        assert index.match(prompt, candidates) == linear_match(index, prompt, candidates)
        index.record(rng.choice(endpoints), prompt)
        if step % 500 == 499:
            index.purge(rng.choice(endpoints))
    assert_consistent(index)


def test_memory_is_bounded() -> None:
    index = PrefixIndex(max_blocks=50)
    rng = random.Random(1)
    endpoints = [f"10.0.0.{i}:8000" for i in range(1, 5)]
    for i in range(500):
        index.record(rng.choice(endpoints), chain(f"p{i}", rng.randint(1, 40)))
    assert index.total_blocks() <= 50 * len(endpoints)
    assert index.distinct_blocks() <= index.total_blocks()
    assert_consistent(index)


def test_bad_bound() -> None:
    with pytest.raises(ValueError, match="max_blocks"):
        PrefixIndex(max_blocks=0)


def test_a_smaller_limit_bounds_one_endpoint_and_keeps_heads() -> None:
    index = PrefixIndex(max_blocks=100)
    index.record(A, chain("sys", 30), limit=20)  # the endpoint can hold 20 blocks: the first 20 stay
    index.record(B, chain("sys", 30))
    assert (index.size(A), index.size(B)) == (20, 30)
    assert index.match(chain("sys", 30), [A, B]) == {A: 20, B: 30}
    index.record(A, chain("other", 10), limit=20)  # the new prompt displaces the old one's tail
    assert index.match(chain("sys", 30), [A])[A] == 10
    assert index.match(chain("other", 10), [A])[A] == 10
    index.record(A, chain("other", 10), limit=500)  # a limit above max_blocks changes nothing
    assert index.size(A) == 20
    assert_consistent(index)
