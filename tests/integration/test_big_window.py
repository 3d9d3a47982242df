"""A window of 200,000 cells on Apache Kafka with default broker settings: tier 1 splits its partial
into messages under the broker's ~1 MB limit, and the root counts every key exactly."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from pipeline.harness.local_servers import Endpoints
from pipeline.io import kafka
from pipeline.runtime.settings import Settings
from pipeline.tiers.coalesce import CoalesceWorker
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

CELLS = 200_000


async def test_a_200000_cell_window_is_split_under_the_message_limit_and_counted_exactly(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    # one events partition and one root partition: the whole window is one partial, ~7 MB as JSON
    base = TOPOLOGY.renamed(unique_name).with_partitions(1, 1)
    topology = dataclasses.replace(base, flush_interval_ms=120_000)  # the window closes when full
    assert topology.max_cells == CELLS
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    ledger: Counter[LedgerKey] = Counter()
    events = [{"type": "like", "key": f"long-tail-comment-{i:06d}", "channel": "v"} for i in range(CELLS)]
    await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)

    settings = Settings(kafka=servers.kafka_bootstrap, redis=servers.redis_url, instance="big")
    worker = CoalesceWorker(topology, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    try:
        async with asyncio.timeout(120):
            while worker.events_in < CELLS:
                assert not task.done(), task
                await asyncio.sleep(0.1)
        assert worker.partial_messages > 1, "the 200,000-cell partial should have been split"
        assert 0 < worker.max_partial_bytes_sent <= settings.max_partial_bytes

        pipe.add("merge", "m1")
        # the root process runs the module's topology (3 partials partitions, of which the topic has
        # 1): its keys carry the tags of that partition count, so read them as it wrote them
        as_the_root_runs = TOPOLOGY.renamed(unique_name)
        got = await wait_for_totals(servers.redis_url, as_the_root_runs, "likes", ledger, timeout_s=120)
        assert got == dict(ledger), pipe.logs()
        assert len(got) == CELLS
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        pipe.stop()
