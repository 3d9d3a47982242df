"""The split history writers route by: k as a function of time, the same in every writer.

A retry reaches its original's partition (where tier 1 holds the ids it counted) when it is
routed by the same k: the k in force at the event's ts. These properties hold that the history
answers alike wherever it is read, that a change never rewrites the past, that trimming keeps
every answer inside the horizon, and that writers proposing at once converge.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.hotkeys import HotKeySplitter, PartitionOf, SplitPolicy, SubKeyRouter
from pipeline.core.model import MAX_SUBKEYS, message_key
from pipeline.core.split_history import (
    Entry,
    History,
    Proposal,
    SplitHistory,
    decode,
    encode,
    k_at,
    propose,
    reconcile,
    trim,
)

TIMES = st.integers(0, 10_000)
KS = st.integers(1, 64)


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Valid histories: increasing effective times, k within bounds."""
    times = sorted(set(draw(st.lists(TIMES, min_size=0, max_size=8))))
    return tuple((t, draw(KS)) for t in times)


def reference_k(history: History, ts: int) -> int:
    """k at ts by a linear scan: the last entry effective at or before ts, else the first one's."""
    if not history:
        return 1
    k = history[0][1]
    for effective, entry_k in history:
        if effective <= ts:
            k = entry_k
    return k


def partition_of(partitions: int) -> PartitionOf:
    return lambda raw: zlib.crc32(raw) % partitions


@given(histories(), st.integers(-10, 11_000))
def test_k_at_is_the_last_entry_in_force(history: History, ts: int) -> None:
    assert k_at(history, ts) == reference_k(history, ts)


@given(histories())
def test_a_history_round_trips_through_its_stored_bytes(history: History) -> None:
    assert decode(encode(history)) == history
    assert encode(decode(encode(history))) == encode(history)  # equal histories, equal bytes (the CAS)


@pytest.mark.parametrize(
    "raw",
    [b"{}", b"[[1]]", b"[[1, 2], [1, 3]]", b"[[2, 2], [1, 3]]", b'[["1", 2]]', b"[[1, 0]]", b"[[1, 2000]]"],
)
def test_what_is_not_a_history_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode(raw)


@given(histories(), KS, st.one_of(st.none(), KS), TIMES, st.lists(st.integers(-10, 11_000), max_size=30))
def test_a_change_never_rewrites_the_past(
    history: History, k: int, expect: int | None, effective: int, probes: list[int]
) -> None:
    new = propose(history, k, expect, effective)
    if new is None:
        return
    added_at = new[-1][0]
    assert new[: len(history)] == history  # entries already there are kept as they are
    assert added_at >= effective and (not history or added_at > history[-1][0])
    for ts in probes:
        if ts < added_at:
            assert k_at(new, ts) == k_at(history, ts) or not history
        else:
            assert k_at(new, ts) == k
    if not history:  # a key's first split: before it, one key
        assert new[0] == (0, 1) and all(k_at(new, ts) == 1 for ts in probes if ts < added_at)


@given(histories(), KS, st.one_of(st.none(), KS))
def test_growth_always_applies_a_shrink_only_from_the_k_it_replaces(
    history: History, k: int, expect: int | None
) -> None:
    latest = history[-1][1] if history else 1
    new = propose(history, k, expect, 20_000)
    if k == latest:
        assert new is None
    elif k > latest:
        assert new is not None and new[-1] == (20_000, k)
    else:
        assert (new is not None) == (expect == latest)


@given(histories(), TIMES, st.lists(st.integers(0, 11_000), max_size=30))
def test_trimming_keeps_every_answer_from_its_start(history: History, oldest: int, probes: list[int]) -> None:
    kept = trim(history, oldest)
    assert len(kept) <= len(history)
    for ts in probes:
        if ts >= oldest:
            assert k_at(kept, ts) == k_at(history, ts)
        elif kept:
            assert k_at(kept, ts) == kept[0][1]  # older than the history kept: the oldest k known


@settings(max_examples=200)
@given(
    history=histories(),
    partitions=st.integers(1, 12),
    events=st.lists(st.tuples(st.text(min_size=1, max_size=20), st.integers(0, 11_000)), max_size=30),
    local_rate=st.integers(0, 5000),
)
def test_same_history_same_ts_same_sub_in_any_writer(
    history: History, partitions: int, events: list[tuple[str, int]], local_rate: int
) -> None:
    """Two writers with their own sketches (one sees the key hot, the other does not) route alike."""
    stored = encode(history)
    writers = []
    for rate in (local_rate, 0):
        w = HotKeySplitter(SplitPolicy(threshold_eps=100, budget_eps=100), partitions=partitions)
        w.use_partitions(partitions, partition_of(partitions))
        w.observe("viral", rate)
        w.tick(1.0)
        w.history.set("viral", stored)
        writers.append(w)
    lone = SubKeyRouter(SplitHistory(), partitions=partitions, partition_of=partition_of(partitions))
    lone.history.set("viral", stored)
    for event_id, ts in events:
        subs = {w.sub_for("viral", event_id, ts) for w in writers} | {lone.sub_for("viral", event_id, ts)}
        assert len(subs) == 1
        sub = subs.pop()
        assert 0 <= sub < MAX_SUBKEYS
        k = reference_k(history, ts)
        assert (sub == 0) if k == 1 else sub in lone.subs("viral", k)


def test_a_retry_with_its_ts_meets_its_original_after_the_key_turned_hot_and_cooled() -> None:
    partitions = 6
    part = partition_of(partitions)
    router = SubKeyRouter(partitions=partitions, partition_of=part)
    ids = [f"order-{i}" for i in range(200)]
    before = {i: router.sub_for("viral", i, 1_000) for i in ids}  # unsplit: all on the key itself
    assert set(before.values()) == {0}
    hot = propose((), 6, None, 5_000)
    assert hot is not None
    router.history.set("viral", encode(hot))
    during = {i: router.sub_for("viral", i, 6_000) for i in ids}
    assert len({part(message_key("viral", s)) for s in during.values()}) == partitions
    cooled = propose(hot, 1, 6, 9_000)
    assert cooled is not None
    router.history.set("viral", encode(cooled))
    # resent later with their ts: each where it first went; with a fresh ts most would move
    assert {i: router.sub_for("viral", i, 1_000) for i in ids} == before
    assert {i: router.sub_for("viral", i, 6_000) for i in ids} == during
    assert sum(router.sub_for("viral", i, 9_500) != during[i] for i in ids) > 100


def test_static_mode_applies_where_the_history_says_one_key() -> None:
    router = SubKeyRouter(static_k=4)
    assert {router.sub_for("k", f"id-{i}", 0) for i in range(100)} == {0, 1, 2, 3}
    router.history.set("k", encode(((0, 1), (50, 8), (90, 1))))
    assert router.k_at("k", 10) == 4 and router.k_at("k", 60) == 8 and router.k_at("k", 95) == 4


class Store:
    """The shared store as the Lua script behaves: compare-and-set of one key's stored bytes."""

    def __init__(self) -> None:
        self.raw: dict[str, bytes] = {}

    def cas(self, key: str, expected: bytes, new: bytes) -> bool:
        if self.raw.get(key, b"") != expected:
            return False
        self.raw[key] = new
        return True


class Writer:
    def __init__(self) -> None:
        self.history = SplitHistory()
        self.mine: dict[str, Entry] = {}
        self.wanted: dict[str, int] = {}

    def sync(self, store: Store, now: int) -> None:
        self.history.replace(store.raw, b"")
        for change in reconcile(self.wanted, self.history, self.mine):
            current = self.history.get(change.key)
            new = propose(current, change.k, change.expect, now)
            assert new is not None
            if store.cas(change.key, self.history.raw.get(change.key, b""), encode(new)):
                self.history.set(change.key, encode(new))
                if change.k > 1:
                    self.mine[change.key] = new[-1]
                else:
                    self.mine.pop(change.key, None)
        for key, entry in list(self.mine.items()):
            if key not in self.wanted and self.history.last(key) != entry:
                del self.mine[key]


@settings(max_examples=200)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 16), st.lists(st.integers(0, 3), max_size=6)),
        min_size=1,
        max_size=25,
    )
)
def test_writers_proposing_at_once_converge_on_the_widest_split_wanted(
    steps: list[tuple[int, int, list[int]]],
) -> None:
    """Writers change what they want and sync in any order; once all have synced (twice, so a
    shrink one made can be answered by another's growth), the key is split as wide as the
    widest writer wants, and one key when none wants it split."""
    store = Store()
    writers = [Writer() for _ in range(4)]
    now = 0
    for who, k, order in steps:
        writers[who].wanted = {"viral": k} if k > 1 else {}
        for i in order:
            now += 10
            writers[i].sync(store, now)
    for _ in range(2):
        for w in writers:
            now += 10
            w.sync(store, now)
    want = max(w.wanted.get("viral", 1) for w in writers)
    latest = decode(store.raw["viral"])[-1][1] if store.raw.get("viral") else 1
    assert latest == want
    for w in writers:  # and every writer reads the same
        w.history.replace(store.raw, b"")
        assert w.history.latest("viral") == latest


def test_a_writer_that_cools_does_not_undo_a_wider_split_of_another() -> None:
    store = Store()
    a, b = Writer(), Writer()
    a.wanted = {"viral": 3}
    a.sync(store, 10)
    b.wanted = {"viral": 6}
    b.sync(store, 20)
    a.wanted = {}
    a.sync(store, 30)  # a put 3 there, not 6: it may not shrink b's split
    assert decode(store.raw["viral"])[-1] == (20, 6)
    assert a.mine == {}
    b.wanted = {}
    b.sync(store, 40)
    assert decode(store.raw["viral"])[-1] == (40, 1)


def test_reconcile_proposes_growth_again_and_shrinks_only_its_own() -> None:
    history = SplitHistory()
    history.set("a", encode(((0, 1), (10, 2))))
    history.set("b", encode(((0, 1), (10, 8))))
    changes = reconcile({"a": 4, "c": 3}, history, {"b": (10, 8)})
    assert changes == [Proposal("a", 4, None), Proposal("c", 3, None), Proposal("b", 1, 8)]
    assert reconcile({}, history, {"b": (10, 4)}) == []  # b holds 8, which this writer did not put
    assert reconcile({}, history, {"b": (5, 8)}) == []  # nor an 8 it put earlier: the entry is another's


def test_a_writer_never_shrinks_an_equal_split_another_writer_put_later() -> None:
    """The example hypothesis found: w1 put 3, w2 grew it to 4 then shrank it to 1, w0 put 3 again;
    w1, now wanting 2, must not shrink w0's 3 although it once put a 3 itself."""
    store = Store()
    w0, w1, w2 = Writer(), Writer(), Writer()
    w1.wanted = {"viral": 3}
    w1.sync(store, 10)
    w2.wanted = {"viral": 4}
    w2.sync(store, 20)
    w1.wanted, w2.wanted, w0.wanted = {"viral": 2}, {}, {"viral": 3}
    for now, w in enumerate([w0, w1, w2, w0, w1, w2], start=3):
        w.sync(store, now * 10)
    assert decode(store.raw["viral"])[-1][1] == 3


def test_the_lead_must_cover_two_refreshes() -> None:
    with pytest.raises(ValueError):
        SplitPolicy(lead_s=0.5, refresh_s=0.5)
    SplitPolicy(lead_s=1.0, refresh_s=0.5)
