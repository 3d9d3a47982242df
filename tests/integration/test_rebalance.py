"""A rebalance that revokes partitions while tier 1 waits for dedup verdicts commits
the pending window whole, so the partitions' new owner neither loses nor repeats it."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from pipeline.io import kafka
from pipeline.io.dedup_store import DedupStore
from pipeline.local_servers import Endpoints
from pipeline.settings import Settings
from pipeline.tiers.coalesce import CoalesceWorker
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


class SlowDedup(DedupStore):
    """The real store, answering late: keeps a worker inside its dedup step during a rebalance."""

    async def duplicates(self, held: list[tuple[int, int, str]]) -> set[tuple[int, int]]:
        await asyncio.sleep(0.7)
        return await super().duplicates(held)


async def test_partitions_revoked_during_dedup_are_counted_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    ledger: Counter[LedgerKey] = Counter()
    events = [{"type": "like", "key": f"k{i % 60}", "channel": "v", "id": f"e{i}"} for i in range(6000)]
    await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)

    def worker(instance: str) -> CoalesceWorker:
        w = CoalesceWorker(
            topology,
            Settings(
                kafka=servers.kafka_bootstrap,
                redis=servers.redis_url,
                instance=instance,
                max_poll_records=500,
            ),
        )
        w.dedup = SlowDedup(w.redis, topology.name, topology.dedup_horizon_s)
        return w

    stop = asyncio.Event()
    first = worker("a")
    tasks = [asyncio.create_task(first.run(stop))]
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    try:
        async with asyncio.timeout(30):
            while not first.records_in:  # it owns every partition and is now deduplicating
                await asyncio.sleep(0.05)
        second = worker("b")  # joining revokes half of the first one's partitions
        tasks.append(asyncio.create_task(second.run(stop)))
        pipe.add("merge", "m1")
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=90)
        assert got == dict(ledger)
        assert second.events_in > 0 and first.events_in + second.events_in == len(events)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        pipe.stop()
