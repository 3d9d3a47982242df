"""The declarative description of a pipeline: which events, which aggregates, which rollups.

A topology is plain data; the tiers read it to know what to compute and
where to put it (topic names, Redis keys). `topologies/` holds the shipped ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from pipeline.core.aggregates import Kind
from pipeline.core.windows import Rollup, total

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _check_name(what: str, name: str) -> None:
    if not _NAME.fullmatch(name):  # match() would let a trailing newline through ($)
        raise ValueError(f"{what} name {name!r} must match {_NAME.pattern}")


@dataclass(frozen=True)
class Metric:
    """One aggregate computed per (channel, key) from one event type."""

    name: str
    kind: Kind
    on: str
    rollups: tuple[Rollup, ...] = (total(),)
    leaderboard: int = 0  # keep the top N keys of each channel in a sorted set (total rollup)

    def __post_init__(self) -> None:
        _check_name("metric", self.name)
        if not self.rollups:
            raise ValueError(f"metric {self.name!r} needs at least one rollup")
        if len({r.name for r in self.rollups}) != len(self.rollups):
            raise ValueError(f"metric {self.name!r} has two rollups of the same size")
        if self.leaderboard and self.kind is Kind.DISTINCT:
            raise ValueError("a leaderboard needs a numeric metric")


def count(name: str, on: str, *rollups: Rollup, leaderboard: int = 0) -> Metric:
    return Metric(name, Kind.COUNT, on, tuple(rollups) or (total(),), leaderboard)


def sum_of(name: str, on: str, *rollups: Rollup, leaderboard: int = 0) -> Metric:
    return Metric(name, Kind.SUM, on, tuple(rollups) or (total(),), leaderboard)


def minimum(name: str, on: str, *rollups: Rollup) -> Metric:
    return Metric(name, Kind.MIN, on, tuple(rollups) or (total(),))


def maximum(name: str, on: str, *rollups: Rollup) -> Metric:
    return Metric(name, Kind.MAX, on, tuple(rollups) or (total(),))


def distinct_users(name: str, on: str, *rollups: Rollup) -> Metric:
    return Metric(name, Kind.DISTINCT, on, tuple(rollups) or (total(),))


@dataclass(frozen=True)
class Partitions:
    events: int = 6
    partials: int = 3
    updates: int = 3


@dataclass(frozen=True)
class Topology:
    """A named pipeline. Event types map to a priority class (higher is shed last)."""

    name: str
    metrics: tuple[Metric, ...]
    priorities: Mapping[str, int]
    flush_interval_ms: int = 250
    max_cells: int = 200_000
    partitions: Partitions = field(default_factory=Partitions)
    description: str = ""
    # events of these types are also forwarded, whole, to the feed topic (e.g. comments for viewers)
    feed_types: frozenset[str] = frozenset()
    # a repeated event id within this many seconds is acknowledged but counted once (0: off)
    dedup_horizon_s: int = 600

    def __post_init__(self) -> None:
        _check_name("topology", self.name)
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"topology {self.name!r} has two metrics of the same name")
        for m in self.metrics:
            if m.on not in self.priorities:
                raise ValueError(f"metric {m.name!r} is on event type {m.on!r}, which is not declared")
        if not self.feed_types <= set(self.priorities):
            raise ValueError(f"feed types {set(self.feed_types) - set(self.priorities)} are not declared")
        if self.flush_interval_ms <= 0 or self.max_cells <= 0 or self.dedup_horizon_s < 0:
            raise ValueError("flush_interval_ms and max_cells must be positive")

    @cached_property
    def types(self) -> frozenset[str]:
        return frozenset(self.priorities)

    @cached_property
    def metrics_by_type(self) -> dict[str, tuple[tuple[int, Metric], ...]]:
        by: dict[str, list[tuple[int, Metric]]] = {t: [] for t in self.priorities}
        for i, m in enumerate(self.metrics):
            by[m.on].append((i, m))
        return {t: tuple(v) for t, v in by.items()}

    @cached_property
    def distinct_metrics(self) -> frozenset[int]:
        return frozenset(i for i, m in enumerate(self.metrics) if m.kind is Kind.DISTINCT)

    def topic(self, role: str) -> str:
        """events | partials | updates | dead-letters."""
        return f"{self.name}.{role}"

    def group(self, tier: str) -> str:
        return f"{self.name}.{tier}"

    def renamed(self, name: str) -> Topology:
        """The same topology under another name: its own topics and Redis keys (used by tests)."""
        return replace(self, name=name)

    def with_partitions(self, events: int, partials: int, updates: int | None = None) -> Topology:
        return replace(self, partitions=Partitions(events, partials, updates or self.partitions.updates))


def topology(
    name: str,
    metrics: Sequence[Metric],
    priorities: Mapping[str, int],
    *,
    flush_interval_ms: int = 250,
    max_cells: int = 200_000,
    partitions: Partitions | None = None,
    description: str = "",
    feed_types: Iterable[str] = (),
    dedup_horizon_s: int = 600,
) -> Topology:
    return Topology(
        name,
        tuple(metrics),
        dict(priorities),
        flush_interval_ms=flush_interval_ms,
        max_cells=max_cells,
        partitions=partitions or Partitions(),
        description=description,
        feed_types=frozenset(feed_types),
        dedup_horizon_s=dedup_horizon_s,
    )
