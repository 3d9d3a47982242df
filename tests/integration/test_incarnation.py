"""A worker restarted after a crash mid-transaction: its open transaction is
aborted, and a read_committed reader that resumes *after* that abort still
sees everything the new incarnation commits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.harness.local_servers import Endpoints
from pipeline.io import incarnation, kafka

pytestmark = pytest.mark.integration

CRASHING_WORKER = r"""
import asyncio, sys
from pipeline.io import kafka
async def main():
    p = kafka.transactional_producer(sys.argv[1], sys.argv[2])
    await p.start()
    await p.begin_transaction()
    await (await p.send(sys.argv[3], b"never-committed", partition=0))
    print("open", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


async def _read_from(bootstrap: str, tp: TopicPartition, offset: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        out: list[bytes] = []
        for _ in range(6):
            for records in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(r.value or b"" for r in records)
        return out
    finally:
        await consumer.stop()


async def test_restart_aborts_the_crashed_transaction_and_later_commits_stay_visible(
    servers: Endpoints, unique_name: str
) -> None:
    topic = f"{unique_name}.out"
    await kafka.ensure_topics(servers.kafka_bootstrap, [kafka.TopicSpec(topic, 1)])
    client = aioredis.Redis.from_url(servers.redis_url)
    group = f"{unique_name}.coalesce"
    first = await incarnation.begin(client, servers.kafka_bootstrap, group, "w1")
    crashed = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WORKER, servers.kafka_bootstrap, first, topic], stdout=subprocess.PIPE
    )
    assert crashed.stdout is not None and crashed.stdout.readline().strip() == b"open"
    crashed.kill()
    crashed.wait()

    second = await incarnation.begin(client, servers.kafka_bootstrap, group, "w1")
    assert second != first
    producer = kafka.transactional_producer(servers.kafka_bootstrap, second)
    await producer.start()
    for i in range(3):
        async with producer.transaction():
            await producer.send(topic, f"committed-{i}".encode(), partition=0)
    await producer.stop()
    await client.aclose()

    tp = TopicPartition(topic, 0)
    everything = await _read_from(servers.kafka_bootstrap, tp, 0)
    assert everything == [b"committed-0", b"committed-1", b"committed-2"]
    # Resume points after the aborted transaction's marker, as a restarted merger would.
    # offsets: 0 aborted record, 1 abort marker, 2 committed-0, 3 marker, 4 committed-1, ...
    for start, expected in [(2, 3), (3, 2), (4, 2), (5, 1)]:
        assert len(await _read_from(servers.kafka_bootstrap, tp, start)) == expected, start
