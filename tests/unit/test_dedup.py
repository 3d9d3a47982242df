"""The dedup state of one source partition: exact verdicts, expiry in event time, changelog, memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.dedup import BYTES_PER_ID, PartitionIds, bytes_per_id, digest

HORIZON_MS = 600_000


def ids(*names: str) -> list[bytes]:
    return [digest(n.encode()) for n in names]


def test_pending_ids_become_committed_only_when_the_window_commits() -> None:
    p = PartitionIds(HORIZON_MS)
    assert p.seen(ids("a", "b", "a"), [1, 1, 1], 1) == [False, False, True]
    p.abort()
    assert p.seen(ids("a"), [1], 1) == [False]
    p.commit(next_offset=7)
    assert (p.committed, p.next_offset, p.pending) == (1, 7, {})
    assert p.seen(ids("a", "c"), [2, 2], 2) == [True, False]


def test_an_id_is_remembered_for_a_horizon_of_record_time_after_its_first_send() -> None:
    p = PartitionIds(HORIZON_MS)
    first_send = 1_000_000
    p.seen(ids("old"), [first_send], first_send)
    p.commit(1)
    # a retry while the partition's newest record is less than a horizon later: a duplicate
    still = first_send + HORIZON_MS - 1
    assert p.seen(ids("old"), [first_send], still) == [True]
    p.commit(2)
    # once records a horizon and a bucket later arrived, the bucket is gone
    later = first_send + HORIZON_MS + p.bucket_ms
    p.seen(ids("other"), [later], later)
    p.commit(3)
    assert p.committed == 1
    assert p.seen(ids("old"), [first_send], later) == [False]


def test_a_clock_far_in_the_future_does_not_expire_the_ids() -> None:
    p = PartitionIds(HORIZON_MS)
    p.seen(ids("a"), [1_000], 1_000)
    p.commit(1)
    # the event claims year 2200; its record was written now: the watermark follows the record
    p.seen(ids("b"), [7_258_118_400_000], 2_000)
    p.commit(2)
    assert p.seen(ids("a"), [1_000], 2_000) == [True]


def test_changelog_records_rebuild_the_same_state_and_respect_their_size() -> None:
    p = PartitionIds(HORIZON_MS)
    names = [f"id{i}" for i in range(1000)]
    p.seen(ids(*names), [600_000 + i * 400 for i in range(1000)], 1_000_000)  # over several buckets
    records = p.changelog(max_bytes=4096)
    assert len(records) > 1 and all(len(r) <= 4096 for r in records)
    assert sum(len(r) for r in records) < 1000 * (BYTES_PER_ID + 1)
    p.commit(1000)
    q = PartitionIds(HORIZON_MS)
    assert sum(q.load(r) for r in records) == 1000
    assert q.seen(ids(*names[:10], "new"), [0] * 11, 1_000_000) == [True] * 10 + [False]
    with pytest.raises(ValueError):
        q.load(b"nope")


@settings(max_examples=40, deadline=None)
@given(
    windows=st.lists(
        st.tuples(st.lists(st.integers(0, 300), max_size=40), st.booleans()),  # (ids, commits?)
        max_size=12,
    )
)
def test_verdicts_match_a_set_of_committed_ids(windows: list[tuple[list[int], bool]]) -> None:
    p = PartitionIds(HORIZON_MS)
    committed: set[int] = set()
    for names, commits in windows:
        pending: set[int] = set()
        expected = []
        for n in names:
            expected.append(n in committed or n in pending)
            pending.add(n)
        assert p.seen(ids(*map(str, names)), [5] * len(names), 5) == expected
        if commits:
            p.commit(0)
            committed |= pending
        else:
            p.abort()
        assert p.committed == len(committed)


def test_memory_per_id_is_the_stated_bound() -> None:
    p = PartitionIds(HORIZON_MS)
    n = 200_000
    for start in range(0, n, 10_000):
        p.seen(ids(*(f"u{i}" for i in range(start, start + 10_000))), [start] * 10_000, start)
        p.commit(start)
    assert p.committed == n
    # the Bloom filter rounds up to a power of two: at most twice its share
    assert p.memory_bytes / n <= BYTES_PER_ID + 2 * (bytes_per_id() - BYTES_PER_ID) + 0.5
    assert bytes_per_id() <= 16
