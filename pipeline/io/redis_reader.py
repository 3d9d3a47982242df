"""Every read of the aggregates in a single Redis: the one place that knows where a value lives.

`RedisStore` answers by topology, metric, bucket, channel and key; the key names come from
`pipeline/core/redis_layout.py`, which the root's apply plan uses too, so reader and writer agree.
Above it, `pipeline/read.py` (`Reader`) adds what does not depend on the store: metric kinds, folding
many keys into one number, buckets of a series. The dashboard's JSON API, the broadcast nodes'
snapshots, the harness and the tests all read through it.

Later stores take this one's methods: a Redis Cluster store (the same calls, keys with hash tags,
scans per primary), and one for buckets Redis no longer holds (PostgreSQL), which a store of stores
asks by bucket age.
"""

from __future__ import annotations

from typing import cast

import orjson
import redis.asyncio as aioredis

from pipeline.core.redis_layout import agg_key, seq_key, splits_key, stats_key, top_key, uniq_key
from pipeline.core.windows import TOTAL


class RedisStore:
    """The aggregates of one topology in one Redis (`client` is borrowed: closing it is the owner's)."""

    def __init__(self, client: aioredis.Redis, topology: str) -> None:
        self.client = client
        self.name = topology

    # -- one metric, one bucket -------------------------------------------------------------------------

    async def values(self, metric: str, bucket: str, channel: str) -> dict[str, float]:
        """Key -> value of a count, sum, min or max metric in one channel and bucket."""
        raw = await self.client.hgetall(agg_key(self.name, metric, bucket, channel))
        return {text(k): number(v) for k, v in raw.items()}

    async def values_by_channel(self, metric: str, bucket: str) -> dict[str, dict[str, float]]:
        """Channel -> key -> value of a count, sum, min or max metric, every channel of one bucket."""
        prefix = agg_key(self.name, metric, bucket, "")
        out: dict[str, dict[str, float]] = {}
        async for name in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            channel = text(name)[len(prefix) :]
            raw = await self.client.hgetall(name)
            if raw:
                out[channel] = {text(k): number(v) for k, v in raw.items()}
        return out

    async def distinct(self, metric: str, bucket: str, channel: str) -> dict[str, int]:
        """Key -> distinct users of a distinct metric in one channel and bucket (HyperLogLog estimates)."""
        base = uniq_key(self.name, metric, bucket, channel, "")
        start = len(base) - len(orjson.dumps([channel, ""]))  # where the JSON [channel, key] begins
        prefix = base[: -len('""]')]  # ...:["channel",
        client = self.client
        names = [text(n) async for n in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)]
        if not names:
            return {}
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.pfcount(name)
            counts = await pipe.execute()
        out: dict[str, int] = {}
        for name, n in zip(names, counts, strict=True):
            _, key = orjson.loads(name[start:])
            out[key] = int(n)
        return out

    async def leaderboard(self, metric: str, channel: str, n: int) -> list[tuple[str, float]]:
        """The channel's leaderboard: the n keys with the highest totals, highest first."""
        raw = await self.client.zrevrange(top_key(self.name, metric, channel), 0, n - 1, withscores=True)
        return [(text(k), whole(s)) for k, s in cast(list[tuple[bytes, float]], raw)]

    # -- one metric, many buckets -----------------------------------------------------------------------

    async def key_per_bucket(
        self, metric: str, channel: str, key: str, buckets: list[str]
    ) -> list[float | None]:
        """A key's value in each bucket (None where it has none)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hget(agg_key(self.name, metric, bucket, channel), key)
            replies = await pipe.execute()
        return [None if reply is None else number(reply) for reply in replies]

    async def channel_per_bucket(self, metric: str, channel: str, buckets: list[str]) -> list[list[float]]:
        """Every key's value of the channel in each bucket."""
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hvals(agg_key(self.name, metric, bucket, channel))
            replies = await pipe.execute()
        return [[number(v) for v in reply] for reply in replies]

    async def distinct_per_bucket(self, metric: str, channel: str, key: str, buckets: list[str]) -> list[int]:
        """Distinct users of one (channel, key) in each bucket (HyperLogLog estimates; 0 when empty)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.pfcount(uniq_key(self.name, metric, bucket, channel, key))
            return [int(n) for n in await pipe.execute()]

    # -- the topology -----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, int]:
        """The pipeline-wide counters (events, dead_letters, late_dropped, deduplicated, ...)."""
        raw = await self.client.hgetall(stats_key(self.name))
        return {text(k): int(v) for k, v in raw.items()}

    async def seqs(self) -> dict[str, int]:
        """Channel -> sequence number of its last update: every channel the root has written to."""
        raw = await self.client.hgetall(seq_key(self.name))
        return {text(k): int(v) for k, v in raw.items()}

    async def channel_count(self) -> int:
        return int(await self.client.hlen(seq_key(self.name)))

    async def splits(self) -> dict[str, int]:
        """Hot key -> sub-keys the writers split it into (empty while no key is split)."""
        raw = await self.client.hgetall(splits_key(self.name))
        return {text(k): int(v) for k, v in raw.items()}

    async def snapshot(
        self, channel: str, metrics: list[str], board: tuple[str, int] | None
    ) -> tuple[int, list[tuple[str, str, float]], list[tuple[str, float]]]:
        """A channel's seq, the all-time values of `metrics` and its leaderboard (metric, n), read in
        one MULTI/EXEC: the root raises the seq in the same atomic step that writes the values, so the
        seq names exactly the state read."""
        name = self.name
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(seq_key(name), channel)
        for m in metrics:
            pipe.hgetall(agg_key(name, m, TOTAL, channel))
        if board is not None:
            pipe.zrevrange(top_key(name, board[0], channel), 0, board[1] - 1, withscores=True)
        replies = await pipe.execute()
        seq = int(replies[0] or 0)
        values = [
            (m, text(key), number(value))
            for m, totals in zip(metrics, replies[1 : 1 + len(metrics)], strict=True)
            for key, value in totals.items()
        ]
        top = [(text(key), whole(score)) for key, score in replies[-1]] if board is not None else []
        return seq, values, top


def whole(score: float) -> float:
    """Sorted-set scores come back as floats; counts read better as integers."""
    return int(score) if score.is_integer() else score


def text(raw: bytes | str) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    return raw.decode() if isinstance(raw, bytes) else raw


def number(raw: bytes | str) -> float:
    """A stored value as int when it is one (counts), else float (sums)."""
    try:
        return int(raw)
    except ValueError:
        return float(raw)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
