"""Writers agree on hot keys: the per-key state machine, what a writer shares, and many writers that each
see a share of a key deciding by the sum of what they all see (core/hotkeys.py, RateBoard as the store)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.hotkeys import ONE_KEY, HotKeySplitter, KeyState, RateBoard, SplitPolicy, next_state

T = 100  # threshold (events/s)
POLICY = SplitPolicy(threshold_eps=T, budget_eps=T, max_k=16, interval_s=1.0, cooldown_s=3.0)
KEY = "viral"


# -- the state machine ----------------------------------------------------------------------------


def test_next_state_grows_at_once_and_shrinks_only_after_the_cooldown() -> None:
    assert next_state(ONE_KEY, 1, 0.0, 3.0) == ONE_KEY
    assert next_state(ONE_KEY, 3, 0.0, 3.0) == KeyState(3)
    assert next_state(KeyState(3), 5, 1.0, 3.0) == KeyState(5)
    assert next_state(KeyState(3, 1.0), 3, 2.0, 3.0) == KeyState(3)  # asked for as much again: no cooling
    cooling = next_state(KeyState(3), 1, 5.0, 3.0)
    assert cooling == KeyState(3, 5.0)
    assert next_state(cooling, 1, 7.9, 3.0) == cooling
    assert next_state(cooling, 2, 8.0, 3.0) == KeyState(2)  # to what is asked for at the end
    assert next_state(cooling, 1, 8.0, 3.0) == ONE_KEY
    assert next_state(cooling, 4, 6.0, 3.0) == KeyState(4)  # a burst ends the cooling


@given(
    steps=st.lists(st.tuples(st.integers(1, 8), st.floats(0, 5, allow_nan=False)), min_size=1, max_size=40),
    cooldown=st.floats(0, 10, allow_nan=False),
)
def test_next_state_never_shrinks_before_a_whole_cooldown_of_asking_less(
    steps: list[tuple[int, float]], cooldown: float
) -> None:
    state, now = ONE_KEY, 0.0
    asked_at_least: list[tuple[float, int]] = []  # (time, k asked)
    for wanted, dt in steps:
        now += dt
        new = next_state(state, wanted, now, cooldown)
        asked_at_least.append((now, wanted))
        assert new.k >= wanted or new.k < state.k  # never below what is asked, unless shrinking
        if new.k < state.k:
            # every ask within the cooldown before now wanted less than the old k
            assert all(k < state.k for t, k in asked_at_least if now - t < cooldown)
            assert new.k == wanted
        if new.k > state.k:
            assert new.k == wanted
        state = new


# -- what a writer shares ---------------------------------------------------------------------------


def test_a_writer_shares_its_heavy_keys_only_and_at_most_so_many() -> None:
    s = HotKeySplitter(SplitPolicy(threshold_eps=1000, share_floor=0.05, max_shared_keys=3))
    assert s.take_report() is None  # no interval closed yet
    s.observe_counts({"a": 900, "b": 60, "c": 49, "d": 400, "e": 55})
    s.tick(1.0)
    assert s.take_report() == {"a": 900, "d": 400, "b": 60}  # >= 50/s, the 3 heaviest
    assert s.take_report() is None  # once per interval


def test_the_sum_counts_only_while_fresh_then_the_writer_decides_alone() -> None:
    s = HotKeySplitter(POLICY)
    s.observe(KEY, 40)
    assert s.tick(1.0) == {}
    assert s.agree({KEY: 160}, 1.0) == {KEY: 2}  # the writers together see it hot
    assert s.k(KEY) == 2 and s.shared_rate(KEY) == 160
    for t in range(2, 12):  # the store never answers again: the sum goes stale after 3 intervals
        s.observe(KEY, 40)
        s.tick(float(t))
    assert not s.shared_fresh(11.0)
    assert s.k(KEY) == 1  # alone at 40/s it cooled after the cooldown


# -- many writers -------------------------------------------------------------------------------------


class Writers:
    """Writers each closing an interval per second, sharing through one board, in a given order."""

    def __init__(self, n: int, policy: SplitPolicy = POLICY) -> None:
        self.policy = policy
        self.splitters = [HotKeySplitter(policy) for _ in range(n)]
        self.board = RateBoard()
        self.now = 0.0

    def second(self, rates: list[dict[str, int]], order: list[int] | None = None) -> None:
        """One interval: writer i sees rates[i] events of each key; then they tick and share in `order`."""
        self.now += 1.0
        for splitter, seen in zip(self.splitters, rates, strict=True):
            splitter.observe_counts(seen)
        for i in order if order is not None else range(len(self.splitters)):
            at = self.now  # all at once; `order` decides who shares first
            splitter = self.splitters[i]
            splitter.tick(at)
            report = splitter.take_report()
            assert report is not None
            totals = self.board.put(
                f"w{i}", report, at, self.policy.shared_ttl, self.policy.threshold_eps / 2
            )
            splitter.agree(totals, at)

    def ks(self, key: str = KEY) -> list[int]:
        return [s.k(key) for s in self.splitters]


def test_four_writers_at_0_4_of_the_threshold_split_together_and_merge_after_the_cooldown() -> None:
    w = Writers(4)
    w.second([{KEY: 40}] * 4)
    assert max(w.ks()) == 2  # the last to share saw 160/s: within the first interval
    w.second([{KEY: 40}] * 4)
    assert w.ks() == [2, 2, 2, 2]  # and from the second on, every writer
    for _ in range(3):
        w.second([{KEY: 40}] * 4)
        assert w.ks() == [2, 2, 2, 2]
    slowed = w.now
    merged_at = None
    for _ in range(8):
        w.second([{KEY: 10}] * 4)  # 40/s together: under half the threshold
        if merged_at is None and w.ks() == [1, 1, 1, 1]:
            merged_at = w.now
    assert merged_at is not None
    assert POLICY.cooldown_s <= merged_at - slowed <= POLICY.cooldown_s + 3


def test_one_writer_alone_at_0_4_never_splits_a_key() -> None:
    w = Writers(1)
    for _ in range(10):
        w.second([{KEY: 40}])
    assert w.ks() == [1]


def test_a_key_stays_split_while_any_writer_still_sees_it_warm() -> None:
    w = Writers(3)
    w.second([{KEY: 400}, {}, {}])
    assert w.ks() == [4, 4, 4]  # one writer's heat splits it for everyone (the sum is 400)
    for _ in range(10):
        w.second([{KEY: 60}, {}, {}])  # one writer still above half the threshold: stays split
        assert min(w.ks()) >= 2
    for _ in range(6):
        w.second([{}, {}, {}])
    assert w.ks() == [1, 1, 1]


def test_a_writer_that_dies_leaves_the_sum_when_its_report_expires() -> None:
    w = Writers(2)
    w.second([{KEY: 60}, {KEY: 60}])
    w.second([{KEY: 60}, {KEY: 60}])
    assert w.ks() == [2, 2]
    survivor = w.splitters[0]
    for t in range(3, 13):  # writer 1 is gone: only writer 0 ticks and shares
        survivor.observe(KEY, 30)
        survivor.tick(float(t))
        report = survivor.take_report() or {}
        survivor.agree(w.board.put("w0", report, float(t), POLICY.shared_ttl, T / 2), float(t))
    assert "w1" not in w.board.reports
    assert survivor.k(KEY) == 1


def test_the_board_replaces_a_report_and_withdraws_a_writer() -> None:
    board = RateBoard()
    assert board.put("a", {"x": 5, "y": 1}, 0.0, 3.0) == {"x": 5, "y": 1}
    assert board.put("b", {"x": 7}, 0.5, 3.0) == {"x": 12, "y": 1}
    assert board.put("a", {"x": 2}, 1.0, 3.0) == {"x": 9}
    assert board.put("a", {"x": 2}, 1.0, 3.0, min_total=10) == {}
    board.withdraw("b")
    assert board.totals() == {"x": 2}
    assert board.put("c", {}, 10.0, 3.0) == {}  # a's report expired


def rounds(n_writers: int) -> st.SearchStrategy[list[tuple[list[int], list[int]]]]:
    """Per second: each writer's rate of the key, and the order they share in."""
    return st.lists(
        st.tuples(
            st.lists(st.integers(0, 120), min_size=n_writers, max_size=n_writers),
            st.permutations(list(range(n_writers))),
        ),
        min_size=1,
        max_size=25,
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 5))
def test_writers_split_when_together_hot_and_merge_only_when_all_cool(data: st.DataObject, n: int) -> None:
    plan = data.draw(rounds(n))
    w = Writers(n)
    for rates, order in plan:
        w.second([{KEY: r} if r else {} for r in rates], order)
        total = sum(r for r in rates if r >= T * POLICY.share_floor)  # what the writers share
        if total >= T:
            # whoever shared last saw every report of this second: it splits as wide as the sum asks
            assert w.splitters[order[-1]].k(KEY) >= HotKeySplitter(POLICY).wanted_k(total)
        for i, r in enumerate(rates):
            if r >= T:
                assert w.splitters[i].k(KEY) >= 2  # a writer never ignores what it sees itself
    # the key stays split in no writer once everyone has been cool for the cooldown (and the sums fresh)
    for _ in range(int(POLICY.cooldown_s) + 3):
        w.second([{}] * n)
    assert w.ks() == [1] * n


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(2, 5), rate=st.integers(0, 400))
def test_in_a_steady_state_every_writer_decides_the_same_k(data: st.DataObject, n: int, rate: int) -> None:
    """Whatever came before, once rates hold still for the cooldown and a few seconds, the writers agree on
    the k the sum asks for (in the hysteresis band, a split stands where it stood)."""
    plan = data.draw(rounds(n))
    w = Writers(n)
    for rates, order in plan:
        w.second([{KEY: r} if r else {} for r in rates], order)
    rng = random.Random(rate)
    shares = [rng.random() for _ in range(n)]
    steady = [round(rate * s / sum(shares)) for s in shares]
    for _ in range(int(POLICY.cooldown_s) + 4):
        w.second([{KEY: r} if r else {} for r in steady], rng.sample(range(n), n))
    ks = w.ks()
    total = sum(r for r in steady if r >= T * POLICY.share_floor)
    if total >= T:
        assert ks == [HotKeySplitter(POLICY).wanted_k(total)] * n
    elif total < T / 2:
        assert ks == [1] * n
    else:  # between half the threshold and the threshold a split stands and none starts (hysteresis)
        assert set(ks) <= {1, 2}


def test_an_invalid_sharing_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        SplitPolicy(share_floor=0)
    with pytest.raises(ValueError):
        SplitPolicy(max_shared_keys=0)
