"""Comment history against the real broker and Redis.

The Lua script appends each comment once whatever is replayed, and keeps a channel to its count and
age. Through the real tiers: comments sent as events reach their channel's history by tier 1, the
feed topic and the root; then the root's feed group is rewound to the start and the root restarted,
so it reads every comment again, and the history holds each once, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from pipeline.core.comment_history import FeedRecord, HistoryPolicy, history_key, plan
from pipeline.harness.local_servers import Endpoints
from pipeline.io.comment_history import CommentHistory
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

FEED = frozenset({"comment"})


def feed_record(offset: int, key: str, channel: str, at_ms: int, partition: int = 0) -> FeedRecord:
    event = {"type": "comment", "key": key, "channel": channel, "user": "u", "text": f"text of {key}"}
    return FeedRecord(partition, offset, at_ms, orjson.dumps(event))


async def test_a_replayed_batch_appends_nothing_and_the_caps_hold(
    servers: Endpoints, unique_name: str
) -> None:
    redis = aioredis.Redis.from_url(servers.redis_url)
    history = CommentHistory(redis, unique_name, HistoryPolicy(max_count=5, max_age_s=60))
    now = int(time.time() * 1000)
    channel = "video {1} ✓"  # braces and any character: the hash tag is a digest
    try:
        batch = [feed_record(i, f"c{i}", channel, now) for i in range(3)]
        assert await history.append(plan(batch, FEED)) == 3
        assert await history.append(plan(batch, FEED)) == 0  # the same records again: a replay
        overlap = [feed_record(i, f"c{i}", channel, now) for i in range(1, 8)]
        assert await history.append(plan(overlap, FEED)) == 5  # only 3..7 are new
        got = await history.recent(channel, 100)
        assert [c["key"] for c in got] == ["c3", "c4", "c5", "c6", "c7"]  # capped at 5, oldest dropped
        assert got[0] == {"id": "c3", "key": "c3", "user": "u", "text": "text of c3", "ts": None}
        assert [c["key"] for c in await history.recent(channel, 2)] == ["c6", "c7"]
        # another feed partition counts its own offsets
        assert await history.append(plan([feed_record(0, "p1", channel, now, partition=1)], FEED)) == 1
        # too old on arrival: trimmed at once (age by the record's time), and a quiet channel expires
        old = [feed_record(100, "old", "video-old", now - 120_000)]
        assert await history.append(plan(old, FEED)) == 1
        assert await history.recent("video-old", 10) == []
        assert await redis.llen(history_key(unique_name, "video-old")) == 0
        ttl = await redis.pttl(history_key(unique_name, channel))
        assert 0 < ttl <= 60_000
    finally:
        await redis.aclose()


async def test_the_root_writes_each_comment_once_though_it_reads_the_feed_again(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    pipe.add("coalesce", "c1")
    merge = pipe.add("merge", "m1")
    redis = aioredis.Redis.from_url(servers.redis_url)
    history = CommentHistory(redis, topology.name, HistoryPolicy())
    channel = "video-h"
    try:
        events: list[dict[str, object]] = [
            {
                "type": "comment",
                "key": f"c{i}",
                "channel": channel,
                "user": "u",
                "text": f"#{i}",
                "id": f"e{i}",
            }
            for i in range(30)
        ]
        ledger: Counter[LedgerKey] = Counter()
        await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)
        # each once; in the order of the feed (comments of different keys pass tier 1 in any order)
        keys = await wait_for_history(history, channel, [f"c{i}" for i in range(30)], pipe)

        # rewind the root's feed group to the start (the root stopped, so the group is empty) and restart
        merge.stop()
        feed, group = topology.topic("feed"), topology.group("merge-feed")
        ends = await rewind(servers.kafka_bootstrap, feed, group)
        merge.start()
        await wait_for_commits(servers.kafka_bootstrap, group, ends, pipe)  # it read the whole feed again
        assert [c["key"] for c in await history.recent(channel, 100)] == keys  # nothing repeated or moved
        await send_events(
            servers.kafka_bootstrap,
            topology.topic("events"),
            [{"type": "comment", "key": "c30", "channel": channel, "text": "after", "id": "e30"}],
            ledger,
        )
        assert await wait_for_history(history, channel, [*keys, "c30"], pipe) == [*keys, "c30"]
    finally:
        pipe.stop()
        await redis.aclose()


async def wait_for_history(
    history: CommentHistory, channel: str, keys: list[str], pipe: Pipeline
) -> list[str]:
    """Until the channel's history holds exactly `keys`, each once, in any order; the order it holds."""
    deadline = time.monotonic() + 60
    while True:
        got = [c["key"] for c in await history.recent(channel, 1000)]
        if len(got) == len(keys) and sorted(got) == sorted(keys):
            return got
        assert time.monotonic() < deadline, f"history {got}\n{pipe.logs()}"
        await asyncio.sleep(0.3)


async def rewind(bootstrap: str, topic: str, group: str) -> dict[TopicPartition, int]:
    """Commit offset 0 for every partition of `topic` in `group` (whose members have left); the ends."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        assert tps
        consumer.assign(tps)
        deadline = time.monotonic() + 30
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        assert sum(ends.values()) >= 30
        while True:
            try:
                await consumer.commit({tp: OffsetAndMetadata(0, "") for tp in tps})
                return ends
            except Exception:  # the stopped member may hold the group until it is gone
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
    finally:
        await consumer.stop()


async def wait_for_commits(
    bootstrap: str, group: str, ends: dict[TopicPartition, int], pipe: Pipeline
) -> None:
    """Until `group` has committed the end of every partition (it read everything up to there)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    deadline = time.monotonic() + 60
    try:
        while True:
            committed = {tp: await consumer.committed(tp) for tp in ends}
            # the last offset of a transactional topic is a commit marker, which no consumer commits past
            if all((committed[tp] or 0) >= end - 1 for tp, end in ends.items() if end):
                return
            assert time.monotonic() < deadline, f"feed not read again: {committed} of {ends}\n{pipe.logs()}"
            await asyncio.sleep(0.5)
    finally:
        await consumer.stop()
