"""The analytics topology end to end: per-minute and per-hour rollups with retention,
distinct visitors, and late events corrected within grace or dropped and counted."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.core.redis_layout import agg_key, key_tag
from pipeline.harness.local_servers import Endpoints
from pipeline.read import Reader
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.analytics import TOPOLOGY

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000 // 3_600_000 * 3_600_000  # the start of an hour, in ms
MIN = 60_000


async def test_rollups_distinct_visitors_and_late_events(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "analytics", tmp_path)
    await pipe.create_topics()
    page, site = "/home?q=a:b", "example.org"

    def view(ts: int, user: str) -> dict[str, object]:
        return {"type": "page_view", "key": page, "channel": site, "ts": ts, "user": user}

    events = [view(T0 + i * 1000, f"u{i % 7}") for i in range(30)]  # minute 0: 30 views, 7 visitors
    events += [view(T0 + 10 * MIN + i * 1000, f"u{i % 3}") for i in range(5)]  # minute 10: 5 views
    events += [view(T0 + 10 * MIN - 5_000, "u-late-ok")]  # minute 9, 5 s late: within 30 s grace
    events += [view(T0 + 2 * MIN, "u-too-late")]  # minute 2, 8 minutes late: dropped from minutes
    events += [{"type": "click", "key": page, "channel": site, "ts": T0 + 10 * MIN, "user": "u1"}]
    ledger: Counter[LedgerKey] = Counter()
    # one key, so one partition and one watermark, sent in order
    await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)
    pipe.add("coalesce", "c1")
    pipe.add("merge", "m1")
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        views = Counter({(site, page): 37})
        got = await wait_for_totals(servers.redis_url, topology, "views", views, timeout_s=60)
        assert got == dict(views), pipe.logs()
        reader = Reader(topology, client)
        assert await reader.key_totals("clicks") == {(site, page): 1}

        def minute(m: int) -> str:
            return f"60:{(T0 + m * MIN) // 1000}"

        assert await reader.value("views", site, page, minute(0)) == 30
        assert await reader.value("views", site, page, minute(10)) == 5
        assert await reader.value("views", site, page, minute(9)) == 1  # late, but within grace
        assert page not in await reader.values("views", site, minute(2))  # too late for its minute
        hour = f"3600:{T0 // 1000}"
        assert await reader.value("views", site, page, hour) == 37  # the hour was still open for all of them
        # retention: the bucket's key expires (the one layout detail this test checks directly)
        ttl = await client.ttl(agg_key(key_tag(topology, page), "views", minute(0), site))
        assert 0 < ttl <= 2 * 24 * 3600

        assert await reader.distinct("visitors", site, page) == 9  # u0..u6, u-late-ok, u-too-late
        assert await reader.distinct("visitors", site, page, minute(0)) == 7

        stats = await reader.stats()
        # the too-late view is dropped from its minute bucket twice: views and visitors
        assert stats["late_dropped"] == 2
        assert stats["events"] == len(events)
    finally:
        await client.aclose()
        pipe.stop()
