"""Redis Cluster (issue 11): the local 3-master cluster, key layout 2 on it, and every Redis use of the
pipeline on it. The readers' answers on the cluster equal theirs on one Redis for the same applies;
every script runs (none crosses slots: a cluster refuses one that does)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from pipeline.core.redis_layout import SLOTS, partition_tag, slot
from pipeline.core.split_history import Proposal, SplitHistory
from pipeline.harness.local_servers import Endpoints, slot_ranges
from pipeline.io import incarnation, redis_client
from pipeline.io.node_registry import NodeRegistry
from pipeline.io.partition_owners import PartitionOwners
from pipeline.io.quarantine import Quarantined, QuarantineState
from pipeline.io.redis_sink import RedisSink
from pipeline.io.splits import SharedRates, SplitHistoryStore
from pipeline.read import Reader
from tests.integration.test_dashboard_api import MIN, T0, apply_events
from topologies.analytics import TOPOLOGY as ANALYTICS
from topologies.live_likes import TOPOLOGY as LIVE_LIKES

pytestmark = pytest.mark.integration


def _nodes(url: str) -> dict[str, dict[str, Any]]:
    port = int(url.rsplit(":", 1)[1])
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        return dict(client.execute_command("CLUSTER NODES"))
    finally:
        client.close()


def test_the_local_cluster_has_three_masters_on_equal_slot_ranges_with_a_replica_each(
    redis_cluster: str,
) -> None:
    nodes = _nodes(redis_cluster)
    masters = {a: n for a, n in nodes.items() if "master" in n["flags"]}
    replicas = [n for n in nodes.values() if "slave" in n["flags"]]
    assert len(masters) == 3 and len(replicas) == 3
    assert sorted(n["node_id"] for n in masters.values()) == sorted(r["master_id"] for r in replicas)
    held = sorted((int(s[0]), int(s[1])) for n in masters.values() for s in n["slots"])
    assert held == slot_ranges(3) == [(0, 5461), (5462, 10922), (10923, 16383)]
    # each root partition's hash tag lands on its own master, whatever the topology's name
    for name in ("live_likes", "t0123456789", "chaos1x0a1b2c"):
        owners = [
            next(i for i, (lo, hi) in enumerate(held) if lo <= slot(partition_tag(name, p, 3)) <= hi)
            for p in range(3)
        ]
        assert owners == [0, 1, 2]
    assert SLOTS == 16384


async def test_readers_answer_on_the_cluster_what_they_answer_on_one_redis(
    servers: Endpoints,
    redis_cluster: str,
    unique_name: str,
) -> None:
    """The same applies into one Redis and into the cluster: every read through `Reader` agrees."""
    likes = LIVE_LIKES.renamed(unique_name)
    channels, keys = (
        ["video-1", "vidéo:2", 'v"3', "{v4}"],
        ["comment-1", "c:2", "ü#{x}", "c 4", "c5", "c6", "c7"],
    )
    events: list[dict[str, Any]] = [
        {"type": "like", "key": k, "channel": c}
        for ci, c in enumerate(channels)
        for ki, k in enumerate(keys)
        for _ in range(1 + (ci * 7 + ki * 5) % 11)
    ]
    events += [{"type": "comment", "key": "c5", "channel": "video-1", "user": "u", "text": "hi"}] * 2
    analytics = ANALYTICS.renamed(unique_name + "a")
    site = "example.org"
    views = [
        {"type": "page_view", "key": p, "channel": site, "ts": T0 + m * MIN + i, "user": f"u{i % (m + 2)}"}
        for m in range(5)
        for p in ("/home?q=a:b", "/about", "/{x}")
        for i in range(3 * m + 1)
    ]
    for url in (servers.redis_url, redis_cluster):
        await apply_events(url, likes, events)
        await apply_events(url, analytics, views)

    async def answers(url: str) -> list[Any]:
        out: list[Any] = []
        async with Reader.from_url(likes, url) as r:
            for c in channels:
                out += [await r.values("likes", c), await r.total("likes", c), await r.top("likes", c, 5)]
                out += [await r.value("likes", c, k) for k in keys]
                snap = await r.snapshot(c)
                out += [snap.seq, sorted(snap.values), snap.top]
            out += [
                await r.totals("likes"),
                await r.key_totals("likes"),
                await r.top("comments", "video-1", 3),
            ]
            out += [await r.channels(), await r.channel_count(), await r.stats(), await r.total("likes")]
        async with Reader.from_url(analytics, url) as r:
            for p in ("/home?q=a:b", "/about", "/{x}"):
                out += [await r.series("views", site, p, size_s=60, points=6, end_s=T0 // 1000 + 300)]
                out += [await r.distinct("visitors", site, p), await r.values("visitors", site)]
            out += [await r.series("views", site, size_s=60, points=6, end_s=T0 // 1000 + 300)]
        return out

    single, cluster = await answers(servers.redis_url), await answers(redis_cluster)
    assert cluster == single
    async with Reader.from_url(likes, redis_cluster) as r:
        assert (await r.stats())["events"] == len(events)
        assert sum((await r.key_totals("likes")).values()) == len(events) - 2
        assert (await r.channels()).keys() == set(channels)


async def test_every_script_and_transaction_of_the_pipeline_runs_on_the_cluster(
    redis_cluster: str,
    unique_name: str,
) -> None:
    """Tier 1's claims, the broadcast registry, the writers' split history and rate sums, the root's
    apply, positions and quarantine release, incarnations: each on the cluster (a script whose keys
    crossed slots would be refused)."""
    client = redis_client.from_url(redis_cluster)
    try:
        assert redis_client.is_cluster(redis_cluster) and type(client).__name__ == "RedisCluster"
        owners = PartitionOwners(client, f"{unique_name}.coalesce")
        assert await owners.claim([0, 1, 2], "tx-a") == []
        assert await owners.claim([1], "tx-b") == ["tx-a"]
        assert await owners.hand_over([0, 2], "tx-a", "tx-a2") == {0, 2}
        await owners.record_fenced(["tx-a"])

        nodes = [NodeRegistry(client, unique_name, f"n{i}", f"http://127.0.0.1:{9000 + i}") for i in range(2)]
        for n in nodes:
            await n.heartbeat()
        assert len((await nodes[0].live()).urls) == 2
        await nodes[1].leave()
        assert len((await nodes[0].live()).urls) == 1

        store = SplitHistoryStore(client, unique_name, lead_ms=2000, guard_ms=500, keep_ms=60_000)
        history = SplitHistory()
        assert await store.propose(history, Proposal("hot", 4, None))
        other = SplitHistory()
        assert await store.load(other) and other.get("hot") == history.get("hot")
        rates = SharedRates(client, unique_name)
        await rates.share("w1", {"hot": 500}, 3000)
        assert await rates.share("w2", {"hot": 700, "cold": 3}, 3000) == {"hot": 1200, "cold": 3}
        await rates.withdraw("w1")

        sink = RedisSink(client, LIVE_LIKES.renamed(unique_name))
        assert tuple(int(x) for x in (await sink.check_server()).split(".")[:2]) >= (7, 0)
        assert await sink.positions() == {}

        state = QuarantineState(client, LIVE_LIKES.renamed(unique_name))
        q = Quarantined(1, 3, 4, 2, 2, "k", "string", "hash", "t", 1, "t.q", 0, 0, 1)
        await state.record(q)
        assert list(await state.all()) == [1]
        assert await state.release(q)
        assert incarnation.key(f"{unique_name}.coalesce", "c1").startswith(unique_name)
    finally:
        await client.aclose()
