"""The harness's and the benchmarks' few reads as plain functions, kept for their callers.

They hold no layout knowledge: each is one call of the store that every reader goes through
(`pipeline/io/redis_reader.py`, behind `pipeline.read.Reader`). New code reads through
`pipeline.read`. Pass the topology (not only its name) when it has other than the default number of
root partitions: the store reads one hash tag per partition.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL
from pipeline.io.redis_reader import RedisStore


async def key_totals(
    client: aioredis.Redis, topology: Topology | str, metric: str
) -> dict[tuple[str, str], float]:
    """Every (channel, key) -> all-time value of one metric."""
    per_channel = await RedisStore(client, topology).values_by_channel(metric, TOTAL)
    return {(c, k): v for c, values in per_channel.items() for k, v in values.items()}


async def metric_sum(client: aioredis.Redis, topology: Topology | str, metric: str) -> float:
    """Sum of a metric's all-time values over every key: for a count, the events counted."""
    return sum((await key_totals(client, topology, metric)).values())


async def stats(client: aioredis.Redis, topology: Topology | str) -> dict[str, int]:
    return await RedisStore(client, topology).stats()


async def splits(client: aioredis.Redis, topology: Topology | str) -> dict[str, int]:
    """Hot key -> sub-keys it is split into (empty while no writer splits keys)."""
    return await RedisStore(client, topology).splits()
