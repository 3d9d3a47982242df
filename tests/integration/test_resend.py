"""When the broker does not acknowledge, the caller is never left without the ids of events whose fate is
unknown: `BrokerUnavailable` carries a result per event, and resending what it names (with the same id
and sub) counts every event exactly once, even though the first copies reach the broker later."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline.client import BrokerUnavailable, PipelineClient
from pipeline.harness.local_servers import Endpoints
from tests.integration.pipeline_harness import LedgerKey, Pipeline, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


async def test_the_caller_resends_what_broker_unavailable_names_and_each_event_counts_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    broker = servers.broker
    if broker is None or broker.pid is None:
        pytest.skip("needs a local broker to freeze (PIPELINE_TEST_KAFKA points elsewhere)")
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    ledger: Counter[LedgerKey] = Counter()
    first: list[dict[str, Any]] = [{"type": "like", "key": f"a{i % 13}", "channel": "v"} for i in range(400)]
    # no ids given: the SDK makes them, and the error must hand them back
    frozen: list[dict[str, Any]] = [{"type": "like", "key": f"b{i % 17}", "channel": "w"} for i in range(600)]
    frozen += [{"type": "like", "key": "c", "channel": "w", "id": f"mine-{i}"} for i in range(50)]
    try:
        pipe.add("coalesce", "c1")
        pipe.add("merge", "m1")
        async with PipelineClient(topology, servers.kafka_bootstrap, ack_timeout_ms=1500) as client:
            assert all(r.accepted for r in await client.send_many(first))
            for ev in first:
                ledger[(ev["channel"], ev["key"])] += 1

            os.kill(broker.pid, signal.SIGSTOP)  # the requests go out; no acknowledgement comes back
            try:
                with pytest.raises(BrokerUnavailable) as caught:
                    await client.send_many(frozen)
            finally:
                os.kill(broker.pid, signal.SIGCONT)  # the first copies may now be written after all
            error = caught.value
            assert len(error.results) == len(frozen)
            assert all(r.unknown and not r.accepted and r.id for r in error.results)
            assert [r.id for r in error.results[-50:]] == [f"mine-{i}" for i in range(50)]
            for ev in frozen:
                ledger[(ev["channel"], ev["key"])] += 1

            resend = error.resend(frozen)
            assert len(resend) == len(frozen) and all(ev["id"] for ev in resend)
            for _ in range(20):  # until the broker answers again
                try:
                    results = await client.send_many(resend)
                    break
                except BrokerUnavailable as again:
                    resend = again.resend(resend)
                    await asyncio.sleep(0.5)
            else:
                raise AssertionError("the broker never came back")
            assert all(r.accepted for r in results)

        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        await asyncio.sleep(1.5)  # settle: a late first copy must not add to the totals
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=5)
        assert got == dict(ledger), pipe.logs()
    finally:
        pipe.stop()
