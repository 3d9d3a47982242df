"""A rebalance moves partitions, and their deduplication state, to a new owner.

The first worker is mid-window when the second joins: the revoked partitions'
pending window commits whole, so the new owner neither loses nor repeats it.
The new owner rebuilds those partitions' ids from the dedup changelog, so
retries of events the first worker counted, sent after the move, count once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.harness.local_servers import Endpoints
from pipeline.io import kafka
from pipeline.read import Reader
from pipeline.runtime.settings import Settings
from pipeline.tiers.coalesce import CoalesceWorker
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


async def test_partitions_and_their_ids_move_to_a_new_owner_and_count_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    # a long window: the first worker still holds everything uncommitted when the second joins
    topology = dataclasses.replace(TOPOLOGY.renamed(unique_name), flush_interval_ms=4000)
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    ledger: Counter[LedgerKey] = Counter()
    events = [{"type": "like", "key": f"k{i % 60}", "channel": "v", "id": f"e{i}"} for i in range(6000)]
    await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)

    def worker(instance: str) -> CoalesceWorker:
        settings = Settings(
            kafka=servers.kafka_bootstrap, redis=servers.redis_url, instance=instance, max_poll_records=500
        )
        return CoalesceWorker(topology, settings)

    stop = asyncio.Event()
    first = worker("a")
    tasks = [asyncio.create_task(first.run(stop))]
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        async with asyncio.timeout(30):
            while not first.records_in:  # it owns every partition and has a window open
                await asyncio.sleep(0.05)
        second = worker("b")  # joining revokes half of the first one's partitions
        tasks.append(asyncio.create_task(second.run(stop)))
        pipe.add("merge", "m1")
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=90)
        assert got == dict(ledger)
        assert first.events_in + second.events_in == len(events)
        moved = set(second.coalescer.ids_held())  # rebuilt from the changelog the first one wrote
        assert moved and all(second.coalescer.ids(p).committed for p in moved)

        # every event again (retries, same ids and keys: same partitions) and 600 new ones
        fresh = [{"type": "like", "key": f"k{i % 60}", "channel": "v", "id": f"n{i}"} for i in range(600)]
        await send_events(servers.kafka_bootstrap, topology.topic("events"), fresh, ledger, retries=events)
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=90)
        await asyncio.sleep(2.0)  # settle: a retry counted late would show now
        got = await Reader(topology, client).key_totals("likes")
        assert got == dict(ledger)
        stats = await Reader(topology, client).stats()
        assert (stats["events"], stats["deduplicated"]) == (6600, 6000)
        assert second.events_in > 0
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        pipe.stop()
        await client.aclose()
