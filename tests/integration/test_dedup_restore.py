"""A window whose commit succeeded on the broker but whose answer was lost: tier 1 takes it for an
abort and forgets the window's ids, although the changelog holds them. It must read them back
(the committed offsets moved past what it saw commit), or retries of those events count twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from pipeline.harness.local_servers import Endpoints
from pipeline.io import kafka
from pipeline.read import Reader
from pipeline.runtime.settings import Settings
from pipeline.tiers.coalesce import CoalesceWorker
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


async def test_a_commit_whose_answer_was_lost_keeps_its_ids(
    servers: Endpoints, unique_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    real = AIOKafkaProducer.transaction
    lost: list[int] = []

    def transaction(self: AIOKafkaProducer) -> Any:
        context = real(self)

        class AnswerLost:
            async def __aenter__(self) -> Any:
                return await context.__aenter__()

            async def __aexit__(self, *exc: Any) -> Any:
                done = await context.__aexit__(*exc)
                if exc[0] is None and not lost:  # committed on the broker; the worker hears a timeout
                    lost.append(1)
                    raise KafkaTimeoutError("the commit's answer was lost")
                return done

        return AnswerLost()

    monkeypatch.setattr(AIOKafkaProducer, "transaction", transaction)
    ledger: Counter[LedgerKey] = Counter()
    events = [{"type": "like", "key": f"k{i % 40}", "channel": "v", "id": f"e{i}"} for i in range(2000)]
    await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)
    settings = Settings(kafka=servers.kafka_bootstrap, redis=servers.redis_url, instance="a")
    worker = CoalesceWorker(topology, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    pipe.add("merge", "m1")
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger) and lost, "the lost answer was not simulated"
        fresh = [{"type": "like", "key": f"k{i % 40}", "channel": "v", "id": f"n{i}"} for i in range(200)]
        await send_events(servers.kafka_bootstrap, topology.topic("events"), fresh, ledger, retries=events)
        await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        await asyncio.sleep(2.0)  # settle: a retry counted late would show now
        assert await Reader(topology, client).key_totals("likes") == dict(ledger)
        stats = await Reader(topology, client).stats()
        assert (stats["events"], stats["deduplicated"]) == (2200, 2000)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        pipe.stop()
        await client.aclose()
