"""Hot-key splitting: detection from rates, k from the budget, hysteresis, stable sub-keys, bounded memory."""

from __future__ import annotations

import math
import zlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.hotkeys import HotKeySplitter, PartitionOf, SplitPolicy
from pipeline.core.model import MAX_SUBKEYS, message_key

POLICY = SplitPolicy(threshold_eps=100, budget_eps=100, max_k=16, interval_s=1.0, cooldown_s=5.0)


def feed(splitter: HotKeySplitter, now: float, rates: dict[str, int], seconds: int = 1) -> dict[str, int]:
    """`rates` events/s per key for `seconds` one-second intervals; the changes of the last tick."""
    changes: dict[str, int] = {}
    for _ in range(seconds):
        splitter.observe_counts(rates)
        now += 1.0
        changes = {**changes, **splitter.tick(now)}
    return changes


def partition_of(partitions: int) -> PartitionOf:
    return lambda raw: zlib.crc32(raw) % partitions


def test_a_cold_key_stays_one_key() -> None:
    s = HotKeySplitter(POLICY)
    assert feed(s, 0, {"calm": 99}, 3) == {}
    assert s.k("calm") == 1
    assert s.sub_for("calm", "any-id") == 0


@pytest.mark.parametrize(("rate", "k"), [(100, 2), (250, 3), (1000, 10), (5000, 16)])
def test_a_hot_key_gets_k_from_its_rate(rate: int, k: int) -> None:
    s = HotKeySplitter(POLICY)
    assert feed(s, 0, {"viral": rate}) == {"viral": k}
    assert s.k("viral") == k == s.splits["viral"]


def test_hysteresis_keeps_the_split_until_the_key_has_been_cool_for_the_cooldown() -> None:
    s = HotKeySplitter(POLICY)
    feed(s, 0, {"viral": 400})
    assert s.k("viral") == 4
    # between threshold/2 and threshold: still hot enough to stay split; k shrinks after the cooldown
    assert feed(s, 1, {"viral": 60}, 3) == {}
    assert s.k("viral") == 4
    assert feed(s, 4, {"viral": 60}, 7) == {"viral": 2}
    # under threshold/2, but not yet for the whole cooldown
    feed(s, 11, {"viral": 10}, 4)
    assert s.k("viral") == 2
    # a burst in between resets the cooldown
    feed(s, 15, {"viral": 200})
    feed(s, 16, {"viral": 10}, 5)
    assert s.k("viral") == 2
    assert feed(s, 21, {"viral": 10}, 2) == {"viral": 1}
    assert s.k("viral") == 1 and s.splits == {}


def test_k_grows_at_once_and_shrinks_after_the_cooldown() -> None:
    s = HotKeySplitter(POLICY)
    feed(s, 0, {"viral": 200})
    assert feed(s, 1, {"viral": 800}) == {"viral": 8}
    changes = feed(s, 2, {"viral": 300}, 7)
    assert changes == {"viral": 3} and s.k("viral") == 3


def test_a_key_that_vanishes_from_the_sketch_cools_down() -> None:
    s = HotKeySplitter(POLICY)
    feed(s, 0, {"viral": 500})
    changes = feed(s, 1, {"other": 1}, 7)
    assert changes.get("viral") == 1 and "viral" not in s.splits


@given(
    k=st.integers(2, 16),
    ids=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=50),
)
def test_a_retry_lands_on_the_same_sub_key(k: int, ids: list[str]) -> None:
    s = HotKeySplitter(POLICY)
    feed(s, 0, {"viral": k * 100})
    assert s.k("viral") == k
    for event_id in ids:
        sub = s.sub_for("viral", event_id)
        assert sub == s.sub_for("viral", event_id)
        assert sub in s.subs("viral", k)
        assert 0 <= sub < MAX_SUBKEYS


def test_sub_keys_spread_over_distinct_partitions_when_the_partitioner_is_known() -> None:
    partitions = 6
    s = HotKeySplitter(POLICY, partitions=partitions, partition_of=partition_of(partitions))
    feed(s, 0, {"viral": 5000})
    assert s.k("viral") == partitions  # capped by the partition count
    subs = s.subs("viral", partitions)
    assert subs[0] == 0  # the key's own partition keeps the plain key
    landed = {zlib.crc32(message_key("viral", sub)) % partitions for sub in subs}
    assert landed == set(range(partitions))
    per_partition = Counter(
        zlib.crc32(message_key("viral", s.sub_for("viral", f"id-{i}"))) % partitions for i in range(6000)
    )
    assert max(per_partition.values()) < 1.2 * 6000 / partitions


def test_static_mode_splits_every_key() -> None:
    s = HotKeySplitter(SplitPolicy(static_k=4))
    subs = {s.sub_for("any-key", f"id-{i}") for i in range(200)}
    assert subs == {0, 1, 2, 3}
    assert s.k("another") == 4
    assert s.splits == {}  # static splits are configuration, not announcements


@settings(max_examples=25, deadline=None)
@given(n_keys=st.integers(1_000, 20_000), seed=st.integers(0, 2**16))
def test_memory_stays_bounded_whatever_the_key_cardinality(n_keys: int, seed: int) -> None:
    s = HotKeySplitter(POLICY, lg_max_items=6)
    counts = {f"k{(i * 7919 + seed) % n_keys}": 1 for i in range(n_keys)}
    s.observe_counts(counts)
    s.observe("viral", 10_000)
    assert s.tracked_items <= 0.75 * 2**6
    s.tick(1.0)
    assert len(s.top_rates(10_000)) <= 0.75 * 2**6
    # the heavy hitter is found, whatever else went through
    assert s.k("viral") == POLICY.max_k
    assert s.top_rates(1)[0][0] == "viral"


@given(rate=st.floats(0, 1e6), current=st.integers(1, 16))
def test_wanted_k_keeps_each_sub_key_under_the_budget_up_to_the_cap(rate: float, current: int) -> None:
    s = HotKeySplitter(POLICY)
    k = s.wanted_k(rate, current)
    assert 1 <= k <= POLICY.max_k
    if k > 1 and k < POLICY.max_k:
        assert rate / k <= POLICY.budget_eps or k == 2
    if rate >= POLICY.threshold_eps:
        assert k == max(2, min(POLICY.max_k, math.ceil(rate / POLICY.budget_eps)))
    if rate < POLICY.threshold_eps / 2:
        assert k == 1


def test_the_rate_estimate_is_per_second_of_the_interval() -> None:
    s = HotKeySplitter(POLICY)
    s.observe("a", 300)
    s.tick(2.0)  # two seconds since the start
    assert s.top_rates(1) == [("a", 150.0)]


def test_an_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        SplitPolicy(threshold_eps=0)
    with pytest.raises(ValueError):
        SplitPolicy(max_k=MAX_SUBKEYS + 1)
