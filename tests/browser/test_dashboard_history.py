"""The dashboard's 30-day hourly chart read from PostgreSQL: a month of page views goes through tier
1, the root (into Redis, whose hourly buckets expire after 5 s here) and the sink (into PostgreSQL,
kept for good); once Redis holds none of them, the chart and the JSON API show every hour exactly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from pipeline.harness.local_postgres import PostgresEndpoint
from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import postgres_sink
from pipeline.read import Reader
from tests.browser.history_topology import TOPOLOGY
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events

pytestmark = [pytest.mark.integration, pytest.mark.browser]

TIMEOUT_MS = 15_000
MODULE = "tests.browser.history_topology"
SITE, PAGE = "example.org", "/home"


def _month_of_views(now_s: int) -> tuple[list[dict[str, object]], Counter[int]]:
    """Views of /home in 60 hours spread over the last 30 days (1 to 5 an hour), and a few of another
    page; in time order. Returns the events and /home's count per hour start."""
    last_hour = now_s // 3600 * 3600 - 3600
    per_hour: Counter[int] = Counter()
    events: list[dict[str, object]] = []
    for i in range(60):
        start = last_hour - (59 - i) * 11 * 3600  # every 11 hours, back 27 days
        n = i % 5 + 1
        per_hour[start] += n
        for j in range(n):
            events.append({"type": "page_view", "key": PAGE, "channel": SITE, "ts": (start + 60 * j) * 1000})
        events.append({"type": "page_view", "key": "/about", "channel": SITE, "ts": (start + 30) * 1000})
    return events, per_hour


async def _wait(predicate: Any, timeout_s: float, what: str, logs: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout_s} s\n{logs()}")
        await asyncio.sleep(0.5)


async def test_the_30_day_hourly_chart_comes_from_postgresql(
    browser: Any, servers: Endpoints, postgres: PostgresEndpoint, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    topology = TOPOLOGY.renamed("t" + uuid.uuid4().hex[:10])
    env = {"PIPELINE_POSTGRES": postgres.url}
    pipe = Pipeline(servers, topology, MODULE, tmp_path, env=env)
    await pipe.create_topics()
    port, operator_key = free_port(), "op-" + uuid.uuid4().hex
    node = WorkerProcess(
        MODULE,
        "broadcast",
        "b1",
        servers.kafka_bootstrap,
        servers.redis_url,
        tmp_path,
        extra_env={
            **env,
            "PIPELINE_BROADCAST_PORT": str(port),
            "PIPELINE_BROADCAST_SECRET": uuid.uuid4().hex,
            "PIPELINE_OPERATOR_API_KEYS": operator_key,
        },
        name=topology.name,
    )
    now_s = int(time.time())
    events, per_hour = _month_of_views(now_s)
    try:
        pipe.add("coalesce", "c1")
        pipe.add("merge", "m1")
        pipe.add("sink", "s1")
        pipe.workers.append(node.start())
        ledger: Counter[LedgerKey] = Counter()
        await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)

        conn = await asyncpg.connect(postgres.url)
        try:

            async def sunk() -> bool:
                rows = await postgres_sink.all_rows(conn, topology, "views")
                return rows.get((0, 0, SITE, PAGE)) == sum(per_hour.values())

            await _wait(sunk, 60, "the sink's totals", pipe.logs)
            rows = await postgres_sink.all_rows(conn, topology, "views")
        finally:
            await conn.close()
        assert {b: int(v) for (size, b, c, k), v in rows.items() if size == 3600 and k == PAGE} == dict(
            per_hour
        )

        async with Reader.from_url(topology, servers.redis_url) as redis_only:

            async def redis_forgot() -> bool:  # the root counted them all, and the hours expired
                total = await redis_only.value("views", SITE, PAGE)
                series = await redis_only.series("views", SITE, PAGE, size_s=3600, points=720, end_s=now_s)
                return total == sum(per_hour.values()) and not any(v for _, v in series)

            await _wait(redis_forgot, 60, "Redis' hourly buckets expiring", pipe.logs)

        # the JSON API: 720 hours, /home's exact count in each, from PostgreSQL
        async with aiohttp.ClientSession(headers={"X-API-Key": operator_key}) as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(
                        f"http://127.0.0.1:{port}/api/series",
                        params={"metric": "views", "channel": SITE, "key": PAGE, "size": 3600, "points": 720},
                    ) as response:
                        if response.status == 200:
                            body = await response.json()
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, pipe.logs()
                await asyncio.sleep(0.3)
        points = {start: value for start, value in body["points"]}
        assert len(points) == 720
        assert {s: v for s, v in points.items() if v} == dict(per_hour)

        # the dashboard's chart: one column per hour over 30 days, each with its exact count
        errors: list[str] = []
        query = f"metric=views&channel={SITE}&key={PAGE}&hours=720&refresh=1000"
        dashboard = f"http://127.0.0.1:{port}/dashboard?{query}"
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{dashboard}#operator-key={operator_key}")
        await expect(page).to_have_url(dashboard, timeout=TIMEOUT_MS)
        columns = page.locator("[data-testid=hours] rect.col")
        await expect(columns).to_have_count(720, timeout=TIMEOUT_MS)
        for start, n in sorted(per_hour.items()):
            column = page.locator(f'[data-testid=hours] rect.col[data-start="{start}"]')
            await expect(column).to_have_attribute("data-value", str(n), timeout=TIMEOUT_MS)
        values = [
            int(float(v or 0)) for v in await columns.evaluate_all("cs => cs.map(c => c.dataset.value)")
        ]
        assert sum(values) == sum(per_hour.values())
        await expect(page.locator("#hours-caption")).to_have_text("last 30 days")
        await page.screenshot(path=str(tmp_path / "dashboard-30-days.png"), full_page=True)
        await page.close()
        assert errors == []
    finally:
        pipe.stop()
