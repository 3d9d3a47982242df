"""Two kinds of time: the processing-time flush window that bounds how long
tier 1 holds deltas, and event-time buckets (rollups) that dashboards read.
"""

from __future__ import annotations

from dataclasses import dataclass

TOTAL = "total"


@dataclass(frozen=True, slots=True)
class Rollup:
    """An event-time bucketing of a metric: the all-time total, or fixed buckets of `size_s`.

    Buckets are kept in Redis for `retention_s`; an event whose bucket ended
    `grace_s` or more before the partition's watermark is dropped and counted.
    """

    size_s: int = 0
    retention_s: int = 0
    grace_s: int = 0

    @property
    def name(self) -> str:
        return TOTAL if not self.size_s else f"{self.size_s}s"

    def bucket(self, ts_ms: int) -> str:
        if not self.size_s:
            return TOTAL
        start = ts_ms // 1000 // self.size_s * self.size_s
        return f"{self.size_s}:{start}"

    def is_late(self, ts_ms: int, watermark_ms: int) -> bool:
        """True when the event's bucket closed `grace_s` or more before the watermark."""
        if not self.size_s:
            return False
        size_ms = self.size_s * 1000
        end_ms = ts_ms // size_ms * size_ms + size_ms
        return end_ms + self.grace_s * 1000 <= watermark_ms


def total() -> Rollup:
    return Rollup()


def every(size_s: int, retention_s: int, grace_s: int = 0) -> Rollup:
    if size_s <= 0 or retention_s <= 0 or grace_s < 0:
        raise ValueError("a rollup needs a positive size and retention and a grace of 0 or more")
    return Rollup(size_s, retention_s, grace_s)


def bucket_start(bucket: str) -> int | None:
    """Epoch seconds a bucket starts at, or None for the total."""
    if bucket == TOTAL:
        return None
    return int(bucket.split(":", 1)[1])


class FlushClock:
    """Processing-time coalescing window: due every `interval_s`, even with no events.

    The cadence is fixed: the time a flush takes (a Kafka transaction) does not
    stretch the next window, an early flush (memory bound) does not move the
    next tick, and ticks missed while the worker was busy are skipped, not made up.
    """

    def __init__(self, interval_s: float, now: float) -> None:
        if interval_s <= 0:
            raise ValueError("flush interval must be positive")
        self.interval_s = interval_s
        self.deadline = now + interval_s

    def due(self, now: float) -> bool:
        return now >= self.deadline

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    def reset(self, now: float) -> None:
        if now >= self.deadline:
            missed = (now - self.deadline) // self.interval_s
            self.deadline += (missed + 1) * self.interval_s
