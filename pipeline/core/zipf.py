"""Zipf key popularity: the law every workload here draws keys from, and the planner predicts with.

Rank i (0 = hottest) has weight 1 / (i + 1)^s. One place, so that a benchmark's
keys and the planner's model of them cannot drift apart.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def weights(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


class Zipf:
    """Draws ranks 0..n-1 (or items of a sequence of that length) by Zipf popularity."""

    def __init__(self, n: int, s: float = 1.1) -> None:
        self.n = n
        self.s = s
        self.cum_weights = list(itertools.accumulate(weights(n, s)))

    def ranks(self, rng: random.Random, k: int = 1) -> list[int]:
        return rng.choices(range(self.n), cum_weights=self.cum_weights, k=k)

    def items(self, rng: random.Random, items: Sequence[T], k: int = 1) -> list[T]:
        """k of `items` (len n, hottest first)."""
        return rng.choices(items, cum_weights=self.cum_weights, k=k)
