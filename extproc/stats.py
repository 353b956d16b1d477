"""The project's statistics, one definition each, so the demo's and the benchmarks' figures mean the same thing.

* `percentile`: linear interpolation between the closest ranks (numpy's default, ``method="linear"``):
  the value at position ``(n - 1) * q`` of the sorted values, interpolated between its two neighbours;
  ``q`` in 0..1. Every p50/p95/p99 the project prints comes from here.
* `wilson_interval`: the Wilson score interval of a binomial proportion (95% by default), used for the
  observed share of an A/B split: unlike the normal approximation it stays inside 0..1 and is sound for
  small counts and shares near 0 or 1.
* `histogram_quantile`: Prometheus's ``histogram_quantile`` over cumulative ``(le, count)`` buckets, for
  quantiles of a histogram metric read from a ``/metrics`` page (linear inside the bucket, as Prometheus).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ``q`` in 0..1; NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes`` in ``n`` trials (z = 1.96: 95%); None for no trials."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``(le, count)`` buckets; ``q`` in 0..1; None when empty.

    The rank ``q * total`` is found in the first bucket that reaches it and interpolated linearly between
    that bucket's lower and upper bound; a rank in the ``+Inf`` bucket gives the largest finite bound.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le
