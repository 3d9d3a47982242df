"""Tier 2's reduction: partials from every source partition (and every sub-key,
which tier 1 already folded into its key) become one delta per cell.

The merged batch also carries, per partials partition, the offset range it
covers: the sink applies data and range in one atomic step, and refuses a
range it has already applied, which is what makes the root exactly-once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.aggregates import Kind, merge
from pipeline.core.model import Cell, Partial
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL

NOTHING_APPLIED = -1  # Redis holds no position for the partition yet
UNKNOWN = -2  # the merger does not know the position: only a replay is refused


@dataclass(slots=True)
class MergedBatch:
    cells: dict[Cell, Any] = field(default_factory=dict)
    # partials partition -> (first offset, last offset) in this batch
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    partials: int = 0
    events: int = 0
    late_dropped: int = 0
    dead: int = 0
    duplicates: int = 0
    bad_partials: int = 0
    # partials partition -> the last offset this merger saw applied before this batch; the apply is
    # refused unless Redis agrees (behind: Redis lost writes; ahead: another merger applied more)
    expected: dict[int, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.ranges


class Merger:
    """Sans-I/O: feed it partial messages, take the merged batch."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._kinds = [m.kind for m in topology.metrics]
        self._distinct = topology.distinct_metrics
        # per metric, the buckets' size prefixes it has ("60" for 60 s buckets)
        self._sizes = [frozenset(str(r.size_s) for r in m.rollups if r.size_s) for m in topology.metrics]
        self._batch = MergedBatch()
        self._applied: dict[int, int] = {}

    def resume(self, positions: Mapping[int, int | None]) -> None:
        """The applied positions read from Redis (None: nothing applied yet) for these partitions."""
        for partition, last in positions.items():
            self._applied[partition] = NOTHING_APPLIED if last is None else last

    def position(self, partition: int) -> int | None:
        """The last offset this merger saw applied for the partition (None: it does not know)."""
        last = self._applied.get(partition)
        return None if last is None or last == NOTHING_APPLIED else last

    def applied(self, batch: MergedBatch) -> None:
        """The batch is in Redis: its ranges are now the positions to expect."""
        for partition, (_, last) in batch.ranges.items():
            self._applied[partition] = last

    def add(self, partition: int, offset: int, raw: bytes) -> Partial | None:
        """Merge one partial message; a message that cannot be read is counted and skipped."""
        batch = self._batch
        first, _ = batch.ranges.get(partition, (offset, offset))
        batch.ranges[partition] = (first, offset)
        try:
            partial = Partial.from_json(raw, self._distinct)
            self._check(partial)
        except (ValueError, KeyError, TypeError, AttributeError):
            batch.bad_partials += 1
            return None
        self.add_partial(partial)
        return partial

    def _check(self, partial: Partial) -> None:
        """Refuse cells this topology cannot merge or apply (they would fail every retry)."""
        for n in (partial.events, partial.late_dropped, partial.dead, partial.duplicates):
            if type(n) is not int:
                raise ValueError(f"counter {n!r} is not an integer")
        for (index, channel, key, bucket), value in partial.cells.items():
            if type(index) is not int or not 0 <= index < len(self._kinds):
                raise ValueError(f"unknown metric {index!r}")
            if type(channel) is not str or type(key) is not str or type(bucket) is not str:
                raise ValueError("channel, key and bucket must be strings")
            if bucket != TOTAL and bucket.split(":", 1)[0] not in self._sizes[index]:
                raise ValueError(f"unknown bucket {bucket!r}")
            if index in self._distinct:
                if not all(type(u) is str for u in value):
                    raise ValueError("distinct members must be strings")
            elif type(value) is not int and type(value) is not float:
                raise ValueError(f"value {value!r} is not a number")

    def add_partial(self, partial: Partial) -> None:
        batch = self._batch
        cells = batch.cells
        kinds = self._kinds
        for cell, value in partial.cells.items():
            old = cells.get(cell)
            if old is None:
                cells[cell] = value
            else:
                kind = kinds[cell[0]]
                cells[cell] = old + value if kind is Kind.COUNT else merge(kind, old, value)
        batch.partials += 1
        batch.events += partial.events
        batch.late_dropped += partial.late_dropped
        batch.dead += partial.dead
        batch.duplicates += partial.duplicates

    def take(self) -> MergedBatch:
        batch, self._batch = self._batch, MergedBatch()
        batch.expected = {p: self._applied.get(p, UNKNOWN) for p in batch.ranges}
        return batch
