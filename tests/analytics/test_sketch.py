"""The quantile sketch's reading from SQL arrays equals its reading from a mapping."""

from __future__ import annotations

import random

from services.analytics import sketch


def test_quantile_sorted_equals_quantile_on_hand_built_bins() -> None:
    rng = random.Random(5)
    cases: list[dict[int, int]] = [
        {sketch.ZERO_BIN: 3, 10: 1, 11: 0, 12: 4},  # a zero bin and an empty bin
        {7: 1},
        {1: 0, 2: 0},  # no samples
    ]
    for _ in range(200):
        size = rng.randint(1, 60)
        cases.append({rng.randint(-400, 900): rng.randint(0, 50) for _ in range(size)})
    for bins in cases:
        ordered = sorted(bins)
        for q in (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0):
            expected = sketch.quantile(bins, q)
            assert sketch.quantile_sorted(ordered, [bins[b] for b in ordered], q) == expected
    assert sketch.quantile_sorted([], [], 0.75) is None
    # By hand: 4 samples, rank ceil(0.75 * 4) = 3; cumulative counts 1, 2, 4: bin 12.
    assert sketch.quantile_sorted([10, 11, 12], [1, 1, 2], 0.75) == sketch.value_of(12)
