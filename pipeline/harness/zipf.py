"""Zipf key popularity: the sampler every workload here draws its keys with.

The law itself (rank i, 0 = hottest, has weight 1 / (i + 1)^s) is the planner's
(`pipeline.core.planner.zipf_weights`): one place, so that a benchmark's keys and the planner's
model of them cannot drift apart.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import TypeVar

from pipeline.core.planner import zipf_weights as weights

__all__ = ["Zipf", "weights"]

T = TypeVar("T")


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
