"""The one Zipf law the workloads draw from and the planner predicts with."""

from __future__ import annotations

import itertools
import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from pipeline.harness.zipf import Zipf, weights


@given(st.integers(1, 500), st.floats(0.5, 2.0))
def test_weights_fall_with_rank_by_the_exponent(n: int, s: float) -> None:
    w = weights(n, s)
    assert len(w) == n and w[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(w))
    if n > 1:
        assert abs(w[1] - 2.0**-s) < 1e-12


def test_draws_follow_the_weights_and_repeat_with_the_seed() -> None:
    z = Zipf(100, 1.1)
    draws = z.ranks(random.Random(3), 200_000)
    assert draws == z.ranks(random.Random(3), 200_000)
    assert min(draws) >= 0 and max(draws) < 100
    counts = Counter(draws)
    total = sum(weights(100, 1.1))
    for rank in (0, 1, 9):  # frequencies within 3 % of the law for the hot ranks
        expected = 200_000 * weights(100, 1.1)[rank] / total
        assert abs(counts[rank] - expected) / expected < 0.03
    assert z.items(random.Random(3), [f"k{i}" for i in range(100)], 5) == [f"k{i}" for i in draws[:5]]
