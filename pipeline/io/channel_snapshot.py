"""A channel's full state read from Redis in one MULTI/EXEC: its seq, totals and leaderboard.

The root increments `{topology}:seq` for a channel in the same Lua script that
writes the channel's data, so a seq read in the same transaction as the hashes
names exactly the state read: a viewer that gets this snapshot and then every
update with a higher seq misses nothing.

Distinct-user metrics are not in snapshots: their HyperLogLogs are keyed per
(channel, key), so the keys cannot be listed in the transaction. Their totals
reach viewers through updates.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from pipeline.core.aggregates import Kind
from pipeline.core.fanout import Snapshot
from pipeline.core.redis_layout import agg_key, seq_key, top_key
from pipeline.core.topology import Metric, Topology
from pipeline.core.windows import TOTAL
from pipeline.io.redis_query import number, text, whole


def leaderboard_metric(topology: Topology) -> Metric | None:
    """The metric whose leaderboard a snapshot's `top` shows: the first one that keeps one."""
    return next((m for m in topology.metrics if m.leaderboard), None)


async def read_snapshot(client: aioredis.Redis, topology: Topology, channel: str) -> Snapshot:
    name = topology.name
    metrics = [m for m in topology.metrics if m.kind is not Kind.DISTINCT]
    board = leaderboard_metric(topology)
    pipe = client.pipeline(transaction=True)
    pipe.hget(seq_key(name), channel)
    for m in metrics:
        pipe.hgetall(agg_key(name, m.name, TOTAL, channel))
    if board is not None:
        pipe.zrevrange(top_key(name, board.name, channel), 0, board.leaderboard - 1, withscores=True)
    replies = await pipe.execute()
    seq = int(replies[0] or 0)
    values = [
        (m.name, text(key), number(value))
        for m, totals in zip(metrics, replies[1 : 1 + len(metrics)], strict=True)
        for key, value in totals.items()
    ]
    top = [(text(key), whole(score)) for key, score in replies[-1]] if board is not None else []
    return Snapshot(channel, seq, values, top)
