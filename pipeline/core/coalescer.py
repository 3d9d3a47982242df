"""Tier 1's reduction: a stream of events becomes, per flush window, one partial
aggregate per (source partition, root partition).

Memory is bounded by the number of active cells (metric, channel, key, bucket)
in the window, never by the number of events: a viral key costs one cell.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Annotated, Any, Literal, Protocol

import msgspec
import orjson

from pipeline.core.aggregates import Kind
from pipeline.core.dedup import PartitionIds
from pipeline.core.model import (
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    MAX_KEY_CHARS,
    MAX_SUBKEYS,
    MAX_TS,
    Cell,
    EventFields,
    InvalidEvent,
    Partial,
    check_event,
)
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL, FlushClock, Rollup

COUNT = Kind.COUNT
_timestamp = attrgetter("timestamp")
_value = attrgetter("value")
# A batch that fails the batch decoder (an event outside the writers' shapes, or malformed) is read
# again event by event; after such a miss the next 2^misses batches (at most this many) go straight
# to the per-event path, so a topology whose events never fit pays for a try once in a while only
FAST_SKIP_MAX = 64

# Tier 1's memory, stated (docs/ARCHITECTURE.md, "Tier 1's memory"): the process itself (Python,
# aiokafka with its fetch buffers, numpy) and, per open cell, the cell held in the window (its
# 4-tuple, its key and channel strings, the dict entry: ~230 bytes measured) plus what closing the
# window builds beside it (the partials' cells per root partition, their JSON: ~210 bytes more).
# tests/unit/test_coalescer_memory.py holds the per-cell figure to it; `pipeline bench cardinality`
# checks the process's peak RSS against the bound.
TIER1_BASE_BYTES = 100_000_000
BYTES_PER_OPEN_CELL = 450


def tier1_memory_bound(max_cells: int) -> int:
    """Bytes a tier-1 worker's RSS stays under with windows of at most `max_cells` cells, without
    its dedup state (`pipeline.core.dedup`, bytes per id inside the horizon)."""
    return TIER1_BASE_BYTES + BYTES_PER_OPEN_CELL * max_cells


class Record(Protocol):
    """What tier 1 needs of a consumed message (aiokafka's ConsumerRecord fits)."""

    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...


def root_partition(key: str, root_partitions: int) -> int:
    """Where every sub-key of `key` meets: a stable hash, the same in every process."""
    return zlib.crc32(key.encode()) % root_partitions


@dataclass(slots=True)
class DeadLetter:
    partition: int
    offset: int
    raw: bytes
    reason: str
    field: str | None = None


@dataclass(slots=True)
class Flush:
    """Everything one window produced; committed to Kafka as one transaction."""

    window: int
    partials: list[Partial]
    next_offsets: dict[int, int]  # source partition -> offset to resume from
    events: int = 0
    cells: int = 0
    duplicates: int = 0
    # (channel, raw event) of feed types (e.g. comments), forwarded to the feed topic
    feed: list[tuple[str, bytes]] = field(default_factory=list)
    # source partition -> records of the ids this window counted (the dedup changelog)
    changelog: dict[int, list[bytes]] = field(default_factory=dict)
    # source partition -> its watermark as the window closed (what a rewind to its end goes back to)
    watermarks: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class _PartitionState:
    cells: dict[Cell, Any] = field(default_factory=dict)
    first: int = -1
    last: int = -1
    events: int = 0
    late: int = 0
    dead: int = 0
    duplicates: int = 0


def _fold(cells: dict[Cell, Any], cell: Cell, kind: Kind, value: float, user: str | None) -> int:
    """Fold one event into a cell; returns how much the held size grew."""
    old = cells.get(cell)
    if kind is Kind.DISTINCT:
        grew = 0
        if old is None:
            cells[cell] = old = set()
            grew = 1
        if user is not None and user not in old:
            old.add(user)
            grew += 1
        return grew
    if old is None:
        cells[cell] = 1 if kind is COUNT else value
        return 1
    if kind is COUNT:
        cells[cell] = old + 1
    elif kind is Kind.SUM:
        cells[cell] = old + value
    elif kind is Kind.MIN:
        if value < old:
            cells[cell] = value
    elif value > old:
        cells[cell] = value
    return 0


def _take_back(cells: dict[Cell, Any], indexes: tuple[int, ...], channel: str, key: str) -> None:
    """Uncount an event counted in place (a repeat of an id): one off each of its all-time cells."""
    for index in indexes:
        cell = (index, channel, key, TOTAL)
        left = cells[cell] - 1
        if left:
            cells[cell] = left
        else:  # no event of the window left in it
            del cells[cell]


def _writer_shape(types: Iterable[str]) -> msgspec.json.Decoder[Any]:
    """A decoder of the events the writers send, of `types`.

    Exactly the events `add_batch`'s per-event shortcut counts in place and `check_event` accepts
    with these fields only: a `type` among `types`, a `key` of 1 to MAX_KEY_CHARS characters, and
    optionally a `channel` (up to MAX_KEY_CHARS; absent = ""), an `id` (1 to MAX_ID_CHARS; null =
    none), a `ts` (an integer in [0, MAX_TS); null = none) and a `sub` (an integer in [0,
    MAX_SUBKEYS)). Anything else (another field, another type, a null channel or sub, a float ts,
    a bool, an empty id) fails the decode, and the batch takes the per-event path, which decides it
    as before. tests/unit/test_coalescer.py holds the two paths to the same counts and verdicts.
    """
    event = msgspec.defstruct(
        "WriterEvent",
        [
            ("type", Literal[tuple(sorted(types))]),
            ("key", Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_CHARS)]),
            ("channel", Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)], ""),
            ("id", Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)] | None, None),
            ("ts", Annotated[int, msgspec.Meta(ge=0, lt=MAX_TS)] | None, None),
            ("sub", Annotated[int, msgspec.Meta(ge=0, lt=MAX_SUBKEYS)], 0),
        ],
        forbid_unknown_fields=True,
        gc=False,  # no references to other objects: the garbage collector need not track them
    )
    return msgspec.json.Decoder(event)


class Coalescer:
    """Sans-I/O: feed it records, ask it when to flush, take the partials."""

    def __init__(
        self, topology: Topology, root_partitions: int, now: float, changelog_max_bytes: int = 900_000
    ) -> None:
        self.topology = topology
        self.changelog_max_bytes = changelog_max_bytes
        self.root_partitions = root_partitions
        self.clock = FlushClock(topology.flush_interval_ms / 1000, now)
        self.max_cells = topology.max_cells
        self.window = 0
        self._types = topology.types
        # per event type: (metric index, kind, has a total rollup, bucketed rollups)
        self._plan: dict[str, tuple[tuple[int, Kind, bool, tuple[Rollup, ...]], ...]] = {
            t: tuple(
                (i, m.kind, any(not r.size_s for r in m.rollups), tuple(r for r in m.rollups if r.size_s))
                for i, m in metrics
            )
            for t, metrics in topology.metrics_by_type.items()
        }
        # event types whose every metric is an all-time count, and not forwarded to the feed:
        # their plainest events are counted without building their fields (see add_batch)
        self._shortcut: dict[str, tuple[int, ...]] = {
            t: tuple(i for i, _, _, _ in entries)
            for t, entries in self._plan.items()
            if t not in topology.feed_types
            and all(kind is COUNT and has_total and not bucketed for _, kind, has_total, bucketed in entries)
        }
        self._tracks_time = any(m.rollups != (Rollup(),) for m in topology.metrics)
        self._horizon_ms = topology.dedup_horizon_s * 1000
        # the batch decoder of the shortcut's events (see _add_decoded), and when to try it next
        self._decoder = _writer_shape(self._shortcut) if self._shortcut else None
        self._fast_misses = 0
        self._fast_skip = 0
        self._ids: dict[int, PartitionIds] = {}  # per source partition; outlives windows
        self._feed_types = topology.feed_types
        self._feed: list[tuple[str, bytes]] = []
        self._parts: dict[int, _PartitionState] = {}
        self._watermark: dict[int, int] = {}
        self._committed_watermark: dict[int, int] = {}  # as of each partition's last committed window
        self._size = 0

    @property
    def size(self) -> int:
        """Cells (and distinct members) held: the memory bound that forces an early flush."""
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.max_cells

    @property
    def pending(self) -> bool:
        return bool(self._parts)

    def due(self, now: float) -> bool:
        return self.full or self.clock.due(now)

    def add_batch(self, partition: int, records: Sequence[Record]) -> list[DeadLetter]:
        """Fold a batch of one partition's records; return those that can never be counted.

        Events that carry an id are counted unless the partition counted that id
        before, within the topology's dedup horizon (`pipeline.core.dedup`).
        """
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _PartitionState()
        if self._decoder is not None and records:
            if self._fast_skip:
                self._fast_skip -= 1
            elif self._add_decoded(partition, part, records):
                self._fast_misses = 0
                return []
            else:
                self._fast_misses += 1
                self._fast_skip = min(FAST_SKIP_MAX, 1 << self._fast_misses)
        types = self._types
        loads = orjson.loads
        dedup = self._horizon_ms > 0
        # events with an id, in offset order: the shortcut's are counted at once (their raw bytes
        # are kept, to take a duplicate back out: holding no new object keeps the garbage
        # collector out of the hot loop); the others, (fields, raw, watermark at the event), are
        # folded once the batch's verdicts are in
        with_id: list[Any] = []
        eids: list[str] = []  # their ids
        held = 0  # events with an id that wait for their verdict to be folded
        feed_types = self._feed_types
        shortcut = self._shortcut
        tracks_time = self._tracks_time
        wm = self._watermark.get(partition, 0)
        cells = part.cells
        size = self._size
        quick = 0
        dead: list[DeadLetter] = []
        accepted: list[tuple[EventFields, int]] = []  # (fields, watermark at the event)
        if not records:
            return dead
        if part.first < 0:
            part.first = records[0].offset
        part.last = records[-1].offset
        count = cells.get
        cells_before = len(cells)
        for record in records:
            raw = record.value
            try:
                if raw is None:
                    raise InvalidEvent("empty message (no value)")
                if len(raw) > MAX_EVENT_BYTES:
                    raise InvalidEvent(f"event is {len(raw)} bytes, over the {MAX_EVENT_BYTES} byte limit")
                obj = loads(raw)
                # Shortcut for the commonest events, {"type", "key", "channel"} of a type that only
                # feeds all-time counts, and the same with an "id" (what the SDK sends): same
                # verdict as check_event; counted in place (with an id: once its verdict is in).
                size_of = len(obj) if type(obj) is dict else 0
                if size_of == 3:
                    etype = obj.get("type")
                    key = obj.get("key")
                    channel = obj.get("channel")
                    if type(etype) is str and type(key) is str and type(channel) is str:
                        indexes = shortcut.get(etype)
                        if (
                            indexes is not None
                            and 0 < len(key) <= MAX_KEY_CHARS
                            and len(channel) <= MAX_KEY_CHARS
                        ):
                            quick += 1
                            if tracks_time:
                                ts = record.timestamp
                                if ts > wm:
                                    wm = ts
                            for index in indexes:
                                cell = (index, channel, key, TOTAL)
                                cells[cell] = count(cell, 0) + 1
                            continue
                elif dedup and 3 <= size_of <= 6:
                    # {"type", "key", "id"} and any of "channel", "ts", "sub": what the writers send
                    etype = obj.get("type")
                    key = obj.get("key")
                    eid = obj.get("id")
                    channel = obj.get("channel")
                    # fields not accounted for yet: "ts" and "sub" are looked up only if there are any
                    rest = size_of - 3 - (channel is not None)
                    ets = sub = None
                    if rest:
                        ets = obj.get("ts")
                        sub = obj.get("sub")
                        rest -= (ets is not None) + (sub is not None)
                    indexes = shortcut.get(etype) if type(etype) is str else None
                    if (
                        indexes is not None
                        # no other field (a key per field seen; a null value takes the full path)
                        and not rest
                        and type(key) is str
                        and 0 < len(key) <= MAX_KEY_CHARS
                        and type(eid) is str
                        and 0 < len(eid) <= MAX_ID_CHARS
                        and (channel is None or (type(channel) is str and len(channel) <= MAX_KEY_CHARS))
                        and (ets is None or (type(ets) is int and 0 <= ets < MAX_TS))
                        and (sub is None or (type(sub) is int and 0 <= sub < MAX_SUBKEYS))
                    ):
                        if channel is None:
                            channel = ""
                        if tracks_time:
                            ets = record.timestamp if ets is None else ets
                            if ets > wm:
                                wm = ets
                        with_id.append(raw)
                        eids.append(eid)
                        for index in indexes:
                            cell = (index, channel, key, TOTAL)
                            cells[cell] = count(cell, 0) + 1
                        continue
                fields = check_event(obj, types, record.timestamp)
            except InvalidEvent as exc:
                dead.append(DeadLetter(partition, record.offset, raw or b"", exc.reason, exc.field))
                continue
            except orjson.JSONDecodeError as exc:
                dead.append(DeadLetter(partition, record.offset, raw or b"", f"not valid JSON: {exc}"))
                continue
            # The watermark moves in offset order, so whether an event is late does not depend on
            # when it is folded (held events are folded after their batch) or on batch boundaries.
            if fields[3] > wm:
                wm = fields[3]
            if dedup and fields[6] is not None:
                held += 1
                with_id.append((fields, raw, wm))
                eids.append(fields[6])
                continue
            accepted.append((fields, wm))
            if feed_types and fields[0] in feed_types:
                self._feed.append((fields[2], raw))
        if with_id:
            quick += len(with_id) - held  # the shortcut's, counted in place above
            newest = max(map(_timestamp, records))  # the batch's ids belong to its newest record's time
            repeats = self.ids(partition).seen(eids, newest)
            for i in repeats:  # counted before: the shortcut's are taken back out, the held dropped
                part.duplicates += 1
                event = with_id[i]
                if type(event) is bytes:
                    quick -= 1
                    obj = loads(event)
                    _take_back(cells, shortcut[obj["type"]], obj.get("channel") or "", obj["key"])
                else:
                    with_id[i] = None
            if held:
                for event in with_id:
                    if type(event) is tuple:
                        checked, raw, at = event
                        accepted.append((checked, at))
                        if feed_types and checked[0] in feed_types:
                            self._feed.append((checked[2], raw))
        part.events += quick
        self._size = size + len(cells) - cells_before  # cells the shortcut added
        self._watermark[partition] = wm
        part.dead += len(dead)
        self._fold(part, accepted)
        return dead

    def _add_decoded(self, partition: int, part: _PartitionState, records: Sequence[Record]) -> bool:
        """`add_batch` for a batch of the writers' plainest events only, each decoded and checked in
        one call of a typed decoder (no dict, no Python-level check per field).

        Returns False, having changed nothing, when some event is not of that shape (or not valid
        JSON, or too large): the caller then reads the batch event by event. (Each value is decoded
        on its own: a batch joined into one document could let a value that is not one event, say
        two objects or half of one, stand in for its neighbours.)
        """
        decoder = self._decoder
        assert decoder is not None
        values = list(map(_value, records))
        try:
            events = list(map(decoder.decode, values))
        except (msgspec.DecodeError, ValueError, TypeError):  # not of the writers' shape, or no value
            return False
        n = len(values)
        if max(map(len, values)) > MAX_EVENT_BYTES:
            return False
        if part.first < 0:
            part.first = records[0].offset
        part.last = records[-1].offset
        cells = part.cells
        count = cells.get
        cells_before = len(cells)
        shortcut = self._shortcut
        for event in events:
            channel = event.channel
            key = event.key
            for index in shortcut[event.type]:
                cell = (index, channel, key, TOTAL)
                cells[cell] = count(cell, 0) + 1
        counted = n
        wm = self._watermark.get(partition, 0)
        if self._tracks_time:  # the watermark moves with each event's time: its `ts`, or its record's
            times = (r.timestamp if e.ts is None else e.ts for e, r in zip(events, records, strict=True))
            wm = max(wm, max(times))
        self._watermark[partition] = wm
        if self._horizon_ms > 0:
            eids = [e.id for e in events]
            where: Sequence[int] = range(n)
            without = eids.count(None)
            if without == n:
                eids = []
            elif without:
                where = [i for i, eid in enumerate(eids) if eid is not None]
                eids = [eids[i] for i in where]
            if eids:
                newest = max(map(_timestamp, records))  # the batch's ids belong to its newest record's time
                for j in self.ids(partition).seen(eids, newest):
                    # counted before: taken back out
                    event = events[where[j]]
                    part.duplicates += 1
                    counted -= 1
                    _take_back(cells, shortcut[event.type], event.channel, event.key)
        part.events += counted
        self._size += len(cells) - cells_before
        return True

    def ids(self, partition: int) -> PartitionIds:
        """The dedup state of a source partition (created empty on first use)."""
        ids = self._ids.get(partition)
        if ids is None:
            ids = self._ids[partition] = PartitionIds(self._horizon_ms)
        return ids

    def restore_ids(self, partition: int, records: Iterable[bytes], next_offset: int) -> int:
        """Rebuild a partition's dedup state from its changelog; returns the ids taken back."""
        ids = self._ids[partition] = PartitionIds(self._horizon_ms)
        taken = sum(ids.load(r) for r in records)
        ids.next_offset = next_offset
        return taken

    def ids_current(self, partition: int, committed: int) -> bool:
        """Does this worker's dedup state of `partition` end exactly at its committed offset?"""
        ids = self._ids.get(partition)
        return ids is not None and not ids.pending and ids.next_offset == committed

    def committed(self, result: Flush) -> None:
        """The window's transaction committed: its ids are counted for good. (The next window may
        be open already: tier 1 reads on while a closed window commits.)"""
        for partition, offset in result.next_offsets.items():
            ids = self._ids.get(partition)
            if ids is not None:
                ids.commit(offset)
        self._committed_watermark.update(result.watermarks)

    def aborted(self) -> None:
        """The window's transaction aborted: its events, and any read after them, will be read again
        from the committed offsets. Everything since the last committed window goes: the open
        window's cells, feed and ids, the closed one's ids, and the watermarks move back to where
        the committed windows left them (so the events read again are judged late or not exactly
        as they will be counted)."""
        for ids in self._ids.values():
            ids.abort()
        self._parts = {}
        self._feed = []
        self._size = 0
        self._watermark = dict(self._committed_watermark)

    def ids_held(self) -> list[int]:
        """The partitions whose dedup state this coalescer holds."""
        return list(self._ids)

    def drop_ids(self, partitions: Iterable[int]) -> None:
        """Forget the dedup state of partitions another worker owns now."""
        for p in partitions:
            self._ids.pop(p, None)

    def _fold(self, part: _PartitionState, events: list[tuple[EventFields, int]]) -> None:
        """Fold validated events, each judged late or not by the watermark it arrived under."""
        cells = part.cells
        plan = self._plan
        late = 0
        size = self._size
        for (etype, key, channel, ets, value, user, _id, _sub), wm in events:
            for index, kind, has_total, bucketed in plan[etype]:
                if has_total:
                    cell = (index, channel, key, TOTAL)
                    if kind is COUNT:  # the common case, inline
                        old = cells.get(cell)
                        if old is None:
                            cells[cell] = 1
                            size += 1
                        else:
                            cells[cell] = old + 1
                    else:
                        size += _fold(cells, cell, kind, value, user)
                for rollup in bucketed:
                    if rollup.is_late(ets, wm):
                        late += 1
                    else:
                        size += _fold(cells, (index, channel, key, rollup.bucket(ets)), kind, value, user)
        part.events += len(events)
        part.late += late
        self._size = size

    def flush(self, now: float) -> Flush:
        """Close the window: partials for every (source partition, root partition) with something to say."""
        self.window += 1
        self.clock.reset(now)
        result = Flush(self.window, [], {})
        roots = self.root_partitions
        for partition, part in self._parts.items():
            if part.last < 0:
                continue
            result.next_offsets[partition] = part.last + 1
            by_root: dict[int, dict[Cell, Any]] = {}
            for cell, value in part.cells.items():
                r = root_partition(cell[2], roots)
                bucket = by_root.get(r)
                if bucket is None:
                    by_root[r] = {cell: value}
                else:
                    bucket[cell] = value
            # Counters ride on one fixed root partition so they are applied exactly once too.
            home = partition % roots
            if (part.events or part.late or part.dead or part.duplicates) and home not in by_root:
                by_root[home] = {}
            for r, cells in sorted(by_root.items()):
                counters = r == home
                result.partials.append(
                    Partial(
                        source_partition=partition,
                        root_partition=r,
                        window=self.window,
                        first_offset=part.first,
                        last_offset=part.last,
                        cells=cells,
                        events=part.events if counters else 0,
                        late_dropped=part.late if counters else 0,
                        dead=part.dead if counters else 0,
                        duplicates=part.duplicates if counters else 0,
                    )
                )
            result.events += part.events
            result.duplicates += part.duplicates
            result.cells += len(part.cells)
            result.watermarks[partition] = self._watermark.get(partition, 0)
            if self._horizon_ms > 0:
                # sealed even without ids, so that its commit never takes ids of the next window
                ids = self.ids(partition)
                ids.seal()
                if ids.pending:
                    result.changelog[partition] = ids.changelog(self.changelog_max_bytes)
        result.feed, self._feed = self._feed, []
        self._parts = {}
        self._size = 0
        return result

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the open window of partitions (their watermark moves with them; ids not yet committed too)."""
        for p in partitions:
            self._parts.pop(p, None)
            self._watermark.pop(p, None)
            self._committed_watermark.pop(p, None)
            ids = self._ids.get(p)
            if ids is not None:
                ids.abort()
        # Count distinct members too, as add_batch does, or `full` would fire late.
        self._size = sum(
            len(p.cells) + sum(len(v) for v in p.cells.values() if isinstance(v, set))
            for p in self._parts.values()
        )
