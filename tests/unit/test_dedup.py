"""The dedup state of one source partition: exact repeats, expiry by record time, changelog, memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.dedup import BYTES_PER_ID, PartitionIds, bytes_per_id

HORIZON_MS = 600_000


def ids(*names: str) -> list[str]:
    return list(names)


def test_pending_ids_become_committed_only_when_the_window_commits() -> None:
    p = PartitionIds(HORIZON_MS)
    assert p.seen(ids("a", "b", "a"), 1) == [2]
    p.abort()
    assert p.seen(ids("a"), 1) == []
    p.commit(next_offset=7)
    assert (p.committed, p.next_offset, p.pending) == (1, 7, 0)
    assert p.seen(ids("a", "c"), 2) == [0]


def test_an_id_is_remembered_until_records_a_horizon_younger_arrive() -> None:
    p = PartitionIds(HORIZON_MS)
    arrived = 1_000_000
    p.seen(ids("old"), arrived)
    p.commit(1)
    # a retry while the partition's newest record is less than a horizon later: a duplicate
    assert p.seen(ids("old"), arrived + HORIZON_MS - 1) == [0]
    p.commit(2)
    # once records a horizon and a bucket later arrived, the bucket is gone
    later = arrived + HORIZON_MS + p.bucket_ms
    p.seen(ids("other"), later)
    p.commit(3)
    assert p.committed == 1
    assert p.seen(ids("old"), later) == []


def test_a_retry_within_the_horizon_of_its_original_is_never_expired_first() -> None:
    """Expiry runs at commit with the watermark of the batches so far: never past a retry's own time."""
    p = PartitionIds(HORIZON_MS)
    step = 6_000  # a record every 6 s; each one's id retried exactly a horizon later
    for t in range(0, 3 * HORIZON_MS, step):
        assert p.seen(ids(f"at{t}"), t) == []
        if t >= HORIZON_MS:
            original = t - HORIZON_MS
            assert p.seen(ids(f"at{original}"), t) == [0], t
        p.commit(t)
    assert p.committed < (HORIZON_MS + 2 * p.bucket_ms) // step  # and the old ones are gone


def test_changelog_records_rebuild_the_same_state_and_respect_their_size() -> None:
    p = PartitionIds(HORIZON_MS)
    names = [f"id{i}" for i in range(1000)]
    for i in range(10):  # batches over several buckets
        p.seen(ids(*names[i * 100 : (i + 1) * 100]), 600_000 + i * 40_000)
    records = p.changelog(max_bytes=4096)
    assert len(records) > 1 and all(len(r) <= 4096 for r in records)
    assert sum(len(r) for r in records) < 1000 * (BYTES_PER_ID + 1)
    p.commit(1000)
    q = PartitionIds(HORIZON_MS)
    assert sum(q.load(r) for r in records) == 1000
    assert q.seen(ids(*names[:10], "new"), 1_000_000) == list(range(10))
    with pytest.raises(ValueError):
        q.load(b"nope")


@settings(max_examples=40, deadline=None)
@given(
    windows=st.lists(
        st.tuples(st.lists(st.lists(st.integers(0, 300), max_size=20), max_size=3), st.booleans()),
        max_size=12,
    )  # windows of batches of ids, and whether each window commits
)
def test_verdicts_match_a_set_of_committed_ids(windows: list[tuple[list[list[int]], bool]]) -> None:
    verdicts_match_a_set(windows)


def verdicts_match_a_set(windows: list[tuple[list[list[int]], bool]]) -> None:
    """Windows of batches of ids, each window committed or aborted: every verdict is the one a set of
    the committed ids and the window's own gives."""
    p = PartitionIds(HORIZON_MS)
    committed: set[int] = set()
    for batches, commits in windows:
        pending: set[int] = set()
        for names in batches:
            expected = []  # indexes of the ids counted before
            for i, n in enumerate(names):
                if n in committed or n in pending:
                    expected.append(i)
                pending.add(n)
            assert p.seen(ids(*map(str, names)), 5) == expected
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
        p.seen(ids(*(f"u{i}" for i in range(start, start + 10_000))), start)
        p.commit(start)
    assert p.committed == n
    # the Bloom filter rounds up to a power of two: at most twice its share
    assert p.memory_bytes / n <= BYTES_PER_ID + 2 * (bytes_per_id() - BYTES_PER_ID) + 0.5
    assert bytes_per_id() <= 16


@settings(max_examples=30, deadline=None)
@given(
    windows=st.lists(
        st.tuples(st.lists(st.lists(st.integers(0, 40), max_size=12), max_size=3), st.booleans()),
        max_size=8,
    )
)
def test_ids_whose_hashes_share_their_high_bits_are_still_told_apart(
    windows: list[tuple[list[list[int]], bool]],
) -> None:
    """Lookups sort and search by the hash's high 64 bits: ids equal there (here all of them, with a
    hash made so) must still be told apart by the rest, within a batch and across segments."""
    import xxhash

    from pipeline.core import dedup

    real = dedup.digest
    dedup.digest = lambda b: bytes(8) + xxhash.xxh3_64_digest(b)
    try:
        verdicts_match_a_set(windows)
    finally:
        dedup.digest = real


def test_a_closed_windows_ids_commit_without_the_next_windows() -> None:
    """Tier 1 reads the next window while a closed one commits: its commit takes only the closed
    window's ids; an abort drops both; ids of either are repeats meanwhile."""
    p = PartitionIds(HORIZON_MS)
    p.seen(ids("a", "b"), 1)
    p.seal()
    assert p.seen(ids("a", "c"), 2) == [0]  # "a" is the closed window's
    assert p.pending == 3
    p.commit(next_offset=5)
    assert (p.committed, p.pending) == (2, 1)
    assert p.seen(ids("c", "b"), 3) == [0, 1]
    p.seal()
    p.seen(ids("d"), 4)
    p.abort()  # the closed window's "c" and the open one's "d" are read again
    assert (p.committed, p.pending) == (2, 0)
    assert p.seen(ids("c", "d", "a"), 5) == [2]
