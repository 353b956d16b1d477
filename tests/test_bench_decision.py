"""`extproc bench decision` runs and reports every case, the sharing ratio among them (numbers, not timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_decision_benchmark_reports_every_case_and_the_cost_of_sharing(tmp_path: Path) -> None:
    out = tmp_path / "decision.json"
    argv = [sys.executable, "-m", "extproc", "bench", "decision", "--iterations", "300", "--json", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "sharing picks (state.backend: redis)" in result.stdout
    data = json.loads(out.read_text())
    for case in ("hash", "hash+schedule", "schedule, local", "schedule, shared"):
        assert 0 < data[case]["p50"] <= data[case]["p99"], case
    assert data["sharing"]["p50_ratio"] > 0 and data["sharing"]["encode_us_per_pick"] > 0
    assert data["index"]["blocks"] > 0
