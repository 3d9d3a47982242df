"""Fail-over on Apache Kafka: a tier-1 worker and a root merger SIGKILLed and never restarted. After
the session timeout the group coordinator removes the dead static members, their partitions go to
the survivors, the survivors fence the dead worker's transactions, and every count stays exact.

Apache Kafka only: the embedded broker never expires a killed static member, so there its partitions
wait for a restart with the same identity (docs/ARCHITECTURE.md, "Fail-over")."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.harness.local_servers import Endpoints
from pipeline.io.partition_owners import owners_key
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

SESSION_TIMEOUT_S = 10.0  # pipeline.io.kafka.consumer's session_timeout_ms
BOUND_S = SESSION_TIMEOUT_S + 10.0


def _events(start: int, n: int) -> list[dict[str, object]]:
    return [
        {"type": "like", "key": f"c{i % 41}", "channel": f"v{i % 3}", "id": f"f{i}"}
        for i in range(start, start + n)
    ]


async def _owners(redis: aioredis.Redis, group: str) -> dict[int, str]:
    raw = await redis.hgetall(owners_key(group))
    return {int(k): v.decode() for k, v in raw.items()}


async def test_killed_workers_partitions_fail_over_within_the_session_timeout(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    if servers.broker_kind != "apache-kafka":
        pytest.skip("fail-over needs Apache Kafka: the embedded broker never expires a killed member")
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    group = topology.group("coalesce")
    redis = aioredis.Redis.from_url(servers.redis_url)
    ledger: Counter[LedgerKey] = Counter()
    try:
        pipe.add("coalesce", "c1")
        victim_c = pipe.add("coalesce", "c2")
        pipe.add("merge", "m1")
        victim_m = pipe.add("merge", "m2")
        async with asyncio.timeout(60):  # both tier-1 workers own partitions
            while {o.split(".")[-2] for o in (await _owners(redis, group)).values()} != {"c1", "c2"}:
                await asyncio.sleep(0.2)
        await send_events(servers.kafka_bootstrap, topology.topic("events"), _events(0, 3000), ledger)
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()

        victim_c.kill()  # SIGKILL, never restarted: no LeaveGroup, the session has to expire
        victim_m.kill()
        killed = time.monotonic()
        await send_events(servers.kafka_bootstrap, topology.topic("events"), _events(3000, 3000), ledger)
        async with asyncio.timeout(BOUND_S + 20):
            while {o.split(".")[-2] for o in (await _owners(redis, group)).values()} != {"c1"}:
                await asyncio.sleep(0.1)
        tier1_takeover_s = time.monotonic() - killed
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=BOUND_S + 30)
        recovered_s = time.monotonic() - killed
        assert got == dict(ledger), pipe.logs()
        await asyncio.sleep(2.0)  # settle: a late duplicate from a zombie would show now
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=5)
        assert got == dict(ledger), pipe.logs()

        measured = (
            f"tier-1 partitions taken over after {tier1_takeover_s:.1f} s, "
            f"all counted after {recovered_s:.1f} s"
        )
        print(measured)
        assert tier1_takeover_s <= BOUND_S, measured
        assert recovered_s <= BOUND_S, measured  # the root's partitions moved too, or nothing would count
        assert pipe.workers[0].running and pipe.workers[2].running, pipe.logs()
    finally:
        pipe.stop()
        await redis.aclose()
