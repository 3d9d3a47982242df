"""Every read of the aggregates in a single Redis: the one place that knows where a value lives.

`RedisStore` answers by topology, metric, bucket, channel and key; the key names come from
`pipeline/core/redis_layout.py`, which the root's apply plan uses too, so reader and writer agree.
Above it, `pipeline/read.py` (`Reader`) adds what does not depend on the store: metric kinds, folding
many keys into one number, buckets of a series. The dashboard's JSON API, the broadcast nodes'
snapshots, the harness and the tests all read through it.

It serves a single Redis and a Redis Cluster alike (the keys carry hash tags, a scan on a cluster
client visits every primary). A later store, for buckets Redis no longer holds (PostgreSQL), takes
this one's methods, and a store of stores asks by bucket age.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.core.redis_layout import (
    agg_key,
    partition_tag,
    root_partition,
    seq_key,
    splits_key,
    stats_key,
    top_key,
    uniq_key,
)
from pipeline.core.topology import Partitions, Topology
from pipeline.core.windows import TOTAL


class RedisStore:
    """The aggregates of one topology in one Redis or one Redis Cluster (`client` is borrowed: closing
    it is the owner's).

    Layout 2 (docs/CONTRACT.md): every key an apply writes carries the hash tag of its root partition,
    so a channel's values, leaderboard and sequence number are spread over one key per root partition.
    A key's value is read with one command at the key's partition (`root_partition`); what spans keys
    (a channel's values, its top, the channels, the counters) is read from every partition and merged.
    """

    def __init__(
        self, client: aioredis.Redis, topology: str | Topology, partitions: int | None = None
    ) -> None:
        self.client = client
        if isinstance(topology, Topology):
            self.name = topology.name
            self.partitions = partitions or topology.partitions.partials
        else:
            self.name = topology
            self.partitions = partitions or Partitions().partials
        self.parts = range(self.partitions)
        self.tags = [partition_tag(self.name, p, self.partitions) for p in self.parts]
        self._snapshot = client.register_script(SNAPSHOT_LUA)

    def tag(self, key: str) -> str:
        """The hash tag of the root partition holding `key`'s cells."""
        return self.tags[root_partition(key, self.partitions)]

    async def _each(self, command: str, keys: list[str], *args: Any) -> list[Any]:
        """One command per key, pipelined (not a transaction: the keys are in different slots)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.execute_command(command, key, *args)
            return await pipe.execute()

    # -- one metric, one bucket -------------------------------------------------------------------------

    async def values(self, metric: str, bucket: str, channel: str) -> dict[str, float]:
        """Key -> value of a count, sum, min or max metric in one channel and bucket."""
        out: dict[str, float] = {}
        for raw in await self._each("HGETALL", [agg_key(t, metric, bucket, channel) for t in self.tags]):
            out.update((text(k), number(v)) for k, v in _pairs(raw))
        return out

    async def values_by_channel(self, metric: str, bucket: str) -> dict[str, dict[str, float]]:
        """Channel -> key -> value of a count, sum, min or max metric, every channel of one bucket."""
        out: dict[str, dict[str, float]] = {}
        for t in self.tags:
            prefix = agg_key(t, metric, bucket, "")
            names = [
                text(n) async for n in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)
            ]
            if not names:
                continue
            for name, raw in zip(names, await self._each("HGETALL", names), strict=True):
                if raw:
                    channel = name[len(prefix) :]
                    out.setdefault(channel, {}).update((text(k), number(v)) for k, v in _pairs(raw))
        return out

    async def distinct(self, metric: str, bucket: str, channel: str) -> dict[str, int]:
        """Key -> distinct users of a distinct metric in one channel and bucket (HyperLogLog estimates)."""
        out: dict[str, int] = {}
        for t in self.tags:
            base = uniq_key(t, metric, bucket, channel, "")
            start = len(base) - len(orjson.dumps([channel, ""]))  # where the JSON [channel, key] begins
            prefix = base[: -len('""]')]  # ...:["channel",
            names = [
                text(n) async for n in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)
            ]
            if not names:
                continue
            for name, n in zip(names, await self._each("PFCOUNT", names), strict=True):
                _, key = orjson.loads(name[start:])
                out[key] = int(n)
        return out

    async def leaderboard(self, metric: str, channel: str, n: int) -> list[tuple[str, float]]:
        """The channel's leaderboard: the n keys with the highest totals, highest first (the best n of
        each root partition's board, merged: each keeps at least n)."""
        boards = await self._each(
            "ZREVRANGE", [top_key(t, metric, channel) for t in self.tags], 0, n - 1, "WITHSCORES"
        )
        return _best(boards, n)

    # -- one metric, many buckets -----------------------------------------------------------------------

    async def key_per_bucket(
        self, metric: str, channel: str, key: str, buckets: list[str]
    ) -> list[float | None]:
        """A key's value in each bucket (None where it has none)."""
        tag = self.tag(key)
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.hget(agg_key(tag, metric, bucket, channel), key)
            replies = await pipe.execute()
        return [None if reply is None else number(reply) for reply in replies]

    async def channel_per_bucket(self, metric: str, channel: str, buckets: list[str]) -> list[list[float]]:
        """Every key's value of the channel in each bucket."""
        parts = self.partitions
        replies = await self._each(
            "HVALS",
            [agg_key(t, metric, bucket, channel) for bucket in buckets for t in self.tags],
        )
        return [
            [number(v) for reply in replies[i * parts : (i + 1) * parts] for v in reply]
            for i in range(len(buckets))
        ]

    async def distinct_per_bucket(self, metric: str, channel: str, key: str, buckets: list[str]) -> list[int]:
        """Distinct users of one (channel, key) in each bucket (HyperLogLog estimates; 0 when empty)."""
        tag = self.tag(key)
        async with self.client.pipeline(transaction=False) as pipe:  # PFCOUNT of one key (a cluster pipeline
            # refuses pfcount(), which may take many)
            for bucket in buckets:
                pipe.execute_command("PFCOUNT", uniq_key(tag, metric, bucket, channel, key))
            return [int(n) for n in await pipe.execute()]

    # -- the topology -----------------------------------------------------------------------------------

    async def stats(self) -> dict[str, int]:
        """The pipeline-wide counters (events, dead_letters, late_dropped, deduplicated, ...): the sums of
        the root partitions' counters."""
        out: dict[str, int] = {}
        for raw in await self._each("HGETALL", [stats_key(t) for t in self.tags]):
            for k, v in _pairs(raw):
                out[text(k)] = out.get(text(k), 0) + int(v)
        return out

    async def seqs(self) -> dict[str, int]:
        """Channel -> sequence number of its last update (the sum of its root partitions'): every
        channel the root has written to."""
        out: dict[str, int] = {}
        for raw in await self._each("HGETALL", [seq_key(t) for t in self.tags]):
            for k, v in _pairs(raw):
                out[text(k)] = out.get(text(k), 0) + int(v)
        return out

    async def channel_count(self) -> int:
        return len(await self.seqs())

    async def splits(self) -> dict[str, int]:
        """Hot key -> sub-keys the writers split it into (empty while no key is split)."""
        raw = await self.client.hgetall(splits_key(self.name))
        return {text(k): int(v) for k, v in raw.items()}

    async def snapshot(
        self, channel: str, metrics: list[str], board: tuple[str, int] | None
    ) -> tuple[dict[int, int], list[tuple[str, str, float]], list[tuple[str, float]]]:
        """A channel's seq in each root partition, the all-time values of `metrics` and its leaderboard
        (metric, n). Each partition is read by one script (its keys share a slot, so a cluster runs it on
        one shard): the root raises a partition's seq in the same atomic step that writes its values, so
        each seq names exactly the state read in its partition. (A script, not MULTI/EXEC: redis-py's
        cluster transactions keep a connection across event loops.)"""

        async def one(tag: str) -> list[Any]:
            keys = [seq_key(tag), *(agg_key(tag, m, TOTAL, channel) for m in metrics)]
            if board is not None:
                keys.append(top_key(tag, board[0], channel))
            reply = await self._snapshot(keys=keys, args=[channel, len(metrics), board[1] if board else 0])
            return list(reply)

        replies = await asyncio.gather(*(one(t) for t in self.tags))
        seqs = {p: int(r[0] or 0) for p, r in zip(self.parts, replies, strict=True)}
        values = [
            (m, text(key), number(value))
            for r in replies
            for m, totals in zip(metrics, r[1 : 1 + len(metrics)], strict=True)
            for key, value in _pairs(totals)
        ]
        top = _best([r[-1] for r in replies], board[1]) if board is not None else []
        return seqs, values, top


# KEYS: a partition's seq hash, the metrics' all-time hashes of the channel, then its leaderboard (when
# ARGV[3] > 0). ARGV: the channel, how many metrics, the leaderboard's n (0: none). Read-only.
SNAPSHOT_LUA = """
local out = {redis.call('HGET', KEYS[1], ARGV[1]) or false}
local n = tonumber(ARGV[2])
for i = 2, n + 1 do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
end
local top = tonumber(ARGV[3])
if top > 0 then
  out[#out + 1] = redis.call('ZREVRANGE', KEYS[n + 2], 0, top - 1, 'WITHSCORES')
end
return out
"""


def _pairs(raw: Any) -> list[tuple[Any, Any]]:
    """A hash reply as (field, value) pairs, whether the client made it a dict or left it a flat list."""
    if isinstance(raw, dict):
        return list(raw.items())
    return list(zip(raw[::2], raw[1::2], strict=True))


def _best(boards: list[Any], n: int) -> list[tuple[str, float]]:
    """The n best of several leaderboards' (member, score) replies, as one ZREVRANGE orders them:
    by score, then by member, both descending."""
    items: list[tuple[str, float]] = []
    for raw in boards:
        if raw and not isinstance(raw[0], (tuple, list)):  # a flat [member, score, ...] reply
            raw = list(zip(raw[::2], raw[1::2], strict=True))
        items.extend((text(k), float(s)) for k, s in raw)
    items.sort(key=lambda kv: (kv[1], kv[0]), reverse=True)
    return [(k, whole(s)) for k, s in items[:n]]


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
