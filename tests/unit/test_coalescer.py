"""Tier 1: the coalescer, and the central exactness property of tier 1 + tier 2.

The property test computes the expected cells *with* the late-event rule, from
an independent reference model: per source partition the watermark is the
running maximum of the timestamps of the valid events seen so far (in offset
order, across batches and flushes); an event is dropped from a bucketed rollup
when its bucket's end + grace <= that watermark (the watermark includes the
event itself). The total rollup never drops anything.

Tier 1 folds some events out of offset order (events with an id wait for
their batch's dedup verdicts; the plainest {"type", "key", "channel"} events of
count-only types are counted in place), but each event is judged by the
watermark as of its own offset, so lateness does not depend on fold order or
batch boundaries (test_lateness_does_not_depend_on_batch_boundaries). The
plain-event shortcut also has its own property test on a topology without
buckets.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.core.aggregates import aggregate
from pipeline.core.coalescer import Coalescer, DeadLetter, Flush, root_partition
from pipeline.core.merger import Merger
from pipeline.core.model import MAX_EVENT_BYTES, Partial
from pipeline.topology import (
    count,
    distinct_users,
    every,
    maximum,
    minimum,
    sum_of,
    topology,
    total,
)


@dataclass(frozen=True)
class Rec:
    offset: int
    value: bytes | None
    timestamp: int = 0


def ev(type: str = "a", key: str = "k", **fields: Any) -> bytes:
    return orjson.dumps({"type": type, "key": key, **fields})


GRACE_S = 30
MINUTE = every(60, retention_s=3600, grace_s=GRACE_S)

TOPO = topology(
    "prop",
    metrics=[
        count("n", "a", total(), MINUTE),
        sum_of("s", "a", total(), MINUTE),
        distinct_users("u", "a", total(), MINUTE),
        minimum("lo", "b", total(), MINUTE),
        maximum("hi", "b", total(), MINUTE),
        count("nb", "b", total()),
        maximum("hi_by_minute", "b", MINUTE),  # buckets only, no total
    ],
    priorities={"a": 0, "b": 1, "c": 0},  # "c" feeds no metric: counted, nothing else
)
KINDS = [m.kind for m in TOPO.metrics]


# --------------------------------------------------------------------------- reference model


@dataclass(frozen=True)
class Gen:
    """A generated record: a valid event (as fields) or a raw invalid message."""

    partition: int
    type: str = "a"
    key: str = "k"
    channel: str | None = None
    user: str | None = None
    value: int | None = None
    ts: int | None = None
    sub: int = 0
    record_ts: int = 0
    invalid: bytes | None = None
    is_invalid: bool = False

    def raw(self) -> bytes | None:
        if self.is_invalid:
            return self.invalid
        obj: dict[str, Any] = {"type": self.type, "key": self.key}
        if self.channel is not None:
            obj["channel"] = self.channel
        if self.user is not None:
            obj["user"] = self.user
        if self.value is not None:
            obj["value"] = self.value
        if self.ts is not None:
            obj["ts"] = self.ts
        if self.sub:
            obj["sub"] = self.sub
        if len(obj) == 3:
            obj["sub"] = 0  # not the plainest shape (see the module docstring)
        return orjson.dumps(obj)


def reference(per_partition: dict[int, list[Gen]]) -> tuple[dict[Any, Any], int, int, int]:
    """Expected (cells, valid events, dead, late drops), straight from the events."""
    contributions: dict[Any, list[tuple[float, str | None]]] = defaultdict(list)
    valid = dead = late = 0
    for gens in per_partition.values():
        wm = 0
        for g in gens:
            if g.is_invalid:
                dead += 1
                continue
            valid += 1
            ts = g.ts if g.ts is not None else g.record_ts
            wm = max(wm, ts)
            value = g.value if g.value is not None else 1
            for index, metric in enumerate(TOPO.metrics):
                if metric.on != g.type:
                    continue
                for rollup in metric.rollups:
                    if rollup.size_s:
                        size_ms = rollup.size_s * 1000
                        end_ms = (ts // size_ms + 1) * size_ms
                        if end_ms + rollup.grace_s * 1000 <= wm:
                            late += 1
                            continue
                        bucket = f"{rollup.size_s}:{ts // size_ms * rollup.size_s}"
                    else:
                        bucket = "total"
                    contributions[(index, g.channel or "", g.key, bucket)].append((value, g.user))
    cells = {cell: aggregate(KINDS[cell[0]], vals) for cell, vals in contributions.items()}
    return cells, valid, dead, late


INVALID = [
    None,
    b"",
    b"{",
    b"[1, 2]",
    b'{"type": "zzz", "key": "k"}',
    b'{"type": "a"}',
    b'{"type": "a", "key": 5}',
    b'{"type": "a", "key": "k", "value": "1"}',
    b'{"type": "a", "key": "k", "value": true}',
    b'{"type": "a", "key": "k", "ts": -5}',
    b'{"type": "a", "key": "k", "sub": 5000}',
    b'{"type": "a", "key": "k", "value": NaN}',
    b'{"type": "a", "key": "k", "value": 1e400}',
    b'{"type": "a", "key": "k", "value": 1e16}',
    b'{"type": "a", "key": "' + b"x" * 257 + b'"}',
    b" " * (MAX_EVENT_BYTES + 1),
]

key_st = st.one_of(st.sampled_from(["k1", "k2", "k3", "k#:", "\xff", "ü"]), st.text(min_size=1, max_size=4))


@st.composite
def gens(draw: st.DrawFn, partitions: int) -> Gen:
    partition = draw(st.integers(0, partitions - 1))
    if draw(st.integers(0, 9)) == 0:
        return Gen(partition, invalid=draw(st.sampled_from(INVALID)), is_invalid=True)
    return Gen(
        partition,
        type=draw(st.sampled_from(["a", "a", "b", "c"])),
        key=draw(key_st),
        channel=draw(st.sampled_from([None, "", "ch1", "ch:2"])),
        user=draw(st.sampled_from([None, "u1", "u2", "u3"])),
        value=draw(st.none() | st.integers(-1000, 1000)),
        ts=draw(st.none() | st.integers(0, 400_000)),
        sub=draw(st.sampled_from([0, 0, 1, 2, 1023])),
        record_ts=draw(st.integers(0, 400_000)),
    )


actions = st.lists(
    st.one_of(
        st.tuples(st.just("batch"), st.integers(0, 7), st.integers(1, 8)),
        st.tuples(st.just("flush"), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=30,
)


def check_flush(flush: Flush, window: dict[int, list[tuple[int, Gen]]], roots: int) -> None:
    """Per-flush invariants, against what was fed in this window."""
    fed = {p: recs for p, recs in window.items() if recs}
    assert flush.next_offsets == {p: recs[-1][0] + 1 for p, recs in fed.items()}
    pairs = [(p.source_partition, p.root_partition) for p in flush.partials]
    assert len(pairs) == len(set(pairs)), "more than one partial per (source, root) partition"
    assert {p.source_partition for p in flush.partials} == set(fed)
    valid_total = 0
    for src, recs in fed.items():
        mine = [p for p in flush.partials if p.source_partition == src]
        valid = sum(1 for _, g in recs if not g.is_invalid)
        invalid = len(recs) - valid
        valid_total += valid
        for p in mine:
            assert 0 <= p.root_partition < roots
            assert p.window == flush.window
            assert (p.first_offset, p.last_offset) == (recs[0][0], recs[-1][0])
            for cell in p.cells:
                assert root_partition(cell[2], roots) == p.root_partition
        carriers = [p for p in mine if p.events or p.dead or p.late_dropped or p.duplicates]
        assert len(carriers) == 1, "counters must ride on exactly one partial"
        assert carriers[0].events == valid
        assert carriers[0].dead == invalid
    assert flush.events == valid_total


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), sources=st.integers(1, 4), roots=st.integers(1, 4))
def test_tiers_agree_with_direct_aggregation(data: st.DataObject, sources: int, roots: int) -> None:
    generated = data.draw(st.lists(gens(sources), min_size=1, max_size=60), label="events")
    plan = data.draw(actions, label="actions")
    start_offsets = data.draw(st.lists(st.integers(0, 1000), min_size=sources, max_size=sources))
    gaps = data.draw(st.lists(st.integers(1, 3), min_size=len(generated), max_size=len(generated)))

    # Offsets per source partition: increasing, with gaps (transaction markers).
    queues: dict[int, list[tuple[int, Gen]]] = defaultdict(list)
    per_partition: dict[int, list[Gen]] = defaultdict(list)
    next_offset = dict(enumerate(start_offsets))
    for g, gap in zip(generated, gaps, strict=True):
        queues[g.partition].append((next_offset[g.partition], g))
        per_partition[g.partition].append(g)
        next_offset[g.partition] += gap

    coalescer = Coalescer(TOPO, roots, now=0.0)
    partials: list[Partial] = []
    dead_letters: list[DeadLetter] = []
    window: dict[int, list[tuple[int, Gen]]] = defaultdict(list)
    key_roots: dict[str, set[int]] = defaultdict(set)
    now = 0.0

    def add(partition: int, n: int) -> None:
        taken, queues[partition] = queues[partition][:n], queues[partition][n:]
        if not taken:
            return
        records = [Rec(off, g.raw(), g.record_ts) for off, g in taken]
        dead = coalescer.add_batch(partition, records)
        bad = [(off, g) for off, g in taken if g.is_invalid]
        assert [(d.partition, d.offset) for d in dead] == [(partition, off) for off, _ in bad]
        for d, (_, g) in zip(dead, bad, strict=True):
            assert d.reason
            assert d.raw == (g.invalid or b"")
        dead_letters.extend(dead)
        window[partition].extend(taken)

    def flush() -> None:
        nonlocal now, window
        now += 1.0
        result = coalescer.flush(now)
        check_flush(result, window, roots)
        for p in result.partials:
            for cell in p.cells:
                key_roots[cell[2]].add(p.root_partition)
        partials.extend(result.partials)
        window = defaultdict(list)
        assert not coalescer.pending
        assert coalescer.size == 0

    for action, partition, n in plan:
        if action == "batch":
            add(partition % sources, n)
        else:
            flush()
    for partition in range(sources):
        add(partition, len(queues[partition]))
    flush()

    # Every cell of one key meets on one root partition, whatever its sub-key or source.
    assert all(len(r) == 1 for r in key_roots.values())

    # Tier 2, through the wire format, in any order.
    order = data.draw(st.permutations(range(len(partials))), label="merge order")
    merger = Merger(TOPO)
    root_offsets: dict[int, int] = defaultdict(int)
    for i in order:
        p = partials[i]
        assert merger.add(p.root_partition, root_offsets[p.root_partition], p.to_json()) is not None
        root_offsets[p.root_partition] += 1
    merged = merger.take()

    cells, valid, dead, late = reference(per_partition)
    event(f"late drops: {'yes' if late else 'no'}")
    event(f"events: {'many' if valid >= 20 else 'few'}")
    event(f"windows with data: {'several' if len({p.window for p in partials}) > 1 else 'one'}")
    assert merged.cells == cells
    assert merged.events == valid
    assert merged.dead == dead == len(dead_letters)
    assert merged.late_dropped == late
    assert merged.bad_partials == 0
    assert merged.partials == len(partials)
    assert merged.ranges == {r: (0, n - 1) for r, n in root_offsets.items()}


# --------------------------------------------------------------------------- examples


def feed(
    coalescer: Coalescer, partition: int, raws: list[bytes | None], start: int = 0, ts: int = 0
) -> list[DeadLetter]:
    return coalescer.add_batch(partition, [Rec(start + i, r, ts) for i, r in enumerate(raws)])


def merged_cells(flush: Flush, topo: Any = TOPO) -> dict[Any, Any]:
    merger = Merger(topo)
    for p in flush.partials:
        merger.add_partial(p)
    return merger.take().cells


def test_simple_counts_and_offsets() -> None:
    c = Coalescer(TOPO, 3, now=0.0)
    assert not c.pending
    feed(c, 0, [ev(key="x", ts=1000), ev(key="x", ts=2000, value=5), ev(key="y", ts=61_000)], start=10)
    feed(c, 2, [ev("b", key="x", value=7, ts=1)], start=500)
    assert c.pending
    f = c.flush(1.0)
    assert f.window == 1
    assert f.next_offsets == {0: 13, 2: 501}
    assert f.events == 4
    cells = merged_cells(f)
    assert cells[(0, "", "x", "total")] == 2
    assert cells[(0, "", "x", "60:0")] == 2
    assert cells[(1, "", "x", "total")] == 6
    assert cells[(0, "", "y", "60:60")] == 1
    assert cells[(3, "", "x", "total")] == 7
    assert cells[(4, "", "x", "60:0")] == 7
    assert cells[(5, "", "x", "total")] == 1
    assert (5, "", "x", "60:0") not in cells  # nb has only a total rollup
    assert f.cells == len([k for k in cells if k[2] == "x" or k[2] == "y"])


def test_empty_flush() -> None:
    c = Coalescer(TOPO, 2, now=0.0)
    c.add_batch(1, [])
    f = c.flush(1.0)
    assert f.partials == [] and f.next_offsets == {} and f.events == 0
    assert c.flush(2.0).window == 2


def test_next_offsets_are_last_offset_plus_one_with_gaps() -> None:
    c = Coalescer(TOPO, 2, now=0.0)
    c.add_batch(0, [Rec(5, ev()), Rec(9, ev()), Rec(20, b"junk")])
    c.add_batch(0, [Rec(22, ev())])
    c.add_batch(3, [Rec(0, None)])
    f = c.flush(1.0)
    assert f.next_offsets == {0: 23, 3: 1}
    for p in f.partials:
        if p.source_partition == 0:
            assert (p.first_offset, p.last_offset) == (5, 22)
    # the next window starts afresh
    c.add_batch(0, [Rec(23, ev())])
    f2 = c.flush(2.0)
    assert f2.next_offsets == {0: 24}
    assert {(p.first_offset, p.last_offset) for p in f2.partials} == {(23, 23)}


def test_invalid_records_become_dead_letters_and_valid_ones_still_count() -> None:
    c = Coalescer(TOPO, 1, now=0.0)
    big = b'{"type":"a","key":"k","pad":"' + b"x" * MAX_EVENT_BYTES + b'"}'
    raws: list[bytes | None] = [
        ev(key="k"),
        None,
        ev(key="k"),
        b"{not json",
        b"[]",
        ev("nope", key="k"),
        ev(key=""),
        ev(key="k", value="3"),
        ev(key="k", ts=1.5),
        big,
        ev(key="k"),
    ]
    dead = feed(c, 4, raws, start=100)
    assert [d.offset for d in dead] == [101, 103, 104, 105, 106, 107, 108, 109]
    assert all(d.partition == 4 for d in dead)
    by_offset = {d.offset: d for d in dead}
    assert by_offset[101].raw == b"" and "empty" in by_offset[101].reason
    assert by_offset[103].raw == b"{not json" and "JSON" in by_offset[103].reason
    assert "object" in by_offset[104].reason
    assert by_offset[105].field == "type" and "nope" in by_offset[105].reason
    assert by_offset[106].field == "key"
    assert by_offset[107].field == "value"
    assert by_offset[108].field == "ts"
    assert by_offset[109].raw == big and str(MAX_EVENT_BYTES) in by_offset[109].reason
    f = c.flush(1.0)
    assert f.next_offsets == {4: 111}
    (p,) = f.partials
    assert (p.events, p.dead, p.late_dropped) == (3, 8, 0)
    assert p.cells[(0, "", "k", "total")] == 3


def test_dead_only_window_still_reports_its_counters_and_offsets() -> None:
    c = Coalescer(TOPO, 3, now=0.0)
    feed(c, 5, [b"x", None], start=7)
    f = c.flush(1.0)
    assert f.next_offsets == {5: 9}
    (p,) = f.partials
    assert p.cells == {} and p.dead == 2 and p.events == 0
    assert (p.first_offset, p.last_offset) == (7, 8)


def test_event_type_without_metrics_is_counted_but_makes_no_cells() -> None:
    c = Coalescer(TOPO, 2, now=0.0)
    feed(c, 0, [ev("c", key="k"), ev("c", key="j")])
    f = c.flush(1.0)
    (p,) = f.partials
    assert p.cells == {} and p.events == 2
    assert c.size == 0


def test_one_partial_per_source_and_root_partition_and_counters_once() -> None:
    roots = 4
    c = Coalescer(TOPO, roots, now=0.0)
    keys = [f"key{i}" for i in range(40)]
    feed(c, 0, [ev(key=k) for k in keys])
    feed(c, 1, [ev(key=k) for k in keys[:5]] + [b"bad"])
    f = c.flush(1.0)
    pairs = [(p.source_partition, p.root_partition) for p in f.partials]
    assert len(pairs) == len(set(pairs))
    assert {r for s, r in pairs if s == 0} == {root_partition(k, roots) for k in keys}
    for src, events, dead in ((0, 40, 0), (1, 5, 1)):
        mine = [p for p in f.partials if p.source_partition == src]
        assert sum(p.events for p in mine) == events
        assert sum(p.dead for p in mine) == dead
        assert sum(1 for p in mine if p.events or p.dead) == 1


def test_sub_keys_of_one_key_meet_on_one_root_partition() -> None:
    roots = 5
    c = Coalescer(TOPO, roots, now=0.0)
    for src in range(6):
        feed(c, src, [ev(key="viral", sub=s, channel="v", ts=1000) for s in (0, src + 1, 1023)])
    f = c.flush(1.0)
    targets = {p.root_partition for p in f.partials if p.cells}
    assert targets == {root_partition("viral", roots)}
    cells = merged_cells(f)
    assert cells[(0, "v", "viral", "total")] == 18
    assert all(cell[2] == "viral" for cell in cells)


def test_root_partition_is_stable_and_in_range() -> None:
    assert root_partition("abc", 1) == 0
    # crc32 is stable across processes (unlike hash()): pin a few values
    import zlib

    for key in ("abc", "ü", "\xff#:"):
        assert root_partition(key, 7) == zlib.crc32(key.encode()) % 7
        assert 0 <= root_partition(key, 7) < 7


def test_distinct_users_and_events_without_user() -> None:
    c = Coalescer(TOPO, 1, now=0.0)
    feed(c, 0, [ev(key="k", user="u1"), ev(key="k", user="u1"), ev(key="k", user="u2"), ev(key="j")])
    cells = merged_cells(c.flush(1.0))
    assert cells[(2, "", "k", "total")] == {"u1", "u2"}
    assert cells[(2, "", "j", "total")] == set()


def test_min_max_sum_with_floats() -> None:
    c = Coalescer(TOPO, 1, now=0.0)
    feed(c, 0, [ev("b", key="k", value=v) for v in (3.5, -1.25, 10, 0)])
    feed(c, 0, [ev(key="k", value=v) for v in (0.5, 0.25)], start=4)
    cells = merged_cells(c.flush(1.0))
    assert cells[(3, "", "k", "total")] == -1.25
    assert cells[(4, "", "k", "total")] == 10
    assert cells[(1, "", "k", "total")] == 0.75


# --------------------------------------------------------------------------- memory bound and clock


def test_full_at_max_cells() -> None:
    topo = topology("small", [count("n", "a")], {"a": 0}, max_cells=3)
    c = Coalescer(topo, 1, now=0.0)
    assert c.size == 0 and not c.full and not c.due(0.0)
    feed(c, 0, [ev(key="k1"), ev(key="k1"), ev(key="k2")])
    assert c.size == 2 and not c.full and not c.due(0.0)
    feed(c, 0, [ev(key="k3")], start=3)
    assert c.size == 3 and c.full and c.due(0.0)
    c.flush(0.0)
    assert c.size == 0 and not c.full and not c.due(0.0)


def test_distinct_members_count_toward_the_memory_bound() -> None:
    topo = topology("small", [distinct_users("u", "a")], {"a": 0}, max_cells=4)
    c = Coalescer(topo, 1, now=0.0)
    feed(c, 0, [ev(key="k", user="u1"), ev(key="k", user="u1"), ev(key="k", user="u2")])
    assert c.size == 3 and not c.full
    feed(c, 0, [ev(key="k", user="u3")], start=3)
    assert c.full


def test_flush_clock_due_after_interval_without_events() -> None:
    topo = topology("clock", [count("n", "a")], {"a": 0}, flush_interval_ms=250)
    c = Coalescer(topo, 1, now=100.0)
    assert not c.due(100.0)
    assert not c.due(100.249)
    assert c.due(100.25)
    assert c.due(1000.0)
    f = c.flush(100.3)
    assert f.partials == []
    # a fixed cadence: a flush that ran late does not push the next tick back
    assert not c.due(100.49)
    assert c.due(100.5)
    # ticks missed while busy are skipped, not made up
    c.flush(101.1)
    assert not c.due(101.24)
    assert c.due(101.25)


def test_early_flush_keeps_the_cadence() -> None:
    topo = topology("clock", [count("n", "a")], {"a": 0}, flush_interval_ms=250, max_cells=1)
    c = Coalescer(topo, 1, now=0.0)
    feed(c, 0, [ev(key="k1")])
    assert c.due(0.1)  # full
    c.flush(0.1)
    assert not c.due(0.2)
    assert c.due(0.25)


def test_forget_drops_state_of_revoked_partitions() -> None:
    topo = topology("f", [count("n", "a"), distinct_users("u", "a")], {"a": 0})
    c = Coalescer(topo, 1, now=0.0)
    feed(c, 0, [ev(key="k", user="u1"), ev(key="k", user="u2")])
    feed(c, 1, [ev(key="j", user="u1"), ev(key="j", user="u2"), ev(key="j", user="u3")])
    reference = Coalescer(topo, 1, now=0.0)
    feed(reference, 1, [ev(key="j", user="u1"), ev(key="j", user="u2"), ev(key="j", user="u3")])
    c.forget([0, 99])
    assert c.size == reference.size
    f = c.flush(1.0)
    assert f.next_offsets == {1: 3}
    assert {p.source_partition for p in f.partials} == {1}


# --------------------------------------------------------------------------- late events


LATE = topology("late", [count("n", "a", total(), every(60, 600, grace_s=30))], {"a": 0})


def late_cells(c: Coalescer) -> tuple[dict[Any, Any], int]:
    f = c.flush(1.0)
    return merged_cells(f, LATE), sum(p.late_dropped for p in f.partials)


def test_late_event_beyond_grace_is_dropped_from_buckets_but_counted_in_total() -> None:
    c = Coalescer(LATE, 2, now=0.0)
    # watermark 200 s; the bucket [60 s, 120 s) closed at 120 s, grace ended at 150 s
    feed(c, 0, [ev(ts=200_000), ev(ts=100_000)])
    cells, late = late_cells(c)
    assert cells[(0, "", "k", "total")] == 2
    assert cells[(0, "", "k", "60:180")] == 1
    assert (0, "", "k", "60:60") not in cells
    assert late == 1


def test_late_event_within_grace_is_applied() -> None:
    c = Coalescer(LATE, 1, now=0.0)
    # watermark 200 s; the bucket [120 s, 180 s) closed at 180 s, grace lasts until 210 s
    feed(c, 0, [ev(ts=200_000), ev(ts=175_000), ev(ts=120_000)])
    cells, late = late_cells(c)
    assert cells[(0, "", "k", "60:120")] == 2
    assert cells[(0, "", "k", "total")] == 3
    assert late == 0


def test_watermark_survives_flushes_and_is_per_partition() -> None:
    c = Coalescer(LATE, 1, now=0.0)
    feed(c, 0, [ev(ts=1_000_000)])
    c.flush(1.0)
    feed(c, 0, [ev(ts=10_000)], start=1)  # late on partition 0 ...
    feed(c, 1, [ev(ts=10_000)])  # ... but not on partition 1, which has its own watermark
    cells, late = late_cells(c)
    assert cells[(0, "", "k", "60:0")] == 1
    assert cells[(0, "", "k", "total")] == 2
    assert late == 1


def test_watermark_uses_record_timestamp_when_event_has_no_ts() -> None:
    c = Coalescer(LATE, 1, now=0.0)
    c.add_batch(0, [Rec(0, ev(), timestamp=500_000), Rec(1, ev(ts=5_000), timestamp=0)])
    cells, late = late_cells(c)
    assert cells[(0, "", "k", "60:480")] == 1
    assert (0, "", "k", "60:0") not in cells
    assert late == 1


def test_late_event_counts_toward_events() -> None:
    c = Coalescer(LATE, 1, now=0.0)
    feed(c, 0, [ev(ts=1_000_000), ev(ts=0)])
    f = c.flush(1.0)
    assert f.events == 2
    assert sum(p.events for p in f.partials) == 2


def test_forgotten_partition_watermark_moves_with_it() -> None:
    c = Coalescer(LATE, 1, now=0.0)
    feed(c, 0, [ev(ts=1_000_000)])
    c.flush(1.0)
    c.forget([0])
    feed(c, 0, [ev(ts=10_000)], start=1)
    cells, late = late_cells(c)
    assert cells[(0, "", "k", "60:0")] == 1
    assert late == 0


@pytest.mark.parametrize("roots", [1, 2, 3, 8])
def test_late_counter_rides_with_the_other_counters(roots: int) -> None:
    c = Coalescer(LATE, roots, now=0.0)
    feed(c, 3, [ev(key="a", ts=1_000_000), ev(key="b", ts=0), ev(key="c", ts=0)])
    f = c.flush(1.0)
    carriers = [p for p in f.partials if p.events or p.late_dropped or p.dead]
    assert len(carriers) == 1
    assert (carriers[0].events, carriers[0].late_dropped) == (3, 2)


# --------------------------------------------------------------------------- deduplication by event id


def test_an_id_counted_before_is_a_duplicate_within_the_batch_the_window_and_later_windows() -> None:
    c = Coalescer(TOPO, 2, now=0.0)
    dead = feed(
        c,
        0,
        [ev(key="k", id="e1"), ev(key="k"), ev(key="k", id="e2"), b"bad", ev(key="k", id="e1")],
        start=10,
    )
    assert [d.offset for d in dead] == [13]
    feed(c, 0, [ev(key="k", id="e2")], start=15)  # another batch of the same window
    f = c.flush(1.0)
    assert f.next_offsets == {0: 16}
    assert f.events == 3 and f.duplicates == 2
    carriers = [p for p in f.partials if p.events or p.dead or p.duplicates]
    assert len(carriers) == 1
    assert (carriers[0].events, carriers[0].dead, carriers[0].duplicates) == (3, 1, 2)
    merger = Merger(TOPO)
    for p in f.partials:
        merger.add(p.root_partition, 0, p.to_json())
    batch = merger.take()
    assert batch.cells[(0, "", "k", "total")] == 3
    assert (batch.events, batch.duplicates, batch.dead) == (3, 2, 1)
    c.committed(f)
    feed(c, 0, [ev(key="k", id="e1"), ev(key="k", id="e3")], start=16)  # a later window
    f2 = c.flush(2.0)
    assert (f2.events, f2.duplicates) == (1, 1)


def test_ids_are_per_source_partition() -> None:
    c = Coalescer(TOPO, 1, now=0.0)
    feed(c, 0, [ev(key="k", id="e1")])
    feed(c, 1, [ev(key="k", id="e1")])
    assert c.flush(1.0).events == 2


def test_an_aborted_window_forgets_its_ids_and_a_committed_one_keeps_them() -> None:
    c = Coalescer(TOPO, 1, now=0.0)
    feed(c, 0, [ev(key="k", id="e1")])
    f = c.flush(1.0)
    assert f.events == 1 and f.changelog and list(f.changelog) == [0]
    c.aborted()  # the transaction failed: the window is read again
    feed(c, 0, [ev(key="k", id="e1")])
    f = c.flush(2.0)
    assert (f.events, f.duplicates) == (1, 0)
    c.committed(f)
    feed(c, 0, [ev(key="k", id="e1")], start=1)
    assert (c.flush(3.0).duplicates, c.ids(0).committed) == (1, 1)


def test_a_new_owner_rebuilt_from_the_changelog_knows_the_committed_ids() -> None:
    old = Coalescer(TOPO, 1, now=0.0, changelog_max_bytes=100)  # forces several records per window
    ids = [f"id-{i}" for i in range(40)]
    feed(old, 3, [ev(key="k", id=i) for i in ids])
    f = old.flush(1.0)
    old.committed(f)
    records = f.changelog[3]
    assert len(records) > 1 and all(len(r) <= 100 for r in records)
    new = Coalescer(TOPO, 1, now=0.0)
    assert new.restore_ids(3, records, f.next_offsets[3]) == 40
    assert new.ids_current(3, 40) and not new.ids_current(3, 39) and not new.ids_current(2, 40)
    feed(new, 3, [ev(key="k", id=i) for i in [*ids[:5], "fresh"]], start=40)
    g = new.flush(2.0)
    assert (g.events, g.duplicates) == (1, 5)


def test_duplicates_only_window_still_reports_the_counter() -> None:
    c = Coalescer(TOPO, 3, now=0.0)
    feed(c, 4, [ev(key="k", id="e1")])
    c.committed(c.flush(0.5))
    feed(c, 4, [ev(key="k", id="e1")], start=1)
    (p,) = c.flush(1.0).partials
    assert p.cells == {} and p.duplicates == 1 and p.events == 0


def test_ids_are_ignored_when_dedup_is_off() -> None:
    topo = topology("nodedup", [count("n", "a")], {"a": 0}, dedup_horizon_s=0)
    c = Coalescer(topo, 1, now=0.0)
    feed(c, 0, [ev(key="k", id="e1"), ev(key="k", id="e1")])
    f = c.flush(1.0)
    assert f.partials[0].cells == {(0, "", "k", "total"): 2}
    assert f.duplicates == 0 and f.changelog == {}


DEDUP = topology(
    "dedup",
    [count("n", "a"), sum_of("s", "a"), distinct_users("u", "a")],
    {"a": 0},
)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), roots=st.integers(1, 3))
def test_every_id_counts_once_per_partition_across_aborts_and_new_owners(
    data: st.DataObject, roots: int
) -> None:
    """Windows commit, abort (and are read again) or move to a new owner rebuilt from the changelog."""
    events = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, 2),  # source partition
                st.sampled_from(["k1", "k2", "k3"]),
                st.none() | st.sampled_from(["e1", "e2", "e3", "e4"]),
                st.integers(-5, 5),
                st.sampled_from([None, "u1", "u2"]),
            ),
            max_size=30,
        )
    )
    batch_size = data.draw(st.integers(1, 6))
    c = Coalescer(DEDUP, roots, now=0.0)
    changelog: dict[int, list[bytes]] = defaultdict(list)
    committed = [0, 0, 0]  # per partition: offsets committed so far
    expected: dict[Any, list[tuple[float, str | None]]] = defaultdict(list)
    seen: set[tuple[int, str]] = set()
    duplicates = valid = 0
    for partition, key, eid, value, user in events:
        if eid is not None and (partition, eid) in seen:
            duplicates += 1
            continue
        if eid is not None:
            seen.add((partition, eid))
        valid += 1
        for index in range(len(DEDUP.metrics)):
            expected[(index, "", key, "total")].append((value, user))
    records: list[list[Rec]] = [[], [], []]
    for partition, key, eid, value, user in events:
        fields: dict[str, Any] = {"value": value}
        if eid is not None:
            fields["id"] = eid
        if user is not None:
            fields["user"] = user
        records[partition].append(Rec(len(records[partition]), ev(key=key, **fields)))
    partials: list[Partial] = []
    position = [0, 0, 0]
    while any(position[p] < len(records[p]) for p in range(3)):
        for p in range(3):
            chunk = records[p][position[p] : position[p] + batch_size]
            if chunk:
                assert c.add_batch(p, chunk) == []
                position[p] += len(chunk)
        if not data.draw(st.booleans()):
            continue
        f = c.flush(1.0)
        fate = data.draw(st.sampled_from(["commit", "abort", "new owner"]))
        if fate == "abort":  # nothing of the window happened: read it again from the commits
            c.aborted()
            position = list(committed)
            continue
        partials.extend(f.partials)
        for p, logs in f.changelog.items():
            changelog[p].extend(logs)
        for p, offset in f.next_offsets.items():
            committed[p] = offset
        c.committed(f)
        if fate == "new owner":
            c = Coalescer(DEDUP, roots, now=0.0)
            for p in range(3):
                c.restore_ids(p, changelog[p], committed[p])
    partials.extend(c.flush(1e9).partials)
    merger = Merger(DEDUP)
    for i, p in enumerate(partials):
        assert merger.add(p.root_partition, i, p.to_json()) is not None
    batch = merger.take()
    kinds = [m.kind for m in DEDUP.metrics]
    assert batch.cells == {cell: aggregate(kinds[cell[0]], vals) for cell, vals in expected.items()}
    assert batch.events == valid
    assert batch.duplicates == duplicates


def test_feed_types_forward_raw_events_except_duplicates() -> None:
    topo = topology("feed", [count("n", "a")], {"a": 0, "b": 1}, feed_types={"b"})
    c = Coalescer(topo, 1, now=0.0)
    first, second, third = ev("b", key="k", channel="v1", text="hi"), ev("b", key="k", id="x"), ev("a")
    feed(c, 0, [first, second, third, ev("b", key="j", channel="v2", id="x")])
    f = c.flush(1.0)
    assert f.feed == [("v1", first), ("", second)]
    assert c.flush(2.0).feed == []


# --------------------------------------------------------------------------- the plainest events


PLAIN = topology(
    "plain",
    [
        count("n", "a"),
        count("m", "a", leaderboard=3),
        count("nb", "b"),
        sum_of("s", "b"),
        distinct_users("u", "b"),
    ],
    {"a": 0, "b": 0, "c": 0},
)

OMIT = "(no channel field)"

plain_bad = [
    {"type": "a", "key": "k" * 257, "channel": "v"},
    {"type": "a", "key": "", "channel": "v"},
    {"type": "a", "key": "k", "channel": "v" * 257},
    {"type": "a", "key": "k", "channel": 5},
    {"type": "a", "key": 5, "channel": "v"},
    {"type": "zz", "key": "k", "channel": "v"},
    {"type": "a", "key": "k", "chanel": "v"},
    {"type": "a", "key": "k", "channel": None},  # valid: null channel is the empty channel
]


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    roots=st.integers(1, 3),
    items=st.lists(
        st.one_of(
            st.tuples(
                st.sampled_from(["a", "b", "c"]),
                st.sampled_from(["k1", "k2", "ü", "k" * 256]),
                st.sampled_from(["", "v1", "v:2", "c" * 256, OMIT]),
                st.none()
                | st.fixed_dictionaries(
                    {},
                    optional={
                        "user": st.sampled_from(["u1", "u2"]),
                        "value": st.integers(-9, 9),
                        "id": st.sampled_from(["i1", "i2", "i3", "", "x" * 129]),
                        "ts": st.sampled_from([5, 2**53 - 1, 2**53, -1, True]),
                        "sub": st.sampled_from([0, 3, 1023, 1024, -1]),
                    },
                ),
            ),
            st.sampled_from(plain_bad),
        ),
        max_size=40,
    ),
)
def test_plain_events_are_counted_like_any_other(data: st.DataObject, roots: int, items: list[Any]) -> None:
    """The in-place shortcut for {"type", "key", "channel"} (and the same with an "id") has the verdict
    and result of the full path; an id counted before is a duplicate either way."""
    from pipeline.core.model import InvalidEvent, explain_event

    raws = []
    expected: dict[Any, list[tuple[float, str | None]]] = defaultdict(list)
    verdicts = []
    ids: set[str] = set()
    duplicates = 0
    for item in items:
        if isinstance(item, dict):
            obj = item
        else:
            etype, key, channel, extra = item
            obj = {"type": etype, "key": key, "channel": channel, **(extra or {})}
            if channel is OMIT:
                del obj["channel"]
        raws.append(orjson.dumps(obj))
        try:
            etype, key, channel, _ts, value, user, event_id, _sub = explain_event(obj, PLAIN.types)
        except InvalidEvent as exc:
            verdicts.append((exc.reason, exc.field))
            continue
        verdicts.append(None)
        if event_id is not None:
            if event_id in ids:
                duplicates += 1
                continue
            ids.add(event_id)
        for index, metric in enumerate(PLAIN.metrics):
            if metric.on == etype:
                expected[(index, channel, key, "total")].append((value, user))
    c = Coalescer(PLAIN, roots, now=0.0)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raws)))) | {0, len(raws)})
    dead: list[DeadLetter] = []
    for lo, hi in itertools.pairwise(cuts):
        dead += c.add_batch(0, [Rec(i, raws[i], 1000 * i) for i in range(lo, hi)])
    assert [(d.offset, d.reason, d.field) for d in dead] == [
        (i, *v) for i, v in enumerate(verdicts) if v is not None
    ]
    f = c.flush(1.0)
    merger = Merger(PLAIN)
    for i, p in enumerate(f.partials):
        assert merger.add(p.root_partition, i, p.to_json()) is not None
    batch = merger.take()
    kinds = [m.kind for m in PLAIN.metrics]
    assert batch.cells == {cell: aggregate(kinds[cell[0]], vals) for cell, vals in expected.items()}
    assert batch.events == verdicts.count(None) - duplicates
    assert (batch.dead, batch.duplicates) == (len(dead), duplicates)
    assert c.size == 0


# --------------------------------------------------------------------------- known issue: fold order


def _bucketed(batches: list[list[Rec]], topo: Any) -> tuple[dict[Any, Any], int]:
    c = Coalescer(topo, 1, now=0.0)
    for batch in batches:
        c.add_batch(0, batch)
    f = c.flush(1.0)
    return merged_cells(f, topo), sum(p.late_dropped for p in f.partials)


ORDER = topology(
    "order", [count("n", "a", total(), every(60, 600, grace_s=30)), count("c", "c")], {"a": 0, "c": 0}
)


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        # a plain event of a count-only type is counted in place, before the rest of its batch
        (Rec(0, ev("a", key="k", ts=10_000)), Rec(1, ev("c", key="k", channel="x"), timestamp=1_000_000)),
        # an event with an id is folded after its batch's dedup verdicts
        (Rec(0, ev("a", key="k", ts=10_000, id="e1")), Rec(1, ev("a", key="j", ts=1_000_000))),
    ],
    ids=["plain-event-shortcut", "dedup-hold"],
)
def test_lateness_does_not_depend_on_batch_boundaries(earlier: Rec, later: Rec) -> None:
    one_batch = _bucketed([[earlier, later]], ORDER)
    record_by_record = _bucketed([[earlier], [later]], ORDER)
    assert record_by_record[1] == 0  # in offset order the earlier event is on time ...
    assert one_batch == record_by_record  # ... whatever the batching


# --------------------------------------------------------------------------- the batch decoder

_good_shapes = st.builds(
    lambda etype, key, channel, eid, ts, sub: orjson.dumps(
        {
            "type": etype,
            "key": key,
            **({} if channel is OMIT else {"channel": channel}),
            **({} if eid is OMIT else {"id": eid}),
            **({} if ts is OMIT else {"ts": ts}),
            **({} if sub is OMIT else {"sub": sub}),
        }
    ),
    st.sampled_from(["a", "c"]),
    st.sampled_from(["k1", "k2", "ü"]),
    st.sampled_from(["", "v1", OMIT]),
    st.sampled_from(["i1", "i2", "i3", "x" * 128, None, OMIT]),
    st.sampled_from([5, 70_000, 2**53 - 1, None, OMIT]),
    st.sampled_from([0, 3, 1023, OMIT]),
)
_odd_values = st.sampled_from(
    [
        None,
        b"",
        b" ",
        b"[]",
        b"not json",
        b'{"type": "a",\n "key": "k1"}',  # valid, but a line of its own would not be one event
        b'{"type":"a","key":"k1"}{"type":"a","key":"k2"}',
        b'{"type":"a","key":"k1"},{"type":"a","key":"k2"}',
        b'{"type":"a","key":"k1"',
        b'"channel":"v"}',
        b'{"type":"a","key":"k1","channel":null}',
        b'{"type":"a","key":"k1","sub":null}',
        b'{"type":"a","key":"k1","id":""}',
        b'{"type":"a","key":"k1","ts":1.0}',
        b'{"type":"a","key":"k1","ts":true}',
        b'{"type":"a","key":"k1","ts":-1}',
        b'{"type":"a","key":"k1","sub":1024}',
        b'{"type":"b","key":"k1","channel":"v1"}',
        b'{"type":"a","key":"k1","value":2}',
        b'{"type":"a","key":"k1","key":"k2"}',
        b'{"type":"a","key":"\\ud800"}',
        b'{"type":"a","key":"\xff"}',
        b'{"type":"a","key":"k1"}' + b" " * MAX_EVENT_BYTES,
    ]
)
MIXED = topology(
    "mixed",
    [count("n", "a"), count("m", "a", leaderboard=3), count("nb", "b", total(), every(60, 600, grace_s=30))],
    {"a": 0, "b": 0, "c": 0},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    topo=st.sampled_from([PLAIN, MIXED]),
    values=st.lists(st.one_of(_good_shapes, _good_shapes, _good_shapes, _odd_values), max_size=60),
)
def test_the_batch_decoder_decides_like_the_per_event_path(
    data: st.DataObject, topo: Any, values: list[Any]
) -> None:
    """A batch read by the typed decoder (the writers' shapes only) ends in the same state as the same batch
    read event by event: the same cells, counters, dead letters, watermark and dedup changelog, across
    windows; a batch with anything else in it falls back without a trace."""
    batched, single = Coalescer(topo, 2, now=0.0), Coalescer(topo, 2, now=0.0)
    single._decoder = None  # the per-event path only
    cuts = sorted(data.draw(st.sets(st.integers(0, len(values)))) | {0, len(values)})
    flush_after = data.draw(st.sets(st.integers(0, len(cuts))))
    for n, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        records = [Rec(i, values[i], 1000 * i) for i in range(lo, hi)]
        batched._fast_skip = 0  # try the batch decoder on every batch
        dead = batched.add_batch(0, records)
        assert [vars_of(d) for d in dead] == [vars_of(d) for d in single.add_batch(0, records)]
        event("typed decoder" if records and batched._fast_misses == 0 else "event by event")
        assert batched.size == single.size
        if batched._tracks_time:  # (without buckets no event is ever late: the watermark is not kept up)
            assert batched._watermark == single._watermark
        if n in flush_after:
            a, b = batched.flush(float(n)), single.flush(float(n))
            assert flushed(a) == flushed(b)
            batched.committed(a)
            single.committed(b)
    assert flushed(batched.flush(99.0)) == flushed(single.flush(99.0))


def test_the_batch_decoder_is_used_for_the_writers_events() -> None:
    c = Coalescer(PLAIN, 1, now=0.0)
    records = [Rec(i, ev("a", key=f"k{i % 3}", channel="v", id=f"e{i % 7}"), i) for i in range(20)]
    assert c.add_batch(0, records) == []
    assert (c._fast_misses, c._fast_skip) == (0, 0)  # read by the typed decoder
    f = c.flush(1.0)
    assert (f.events, f.duplicates) == (7, 13)
    c.add_batch(0, [Rec(20, b"not json")])
    assert c._fast_skip == 2  # the next two batches go event by event


def vars_of(d: DeadLetter) -> tuple[Any, ...]:
    return (d.partition, d.offset, d.raw, d.reason, d.field)


def flushed(f: Flush) -> tuple[Any, ...]:
    return (
        f.window,
        sorted(
            (
                *(p.source_partition, p.root_partition, sorted(p.cells.items(), key=repr), p.events),
                *(p.late_dropped, p.dead, p.duplicates, p.first_offset, p.last_offset),
            )
            for p in f.partials
        ),
        f.next_offsets,
        f.events,
        f.cells,
        f.duplicates,
        f.feed,
        f.changelog,
    )


def test_the_next_window_is_read_while_a_closed_one_commits() -> None:
    """The closed window's commit counts only its own ids; an abort drops the next window too and
    moves the watermark back to where the committed windows left it."""
    c = Coalescer(ORDER, 1, now=0.0)
    assert c.add_batch(0, [Rec(0, ev("c", key="k", id="x"), 1_000)]) == []
    closed = c.flush(1.0)
    assert closed.watermarks == {0: 1_000}
    c.add_batch(0, [Rec(1, ev("c", key="k", id="y"), 2_000), Rec(2, ev("c", key="k", id="x"), 3_000)])
    c.committed(closed)
    assert (c.ids(0).committed, c.ids(0).pending) == (1, 1)
    second = c.flush(2.0)
    assert (second.events, second.duplicates) == (1, 1)
    c.add_batch(0, [Rec(3, ev("a", key="k", ts=500_000), 4_000)])
    c.aborted()  # the second window's transaction failed: offsets 1.. are read again
    assert (c.size, c.pending, c._watermark) == (0, False, {0: 1_000})
    assert (c.ids(0).committed, c.ids(0).pending) == (1, 0)
    c.add_batch(0, [Rec(1, ev("c", key="k", id="y"), 2_000), Rec(2, ev("c", key="k", id="x"), 3_000)])
    again = c.flush(3.0)
    assert (again.events, again.duplicates, again.next_offsets) == (1, 1, {0: 3})
