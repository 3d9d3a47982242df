"""The dashboard's JSON query API against the real Redis, on a small aiohttp app of its own.

The data is written the way the root writes it: events folded by the tier-1
Coalescer, merged by the Merger and applied by the RedisSink's Lua script (no
Kafka in between: the API only reads Redis, and the end-to-end path through
worker processes is what tests/browser/ covers).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pipeline.core.coalescer import Coalescer, root_partition
from pipeline.core.merger import Merger
from pipeline.core.model import Partial
from pipeline.core.redis_layout import splits_key
from pipeline.core.topology import Topology
from pipeline.harness.local_servers import Endpoints
from pipeline.io import redis_client
from pipeline.io.redis_sink import RedisSink
from pipeline.web import dashboard
from tests.integration.redis_cluster import STORES, on_store
from topologies.analytics import TOPOLOGY as ANALYTICS
from topologies.live_likes import TOPOLOGY as LIVE_LIKES

pytestmark = pytest.mark.integration


@pytest.fixture(params=STORES)
def servers(request: pytest.FixtureRequest, servers: Endpoints) -> Endpoints:
    """Every test here on one Redis and on a 3-master Redis Cluster (key layout 2 on both)."""
    return on_store(request, servers)

T0 = 1_700_000_000_000 // 3_600_000 * 3_600_000  # the start of an hour, in ms
MIN = 60_000


@dataclass
class _Record:
    offset: int
    value: bytes
    timestamp: int


async def apply_events(
    redis_url: str, topology: Topology, events: list[dict[str, Any]], first_offset: int = 0
) -> None:
    """Fold, merge and apply `events` into Redis exactly as tiers 1 and 2 would: cells routed to their
    root partitions, one apply per root partition (partials from `first_offset` on in each: a later
    apply must come after the one before, or it is a replay)."""
    coalescer = Coalescer(topology, root_partitions=topology.partitions.partials, now=0.0)
    records = [_Record(i, orjson.dumps(e), int(e.get("ts", T0))) for i, e in enumerate(events)]
    assert coalescer.add_batch(0, records) == []
    by_root: dict[int, list[Partial]] = {}
    for partial in coalescer.flush(1.0).partials:
        by_root.setdefault(partial.root_partition, []).append(partial)
    client = redis_client.from_url(redis_url)  # one Redis, or a `redis+cluster://` cluster
    try:
        sink = RedisSink(client, topology)
        for root, partials in sorted(by_root.items()):
            merger = Merger(topology)
            for offset, partial in enumerate(partials, first_offset):
                merger.add(root, offset, partial.to_json())
            assert (await sink.apply(merger.take())).applied
    finally:
        await client.aclose()


@pytest.fixture
async def api(servers: Endpoints) -> AsyncIterator[Any]:
    """`make(topology)` -> a TestClient of an app with only the dashboard mounted."""
    clients: list[TestClient[web.Request, web.Application]] = []
    redis_clients: list[aioredis.Redis] = []

    async def make(topology: Topology) -> TestClient[web.Request, web.Application]:
        app = web.Application()
        client = redis_client.from_url(servers.redis_url)
        redis_clients.append(client)
        dashboard.setup(app, topology, client)
        test_client = TestClient(TestServer(app, host="127.0.0.1"))
        await test_client.start_server()
        clients.append(test_client)
        return test_client

    yield make
    for c in clients:
        await c.close()
    for r in redis_clients:
        await r.aclose()


async def get(client: TestClient[web.Request, web.Application], path: str, status: int = 200) -> Any:
    response = await client.get(path)
    body = await response.read()
    assert response.status == status, body
    assert response.content_type == "application/json"
    return orjson.loads(body)


def like(channel: str, key: str) -> dict[str, Any]:
    return {"type": "like", "key": key, "channel": channel}


async def test_live_likes_totals_top_channels_stats_and_splits(
    servers: Endpoints, unique_name: str, api: Any
) -> None:
    topology = LIVE_LIKES.renamed(unique_name)
    events = [like("video-1", "comment-1")] * 5 + [like("video-1", "comment-2")] * 3
    events += [like("video-2", "comment-3")] * 2 + [like("video-1", "comment-4")]
    events += [{"type": "comment", "key": "comment-1", "channel": "video-1", "user": "u1", "text": "hi"}]
    await apply_events(servers.redis_url, topology, events)
    client = await api(topology)

    described = (await get(client, "/api/topologies"))["topologies"]
    assert [t["name"] for t in described] == [unique_name]
    assert described[0]["feed_types"] == ["comment"]
    assert described[0]["metrics"][0] == {
        "name": "likes",
        "kind": "count",
        "on": "like",
        "rollups": [0],
        "leaderboard": 100,
    }

    channels = await get(client, "/api/channels")
    assert sorted(c["channel"] for c in channels["channels"]) == ["video-1", "video-2"]
    assert channels["count"] == 2

    assert (await get(client, "/api/totals?metric=likes"))["channels"] == {"video-1": 9, "video-2": 2}
    per_key = await get(client, "/api/totals?metric=likes&channel=video-1")
    assert per_key["values"] == {"comment-1": 5, "comment-2": 3, "comment-4": 1}
    assert per_key["total"] == 9
    assert (await get(client, "/api/totals?metric=comments&channel=video-1"))["values"] == {"comment-1": 1}
    assert (await get(client, "/api/totals?metric=likes&channel=nobody"))["values"] == {}

    top = await get(client, "/api/top?metric=likes&channel=video-1&n=2")
    assert top["top"] == [["comment-1", 5], ["comment-2", 3]]
    assert top["source"] == "leaderboard"
    no_leaderboard = await get(client, "/api/top?metric=comments&channel=video-1")
    assert no_leaderboard == {
        "metric": "comments",
        "channel": "video-1",
        "n": 10,
        "source": "scan",
        "top": [["comment-1", 1]],
    }

    stats = await get(client, "/api/stats")
    assert stats["stats"]["events"] == len(events)
    # one apply per root partition the keys hash to (summed over the partitions' counters)
    assert stats["stats"]["applies"] == len({root_partition(e["key"], 3) for e in events}) > 1
    assert stats["channels"] == 2

    assert (await get(client, "/api/splits")) == {"splits": {}}
    writer = redis_client.from_url(servers.redis_url)
    try:
        await writer.hset(splits_key(unique_name), mapping={"comment-1": 8})
    finally:
        await writer.aclose()
    assert (await get(client, "/api/splits")) == {"splits": {"comment-1": 8}}


async def test_analytics_series_and_distinct_visitors(servers: Endpoints, unique_name: str, api: Any) -> None:
    topology = ANALYTICS.renamed(unique_name)
    page, site = "/home?q=a:b", "example.org"

    def view(ts: int, user: str, key: str = page) -> dict[str, Any]:
        return {"type": "page_view", "key": key, "channel": site, "ts": ts, "user": user}

    events = [view(T0 + i * 1000, f"u{i % 7}") for i in range(30)]  # minute 0: 30 views, 7 visitors
    events += [view(T0 + 2 * MIN + i * 1000, f"u{i % 3}") for i in range(5)]  # minute 2: 5 views
    events += [view(T0 + 2 * MIN, "u1", key="/about")] * 4  # minute 2: 4 views of another page
    events += [view(T0 + 3600_000 + 5 * MIN, "u9")]  # the next hour, minute 5
    await apply_events(servers.redis_url, topology, events)
    client = await api(topology)
    end_s = (T0 + 3 * MIN) // 1000
    base = f"/api/series?channel={site}&end={end_s}&points=4"

    minutes = await get(client, f"{base}&metric=views&size=60&key=/home?q%3Da:b")
    start = T0 // 1000
    assert minutes["points"] == [[start, 30], [start + 60, 0], [start + 120, 5], [start + 180, 0]]
    assert minutes["size"] == 60
    whole_site = await get(client, f"{base}&metric=views&size=60")
    assert [v for _, v in whole_site["points"]] == [30, 0, 9, 0]
    assert whole_site["key"] is None
    hours_end = (T0 + 3600_000) // 1000
    hours = await get(client, f"/api/series?metric=views&channel={site}&size=3600&points=2&end={hours_end}")
    assert hours["points"] == [[start, 39], [start + 3600, 1]]

    visitors = await get(client, f"{base}&metric=visitors&size=60&key=/home?q%3Da:b")
    assert [v for _, v in visitors["points"]] == [7, 0, 3, 0]
    distinct = await get(client, f"/api/totals?metric=visitors&channel={site}")
    assert distinct["values"] == {"/about": 1, "/home?q=a:b": 8}
    assert distinct["total"] is None  # distinct users of different pages do not add up
    top_pages = await get(client, f"/api/top?metric=views&channel={site}&n=5")
    assert top_pages["top"] == [["/home?q=a:b", 36], ["/about", 4]]
    top_visitors = await get(client, f"/api/top?metric=visitors&channel={site}&n=1")
    assert top_visitors["top"] == [["/home?q=a:b", 8]]

    default_end = await get(client, f"/api/series?metric=views&channel={site}&points=3")
    now_minute = int(time.time()) // 60 * 60
    assert default_end["points"][-1][0] in (now_minute, now_minute + 60)  # the minute may turn meanwhile
    assert [v for _, v in default_end["points"]] == [0, 0, 0]


async def test_bad_queries_say_what_is_wrong(servers: Endpoints, unique_name: str, api: Any) -> None:
    client = await api(ANALYTICS.renamed(unique_name))
    cases = {
        "/api/totals": "missing parameter 'metric'",
        "/api/totals?metric=nope": "unknown metric 'nope'",
        "/api/totals?metric=visitors": "need a 'channel'",
        "/api/top?metric=views": "missing parameter 'channel'",
        "/api/top?metric=views&channel=s&n=0": "between 1 and 1000",
        "/api/top?metric=views&channel=s&n=ten": "must be an integer",
        "/api/series?metric=views&channel=s&size=30": "has buckets of [60, 3600] seconds, not 30",
        "/api/series?metric=views&channel=s&points=100000": "between 1 and 1000",
        "/api/series?metric=visitors&channel=s": "needs a 'key'",
    }
    for path, reason in cases.items():
        assert reason in (await get(client, path, status=400))["error"], path
    likes = await api(LIVE_LIKES.renamed(unique_name))
    refused = await get(likes, "/api/series?metric=likes&channel=c", 400)
    assert "keeps only all-time totals" in refused["error"]


async def test_dashboard_page_is_served(servers: Endpoints, unique_name: str, api: Any) -> None:
    client = await api(LIVE_LIKES.renamed(unique_name))
    page = await client.get("/dashboard")
    assert page.status == 200
    assert "text/html" in page.headers["Content-Type"]
    assert 'src="dashboard.js"' in await page.text()
    script = await client.get("/dashboard.js")
    assert script.status == 200
    assert "/api/topologies" in await script.text()


async def test_a_leaderboard_updated_in_bulk_keeps_the_exact_top_across_applies(
    servers: Endpoints, unique_name: str, api: Any
) -> None:
    """The apply adds a channel's leaderboard members in one ZADD and trims once: with 2,500 keys in
    one apply (over twice the board's 100) and a second apply that lifts low keys past the top,
    the board still lists exactly the top of the totals."""
    topology = LIVE_LIKES.renamed(unique_name)
    counts = {f"c{i}": 1 + (i * 7919) % 400 for i in range(2500)}
    first = [{"type": "like", "key": k, "channel": "v"} for k, n in counts.items() for _ in range(n % 5 + 1)]
    totals = {k: n % 5 + 1 for k, n in counts.items()}
    await apply_events(servers.redis_url, topology, first)
    risers = [f"c{i}" for i in range(0, 2500, 97)]
    second = [
        {"type": "like", "key": k, "channel": "v"} for j, k in enumerate(risers) for _ in range(10 + 6 * j)
    ]
    for j, k in enumerate(risers):
        totals[k] += 10 + 6 * j  # distinct totals at the top: no tie decides the order
    await apply_events(servers.redis_url, topology, second, first_offset=1)
    client = await api(topology)
    top = await get(client, "/api/top?metric=likes&channel=v&n=20")
    assert top["source"] == "leaderboard"
    expected = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert sorted(top["top"], key=lambda kv: (-kv[1], kv[0])) == [list(kv) for kv in expected]
