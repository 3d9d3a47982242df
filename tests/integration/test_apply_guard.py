"""A key that holds another type than the apply needs (a trap: someone SET a string where the root keeps a
hash) refuses the whole batch before anything is written. Redis keeps a script's earlier writes when a later
command fails, so without the check the root applied half a batch, died, and applied that half again on
every restart. Now it holds, says so (log line, metric), and once the key is repaired the batch applies
whole: every total exact, no event counted twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.core.redis_layout import agg_key
from pipeline.core.windows import TOTAL
from pipeline.io import redis_query
from pipeline.local_servers import Endpoints
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


async def test_a_wrongly_typed_key_holds_the_batch_whole_until_it_is_repaired(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    redis = aioredis.Redis.from_url(servers.redis_url)
    trap = agg_key(topology.name, "likes", TOTAL, "trapped")
    ledger: Counter[LedgerKey] = Counter()
    try:
        await redis.set(trap, "not a hash")
        pipe.add("coalesce", "c1")
        merger = pipe.add("merge", "m1")
        # one window: channels the root can write and the trapped one, in the same batches
        events = [
            {"type": "like", "key": f"k{i % 23}", "channel": ("trapped", "a-fine", "z-fine")[i % 3]}
            for i in range(3000)
        ]
        await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)
        async with asyncio.timeout(60):
            while "apply refused" not in merger.log_tail(200):
                assert merger.running, merger.log_tail(40)
                await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)  # retried at least once meanwhile: still nothing written
        fine = [agg_key(topology.name, "likes", TOTAL, ch) for ch in ("a-fine", "z-fine")]
        assert await redis.exists(*fine) == 0, "half a batch applied"
        assert (await redis_query.stats(redis, topology.name)).get("events", 0) == 0
        assert merger.running, merger.log_tail(40)
        assert '"key": "' + trap + '"' in merger.log_tail(200) and "holds" in merger.log_tail(200)

        await redis.delete(trap)  # repaired
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        await asyncio.sleep(2.0)  # settle: nothing applied twice after the hold
        assert await redis_query.key_totals(redis, topology.name, "likes") == dict(ledger)
        assert (await redis_query.stats(redis, topology.name))["events"] == len(events)
    finally:
        pipe.stop()
        await redis.aclose()


async def test_the_root_checks_the_redis_version_it_needs(servers: Endpoints) -> None:
    from pipeline.io.redis_sink import MIN_REDIS, RedisSink

    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        version = await RedisSink(client, TOPOLOGY).check_server()
    finally:
        await client.aclose()
    assert tuple(int(x) for x in version.split(".")[:2]) >= MIN_REDIS
