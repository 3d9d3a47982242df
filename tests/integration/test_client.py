"""The producer SDK against the real broker and Redis: validation with field and reason, ids kept or
generated, hot keys spread over sub-keys on distinct partitions and announced, a split key counted
exactly by the real pipeline, and a fast BrokerUnavailable when there is no broker."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from pipeline.client import BrokerUnavailable, PipelineClient
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.core.model import parse_message_key
from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.io import kafka
from pipeline.read import Reader
from tests.integration.pipeline_harness import LedgerKey, Pipeline, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


async def _read_all(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 15.0
) -> list[tuple[int, bytes | None, bytes | None]]:
    """(partition, key, value) of the first `expected` records of a topic."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[tuple[int, bytes | None, bytes | None]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                out.extend((tp.partition, r.key, r.value) for r in records)
    finally:
        await consumer.stop()
    return out


async def test_send_many_validates_keeps_or_generates_ids_and_sends(
    servers: Endpoints, unique_name: str
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    events: list[Any] = [
        {"type": "like", "key": "k1", "channel": "v"},
        {"type": "like", "key": "k2", "channel": "v", "id": "mine-\xff"},
        {"type": "like", "key": ""},
        {"type": "dislike", "key": "k3"},
        {"type": "comment", "key": "k4", "channel": "v", "user": "u", "text": "hello"},
        "not an event",
    ]
    async with PipelineClient(topology, servers.kafka_bootstrap) as client:
        results = await client.send_many(events)
        single = await asyncio.gather(*(client.send({"type": "like", "key": f"s{i}"}) for i in range(30)))
        bad_single = await client.send({"type": "like"})
    assert [r.index for r in results] == list(range(len(events)))
    assert [r.accepted for r in results] == [True, True, False, False, True, False]
    assert results[1].id == "mine-\xff" and len(results[0].id or "") == 32
    assert (results[2].field, results[3].field, results[5].field) == ("key", "type", None)
    assert all(r.reason for r in results if not r.accepted)
    assert all(r.accepted for r in single) and len({r.id for r in single}) == 30
    assert not bad_single.accepted and bad_single.field == "key"

    records = await _read_all(servers.kafka_bootstrap, topology.topic("events"), 33)
    values = {orjson.loads(v)["id"]: (k, orjson.loads(v)) for _, k, v in records if v}
    assert len(values) == 33
    key, value = values["mine-\xff"]
    assert key == b"k2" and value == {
        "type": "like",
        "key": "k2",
        "channel": "v",
        "id": "mine-\xff",
        "ts": results[1].ts,  # stamped by the SDK at the send, returned so a retry can carry it
    }
    assert abs(results[1].ts - time.time() * 1000) < 60_000
    assert values[results[4].id or ""][1]["text"] == "hello"


async def test_a_hot_key_is_split_over_distinct_partitions_and_announced(
    servers: Endpoints, unique_name: str
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    splitter = HotKeySplitter(SplitPolicy(threshold_eps=200, budget_eps=100, interval_s=0.2, cooldown_s=0.4))
    client = PipelineClient(topology, servers.kafka_bootstrap, redis_url=servers.redis_url, splitter=splitter)
    redis = aioredis.Redis.from_url(servers.redis_url)
    try:
        await client.start()
        first = await client.send_many([{"type": "like", "key": "viral", "channel": "v"} for _ in range(500)])
        assert {r.sub for r in first} == {0}  # nothing is known about the key yet
        await asyncio.sleep(0.25)
        second = await client.send_many(
            [{"type": "like", "key": "viral", "channel": "v"} for _ in range(3000)]
        )
        partitions = topology.partitions.events
        assert splitter.k("viral") == partitions  # capped by the partition count
        # proposed in the shared split history, in force after the lead (so every writer knows it first)
        assert {r.sub for r in second} == {0}
        deadline = time.monotonic() + 10
        while splitter.router.k_at("viral", int(time.time() * 1000)) != partitions:
            assert time.monotonic() < deadline, "split never took effect"
            await asyncio.sleep(0.02)
        third = await client.send_many(
            [{"type": "like", "key": "viral", "channel": "v"} for _ in range(3000)]
        )
        assert len({r.sub for r in third}) == partitions
        deadline = time.monotonic() + 5
        while (await Reader(topology, redis).splits()).get("viral") != partitions:
            assert time.monotonic() < deadline, "split never announced in Redis"
            await asyncio.sleep(0.05)
        # the key cools down: unsplit and the announcement removed
        deadline = time.monotonic() + 5
        while "viral" in await Reader(topology, redis).splits():
            assert time.monotonic() < deadline, "split never withdrawn"
            await asyncio.sleep(0.1)
    finally:
        await client.stop()
        await redis.aclose()
    records = await _read_all(servers.kafka_bootstrap, topology.topic("events"), 6500)
    landed = {p for p, k, _ in records if k and parse_message_key(k)[1] != 0} | {
        p for p, k, _ in records if k == b"viral"
    }
    assert landed == set(range(partitions))  # every partition took a share of the hot key
    announced = await _read_all(servers.kafka_bootstrap, topology.topic("splits"), 2)
    assert announced[0][1] == b"viral" and orjson.loads(announced[0][2] or b"")["k"] == partitions
    assert announced[1][2] is None  # the tombstone that unsplits it on the compacted topic


async def test_a_split_key_is_counted_exactly_by_the_pipeline(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    pipe.add("coalesce", "c1")
    pipe.add("merge", "m1")
    splitter = HotKeySplitter(SplitPolicy(static_k=8))  # static mode: every key over 8 sub-keys
    ledger: Counter[LedgerKey] = Counter()
    try:
        async with PipelineClient(topology, servers.kafka_bootstrap, splitter=splitter) as client:
            for chunk in range(5):
                events = [{"type": "like", "key": "viral", "channel": "v"} for _ in range(1000)]
                events += [{"type": "like", "key": f"k{i}", "channel": "v"} for i in range(chunk * 10)]
                results = await client.send_many(events)
                assert all(r.accepted for r in results)
                for e in events:
                    ledger[("v", e["key"])] += 1
            # a retry of already-sent events, same ids: acknowledged, not counted
            retried = await client.send_many(
                [{"type": "like", "key": "viral", "channel": "v", "id": r.id} for r in results[:100]]
            )
            assert [r.sub for r in retried] == [r.sub for r in results[:100]]  # same id, same sub-key
        assert len({r.sub for r in results}) > 1
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=30)
        assert got == dict(ledger), pipe.logs()
    finally:
        pipe.stop()


async def test_no_broker_is_a_fast_broker_unavailable(unique_name: str) -> None:
    client = PipelineClient(TOPOLOGY.renamed(unique_name), f"127.0.0.1:{free_port()}", ack_timeout_ms=1000)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await client.start()
    assert time.monotonic() - started < 10  # bounded by the ack timeout, not aiokafka's retries
    with pytest.raises(BrokerUnavailable):
        await client.send_many([{"type": "like", "key": "k"}])
