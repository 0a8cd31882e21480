"""The fixed latency histogram of the per-minute rollups.

Bucket upper edges in milliseconds; the last bucket is everything above the
last edge. Edges sit on the alert thresholds (3 s and 5 s fire, 2.5 s and
4 s are where they clear), so "p95 above 3 s" is decided exactly: it holds
iff more than 5 % of the requests fell in buckets above 3 s. Quantiles in
between are interpolated linearly inside a bucket, as Prometheus'
`histogram_quantile` does.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Final

EDGES_MS: Final = (
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2000.0,
    2500.0,
    3000.0,
    4000.0,
    5000.0,
    10000.0,
    30000.0,
)
BUCKETS: Final = len(EDGES_MS) + 1


def bucket_of(duration_ms: float) -> int:
    """Index of the bucket holding a duration (upper edges inclusive, like Prometheus' `le`)."""
    return bisect.bisect_left(EDGES_MS, duration_ms)


def quantile(counts: Sequence[int], q: float, max_ms: float | None = None) -> float:
    """The q-quantile of a histogram (0 when it is empty). The open last bucket
    is bounded by `max_ms` when known, else reported as the last edge."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = EDGES_MS[index - 1] if index > 0 else 0.0
            if index < len(EDGES_MS):
                upper = EDGES_MS[index]
            else:
                upper = max(max_ms or lower, lower)
            return lower + (upper - lower) * ((rank - seen) / count)
        seen += count
    return EDGES_MS[-1] if max_ms is None else max_ms


def add(into: list[int], other: Sequence[int]) -> None:
    for i, value in enumerate(other):
        into[i] += value
