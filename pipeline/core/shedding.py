"""Overload decisions for the ingest gateway: shed which priority classes, throttle, Retry-After.

Tier-1 consumer lag says how far the pipeline is behind. Below `lag_shed`
everything is accepted. Between `lag_shed` and `lag_high` the lowest priority
classes are shed, more of them as the lag grows (graduated), but never the
highest class. At `lag_high` (or when the broker's acknowledgements are slower
than `latency_high_ms`) every request is throttled with 429. Retry-After is the
time the lag needs to drain back to `lag_shed` at the measured drain rate.
Sans-I/O: the runtime feeds lag samples and a monotonic clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoadLimits:
    lag_shed: int = 50_000  # events behind at which the lowest class starts to be shed
    lag_high: int = 200_000  # events behind at which every request is throttled (429)
    latency_high_ms: float = 0.0  # broker ack latency that throttles too (0: not watched)
    retry_min_s: int = 1
    retry_max_s: int = 60

    def __post_init__(self) -> None:
        if not 0 <= self.lag_shed <= self.lag_high:
            raise ValueError("need 0 <= lag_shed <= lag_high")
        if not 1 <= self.retry_min_s <= self.retry_max_s:
            raise ValueError("need 1 <= retry_min_s <= retry_max_s")


@dataclass(frozen=True, slots=True)
class Overload:
    """What to do with requests until the next sample."""

    throttle: bool = False  # answer 429 to every request
    shed: frozenset[int] = frozenset()  # priority classes whose events are shed
    retry_after_s: int = 0
    lag: int = 0

    @property
    def normal(self) -> bool:
        return not self.throttle and not self.shed


NORMAL = Overload()


class LoadShedder:
    """Maps (lag, drain rate, ack latency) to an Overload for a topology's priority classes."""

    def __init__(self, classes: Iterable[int], limits: LoadLimits | None = None) -> None:
        self.classes = sorted(set(classes))
        if not self.classes:
            raise ValueError("need at least one priority class")
        self.limits = limits or LoadLimits()

    def decide(self, lag: int, drain_eps: float, latency_ms: float = 0.0) -> Overload:
        lim = self.limits
        slow_broker = lim.latency_high_ms > 0 and latency_ms >= lim.latency_high_ms
        if lag >= lim.lag_high or slow_broker:
            return Overload(True, frozenset(self.classes), self.retry_after(lag, drain_eps), lag)
        if lag < lim.lag_shed or len(self.classes) == 1:
            return Overload(lag=lag)
        # between the two thresholds: 1 .. n-1 of the n classes, lowest first; the highest never
        span = max(1, lim.lag_high - lim.lag_shed)
        lower = len(self.classes) - 1
        shed = min(lower, 1 + (lag - lim.lag_shed) * lower // span)
        return Overload(False, frozenset(self.classes[:shed]), self.retry_after(lag, drain_eps), lag)

    def retry_after(self, lag: int, drain_eps: float) -> int:
        """Seconds until the lag is back under `lag_shed` at `drain_eps`; the maximum when nothing drains."""
        lim = self.limits
        excess = max(0, lag - lim.lag_shed)
        seconds = excess / drain_eps if drain_eps > 0 else math.inf
        if not seconds < lim.retry_max_s:  # also inf (nothing drains) and overflow
            return lim.retry_max_s
        return max(lim.retry_min_s, math.ceil(seconds))


class DrainRate:
    """Events/s tier 1 consumes, from successive samples of its committed offsets (smoothed)."""

    def __init__(self, smoothing: float = 0.5) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError("smoothing must be in (0, 1]")
        self.smoothing = smoothing
        self.eps = 0.0
        self._last: tuple[float, int] | None = None

    def update(self, now: float, committed: int) -> float:
        """`committed`: the sum of tier 1's committed offsets over the events partitions."""
        last = self._last
        self._last = (now, committed)
        if last is None or now <= last[0]:
            return self.eps
        rate = max(0, committed - last[1]) / (now - last[0])
        self.eps = rate if self.eps == 0 else self.smoothing * rate + (1 - self.smoothing) * self.eps
        return self.eps
