"""The pure scheduling core: filters, scorers, pickers and the scheduler. No network, no clock."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from extproc import config as cfg
from extproc.scheduling import (
    EndpointState,
    PluginError,
    RoutingRequest,
    Scheduler,
    SchedulingContext,
    known_plugins,
    register_scorer,
)
from extproc.scheduling.prefix.scorer import PrefixScorer

POOL, MODEL, NOW = "pool-1b", "llama-1b", 100.0
SYSTEM = "<|system|>\nYou are a helpful assistant who answers questions about cities and rivers.\n"


def endpoints(n: int = 4, **kw: Any) -> list[EndpointState]:
    fields: dict[str, Any] = {"scraped_at": NOW - 0.1, "scrape_ok": True, **kw}
    return [EndpointState(f"10.0.0.{i + 1}:8000", POOL, **fields) for i in range(n)]


def scheduler(seed: int = 0, **settings: Any) -> Scheduler:
    return Scheduler(cfg.Scheduler(**settings), rng=random.Random(seed))


def scorers(**weights: float | tuple[float, dict[str, Any]]) -> list[cfg.WeightedPlugin]:
    out = []
    for name, spec in weights.items():
        weight, params = spec if isinstance(spec, tuple) else (spec, {})
        out.append(cfg.WeightedPlugin(name=name, weight=weight, params=params))
    return out


def request(s: Scheduler, text: str = "", subset: Sequence[str] | None = None) -> RoutingRequest:
    return RoutingRequest(POOL, MODEL, text, None if subset is None else frozenset(subset), target_model=MODEL)


def scrape(eps: Sequence[EndpointState], now: float = NOW) -> None:
    """What a fresh scrape does to the picker's view: pending back to zero."""
    for e in eps:
        e.pending = 0
        e.scraped_at = now


def turn(history: str, user: str) -> str:
    return f"{history}<|user|>\n{user}\n<|assistant|>\n"


# --- affinity and load -------------------------------------------------------------------------------


def test_multi_turn_conversation_sticks_while_others_spread() -> None:
    s = scheduler(seed=1)
    eps = endpoints(4)
    questions = [
        "Tell me about the history of Paris and its bridges over the Seine, in some detail please.",
        "What are the main rivers of Germany, and which cities lie on the Rhine and the Elbe?",
        "Describe the canals of Amsterdam: when were they dug and why, and how are they kept?",
        "How did Vienna grow along the Danube, and which districts are closest to the river?",
    ]
    first_turns = [turn(SYSTEM, q) + "x" * 600 for q in questions]  # long enough to be worth affinity
    served: list[str] = []
    for text in first_turns:
        served.append(s.schedule(request(s, text), eps, NOW).endpoints[0])
    # pending spreads the four new conversations over the four idle endpoints
    assert len(set(served)) == 4
    for round_ in range(3):
        scrape(eps)  # equal load again
        for text, where in zip(first_turns, served, strict=True):
            follow_up = turn(text + "Here is my answer.\n", f"And a follow-up question number {round_}?")
            decision = s.schedule(request(s, follow_up), eps, NOW)
            assert decision.endpoints[0] == where
            scrape(eps)


def test_saturated_endpoint_loses_despite_a_full_prefix_match() -> None:
    s = scheduler()
    eps = endpoints(3)
    text = turn(SYSTEM, "a long question " * 100)
    first = s.schedule(request(s, text), eps, NOW).endpoints[0]
    scrape(eps)
    hot = next(e for e in eps if e.address == first)
    hot.waiting = 10
    decision = s.schedule(request(s, text), eps, NOW)
    assert decision.endpoints[0] != first
    assert first not in decision.scores  # filtered out, not merely outscored
    # KV-cache pressure saturates too
    hot.waiting, hot.kv_usage = 0, 0.97
    scrape(eps)
    assert s.schedule(request(s, text), eps, NOW).endpoints[0] != first


def test_identical_short_prompts_spread_by_load() -> None:
    """200 copies of one short prompt over 4 endpoints: no endpoint gets more than 40 %.

    With GIE's ratio-only score (min_blocks=1) and no saturation filter, they all pile onto one.
    """

    def run(settings: dict[str, Any]) -> Counter[str]:
        s = scheduler(seed=7, **settings)
        eps = endpoints(4)
        outstanding = dict.fromkeys((e.address for e in eps), 0)
        picks: Counter[str] = Counter()
        for k in range(200):
            decision = s.schedule(request(s, "What is the capital of France?"), eps, NOW)
            picks[decision.endpoints[0]] += 1
            outstanding[decision.endpoints[0]] += 1
            if k % 5 == 4:  # a scrape every 5 requests; each endpoint finished up to 2 meanwhile
                for e in eps:
                    outstanding[e.address] = max(0, outstanding[e.address] - 2)
                    e.waiting = outstanding[e.address]
                scrape(eps)
        return picks

    ours = run({})
    assert sum(ours.values()) == 200
    assert max(ours.values()) <= 0.4 * 200
    gie = run({"filters": ["healthy"], "scorers": scorers(queue=2, kv_cache=2, prefix=(3, {"min_blocks": 1}))})
    assert max(gie.values()) >= 0.9 * 200


def test_pending_and_prefix_are_recorded_on_the_pick() -> None:
    s = scheduler()
    eps = endpoints(2)
    req = request(s, "y" * 640)
    decision = s.schedule(req, eps, NOW)
    picked = next(e for e in eps if e.address == decision.endpoints[0])
    assert picked.pending == 1
    assert sum(e.pending for e in eps) == 1
    prefix = next(p for p in s.plugins() if isinstance(p, PrefixScorer))
    assert prefix.index.match(prefix.hashes(req.prompt, MODEL), [e.address for e in eps])[picked.address] == 10
    s.forget_endpoint(picked.address)
    assert prefix.index.size(picked.address) == 0


# --- filters -----------------------------------------------------------------------------------------


def test_stale_endpoints_are_excluded_unless_none_is_fresh() -> None:
    s = scheduler()
    eps = endpoints(3)
    eps[0].scraped_at = NOW - 10  # stale
    eps[1].scrape_ok = False  # last scrape failed
    for _ in range(10):
        decision = s.schedule(request(s), eps, NOW)
        assert decision.endpoints == (eps[2].address,)
        assert not decision.fail_open
        eps[2].pending = 0
    for e in eps:
        e.scraped_at = None  # never scraped: fail open
    decision = s.schedule(request(s), eps, NOW)
    assert decision.routed
    assert decision.fail_open
    assert "fresh" in decision.reason
    assert len(decision.endpoints) == 3


def test_subset_hint_restricts_and_an_empty_result_is_503() -> None:
    s = scheduler()
    eps = endpoints(4)
    for _ in range(20):
        decision = s.schedule(request(s, subset=[eps[1].address, eps[3].address]), eps, NOW)
        assert set(decision.endpoints) == {eps[1].address, eps[3].address}
        scrape(eps)
    for subset in ([], ["10.9.9.9:8000"]):
        decision = s.schedule(request(s, subset=subset), eps, NOW)
        assert decision.status == 503
        assert not decision.routed
        assert decision.reason == "no endpoint in the subset hint"


def test_filter_order_decides_whether_a_stale_hinted_endpoint_fails_open() -> None:
    eps = endpoints(3)
    eps[2].scraped_at = NOW - 10
    hint = [eps[2].address]
    # healthy first: the hint names only a stale endpoint, so nothing eligible is left
    h = scheduler(filters=["healthy", "subset", "not_saturated"])
    assert h.schedule(request(h, subset=hint), eps, NOW).status == 503
    # subset first (the default): the hint is honoured and health fails open inside it
    s = scheduler()
    decision = s.schedule(request(s, subset=hint), eps, NOW)
    assert decision.endpoints == (eps[2].address,)
    assert decision.fail_open


def test_all_saturated_sheds_with_429_or_routes_anyway() -> None:
    eps = endpoints(3, waiting=9)
    eps[1].waiting = 20
    shedding = scheduler(filters=["subset", "healthy", {"name": "not_saturated", "params": {"shed": True}}])
    decision = shedding.schedule(request(shedding), eps, NOW)
    assert (decision.status, decision.endpoints) == (429, ())
    assert "saturated" in decision.reason
    assert all(e.pending == 0 for e in eps)

    routing = scheduler()
    decision = routing.schedule(request(routing), eps, NOW)
    assert decision.routed
    assert not decision.fail_open
    assert "saturated" in decision.reason
    assert decision.endpoints[-1] == eps[1].address  # the longest queue is the last resort


def test_empty_pool_and_other_pools() -> None:
    s = scheduler()
    assert s.schedule(request(s), [], NOW).status == 503
    other = [EndpointState("10.1.0.1:8000", "pool-3b", scraped_at=NOW, scrape_ok=True)]
    decision = s.schedule(request(s), other, NOW)
    assert decision.status == 503
    assert POOL in decision.reason
    decision = s.schedule(request(s), other + endpoints(1), NOW)
    assert decision.endpoints == ("10.0.0.1:8000",)


# --- pickers -----------------------------------------------------------------------------------------


def test_fallbacks_count_and_order() -> None:
    eps = endpoints(5)
    for i, e in enumerate(eps):
        e.waiting = [3, 0, 4, 1, 2][i]
    s = scheduler(scorers=scorers(queue=1), fallbacks=3)
    decision = s.schedule(request(s), eps, NOW)
    assert decision.endpoints == tuple(eps[i].address for i in (1, 3, 4, 0))
    assert decision.scores == pytest.approx({eps[i].address: (4 - eps[i].waiting) / 4 for i in range(5)})
    assert scheduler(fallbacks=0).schedule(request(s), endpoints(5), NOW).endpoints.__len__() == 1
    assert len(scheduler(fallbacks=10).schedule(request(s), endpoints(5), NOW).endpoints) == 5


def test_max_score_breaks_ties_at_random() -> None:
    s = scheduler(scorers=scorers(kv_cache=1))
    firsts = Counter(s.schedule(request(s), endpoints(4), NOW).endpoints[0] for _ in range(400))
    assert len(firsts) == 4
    assert min(firsts.values()) > 50


def test_round_robin_cycles_per_pool() -> None:
    s = scheduler(filters=["healthy", "subset"], scorers=[], picker="round_robin", fallbacks=1)
    eps = endpoints(3, waiting=50)
    eps.reverse()  # the order is by address, not by the caller's list
    picks = [s.schedule(request(s), eps, NOW).endpoints for _ in range(6)]
    addresses = sorted(e.address for e in eps)
    assert [p[0] for p in picks] == addresses * 2
    assert picks[0][1] == addresses[1]
    other = [EndpointState("10.1.0.1:8000", "pool-3b", scraped_at=NOW, scrape_ok=True)]
    assert s.schedule(RoutingRequest("pool-3b"), other, NOW).endpoints == ("10.1.0.1:8000",)
    assert s.schedule(request(s), eps, NOW).endpoints[0] == addresses[0]  # its own counter


def test_random_covers_all() -> None:
    s = scheduler(seed=3, filters=["healthy", "subset"], scorers=[], picker="random")
    eps = endpoints(5)
    firsts = Counter(s.schedule(request(s), eps, NOW).endpoints[0] for _ in range(500))
    assert set(firsts) == {e.address for e in eps}
    assert min(firsts.values()) > 50


# --- configuration and registry ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "settings", "words"),
    [
        ("filter", {"filters": ["healthy", "fresh"]}, ["scheduler.filters[1]", "'fresh'", "healthy, not_saturated"]),
        ("scorer", {"scorers": scorers(queue=1, latency=1)}, ["scheduler.scorers[1]", "'latency'", "kv_cache"]),
        ("picker", {"picker": "best"}, ["scheduler.picker", "'best'", "max_score, random, round_robin"]),
    ],
)
def test_unknown_plugin_names_are_clear(kind: str, settings: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(PluginError) as info:
        scheduler(**settings)
    message = str(info.value)
    assert f"unknown {kind}" in message
    for word in words:
        assert word in message


def test_bad_scorer_params_are_clear() -> None:
    with pytest.raises(PluginError, match=r"scorer 'prefix'.*min_blocks"):
        scheduler(scorers=scorers(prefix=(1, {"min_blocks": 0})))
    with pytest.raises(PluginError, match=r"unknown param 'window' for scorer 'queue'; it accepts no params"):
        scheduler(scorers=scorers(queue=(1, {"window": 3})))


def test_known_plugins() -> None:
    known = known_plugins()
    assert {"healthy", "subset", "not_saturated"} <= set(known["filters"])
    assert {"queue", "kv_cache", "prefix", "running"} <= set(known["scorers"])
    assert {"max_score", "random", "round_robin"} <= set(known["pickers"])


def test_a_new_scorer_is_one_class_and_one_line_of_config() -> None:
    @register_scorer("test_prefers_last_octet")
    class PrefersLastOctet:
        needs_prefix = False

        def __init__(self, octet: int) -> None:
            self.octet = octet

        def score(self, ctx: SchedulingContext, candidates: Sequence[EndpointState]) -> list[float]:
            return [float(e.address.split(":")[0].endswith(f".{self.octet}")) for e in candidates]

    s = scheduler(scorers=scorers(test_prefers_last_octet=(1, {"octet": 3})))
    assert s.schedule(request(s), endpoints(4), NOW).endpoints[0] == "10.0.0.3:8000"


POLICIES: dict[str, dict[str, Any]] = {
    "default": {},
    "gie_prefix": {"scorers": scorers(queue=2, kv_cache=2, prefix=(3, {"min_blocks": 1}))},
    "least_queue": {"scorers": scorers(queue=1)},
    "prefix_only": {"scorers": scorers(prefix=1)},
    "random": {"filters": ["healthy", "subset"], "scorers": [], "picker": "random"},
    "round_robin": {"filters": ["healthy", "subset"], "scorers": [], "picker": "round_robin"},
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_benchmark_policies_are_expressible_in_config(policy: str) -> None:
    config = cfg.parse_config(
        {
            "pools": [{"name": POOL, "models": [MODEL], "endpoints": {"static": ["10.0.0.1:8000"]}}],
            "scheduler": POLICIES[policy],
        }
    )
    s = Scheduler.from_config(config, rng=random.Random(0))
    eps = endpoints(4)
    eps[2].waiting = 3
    decision = s.schedule(request(s, SYSTEM * 3), eps, NOW)
    assert decision.routed
    assert len(decision.endpoints) == 1 + config.scheduler.fallbacks
    if policy == "least_queue":
        assert eps[2].address not in decision.endpoints  # the longest queue is not even a fallback


def test_default_policy_is_gies_weights_with_prefix_4_and_kv_threshold_095() -> None:
    s = Scheduler.from_config(
        cfg.parse_config({"pools": [{"name": POOL, "models": [MODEL], "endpoints": {"static": ["10.0.0.1:8000"]}}]})
    )
    assert [(w, type(sc).__name__) for w, sc in s._scorers] == [
        (2, "QueueScorer"),
        (2, "KVCacheScorer"),
        (4, "PrefixScorer"),
    ]
    saturation = next(f for f in s._filters if type(f).__name__ == "NotSaturated")
    assert (saturation.queue_threshold, saturation.kv_cache_threshold) == (5, 0.95)


def test_max_score_breaks_near_ties_in_rotation() -> None:
    s = scheduler(scorers=[{"name": "kv_cache", "weight": 2}])
    eps = endpoints(4)
    for i, e in enumerate(eps):
        e.kv_usage = 0.001 * i  # near-equal: within the picker's tolerance
    picks = [s.schedule(request(s), eps, NOW).endpoints[0] for _ in range(8)]
    assert sorted(picks[:4]) == sorted(e.address for e in eps)  # every endpoint once before any twice
    assert picks[4:] == picks[:4]
    eps[2].kv_usage = 0.5  # a real difference is not a tie
    assert eps[2].address not in {s.schedule(request(s), eps, NOW).endpoints[0] for _ in range(6)}


def test_no_prompt_is_hashed_without_a_prefix_scorer(monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.scheduling.prefix import scorer as prefix_module

    calls: list[str] = []
    real = prefix_module.prompt_hashes

    def counting(text: str, *args: Any) -> tuple[int, ...]:
        calls.append(text)
        return real(text, *args)

    monkeypatch.setattr(prefix_module, "prompt_hashes", counting)
    text = SYSTEM * 3
    without = scheduler(scorers=scorers(queue=2, kv_cache=2))
    assert not any(isinstance(p, PrefixScorer) for p in without.plugins())
    assert without.schedule(request(without, text), endpoints(4), NOW).routed
    assert calls == []
    with_prefix = scheduler()
    assert with_prefix.schedule(request(with_prefix, text), endpoints(4), NOW).routed
    assert calls == [text]


def test_tie_tolerance_is_a_param_of_max_score() -> None:
    eps = endpoints(2)
    eps[1].kv_usage = 0.3  # kv_cache scores 1.0 and 0.7: a tie within 0.5, a clear winner within 0.2
    strict = scheduler(scorers=scorers(kv_cache=1), picker={"name": "max_score", "params": {"tie_tolerance": 0.2}})
    assert {strict.schedule(request(strict), eps, NOW).endpoints[0] for _ in range(6)} == {eps[0].address}
    loose = scheduler(scorers=scorers(kv_cache=1), picker={"name": "max_score", "params": {"tie_tolerance": 0.5}})
    assert {loose.schedule(request(loose), eps, NOW).endpoints[0] for _ in range(6)} == {e.address for e in eps}


def test_the_prefix_index_holds_no_more_than_an_endpoint_can_cache() -> None:
    """An endpoint exporting its KV capacity (vllm:cache_config_info) is remembered for what fits in it."""
    text = SYSTEM + "a question about rivers " * 400  # ~9,700 characters: 151 blocks of 64
    for capacity_aware, expected in ((True, 2_000 * 4 // 64), (False, len(text) // 64)):
        s = scheduler(scorers=[{"name": "prefix", "weight": 1, "params": {"capacity_aware": capacity_aware}}])
        eps = endpoints(1, cache_tokens=2_000)  # 2,000 tokens of KV cache: ~125 blocks of 64 characters
        s.schedule(request(s, text), eps, NOW)
        prefix = next(p for p in s.plugins() if isinstance(p, PrefixScorer))
        assert prefix.index.size(eps[0].address) == expected
