"""`pipeline bench redis-baseline` against the real broker and Redis: one command per event, and the
totals in Redis are exactly the events on the topic, per counter, in every mode."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from pipeline import cli
from pipeline.bench.redis_baseline import METRIC, incr_key
from pipeline.core.redis_layout import agg_key
from pipeline.core.windows import TOTAL
from pipeline.harness.local_servers import Endpoints

pytestmark = pytest.mark.integration

EVENTS = 4_000
ROUNDTRIP_EVENTS = 1_500


async def _topic_events(bootstrap: str, topic: str, expected: int) -> list[tuple[str, str]]:
    """(channel, key) of every event on the topic, in partition order, read independently of the bench."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    by_partition: dict[int, list[tuple[str, str]]] = {}
    n = 0
    try:
        for _ in range(200):
            if n >= expected:
                break
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for record in records:
                    event = orjson.loads(record.value)
                    by_partition.setdefault(tp.partition, []).append((event["channel"], event["key"]))
                    n += 1
    finally:
        await consumer.stop()
    return [e for p in sorted(by_partition) for e in by_partition[p]]


async def _redis_counts(
    redis_url: str, prefix: str, mode: str, wanted: set[tuple[str, str]]
) -> Counter[tuple[str, str]]:
    r = aioredis.from_url(redis_url, decode_responses=True)
    out: Counter[tuple[str, str]] = Counter()
    try:
        if mode.startswith("hincrby"):
            for channel in {c for c, _ in wanted}:
                for key, value in (await r.hgetall(agg_key(prefix, METRIC, TOTAL, channel))).items():
                    out[(channel, key)] = int(value)
        else:
            names = [incr_key(prefix, c, k) for c, k in wanted]
            for (c, k), value in zip(wanted, await r.mget(names), strict=True):
                if value is not None:
                    out[(c, k)] = int(value)
    finally:
        await r.aclose()
    return out


def test_every_event_is_one_command_and_totals_match(
    servers: Endpoints, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "bench",
            "redis-baseline",
            "--events",
            str(EVENTS),
            "--roundtrip-events",
            str(ROUNDTRIP_EVENTS),
            "--keys",
            "300",
            "--modes",
            "hincrby_roundtrip,hincrby_pipelined,incr_pipelined,incr_roundtrip",
            "--kafka",
            servers.kafka_bootstrap,
            "--redis",
            servers.redis_url,
            "--json",
        ]
    )
    assert code == 0
    summary = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["exact"] is True
    events = asyncio.run(_topic_events(servers.kafka_bootstrap, summary["topic"], EVENTS))
    assert len(events) == EVENTS
    all_counts = Counter(events)
    for mode, result in summary["modes"].items():
        n = ROUNDTRIP_EVENTS if mode.endswith("_roundtrip") else EVENTS
        assert result["events"] == n
        assert result["redis_commands"] == n
        assert result["redis_total"] == n
        assert result["events_per_s"] > 0
        if mode.endswith("_roundtrip"):
            assert result["round_trips"] == n
            # which n events a round-trip mode took depends on fetch order across partitions,
            # so check that its counters are a sub-multiset of the topic's that sums to n
            got = asyncio.run(_redis_counts(servers.redis_url, result["redis_prefix"], mode, set(all_counts)))
            assert sum(got.values()) == n
            assert all(got[k] <= all_counts[k] for k in got)
        else:
            assert result["round_trips"] < n
            got = asyncio.run(_redis_counts(servers.redis_url, result["redis_prefix"], mode, set(all_counts)))
            assert got == all_counts
