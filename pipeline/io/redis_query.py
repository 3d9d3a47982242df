"""Reading aggregates back from Redis, the way dashboards and checks do."""

from __future__ import annotations

from typing import cast

import orjson
import redis.asyncio as aioredis

from pipeline.core.redis_layout import agg_key, seq_key, splits_key, stats_key, top_key, uniq_key
from pipeline.core.windows import TOTAL


async def key_totals(client: aioredis.Redis, topology: str, metric: str) -> dict[tuple[str, str], float]:
    """Every (channel, key) -> all-time value of one metric."""
    prefix = agg_key(topology, metric, TOTAL, "")
    out: dict[tuple[str, str], float] = {}
    async for name in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        channel = text(name)[len(prefix) :]
        for field, value in (await client.hgetall(name)).items():
            out[(channel, text(field))] = number(value)
    return out


async def metric_sum(client: aioredis.Redis, topology: str, metric: str) -> float:
    """Sum of a metric's all-time values over every key: for a count, the events counted."""
    return sum((await key_totals(client, topology, metric)).values())


async def stats(client: aioredis.Redis, topology: str) -> dict[str, int]:
    raw = await client.hgetall(stats_key(topology))
    return {text(k): int(v) for k, v in raw.items()}


# --- reads behind the dashboard's JSON API (pipeline/web/dashboard.py) ----------------------------


async def channel_seqs(client: aioredis.Redis, topology: str) -> dict[str, int]:
    """Channel -> sequence number of its last update: every channel the root has written to."""
    raw = await client.hgetall(seq_key(topology))
    return {text(k): int(v) for k, v in raw.items()}


async def channel_totals(
    client: aioredis.Redis, topology: str, metric: str, channel: str, bucket: str = TOTAL
) -> dict[str, float]:
    """Key -> value of one metric in one channel and bucket (count, sum, min, max)."""
    raw = await client.hgetall(agg_key(topology, metric, bucket, channel))
    return {text(k): number(v) for k, v in raw.items()}


async def channel_distinct(
    client: aioredis.Redis, topology: str, metric: str, channel: str, bucket: str = TOTAL
) -> dict[str, int]:
    """Key -> distinct users of one distinct metric in one channel and bucket (HyperLogLog estimates)."""
    base = uniq_key(topology, metric, bucket, channel, "")
    start = len(base) - len(orjson.dumps([channel, ""]))  # where the JSON [channel, key] begins
    prefix = base[: -len('""]')]  # ...:["channel",
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


async def channel_sums(client: aioredis.Redis, topology: str, metric: str) -> dict[str, list[float]]:
    """Channel -> every key's all-time value of one metric (the caller folds them by kind)."""
    prefix = agg_key(topology, metric, TOTAL, "")
    out: dict[str, list[float]] = {}
    async for name in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        channel = text(name)[len(prefix) :]
        out[channel] = [number(v) for v in await client.hvals(name)]
    return out


async def top_keys(
    client: aioredis.Redis, topology: str, metric: str, channel: str, n: int
) -> list[tuple[str, float]]:
    """The channel's leaderboard: the n keys with the highest totals, highest first."""
    raw = await client.zrevrange(top_key(topology, metric, channel), 0, n - 1, withscores=True)
    return [(text(k), whole(s)) for k, s in cast(list[tuple[bytes, float]], raw)]


async def bucket_values(
    client: aioredis.Redis, topology: str, metric: str, channel: str, key: str | None, buckets: list[str]
) -> list[float]:
    """One value per bucket: the key's, or with no key the sum over the channel's keys (0 when empty)."""
    async with client.pipeline(transaction=False) as pipe:
        for bucket in buckets:
            name = agg_key(topology, metric, bucket, channel)
            if key is None:
                pipe.hvals(name)
            else:
                pipe.hget(name, key)
        replies = await pipe.execute()
    if key is None:
        return [sum(number(v) for v in reply) for reply in replies]
    return [0 if reply is None else number(reply) for reply in replies]


async def bucket_distinct(
    client: aioredis.Redis, topology: str, metric: str, channel: str, key: str, buckets: list[str]
) -> list[int]:
    """Distinct users of one (channel, key) per bucket (HyperLogLog estimates; 0 when empty)."""
    async with client.pipeline(transaction=False) as pipe:
        for bucket in buckets:
            pipe.pfcount(uniq_key(topology, metric, bucket, channel, key))
        return [int(n) for n in await pipe.execute()]


async def splits(client: aioredis.Redis, topology: str) -> dict[str, int]:
    """Hot key -> sub-keys it is split into (empty while no writer splits keys)."""
    raw = await client.hgetall(splits_key(topology))
    return {text(k): int(v) for k, v in raw.items()}


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
