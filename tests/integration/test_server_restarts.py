"""Redis or the broker restarting under a running pipeline loses no count and adds none."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.core.topology import Topology
from pipeline.harness.local_servers import Endpoints
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


def _events(start: int, n: int) -> list[dict[str, object]]:
    return [
        {"type": "like", "key": f"c{i % 37}", "channel": f"v{i % 3}", "id": f"e{i}"}
        for i in range(start, start + n)
    ]


async def _running(
    servers: Endpoints, name: str, tmp_path: Path
) -> tuple[Pipeline, Topology, Counter[LedgerKey]]:
    """A tier-1 worker and a merger that have counted a first 3,000 events."""
    topology = TOPOLOGY.renamed(name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    pipe.add("coalesce", "c1")
    pipe.add("merge", "m1")
    ledger: Counter[LedgerKey] = Counter()
    try:
        await send_events(servers.kafka_bootstrap, topology.topic("events"), _events(0, 3000), ledger)
        assert await wait_for_totals(servers.redis_url, topology, "likes", ledger, 60) == dict(ledger)
    except BaseException:
        pipe.stop()
        raise
    return pipe, topology, ledger


async def test_redis_restart_mid_stream(servers: Endpoints, unique_name: str, tmp_path: Path) -> None:
    if servers.redis is None:
        pytest.skip("needs a local Redis to restart it (PIPELINE_TEST_REDIS points elsewhere)")
    pipe, topology, ledger = await _running(servers, unique_name, tmp_path)
    try:
        servers.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
        await send_events(servers.kafka_bootstrap, topology.topic("events"), _events(3000, 3000), ledger)
        await asyncio.sleep(1.5)  # both tiers now hit a closed port
        servers.redis.start()
        await send_events(servers.kafka_bootstrap, topology.topic("events"), _events(6000, 3000), ledger)
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=90)
        assert got == dict(ledger), pipe.logs()
        assert all(w.running for w in pipe.workers), pipe.logs()
    finally:
        pipe.stop()


async def test_broker_restart_mid_stream(servers: Endpoints, unique_name: str, tmp_path: Path) -> None:
    if servers.broker is None:
        pytest.skip("needs a local broker to restart it (PIPELINE_TEST_KAFKA points elsewhere)")
    pipe, topology, ledger = await _running(servers, unique_name, tmp_path)
    try:
        if servers.broker_kind == "embedded":
            await asyncio.sleep(1.0)  # it snapshots its data ~0.4 s after changes (Apache Kafka: a log)
        servers.broker.stop()  # SIGTERM: the broker flushes and exits
        pipe.add("coalesce", "c2")  # workers that start while the broker is away wait for it
        pipe.add("merge", "m2")
        await asyncio.sleep(2.0)
        servers.broker.start()
        await send_events(servers.kafka_bootstrap, topology.topic("events"), _events(3000, 3000), ledger)
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=90)
        assert got == dict(ledger), pipe.logs()
        assert all(w.running for w in pipe.workers), pipe.logs()
        assert "broker unavailable; retrying" in pipe.workers[2].log_tail(200), pipe.logs()
    finally:
        pipe.stop()


async def test_writes_redis_lost_are_applied_again_from_kafka(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    """Redis restarted from an older state (a crash between AOF fsyncs loses up to a second):
    the root notices that Redis is behind what it applied, and applies those partials again."""
    pipe, topology, ledger = await _running(servers, unique_name, tmp_path)
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{topology.name}:*")]
        older = {k: await client.dump(k) for k in keys}  # Redis as of 3,000 events
        await send_events(servers.kafka_bootstrap, topology.topic("events"), _events(3000, 3000), ledger)
        assert await wait_for_totals(servers.redis_url, topology, "likes", ledger, 60) == dict(ledger)

        merger = pipe.workers[1]
        assert merger.proc is not None
        merger.proc.send_signal(signal.SIGSTOP)  # nothing applies while Redis goes back in time
        try:
            await client.delete(*[k async for k in client.scan_iter(match=f"{topology.name}:*")])
            for key, value in older.items():
                await client.restore(key, 0, value)
        finally:
            merger.proc.send_signal(signal.SIGCONT)
        await send_events(servers.kafka_bootstrap, topology.topic("events"), _events(6000, 1000), ledger)
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        assert "Redis lost applied batches" in merger.log_tail(100), merger.log_tail(30)
    finally:
        await client.aclose()
        pipe.stop()
