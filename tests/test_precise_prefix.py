"""The precise prefix index and scorer, pure: what engines report holding, and the fallback where unknown."""

from __future__ import annotations

import random
from array import array

import pytest

from extproc import config as cfg
from extproc.datalayer.endpoint import EndpointState
from extproc.scheduling import RoutingRequest, Scheduler
from extproc.scheduling.framework import PluginError, SchedulingContext
from extproc.scheduling.prefix.kv_index import KvBlockIndex, token_block_hashes
from extproc.scheduling.prefix.precise import PrecisePrefixScorer

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
BS = 4  # tokens per block in these tests


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def store_chain(
    index: KvBlockIndex, address: str, ids: list[int], engine_base: int, parent: int | None = None
) -> list[int]:
    """Report ``ids`` (whole blocks) stored on ``address`` as one BlockStored; returns the engine hashes used."""
    engine = [engine_base + i for i in range(len(ids) // BS)]
    index.stored(address, engine, parent, ids, BS)
    return engine


def test_a_stored_chain_matches_by_our_hash_whatever_the_engine_hashes() -> None:
    index = KvBlockIndex()
    prompt = tokens(40)  # 10 blocks
    store_chain(index, A, prompt[:24], engine_base=1000)  # blocks 0-5
    store_chain(index, B, prompt[:8], engine_base=77)  # blocks 0-1, other engine hashes
    hashes = token_block_hashes(array("I", prompt), BS, 100)
    assert len(hashes) == 10
    assert index.match(hashes, [A, B, C]) == {A: 6, B: 2, C: 0}
    # a follow-up store with a parent continues the chain
    store_chain(index, A, prompt[24:32], engine_base=1006, parent=1005)
    assert index.match(hashes, [A])[A] == 8


def test_removals_clears_orphans_and_the_capacity_bound() -> None:
    index = KvBlockIndex()
    prompt = tokens(40)
    engine = store_chain(index, A, prompt, engine_base=1)
    hashes = token_block_hashes(array("I", prompt), BS, 100)
    assert index.removed(A, [engine[7], engine[8], engine[9]]) == 3  # vLLM evicts tails first
    assert index.match(hashes, [A])[A] == 7
    assert index.removed(A, [12345]) == 0 and index.stats.unknown_removals == 1
    index.removed(A, [engine[3]])  # a hole in the middle: the match stops there
    assert index.match(hashes, [A])[A] == 3
    assert index.stored(A, [555], 999_999, tokens(4), BS) == 0 and index.stats.orphans == 1  # unknown parent
    assert index.stored(A, [556], None, tokens(3), BS) == 0 and index.stats.malformed == 1  # short block
    index.cleared(A)
    assert index.size(A) == 0 and index.match(hashes, [A])[A] == 0
    index.set_limit(A, 5)
    store_chain(index, A, prompt, engine_base=100)
    assert index.size(A) == 5 and index.stats.evicted_over_limit == 5  # the oldest went


def test_the_same_tokens_on_two_endpoints_and_a_forgotten_endpoint() -> None:
    index = KvBlockIndex()
    prompt = tokens(16)
    store_chain(index, A, prompt, engine_base=1)
    store_chain(index, B, prompt, engine_base=1)  # engines may use the same hashes: per endpoint
    hashes = token_block_hashes(array("I", prompt), BS, 100)
    index.removed(A, [1, 2, 3, 4])
    assert index.match(hashes, [A, B]) == {A: 0, B: 4}
    index.forget(B)
    assert index.match(hashes, [A, B]) == {A: 0, B: 0}
    index.stored(C, [b"\x01" * 32], None, tokens(4), BS)  # bytes hashes (newer vLLM) work the same
    assert index.match(hashes, [C])[C] == 1


def endpoints() -> list[EndpointState]:
    out = []
    for address in (A, B, C):
        e = EndpointState(address=address, pool="p")
        e.scrape_ok, e.scraped_at = True, 0.0
        out.append(e)
    return out


def ctx(prompt: str, ids: list[int] | None, now: float = 0.0) -> SchedulingContext:
    request = RoutingRequest("p", "m", prompt, None, target_model="m", token_ids=ids)
    return SchedulingContext(request=request, now=now, rng=random.Random(1))


def test_live_endpoints_are_scored_from_the_events_the_others_approximately() -> None:
    scorer = PrecisePrefixScorer(min_blocks=1, port_offset=1)
    eps = endpoints()
    prompt = tokens(32)
    store_chain(scorer.index, A, prompt[:16], engine_base=1)  # A holds half, per its engine
    scorer.set_live(A, True)
    scorer.set_live(B, True)
    scorer.index.stored(B, [9], None, tokens(4, 500), BS)  # B is live (block size known), holds none of it
    text = "x" * 4096
    # C is not live: the approximate index decides for it; teach it that C served this text
    first = ctx(text, prompt)
    scorer.score(first, eps)
    scorer.on_picked(first, eps[2])
    scores = scorer.score(ctx(text, prompt), eps)
    assert scores[0] == pytest.approx(0.5)  # 4 of 8 blocks on A's engine
    assert scores[1] == 0.0
    assert scores[2] > 0.9  # C from the approximate index (it was sent there)
    # without tokens (the render failed) everyone is scored approximately
    assert scorer.score(ctx(text, None), eps)[0] == 0.0


def test_a_pick_counts_speculatively_until_the_engine_confirms_or_it_expires() -> None:
    scorer = PrecisePrefixScorer(min_blocks=1, port_offset=1, speculative_ttl=2.0)
    eps = endpoints()
    for address in (A, B):
        scorer.set_live(address, True)
        scorer.index.stored(address, [address], None, tokens(4, 900), BS)  # block size known
    prompt = tokens(32)
    first = ctx("", prompt, now=10.0)
    scorer.score(first, eps[:2])
    scorer.on_picked(first, eps[1])  # sent to B; its engine has not stored it yet
    assert scorer.score(ctx("", prompt, now=11.0), eps[:2]) == [0.0, 1.0]
    assert scorer.score(ctx("", prompt, now=12.5), eps[:2]) == [0.0, 0.0]  # expired, never confirmed


def test_params_are_checked_and_the_scheduler_asks_for_tokens() -> None:
    with pytest.raises(ValueError, match="port"):
        PrecisePrefixScorer(port=None)
    with pytest.raises(ValueError, match="speculative_ttl"):
        PrecisePrefixScorer(speculative_ttl=-1)
    with pytest.raises(ValueError, match="fallback"):
        PrecisePrefixScorer(fallback=[1])  # type: ignore[arg-type]
    scorer = PrecisePrefixScorer(port_offset=1, replay_port_offset=2)
    assert scorer.event_address("10.1.2.3:8000") == ("10.1.2.3", 8001)
    assert scorer.event_address("[::1]:8000", replay=True) == ("::1", 8002)
    assert PrecisePrefixScorer().event_address("10.1.2.3:8000") == ("10.1.2.3", 5557)
    data = {"pools": [{"name": "p", "models": ["m"], "endpoints": {"static": [A]}}]}
    data["scheduler"] = {"scorers": [{"name": "precise_prefix", "weight": 4, "params": {"bogus": 1}}]}
    with pytest.raises(PluginError, match="bogus"):
        Scheduler.from_config(cfg.parse_config(data))
    data["scheduler"] = {"scorers": [{"name": "precise_prefix", "weight": 4}]}
    assert Scheduler.from_config(cfg.parse_config(data)).needs_tokens
    assert not Scheduler.from_config(cfg.parse_config({"pools": data["pools"]})).needs_tokens


def test_replicas_share_the_fallback_index_through_the_prefix_records() -> None:
    a, b = PrecisePrefixScorer(port_offset=1), PrecisePrefixScorer(port_offset=1)
    eps = endpoints()
    text = "y" * 4096
    first = ctx(text, None)
    a.score(first, eps)
    a.on_picked(first, eps[1])
    record = a.shared_record(first, eps[1])
    b.apply_shared(B, a.encode_shared(record))
    assert b.score(ctx(text, None), eps)[1] > 0.9  # b's fallback learned a's pick
