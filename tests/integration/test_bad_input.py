"""Malformed events go to the dead-letter topic with a reason; the good ones around them all count."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.harness.local_servers import Endpoints
from pipeline.read import Reader
from tests.integration.pipeline_harness import LedgerKey, Pipeline, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

BAD: list[tuple[bytes | None, str]] = [
    (b"not json at all", "not valid JSON"),
    (b'{"type": "like", "key": "k", "value": NaN}', "not valid JSON"),
    (b'{"type": "like", "key": "k", "value": 1e400}', "not valid JSON"),
    (b"[1, 2, 3]", "must be a JSON object"),
    (b'{"type": "like"}', "missing field 'key'"),
    (b'{"type": "like", "key": 17}', "field 'key' must be a string"),
    (b'{"type": "like", "key": "k", "value": "3"}', "field 'value' must be a number"),
    (b'{"type": "like", "key": "k", "ts": -5}', "field 'ts' is out of range"),
    (b'{"type": "rocket", "key": "k"}', "unknown event type"),
    (b'{"type": "like", "key": "k", "sub": 99999}', "field 'sub'"),
    (orjson.dumps({"type": "like", "key": "k", "pad": "x" * 70_000}), "byte limit"),
    (b"\xff\xfe invalid utf-8", "not valid JSON"),
    (None, "empty message"),
]


async def test_bad_events_go_to_dead_letters_and_good_ones_count(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    producer = AIOKafkaProducer(bootstrap_servers=servers.kafka_bootstrap, acks="all")
    await producer.start()
    ledger: Counter[LedgerKey] = Counter()
    try:
        for _ in range(3):
            for i, (raw, _) in enumerate(BAD):
                # every bad event sits between good ones on the same partition
                good = orjson.dumps({"type": "like", "key": f"k{i}", "channel": "v"})
                await producer.send_and_wait(topology.topic("events"), good, key=b"same", partition=0)
                await producer.send_and_wait(topology.topic("events"), raw, key=b"same", partition=0)
                ledger[("v", f"k{i}")] += 1
    finally:
        await producer.stop()
    pipe.add("coalesce", "c1")
    pipe.add("merge", "m1")
    try:
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        dead = await _read_dead_letters(servers.kafka_bootstrap, topology.topic("dead-letters"), 3 * len(BAD))
        assert len(dead) == 3 * len(BAD)
        for (raw, want_reason), (value, headers) in zip(BAD * 3, dead, strict=True):
            assert value == (raw or b"")
            assert want_reason in headers["reason"].decode(), headers
            assert headers["source"].decode().startswith(f"{topology.topic('events')}/0/")
        client = aioredis.Redis.from_url(servers.redis_url)
        stats = await Reader(topology, client).stats()
        await client.aclose()
        assert stats["dead_letters"] == 3 * len(BAD)
        assert stats["events"] == 3 * len(BAD)
        assert all(w.running for w in pipe.workers), pipe.logs()
    finally:
        pipe.stop()


async def _read_dead_letters(bootstrap: str, topic: str, n: int) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level="read_committed"
    )
    await consumer.start()
    out: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend((r.value or b"", dict(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return out
