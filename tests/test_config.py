"""Configuration errors name the field and the fix; `extproc serve --check` reports them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from extproc.config import ConfigError, load_config, parse_config
from extproc.local.procs import extproc_argv

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.yaml"


def pools(**pool) -> dict:
    return {"pools": [{"name": "a", "models": ["m"], "endpoints": {"static": ["127.0.0.1:8000"]}, **pool}]}


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert [p.name for p in config.pools] == ["1b", "3b"]
    assert config.scheduler.filters[0] == "subset"


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
