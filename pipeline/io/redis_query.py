"""Reading aggregates back from Redis, the way dashboards and checks do."""

from __future__ import annotations

import redis.asyncio as aioredis

from pipeline.core.redis_layout import agg_key, stats_key
from pipeline.core.windows import TOTAL


async def key_totals(client: aioredis.Redis, topology: str, metric: str) -> dict[tuple[str, str], float]:
    """Every (channel, key) -> all-time value of one metric."""
    prefix = agg_key(topology, metric, TOTAL, "")
    out: dict[tuple[str, str], float] = {}
    async for name in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        channel = _text(name)[len(prefix) :]
        for field, value in (await client.hgetall(name)).items():
            out[(channel, _text(field))] = _number(value)
    return out


async def metric_sum(client: aioredis.Redis, topology: str, metric: str) -> float:
    """Sum of a metric's all-time values over every key: for a count, the events counted."""
    return sum((await key_totals(client, topology, metric)).values())


async def stats(client: aioredis.Redis, topology: str) -> dict[str, int]:
    raw = await client.hgetall(stats_key(topology))
    return {_text(k): int(v) for k, v in raw.items()}


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _number(raw: bytes | str) -> float:
    try:
        return int(raw)
    except ValueError:
        return float(raw)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
