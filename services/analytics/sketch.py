"""A mergeable quantile sketch: counts per log-spaced bin (DDSketch's mapping).

A value v > 0 falls in bin ceil(log(v) / log(GAMMA)); every value in a bin is
within RELATIVE_ACCURACY of the bin's representative value, so a quantile read
from merged bins is within that relative error of the exact one. Zero (and
anything below MIN_VALUE) goes to ZERO_BIN. Bins are stored per rollup bucket
and summed across buckets.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
MIN_VALUE = 1e-9
ZERO_BIN = -(2**31) + 1


def bin_of(value: float) -> int:
    if value < MIN_VALUE:
        return ZERO_BIN
    return math.ceil(math.log(value) / _LOG_GAMMA)


def value_of(bin_: int) -> float:
    """The bin's representative value (relative error <= RELATIVE_ACCURACY)."""
    if bin_ == ZERO_BIN:
        return 0.0
    return 2 * GAMMA**bin_ / (GAMMA + 1)


def quantile(bins: Mapping[int, int] | Iterable[tuple[int, int]], q: float) -> float | None:
    """The q-quantile (0..1) of merged bins, None when empty. Uses the lower
    nearest rank, like PostgreSQL's percentile_disc."""
    items = sorted(bins.items() if isinstance(bins, Mapping) else bins)
    total = sum(count for _, count in items)
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bin_, count in items:
        seen += count
        if seen >= rank:
            return value_of(bin_)
    return value_of(items[-1][0])


def quantile_sorted(bins: Sequence[int], counts: Sequence[int], q: float) -> float | None:
    """:func:`quantile` of bins given in ascending order with their counts (as SQL's
    ``array_agg(bin ORDER BY bin)`` gives them): the same lower nearest rank, found with
    a cumulative sum and a bisection instead of a Python loop over the bins."""
    if not bins:
        return None
    cumulative = list(itertools.accumulate(counts))
    total = cumulative[-1]
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    return value_of(bins[min(len(bins) - 1, bisect.bisect_left(cumulative, rank))])
