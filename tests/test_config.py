"""Configuration errors name the field and the fix; `extproc serve --check` reports them."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.config import ConfigError, load_config, parse_config
from extproc.local.procs import extproc_argv
from extproc.scheduling import PluginError, Scheduler

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.yaml"


def pools(**pool) -> dict:
    return {"pools": [{"name": "a", "models": ["m"], "endpoints": {"static": ["127.0.0.1:8000"]}, **pool}]}


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert [p.name for p in config.pools] == ["1b", "3b"]
    assert config.scheduler.filters[0].name == "subset"


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({}, ["pools", "required"]),
        ({"pools": []}, ["pools"]),
        (pools(endpoints={"static": ["vllm:8000"]}), ["pools.0.endpoints.static", "IP address", "dns"]),
        (pools(endpoints={"static": ["127.0.0.1"]}), ["host:port"]),
        (pools(endpoints={}), ["exactly one of 'static'"]),
        (pools(endpoints={"static": ["127.0.0.1:1"], "dns": {"name": "x", "port": 1}}), ["exactly one"]),
        (pools(name="Has Spaces"), ["pools.0.name"]),
        (pools(modles=["m"]), ["pools.0.modles", "unknown field"]),
        ({**pools(), "scrape": {"interval": 0}}, ["scrape.interval", "greater than 0"]),
        ({**pools(), "server": {"listen": "unix:"}}, ["server.listen", "unix:/run/extproc.sock"]),
        (
            {"pools": [pools()["pools"][0], {**pools()["pools"][0], "name": "b"}]},
            ["model 'm' is listed by pools 'a' and 'b'"],
        ),
    ],
)
def test_errors_name_the_field_and_the_fix(data: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)


def test_unknown_plugin_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(EXAMPLE.read_text().replace("{name: queue, weight: 2}", "{name: qeueu, weight: 2}"))
    done = subprocess.run(extproc_argv("serve", "--config", str(path)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "qeueu" in done.stderr and "known scorers" in done.stderr


def test_check_flag(tmp_path: Path) -> None:
    ok = subprocess.run(extproc_argv("serve", "--config", str(EXAMPLE), "--check"), capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    missing = subprocess.run(
        extproc_argv("serve", "--config", str(tmp_path / "nope.yaml")), capture_output=True, text=True
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_check_prints_the_configuration_as_it_would_run(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(
        yaml.safe_dump({**pools(), "scheduler": {"picker": {"name": "max_score", "params": {"tie_tolerance": 0.5}}}})
    )
    done = subprocess.run(extproc_argv("serve", "--config", str(path), "--check"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout.split("\n", 1)[1])
    scheduler = effective["scheduler"]
    assert scheduler["picker"] == {"name": "max_score", "params": {"tie_tolerance": 0.5}}
    assert [f["name"] for f in scheduler["filters"]] == ["subset", "healthy", "not_saturated"]
    assert scheduler["filters"][2]["params"] == {"queue_threshold": 5, "kv_cache_threshold": 0.95, "shed": False}
    prefix = next(s for s in scheduler["scorers"] if s["name"] == "prefix")
    assert prefix["params"] == {
        "min_blocks": 16,
        "block_chars": 64,
        "max_blocks": 16384,
        "max_prompt_blocks": 256,
        "capacity_aware": True,
        "chars_per_token": 4.0,
    }
    assert effective["scrape"]["stale_after"] == 2.0


LEGACY = {
    "scheduler": {"saturation": {"queue_threshold": 3, "kv_cache_threshold": 0.5}, "shed_when_saturated": True},
    "prefix": {"block_chars": 32, "max_blocks": 100, "max_prompt_blocks": 10},
}
CURRENT = {
    "scheduler": {
        "filters": [
            "subset",
            "healthy",
            {"name": "not_saturated", "params": {"queue_threshold": 3, "kv_cache_threshold": 0.5, "shed": True}},
        ],
        "scorers": [
            {"name": "queue", "weight": 2},
            {"name": "kv_cache", "weight": 2},
            {"name": "prefix", "weight": 4, "params": {"block_chars": 32, "max_blocks": 100, "max_prompt_blocks": 10}},
        ],
    }
}


def test_moved_keys_still_work_and_the_warning_names_the_new_place(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="extproc.config"):
        legacy = parse_config({**pools(), **LEGACY})
    assert legacy.scheduler == parse_config({**pools(), **CURRENT}).scheduler
    text = caplog.text
    assert "'scheduler.saturation' and 'scheduler.shed_when_saturated'" in text
    assert "{name: not_saturated, params: {queue_threshold: 3, kv_cache_threshold: 0.5, shed: true}}" in text
    assert "'prefix' moved to the prefix scorer" in text and "block_chars: 32" in text
    # the moved values reach the plugins
    scheduler = Scheduler.from_config(legacy)
    saturation = next(p for p in scheduler.plugins() if type(p).__name__ == "NotSaturated")
    assert (saturation.queue_threshold, saturation.kv_cache_threshold, saturation.shed) == (3, 0.5, True)
    prefix = next(p for p in scheduler.plugins() if type(p).__name__ == "PrefixScorer")
    assert (prefix.block_chars, prefix.index.max_blocks, prefix.max_prompt_blocks) == (32, 100, 10)


def test_a_moved_key_without_its_plugin_says_it_has_no_effect(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="extproc.config"):
        parse_config({**pools(), "scheduler": {"filters": ["healthy"], "saturation": {"queue_threshold": 1}}})
    assert "not_saturated filter, which is not configured: no effect" in caplog.text


@pytest.mark.parametrize(
    ("scheduler", "needles"),
    [
        ({"picker": {"name": "max_score", "params": {"tie_tolerance": -1}}}, ["scheduler.picker", "tie_tolerance"]),
        ({"picker": {"name": "max_score", "params": {"tolerance": 1}}}, ["unknown param 'tolerance'", "tie_tolerance"]),
        (
            {"filters": [{"name": "not_saturated", "params": {"kv_cache_threshold": 2}}]},
            ["scheduler.filters[0]", "kv_cache_threshold", "at most 1"],
        ),
        ({"filters": [{"name": "healthy", "params": {"stale_after": 1}}]}, ["filter 'healthy'", "accepts no params"]),
        ({"scorers": [{"name": "prefix", "params": {"block_chars": 4}}]}, ["scheduler.scorers[0]", "block_chars"]),
    ],
)
def test_plugin_params_are_checked_at_start(scheduler: dict, needles: list[str]) -> None:
    config = parse_config({**pools(), "scheduler": scheduler})
    with pytest.raises(PluginError) as caught:
        Scheduler.from_config(config)
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)
