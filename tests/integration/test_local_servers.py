"""The session's broker and Redis work for real, and the broker keeps data across a restart."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.harness.local_servers import Endpoints
from pipeline.io import kafka

pytestmark = pytest.mark.integration


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    await kafka.ensure_topics(bootstrap, [kafka.TopicSpec(name, partitions)])


async def produce(bootstrap: str, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=f"k{i % 50}".encode(), value=str(i).encode()) for i in range(count)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def consume_all(
    bootstrap: str, topic: str, expected: int, timeout: float = 30.0
) -> dict[int, list[int]]:
    """Read the whole topic from the beginning: partition -> values in offset order."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        partitions = await kafka.partitions_of(admin, topic)
    finally:
        await admin.close()
    assert partitions, f"topic {topic} not found"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen: dict[int, list[int]] = {tp.partition: [] for tp in tps}
        async with asyncio.timeout(timeout):
            while sum(len(v) for v in seen.values()) < expected:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, records in batches.items():
                    seen[tp.partition].extend(int(r.value) for r in records if r.value is not None)
        return seen
    finally:
        await consumer.stop()


async def test_kafka_produce_consume(servers: Endpoints, unique_name: str) -> None:
    topic = f"{unique_name}-events"
    await create_topic(servers.kafka_bootstrap, topic, partitions=3)
    await produce(servers.kafka_bootstrap, topic, 1000)

    seen = await consume_all(servers.kafka_bootstrap, topic, expected=1000)

    assert sorted(v for values in seen.values() for v in values) == list(range(1000))
    assert len(seen) == 3 and all(seen.values()), "keys should spread over all 3 partitions"
    for values in seen.values():
        assert values == sorted(values), "order within a partition is the send order"


async def test_redis_set_get_and_lua(servers: Endpoints, unique_name: str) -> None:
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        await client.set(f"{unique_name}:k", "v")
        assert await client.get(f"{unique_name}:k") == b"v"

        # Lua runs atomically in Redis: the pipeline's merge step relies on this.
        script = """
            redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
            return redis.call('HGET', KEYS[1], ARGV[1])
        """
        key = f"{unique_name}:h"
        assert await client.eval(script, 1, key, "likes", 5) == b"5"
        assert await client.eval(script, 1, key, "likes", 7) == b"12"
    finally:
        await client.aclose()


async def test_broker_keeps_data_across_sigterm_restart(servers: Endpoints, unique_name: str) -> None:
    broker = servers.broker
    if broker is None:
        pytest.skip("external broker: cannot restart it")
    topic = f"{unique_name}-durable"
    await create_topic(servers.kafka_bootstrap, topic, partitions=3)
    await produce(servers.kafka_bootstrap, topic, 300)
    if broker.kind == "embedded":
        await asyncio.sleep(1.0)  # it snapshots ~0.4 s after changes; Apache Kafka has the log

    await asyncio.to_thread(broker.stop)
    assert not broker.running
    await asyncio.to_thread(broker.start)
    assert broker.running

    seen = await consume_all(servers.kafka_bootstrap, topic, expected=300)
    assert sorted(v for values in seen.values() for v in values) == list(range(300))


async def test_redis_keeps_data_across_sigterm_restart(servers: Endpoints, unique_name: str) -> None:
    server = servers.redis
    if server is None:
        pytest.skip("external Redis: cannot restart it")
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        await client.set(f"{unique_name}:durable", "yes")
    finally:
        await client.aclose()

    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)

    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        assert await client.get(f"{unique_name}:durable") == b"yes"
    finally:
        await client.aclose()


def test_the_suite_runs_on_the_broker_it_was_asked_for(servers: Endpoints) -> None:
    """ops/test asks for Apache Kafka wherever a JDK 17+ runs (PIPELINE_LOCAL_BROKER=kafka): then no
    test may quietly run on the embedded broker."""
    asked = os.environ.get("PIPELINE_LOCAL_BROKER")
    if servers.broker is None:
        pytest.skip("external servers (PIPELINE_TEST_KAFKA): not ours to choose")
    expected = {"kafka": "apache-kafka", "embedded": "embedded"}.get(asked or "", servers.broker_kind)
    assert servers.broker_kind == expected
    if asked == "kafka":
        assert len(servers.kafka_bootstrap.split(",")) == 1  # one node for the suite
