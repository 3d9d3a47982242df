"""Load shedding: lowest classes first, the highest only when throttling everything; Retry-After from lag."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.shedding import DrainRate, LoadLimits, LoadShedder

LIMITS = LoadLimits(lag_shed=1_000, lag_high=5_000, latency_high_ms=500, retry_min_s=1, retry_max_s=60)


def test_under_lag_shed_nothing_happens() -> None:
    decision = LoadShedder([0, 1, 2], LIMITS).decide(999, 100.0)
    assert decision.normal and decision.retry_after_s == 0


def test_lowest_class_is_shed_first_and_the_highest_never_before_throttling() -> None:
    shedder = LoadShedder([0, 1, 2], LIMITS)
    assert shedder.decide(1_000, 100.0).shed == {0}
    assert shedder.decide(2_999, 100.0).shed == {0}
    assert shedder.decide(3_000, 100.0).shed == {0, 1}
    assert shedder.decide(4_999, 100.0).shed == {0, 1}
    top = shedder.decide(5_000, 100.0)
    assert top.throttle and top.shed == {0, 1, 2}


def test_one_class_is_only_ever_throttled() -> None:
    shedder = LoadShedder([3], LIMITS)
    assert shedder.decide(4_999, 1.0).normal
    assert shedder.decide(5_000, 1.0).throttle


def test_a_slow_broker_throttles_even_without_lag() -> None:
    shedder = LoadShedder([0, 1], LIMITS)
    assert shedder.decide(0, 100.0, latency_ms=499).normal
    assert shedder.decide(0, 100.0, latency_ms=500).throttle


def test_retry_after_is_the_time_to_drain_back_under_lag_shed() -> None:
    shedder = LoadShedder([0, 1], LIMITS)
    assert shedder.decide(11_000, 1_000.0).retry_after_s == 10
    assert shedder.decide(1_500, 1_000.0).retry_after_s == 1  # never under the minimum
    assert shedder.decide(10_000_000, 1.0).retry_after_s == 60  # never over the maximum
    assert shedder.decide(6_000, 0.0).retry_after_s == 60  # nothing drains: the maximum


@given(
    classes=st.lists(st.integers(-5, 5), min_size=1, max_size=6, unique=True),
    lag=st.integers(0, 10_000),
    drain=st.floats(0, 1e6),
)
def test_shedding_is_graduated_and_monotonic(classes: list[int], lag: int, drain: float) -> None:
    shedder = LoadShedder(classes, LIMITS)
    now = shedder.decide(lag, drain)
    more = shedder.decide(lag + 500, drain)
    assert now.shed <= more.shed  # more lag never sheds less
    if not now.throttle:
        assert max(classes) not in now.shed  # the highest class goes last
    # whatever is shed is a prefix of the classes, lowest first
    assert sorted(now.shed) == sorted(classes)[: len(now.shed)]
    if not now.normal:
        assert LIMITS.retry_min_s <= now.retry_after_s <= LIMITS.retry_max_s


def test_drain_rate_follows_committed_offsets() -> None:
    drain = DrainRate(smoothing=1.0)
    assert drain.update(0.0, 0) == 0
    assert drain.update(1.0, 500) == 500
    assert drain.update(3.0, 1500) == 500
    assert drain.update(4.0, 1500) == 0  # tier 1 stopped
    assert drain.update(4.0, 9999) == 0  # no time passed: no new estimate


def test_drain_rate_is_smoothed() -> None:
    drain = DrainRate(smoothing=0.5)
    drain.update(0.0, 0)
    drain.update(1.0, 1000)
    assert drain.update(2.0, 1000) == 500


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        LoadLimits(lag_shed=10, lag_high=5)
    with pytest.raises(ValueError):
        LoadShedder([])
