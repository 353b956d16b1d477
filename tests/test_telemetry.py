"""The picker's metrics after real traffic through Envoy: names, types, labels, values, bounded cardinality."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from extproc.config import parse_config
from extproc.datalayer.table import EndpointTable
from extproc.gateway.telemetry import StateCollector, Telemetry
from extproc.local.stack import PoolSpec, Stack, start_stack
from extproc.scheduling import RoutingRequest, Scheduler
from tests.helpers import post

SPLIT = {"name": "ab-test", "backends": [{"pool": "1b", "weight": 70}, {"pool": "3b", "weight": 30}]}
MODELS = {"1b": "llama-3-2-1b", "3b": "llama-3-2-3b"}

# name -> (type, label names) of every family the picker exports.
EXPECTED = {
    "extproc_requests": ("counter", {"pool", "model", "route", "outcome"}),
    "extproc_decision_duration_seconds": ("histogram", {"pool"}),
    "extproc_endpoint_picks": ("counter", {"pool", "endpoint"}),
    "inference_objective_request": ("counter", {"model_name", "target_model_name"}),
    "inference_objective_request_error": ("counter", {"model_name", "target_model_name", "error_code"}),
    "inference_extension_prefix_indexer_hit_ratio": ("histogram", {"name"}),
    "extproc_endpoint_waiting_requests": ("gauge", {"pool", "endpoint"}),
    "extproc_endpoint_running_requests": ("gauge", {"pool", "endpoint"}),
    "extproc_endpoint_pending_requests": ("gauge", {"pool", "endpoint"}),
    "extproc_endpoint_kv_cache_usage_ratio": ("gauge", {"pool", "endpoint"}),
    "extproc_endpoint_up": ("gauge", {"pool", "endpoint"}),
    "extproc_endpoint_scrape_age_seconds": ("gauge", {"pool", "endpoint"}),
    "extproc_endpoint_scrapes": ("counter", {"pool", "endpoint", "result"}),
    "inference_pool_per_pod_queue_size": ("gauge", {"name", "model_server_pod"}),
    "inference_pool_ready_pods": ("gauge", {"name"}),
    "inference_pool_average_queue_size": ("gauge", {"name"}),
    "inference_pool_average_kv_cache_utilization": ("gauge", {"name"}),
    "extproc_prefix_index_blocks": ("gauge", {"pool"}),
    "inference_extension_prefix_indexer_size": ("gauge", set()),
    "extproc_split_weight_ratio": ("gauge", {"route", "pool"}),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("telemetry"),
        [PoolSpec("1b", MODELS["1b"], 2, ("--time-scale", "0.05")), PoolSpec("3b", MODELS["3b"], 1)],
        settings={"splits": [SPLIT]},
    )
    try:
        yield s
    finally:
        s.stop()


def send(stack: Stack, path: str, body: bytes | dict[str, object]) -> int:
    return post(stack.gateway + path, body, timeout=10).status


def chat(model: str, text: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2}


def families(stack: Stack) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    text = urllib.request.urlopen(stack.metrics_url, timeout=5).read().decode()
    return {
        f.name: (f.type, [(s.name, dict(s.labels), s.value) for s in f.samples])
        for f in text_string_to_metric_families(text)
        if f.name.startswith(("extproc_", "inference_"))
    }


def value(fams: dict, family: str, sample: str | None = None, **labels: str) -> float:
    _type, samples = fams[family]
    name = sample or family
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def series_count(fams: dict) -> int:
    return sum(len(samples) for _t, samples in fams.values())


def send_batch(stack: Stack, tag: str) -> dict[str, int]:
    """One batch of every kind of request; prompts, invented model names and headers are unique per ``tag``."""
    statuses: dict[str, int] = {}
    long_system = "You are a careful assistant. " * 80  # ~2,400 characters: many prefix blocks
    for i in range(10):
        text = f"{tag} question {i}: " + "tell me about caching " * 5
        statuses[f"1b-{i}"] = send(stack, "/v1/1b/chat/completions", chat(MODELS["1b"], long_system + text))
        statuses[f"3b-{i}"] = send(stack, "/v1/3b/chat/completions", chat(MODELS["3b"], text))
        statuses[f"model-{i}"] = send(stack, "/v1/chat/completions", chat(MODELS["3b"], text))
        statuses[f"ab-{i}"] = send(stack, "/v1/ab-test/chat/completions", chat("auto", text))
        statuses[f"unknown-{i}"] = send(stack, "/v1/chat/completions", chat(f"invented-{tag}-{i}", text))
        statuses[f"bad-{i}"] = send(stack, "/v1/1b/chat/completions", f"{{not json {tag} {i}".encode())
    return statuses


def test_metrics_have_the_right_types_labels_and_values(stack: Stack) -> None:
    statuses = send_batch(stack, "first")
    assert [k for k, s in statuses.items() if k.startswith(("1b", "3b", "model", "ab")) and s != 200] == []
    assert {s for k, s in statuses.items() if k.startswith("unknown")} == {404}
    assert {s for k, s in statuses.items() if k.startswith("bad")} == {400}
    time.sleep(0.3)
    fams = families(stack)

    for name, (kind, labels) in EXPECTED.items():
        assert name in fams, f"{name} missing from the picker's /metrics"
        got_type, samples = fams[name]
        assert got_type == kind, f"{name} is a {got_type}, expected {kind}"
        assert samples, f"{name} has no samples"
        for _n, sample_labels, _v in samples:
            assert set(sample_labels) - {"le"} == labels, f"{name} labels {sorted(sample_labels)}"

    # Requests by pool, route and outcome.
    assert (
        value(fams, "extproc_requests", "extproc_requests_total", pool="1b", route="1b-by-path", outcome="picked") == 10
    )
    assert (
        value(fams, "extproc_requests", "extproc_requests_total", pool="3b", route="by-model", outcome="picked") == 10
    )
    ab = {
        pool: value(fams, "extproc_requests", "extproc_requests_total", pool=pool, route="ab-test-split")
        for pool in MODELS
    }
    assert sum(ab.values()) == 10
    assert value(fams, "extproc_requests", "extproc_requests_total", outcome="404", route="by-model") == 10
    assert value(fams, "extproc_requests", "extproc_requests_total", outcome="400") == 10
    # GIE names: "auto" is what the client asked for on the split; the served model is the target.
    asked_auto = value(fams, "inference_objective_request", "inference_objective_request_total", model_name="auto")
    assert asked_auto == 10
    errors = value(fams, "inference_objective_request_error", "inference_objective_request_error_total")
    assert errors == 20
    # Picks add up to the routed requests, per endpoint of each pool.
    picks = value(fams, "extproc_endpoint_picks", "extproc_endpoint_picks_total")
    assert picks == 40
    assert value(fams, "extproc_decision_duration_seconds", "extproc_decision_duration_seconds_count") == 40
    # The long shared system prompt: later 1b requests match blocks on their endpoint.
    ratio_sum = value(
        fams,
        "inference_extension_prefix_indexer_hit_ratio",
        "inference_extension_prefix_indexer_hit_ratio_sum",
        name="1b",
    )
    assert ratio_sum > 5
    assert value(fams, "extproc_prefix_index_blocks", pool="1b") > 0
    # State as the scheduler sees it: every endpoint fresh, scraped successfully.
    addresses = {r.address for rs in stack.sims.values() for r in rs}
    ups = {lab["endpoint"]: v for n, lab, v in fams["extproc_endpoint_up"][1]}
    assert ups == dict.fromkeys(addresses, 1.0)
    assert value(fams, "inference_pool_ready_pods", name="1b") == 2
    for address in addresses:
        assert (
            value(
                fams, "extproc_endpoint_scrapes", "extproc_endpoint_scrapes_total", endpoint=address, result="success"
            )
            > 0
        )
    assert value(fams, "extproc_split_weight_ratio", route="ab-test-split", pool="1b") == pytest.approx(0.7)
    assert value(fams, "extproc_split_weight_ratio", route="ab-test-split", pool="3b") == pytest.approx(0.3)


def test_label_cardinality_does_not_grow_with_requests(stack: Stack) -> None:
    send_batch(stack, "warm")
    time.sleep(0.3)
    before = families(stack)
    send_batch(stack, "second")  # new prompts, new invented model names, new bad bodies
    time.sleep(0.3)
    after = families(stack)
    assert series_count(after) == series_count(before)

    addresses = {r.address for rs in stack.sims.values() for r in rs}
    allowed = {
        "pool": {"", *MODELS},
        "name": set(MODELS),
        "model": {"", *MODELS.values()},
        "model_name": {"", "auto", *MODELS.values()},
        "target_model_name": {"", *MODELS.values()},
        "endpoint": addresses,
        "model_server_pod": addresses,
        "route": {"1b-by-path", "3b-by-path", "ab-test-split", "by-model"},
        "outcome": {"picked", "fallback", "400", "404", "413", "429", "503"},
        "error_code": {"400", "404", "413", "429", "503"},
        "result": {"success", "shared", "timeout", "connect", "status", "parse"},
    }
    for name, (_t, samples) in after.items():
        for _n, labels, _v in samples:
            for key, label_value in labels.items():
                if key == "le":
                    continue
                assert key in allowed, f"{name}: unexpected label {key}"
                assert label_value in allowed[key], f"{name}: {key}={label_value!r} is not a bounded value"


def test_endpoint_series_leave_with_the_endpoint() -> None:
    config = parse_config(
        {
            "pools": [{"name": "p", "models": ["m"], "endpoints": {"static": ["127.0.0.1:1", "127.0.0.1:2"]}}],
            "splits": [],
        }
    )
    registry = CollectorRegistry()
    telemetry = Telemetry(registry)
    table = EndpointTable()
    table.replace_pool("p", ["127.0.0.1:1", "127.0.0.1:2"])
    table.on_removed(telemetry.forget_endpoint)
    scheduler = Scheduler.from_config(config)
    telemetry.watch(StateCollector(config, table, {}, scheduler))
    telemetry.routed("p", "m", "m", "by-model", "127.0.0.1:1", False)
    # a pick the prefix plugin records: 2 of the prompt's 4 blocks were on the picked endpoint
    for state in table.pool_endpoints("p"):
        state.scraped_at, state.scrape_ok = 0.0, True
    prompt = "x" * 64 * 2
    scheduler.schedule(RoutingRequest("p", "m", prompt, target_model="m"), table.pool_endpoints("p")[:1], 0.0)
    picked = table.pool_endpoints("p")[0]
    scheduler.schedule(RoutingRequest("p", "m", prompt + "y" * 64 * 2, target_model="m"), [picked], 0.0)

    def endpoints() -> set[str]:
        return {
            s.labels["endpoint"]
            for f in registry.collect()
            for s in f.samples
            if "endpoint" in s.labels and f.name.startswith("extproc_endpoint")
        }

    assert endpoints() == {"127.0.0.1:1", "127.0.0.1:2"}
    table.replace_pool("p", ["127.0.0.1:2"])
    assert endpoints() == {"127.0.0.1:2"}
    assert registry.get_sample_value("inference_extension_prefix_indexer_hit_ratio_sum", {"name": "p"}) == 0.5


def test_routes_get_readable_envoy_stats(stack: Stack) -> None:
    send(stack, "/v1/ab-test/chat/completions", chat("auto", "hello"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/stats/prometheus", timeout=5).read().decode()
    assert 'envoy_vhost_route_upstream_rq_total{envoy_virtual_host="gateway",envoy_route="ab-test-split"}' in text
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="pool-1b"}' in text
