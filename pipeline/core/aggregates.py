"""Mergeable per-key aggregates.

Every kind is a commutative monoid, so any split of the events into batches,
windows, partitions or sub-keys merges back to the same value: that is what
makes hierarchical aggregation exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    DISTINCT = "distinct"  # distinct users; a set between tiers, a HyperLogLog in Redis


def initial(kind: Kind, value: float, user: str | None) -> Any:
    """The aggregate of a single event."""
    if kind is Kind.COUNT:
        return 1
    if kind is Kind.DISTINCT:
        return {user} if user is not None else set()
    return value


def merge(kind: Kind, a: Any, b: Any) -> Any:
    """Combine two aggregates of the same cell."""
    if kind is Kind.COUNT or kind is Kind.SUM:
        return a + b
    if kind is Kind.MIN:
        return a if a <= b else b
    if kind is Kind.MAX:
        return a if a >= b else b
    return a | b


def aggregate(kind: Kind, values: Iterable[tuple[float, str | None]]) -> Any:
    """Fold events (value, user) directly: the reference the tiers must agree with."""
    result: Any = None
    for value, user in values:
        one = initial(kind, value, user)
        result = one if result is None else merge(kind, result, one)
    return result
