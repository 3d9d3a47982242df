"""Tier 2's reduction: partials from every source partition (and every sub-key,
which tier 1 already folded into its key) become one delta per cell.

The merged batch also carries, per partials partition, the offset range it
covers: the sink applies data and range in one atomic step, and refuses a
range it has already applied, which is what makes the root exactly-once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import orjson

from pipeline.core.aggregates import Kind, merge
from pipeline.core.model import PARTIAL_VERSION, Cell, Partial
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL

NOTHING_APPLIED = -1  # Redis holds no position for the partition yet
UNKNOWN = -2  # the merger does not know the position: only a replay is refused

Group = tuple[int, str, str]  # (metric index, channel, bucket): the cells one Redis hash holds
_STR = frozenset({str})
_NUMBER = frozenset({int, float})


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
    # the cells' keys by (metric, channel, bucket), each once, in the order they came, when the merger
    # knows them (partials of format v2): the apply plans a group in bulk. None: group `cells` anew
    groups: dict[Group, list[str]] | None = field(default=None, compare=False)

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
        self._batch = MergedBatch(groups={})
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
            obj = orjson.loads(raw)
            if type(obj) is dict and obj.get("v") == PARTIAL_VERSION:
                return self._add_grouped(obj)
            partial = Partial.from_obj(obj, self._distinct)
            self._check(partial)
        except (ValueError, KeyError, TypeError, AttributeError):
            batch.bad_partials += 1
            return None
        self.add_partial(partial)
        return partial

    def _add_grouped(self, obj: dict[str, Any]) -> Partial:
        """A v2 partial, checked as `_check` checks (all of it before merging any of it) and merged a
        group at a time: the cells of a group whose keys the batch does not hold yet go in with one
        dict update, with no Python-level step per cell."""
        counters = (obj["events"], obj["late"], obj["dead"], obj.get("dup", 0))
        for n in counters:
            if type(n) is not int:
                raise ValueError(f"counter {n!r} is not an integer")
        head = (obj["src"], obj["root"], obj["win"], obj["first"], obj["last"])
        groups = obj["groups"]
        if type(groups) is not list:
            raise ValueError("groups must be a list")
        kinds, distinct = self._kinds, self._distinct
        staged: list[tuple[int, str, str, list[str], list[Any]]] = []
        for m, ch, b, keys, values in groups:
            if type(m) is not int or not 0 <= m < len(kinds):
                raise ValueError(f"unknown metric {m!r}")
            if type(ch) is not str or type(b) is not str:
                raise ValueError("channel, key and bucket must be strings")
            if b != TOTAL and b.split(":", 1)[0] not in self._sizes[m]:
                raise ValueError(f"unknown bucket {b!r}")
            if type(keys) is not list or type(values) is not list or len(keys) != len(values):
                raise ValueError("a group's keys and values must be lists of one length")
            if keys and not _STR.issuperset(map(type, keys)):
                raise ValueError("channel, key and bucket must be strings")
            if m in distinct:
                values = [set(v) for v in values]
                for members in values:
                    if not _STR.issuperset(map(type, members)):
                        raise ValueError("distinct members must be strings")
            elif values and not _NUMBER.issuperset(map(type, values)):
                raise ValueError("values must be numbers")
            staged.append((m, ch, b, keys, values))
        batch = self._batch
        cells = batch.cells
        by_group = batch.groups
        mine: dict[Cell, Any] = {}
        for m, ch, b, keys, values in staged:
            incoming = dict(zip(zip(repeat(m), repeat(ch), keys, repeat(b)), values, strict=True))
            mine.update(incoming)
            if cells.keys().isdisjoint(incoming):
                cells.update(incoming)
                added: list[str] = keys if len(incoming) == len(keys) else [c[2] for c in incoming]
            else:
                kind = kinds[m]
                added = []
                for cell, value in incoming.items():
                    old = cells.get(cell)
                    if old is None:
                        cells[cell] = value
                        added.append(cell[2])
                    else:
                        cells[cell] = old + value if kind is Kind.COUNT else merge(kind, old, value)
            if by_group is not None:
                held = by_group.get((m, ch, b))
                if held is None:
                    by_group[(m, ch, b)] = list(added)
                else:
                    held.extend(added)
        batch.partials += 1
        batch.events += counters[0]
        batch.late_dropped += counters[1]
        batch.dead += counters[2]
        batch.duplicates += counters[3]
        return Partial(*head, mine, *counters)

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
        batch.groups = None  # grouped anew by the apply
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
        batch, self._batch = self._batch, MergedBatch(groups={})
        batch.expected = {p: self._applied.get(p, UNKNOWN) for p in batch.ranges}
        return batch
