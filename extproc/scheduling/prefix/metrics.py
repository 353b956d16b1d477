"""The prefix plugin's metrics, built from its own state when Prometheus scrapes.

The hit ratio is counted here in plain integers (a few list increments per routed request, no lock)
and exported as a Prometheus histogram with GIE's name, so the request path never touches
prometheus_client.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from extproc.scheduling.prefix.index import PrefixIndex

RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class RatioHistograms:
    """One histogram of values in 0..1 per label value, with Prometheus's ``le`` (at most) buckets."""

    __slots__ = ("_by_label", "bounds")

    def __init__(self, bounds: Sequence[float] = RATIO_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._by_label: dict[str, list[float]] = {}  # label -> [count per bucket..., +Inf bucket, sum]

    def observe(self, label: str, value: float) -> None:
        row = self._by_label.get(label)
        if row is None:
            row = self._by_label[label] = [0.0] * (len(self.bounds) + 2)
        row[bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def family(self, name: str, documentation: str, label_name: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=[label_name])
        edges = [*(floatToGoString(b) for b in self.bounds), "+Inf"]
        for label, row in list(self._by_label.items()):
            counts = list(row)
            cumulative, buckets = 0.0, []
            for edge, count in zip(edges, counts, strict=False):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric([label], buckets, counts[-1])
        return family


def index_metrics(index: PrefixIndex, members: Mapping[str, Sequence[str]]) -> Iterator[Metric]:
    """Blocks the index holds per pool and in all (the latter under GIE's name)."""
    per_pool = GaugeMetricFamily(
        "extproc_prefix_index_blocks", "Blocks the prefix index holds for the pool's endpoints.", labels=["pool"]
    )
    for pool, addresses in members.items():
        per_pool.add_metric([pool], sum(index.size(a) for a in addresses))
    total = GaugeMetricFamily(
        "inference_extension_prefix_indexer_size", "Prompt blocks in the prefix index, all pools (GIE name)."
    )
    total.add_metric([], sum(index.size(a) for a in index.addresses()))
    yield per_pool
    yield total
