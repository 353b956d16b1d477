"""A Prometheus text page as numbers, for the demo's and the benchmarks' before/after snapshots."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]


def samples(text: str) -> list[Sample]:
    """Every sample of the page: (name as exposed, e.g. ``foo_total``, labels, value)."""
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def sum_samples(text: str, names: Iterable[str]) -> dict[str, float]:
    """For each of ``names``, the sum of its samples over all label sets (0 when absent)."""
    out = dict.fromkeys(names, 0.0)
    for name, _labels, value in samples(text):
        if name in out:
            out[name] += value
    return out
