"""Two tier-1 workers that both believe they own the same partitions — a member
that missed a rebalance, or a broker that forgot the group on a restart —
commit each record's window once: the later claimant fences the earlier one,
whose pending window then aborts instead of committing a second time."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from pipeline.harness.local_servers import Endpoints
from pipeline.io import kafka
from pipeline.runtime.settings import Settings
from pipeline.tiers.coalesce import CoalesceWorker
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


async def test_a_zombie_owner_is_fenced_and_its_window_counted_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    ledger: Counter[LedgerKey] = Counter()
    events = [{"type": "like", "key": f"k{i % 40}", "channel": f"v{i % 3}"} for i in range(3000)]
    await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)

    def settings(instance: str) -> Settings:
        return Settings(kafka=servers.kafka_bootstrap, redis=servers.redis_url, instance=instance)

    # The zombie: a group member with a window that stays open until the test closes it.
    zombie = CoalesceWorker(dataclasses.replace(topology, flush_interval_ms=600_000), settings("a"))
    stop_zombie, stop_rival = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(zombie.run(stop_zombie))]
    rival = CoalesceWorker(topology, settings("b"))
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    try:
        async with asyncio.timeout(30):
            while zombie.records_in < len(events):  # everything folded, nothing committed
                await asyncio.sleep(0.05)
        assert zombie.events_in == 0
        owned = set(zombie.consumer.assignment())
        assert len(owned) == topology.partitions.events

        # The rival: gets the same partitions without the zombie being told (no rebalance).
        await rival._new_producer()
        await rival.consumer.start()
        rival.consumer.assign(sorted(owned, key=lambda tp: tp.partition))
        rival.assigned(owned)
        tasks.append(asyncio.create_task(rival._loop(stop_rival)))
        async with asyncio.timeout(30):
            while rival.events_in < len(events):
                await asyncio.sleep(0.05)

        await zombie.flush()  # the zombie's window closes late: it must not commit
        assert zombie.events_in == 0
        assert zombie._held == owned  # and it stops reading what the rival owns

        pipe.add("merge", "m1")
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        committed = {tp.partition: await rival.consumer.committed(tp) for tp in owned}
        ends = await rival.consumer.end_offsets(list(owned))
        assert committed == {tp.partition: ends[TopicPartition(tp.topic, tp.partition)] for tp in owned}
    finally:
        stop_zombie.set()
        stop_rival.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rival.consumer.stop()
        await rival.producer.stop()
        pipe.stop()
