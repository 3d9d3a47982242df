"""Reading a topology's aggregates: one API, whatever the store and its key layout.

    async with Reader.from_url(TOPOLOGY, "redis://127.0.0.1:6379/0") as reader:
        await reader.total("likes", "video-3")                 # the channel's likes, all keys
        await reader.value("likes", "video-3", "comment-17")   # one comment's
        await reader.top("likes", "video-3", 10)               # Top(items=[("comment-17", 9120), ...])
        await reader.series("views", "example.org", "/home", size_s=60, points=60)
        await reader.distinct("visitors", "example.org", "/home")
        await reader.stats()

    reader = SyncReader(TOPOLOGY, "redis://127.0.0.1:6379/0")  # the same, blocking; thread- and fork-safe
    reader.top("likes", "video-3", 10)

Values are ints for counts (and whatever is whole), floats otherwise; a key or bucket with nothing
in it reads 0. A question the topology cannot answer (an unknown metric, the total of a distinct
metric over keys, a series of a metric without time buckets) raises `QueryError`, whose text says
why.

The reader knows metrics, kinds and buckets; where a value lives is the store's business
(`pipeline/io/redis_reader.py`, a single Redis today). The dashboard's JSON API, the broadcast
nodes' snapshots, the harness and the tests read through this module, so a change of layout (Redis
Cluster's hash tags) or of store (PostgreSQL for buckets past Redis' retention) is made behind it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from pipeline.core.aggregates import Kind
from pipeline.core.fanout import Snapshot
from pipeline.core.topology import Metric, Topology
from pipeline.core.windows import TOTAL, Rollup
from pipeline.io import redis_client
from pipeline.io.postgres_history import PostgresHistory
from pipeline.io.redis_reader import RedisStore
from pipeline.runtime.loop_thread import PerProcess


class QueryError(ValueError):
    """A question the topology cannot answer: an unknown metric, a series without buckets, ..."""


@dataclass(frozen=True, slots=True)
class Top:
    """A channel's top keys, best first, and where they came from: the metric's leaderboard, or a
    scan of every key when the metric keeps none."""

    items: list[tuple[str, float]]
    source: str  # "leaderboard" | "scan"


def leaderboard_metric(topology: Topology) -> Metric | None:
    """The metric whose leaderboard a channel snapshot's `top` shows: the first that keeps one."""
    return next((m for m in topology.metrics if m.leaderboard), None)


def series_starts(size_s: int, points: int, end_s: int) -> list[int]:
    """Bucket starts (epoch seconds), oldest first: `points` buckets ending with the one holding `end_s`."""
    last = end_s // size_s * size_s
    return [last - (points - 1 - i) * size_s for i in range(points)]


def fold(kind: Kind, values: list[float]) -> float | None:
    """One number for many keys' values of a metric: their sum, or their min or max (None: distinct
    users of different keys overlap, they do not add up)."""
    if kind is Kind.DISTINCT:
        return None
    if not values:
        return 0
    if kind is Kind.MIN:
        return min(values)
    if kind is Kind.MAX:
        return max(values)
    return sum(values)


class Reader:
    """Async reads of one topology's aggregates."""

    def __init__(
        self,
        topology: Topology,
        store: RedisStore | aioredis.Redis,
        history: PostgresHistory | None = None,
    ) -> None:
        """`store`: a RedisStore, or a redis.asyncio client (borrowed: `aclose` leaves it open).
        `history`: the sink's PostgreSQL rollups, read for the buckets of a series Redis no longer
        holds (borrowed too)."""
        self.topology = topology
        self.history = history
        self.store = store if isinstance(store, RedisStore) else RedisStore(store, topology)
        self.metrics = {m.name: m for m in topology.metrics}
        self._owned: aioredis.Redis | None = None
        self._owned_history: PostgresHistory | None = None

    @classmethod
    def from_url(
        cls, topology: Topology, redis_url: str, *, postgres_url: str | None = None, **redis_options: Any
    ) -> Reader:
        """A reader with a Redis client of its own (and a PostgreSQL history when `postgres_url` is
        given), closed by `aclose()`."""
        client = redis_client.from_url(redis_url, **redis_options)  # `redis+cluster://`: a Redis Cluster
        history = PostgresHistory(topology, postgres_url) if postgres_url else None
        reader = cls(topology, client, history)
        reader._owned = client
        reader._owned_history = history
        return reader

    async def aclose(self) -> None:
        if self._owned_history is not None:
            await self._owned_history.aclose()
            self._owned_history = None
        if self._owned is not None:
            await self._owned.aclose()
            self._owned = None

    async def __aenter__(self) -> Reader:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- what can be asked --------------------------------------------------------------------------

    def metric(self, name: str) -> Metric:
        metric = self.metrics.get(name)
        if metric is None:
            raise QueryError(f"unknown metric {name!r} (one of {sorted(self.metrics)})")
        return metric

    def rollup(self, metric: str | Metric, size_s: int | None = None) -> Rollup:
        """The metric's time buckets of `size_s` seconds (its smallest when None)."""
        m = self.metric(metric) if isinstance(metric, str) else metric
        sizes = sorted(r.size_s for r in m.rollups if r.size_s)
        if not sizes:
            raise QueryError(f"metric {m.name!r} keeps only all-time totals, no series")
        size = sizes[0] if size_s is None else size_s
        for r in m.rollups:
            if r.size_s == size:
                return r
        raise QueryError(f"metric {m.name!r} has buckets of {sizes} seconds, not {size}")

    # -- values -------------------------------------------------------------------------------------

    async def value(self, metric: str, channel: str, key: str, bucket: str = TOTAL) -> float:
        """One key's value in one bucket (distinct users for a distinct metric); 0 when it has none."""
        m = self.metric(metric)
        if m.kind is Kind.DISTINCT:
            return (await self.store.distinct_per_bucket(m.name, channel, key, [bucket]))[0]
        found = (await self.store.key_per_bucket(m.name, channel, key, [bucket]))[0]
        return 0 if found is None else found

    async def values(self, metric: str, channel: str, bucket: str = TOTAL) -> dict[str, float]:
        """Key -> value of every key of the channel in one bucket (distinct users for a distinct metric)."""
        m = self.metric(metric)
        if m.kind is Kind.DISTINCT:
            return dict(await self.store.distinct(m.name, bucket, channel))
        return await self.store.values(m.name, bucket, channel)

    async def total(self, metric: str, channel: str | None = None, bucket: str = TOTAL) -> float:
        """The channel's keys folded into one number (sum; min or max for those kinds), or with no
        channel every channel's. Not for distinct metrics: users of different keys overlap."""
        m = self._foldable(metric, "a total")
        if channel is None:
            per_channel = await self.store.values_by_channel(m.name, bucket)
            return _folded(m.kind, [v for values in per_channel.values() for v in values.values()])
        return _folded(m.kind, list((await self.store.values(m.name, bucket, channel)).values()))

    async def totals(self, metric: str, bucket: str = TOTAL) -> dict[str, float]:
        """Channel -> its keys folded into one number, for every channel that has a value."""
        m = self._foldable(metric, "totals per channel")
        per_channel = await self.store.values_by_channel(m.name, bucket)
        return {c: _folded(m.kind, list(v.values())) for c, v in sorted(per_channel.items())}

    async def key_totals(self, metric: str, bucket: str = TOTAL) -> dict[tuple[str, str], float]:
        """(channel, key) -> value, every key of every channel (count, sum, min, max metrics)."""
        m = self._foldable(metric, "values of every channel")
        per_channel = await self.store.values_by_channel(m.name, bucket)
        return {(c, k): v for c, values in per_channel.items() for k, v in values.items()}

    async def top(self, metric: str, channel: str, n: int = 10) -> Top:
        """The channel's n best keys (highest; lowest for a min metric), best first, from the metric's
        leaderboard if it keeps one (at most `leaderboard` keys), else from all its keys."""
        m = self.metric(metric)
        if m.leaderboard:
            return Top(await self.store.leaderboard(m.name, channel, min(n, m.leaderboard)), "leaderboard")
        values = await self.values(m.name, channel)
        reverse = m.kind is not Kind.MIN
        ranked = sorted(values.items(), key=lambda kv: (-kv[1] if reverse else kv[1], kv[0]))
        return Top(ranked[:n], "scan")

    async def series(
        self,
        metric: str,
        channel: str,
        key: str | None = None,
        *,
        size_s: int | None = None,
        points: int = 60,
        end_s: int | None = None,
    ) -> list[tuple[int, float]]:
        """(bucket start in epoch seconds, value) for `points` buckets of `size_s` (the metric's
        smallest by default) ending with the one holding `end_s` (now), oldest first, 0 where empty.
        Without a key: the channel's sum per bucket (count and sum metrics). Buckets Redis does not
        hold (past its retention) are read from the history, when the reader has one."""
        m = self.metric(metric)
        rollup = self.rollup(m, size_s)
        starts = series_starts(rollup.size_s, points, int(time.time()) if end_s is None else end_s)
        buckets = [rollup.bucket(s * 1000) for s in starts]
        values: list[float]
        if m.kind is Kind.DISTINCT:
            if key is None:
                raise QueryError(f"a series of the distinct metric {m.name!r} needs a 'key'")
            values = list(await self.store.distinct_per_bucket(m.name, channel, key, buckets))
            if self.history is not None:  # the sink's registers' estimate, for buckets Redis dropped
                missing = [s for s, v in zip(starts, values, strict=True) if not v]
                old = await self.history.key_buckets(m.name, channel, key, rollup.size_s, missing)
                values = [old.get(s, v) for s, v in zip(starts, values, strict=True)]
        elif key is None:
            if m.kind is not Kind.COUNT and m.kind is not Kind.SUM:
                raise QueryError(f"a series of the {m.kind.value} metric {m.name!r} needs a 'key'")
            per_bucket = await self.store.channel_per_bucket(m.name, channel, buckets)
            values = [sum(v) for v in per_bucket]
            if self.history is not None:
                missing = [s for s, v in zip(starts, per_bucket, strict=True) if not v]
                old = await self.history.channel_buckets(m.name, channel, rollup.size_s, missing)
                values = [old.get(s, v) for s, v in zip(starts, values, strict=True)]
        else:
            found = await self.store.key_per_bucket(m.name, channel, key, buckets)
            values = [0 if v is None else v for v in found]
            if self.history is not None:
                missing = [s for s, v in zip(starts, found, strict=True) if v is None]
                old = await self.history.key_buckets(m.name, channel, key, rollup.size_s, missing)
                values = [old.get(s, v) for s, v in zip(starts, values, strict=True)]
        return list(zip(starts, values, strict=True))

    async def distinct(self, metric: str, channel: str, key: str, bucket: str = TOTAL) -> int:
        """Distinct users of one (channel, key) in one bucket (a HyperLogLog estimate)."""
        m = self.metric(metric)
        if m.kind is not Kind.DISTINCT:
            raise QueryError(f"metric {m.name!r} is a {m.kind.value}, not a distinct-users metric")
        return (await self.store.distinct_per_bucket(m.name, channel, key, [bucket]))[0]

    # -- the topology -------------------------------------------------------------------------------

    async def stats(self) -> dict[str, int]:
        """The pipeline-wide counters: events, dead_letters, late_dropped, deduplicated, partials, ..."""
        return await self.store.stats()

    async def channels(self) -> dict[str, int]:
        """Channel -> sequence number of its last update, for every channel the root has written to."""
        return await self.store.seqs()

    async def channel_count(self) -> int:
        return await self.store.channel_count()

    async def splits(self) -> dict[str, int]:
        """Hot key -> the sub-keys writers split it into now."""
        return await self.store.splits()

    async def snapshot(self, channel: str) -> Snapshot:
        """A channel's all-time values and leaderboard with the seq that names them, read atomically
        (what a viewer gets first). Distinct metrics are left out: they reach viewers by updates."""
        metrics = [m.name for m in self.topology.metrics if m.kind is not Kind.DISTINCT]
        board = leaderboard_metric(self.topology)
        seqs, values, top = await self.store.snapshot(
            channel, metrics, (board.name, board.leaderboard) if board is not None else None
        )
        return Snapshot(channel, sum(seqs.values()), values, top, seqs)

    def _foldable(self, metric: str, what: str) -> Metric:
        m = self.metric(metric)
        if m.kind is Kind.DISTINCT:
            raise QueryError(f"{what} of the distinct metric {m.name!r} need a 'channel' and a 'key'")
        return m


def _folded(kind: Kind, values: list[float]) -> float:
    folded = fold(kind, values)
    assert folded is not None  # not distinct: checked by the caller
    return folded


class SyncReader:
    """The `Reader`, blocking: one background loop thread per process; thread-safe and fork-safe
    (a forked child reads through a connection of its own), like `SyncPipelineClient`."""

    def __init__(self, topology: Topology, redis_url: str, **redis_options: Any) -> None:
        self.topology = topology

        async def make() -> Reader:
            return Reader.from_url(topology, redis_url, **redis_options)

        async def close(reader: Reader) -> None:
            await reader.aclose()

        self._reader = PerProcess(f"{topology.name}.sync-reader", make, close)

    def value(self, metric: str, channel: str, key: str, bucket: str = TOTAL) -> float:
        return self._reader.call(lambda r: r.value(metric, channel, key, bucket))

    def values(self, metric: str, channel: str, bucket: str = TOTAL) -> dict[str, float]:
        return self._reader.call(lambda r: r.values(metric, channel, bucket))

    def total(self, metric: str, channel: str | None = None, bucket: str = TOTAL) -> float:
        return self._reader.call(lambda r: r.total(metric, channel, bucket))

    def totals(self, metric: str, bucket: str = TOTAL) -> dict[str, float]:
        return self._reader.call(lambda r: r.totals(metric, bucket))

    def key_totals(self, metric: str, bucket: str = TOTAL) -> dict[tuple[str, str], float]:
        return self._reader.call(lambda r: r.key_totals(metric, bucket))

    def top(self, metric: str, channel: str, n: int = 10) -> Top:
        return self._reader.call(lambda r: r.top(metric, channel, n))

    def series(
        self,
        metric: str,
        channel: str,
        key: str | None = None,
        *,
        size_s: int | None = None,
        points: int = 60,
        end_s: int | None = None,
    ) -> list[tuple[int, float]]:
        return self._reader.call(
            lambda r: r.series(metric, channel, key, size_s=size_s, points=points, end_s=end_s)
        )

    def distinct(self, metric: str, channel: str, key: str, bucket: str = TOTAL) -> int:
        return self._reader.call(lambda r: r.distinct(metric, channel, key, bucket))

    def stats(self) -> dict[str, int]:
        return self._reader.call(lambda r: r.stats())

    def channels(self) -> dict[str, int]:
        return self._reader.call(lambda r: r.channels())

    def splits(self) -> dict[str, int]:
        return self._reader.call(lambda r: r.splits())

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> SyncReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["QueryError", "Reader", "SyncReader", "Top", "fold", "leaderboard_metric", "series_starts"]
