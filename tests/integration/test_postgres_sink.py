"""The sink's PostgreSQL side against a real server: the schema and its migrations, batches with their
offsets in one transaction, replays refused, min/max compared, retention, and the index the 30-day
hourly query uses."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from pipeline.core import hll
from pipeline.core.coalescer import root_partition
from pipeline.core.merger import NOTHING_APPLIED, UNKNOWN, MergedBatch
from pipeline.core.sink_plan import cutoffs, plan_rows
from pipeline.harness.local_postgres import PostgresEndpoint
from pipeline.harness.local_servers import Endpoints
from pipeline.io import postgres_sink
from pipeline.io.postgres_history import PostgresHistory
from pipeline.io.postgres_sink import MIGRATIONS, SCHEMA_VERSION, PostgresSink
from pipeline.io.redis_sink import RedisSink
from pipeline.read import Reader
from pipeline.topology import count, distinct_users, every, maximum, minimum, sum_of, topology, total

pytestmark = pytest.mark.integration

HOUR = every(3600, retention_s=86400)
MINUTE = every(60, retention_s=3600)


def make_topology(name: str) -> Any:
    return topology(
        name,
        metrics=[
            count("views", "v", total(), MINUTE, HOUR),
            sum_of("spent", "v"),
            minimum("lo", "v"),
            maximum("hi", "v"),
        ],
        priorities={"v": 0},
    )


@pytest.fixture
async def conn(postgres: PostgresEndpoint) -> AsyncIterator[asyncpg.Connection]:
    c = await postgres_sink.connect(postgres.url)
    try:
        yield c
    finally:
        await c.close()


def batch(cells: dict[Any, Any], ranges: dict[int, tuple[int, int]], expected: dict[int, int]) -> MergedBatch:
    return MergedBatch(cells=cells, ranges=ranges, expected=expected)


async def test_batches_add_compare_and_keep_their_offsets(conn: asyncpg.Connection, unique_name: str) -> None:
    topo = make_topology(unique_name)
    assert await postgres_sink.migrate(conn, topo) == 0
    assert await postgres_sink.migrate(conn, topo) == SCHEMA_VERSION  # nothing left to do
    for naive in (False, True):  # the batched apply and the naive baseline write the same rows
        if naive:
            await conn.execute(f"DROP SCHEMA {topo.name} CASCADE")
            await postgres_sink.migrate(conn, topo)
        sink = PostgresSink(conn, topo, naive=naive)
        first = batch(
            {
                (0, "site", "/home", "total"): 3,
                (0, "site", "/home", "3600:7200"): 3,
                (1, "site", "/home", "total"): 0.1,
                (2, "site", "/home", "total"): 5,
                (3, "site", "/home", "total"): 5,
            },
            {0: (0, 4), 2: (0, 0)},
            {0: UNKNOWN, 2: UNKNOWN},
        )
        result = await sink.apply(first, plan_rows(topo, first))
        assert result.applied and result.rows == 5
        second = batch(
            {
                (0, "site", "/home", "total"): 2**62,
                (1, "site", "/home", "total"): 0.2,
                (2, "site", "/home", "total"): -1.5,
                (3, "site", "/home", "total"): 4,
                (0, "site", "/about", "3600:7200"): 1,
            },
            {0: (5, 9)},
            {0: 4},
        )
        assert (await sink.apply(second, plan_rows(topo, second))).applied
        rows = await postgres_sink.all_rows(conn, topo, "views")
        assert rows == {
            (0, 0, "site", "/home"): Decimal(2**62 + 3),
            (3600, 7200, "site", "/home"): Decimal(3),
            (3600, 7200, "site", "/about"): Decimal(1),
        }
        assert (await postgres_sink.all_rows(conn, topo, "spent"))[(0, 0, "site", "/home")] == Decimal("0.3")
        assert (await postgres_sink.all_rows(conn, topo, "lo"))[(0, 0, "site", "/home")] == Decimal("-1.5")
        assert (await postgres_sink.all_rows(conn, topo, "hi"))[(0, 0, "site", "/home")] == Decimal(5)
        assert await sink.positions() == {0: 9, 2: 0}

        # a replay (a range at or before the applied offset) writes nothing
        replay = batch({(0, "site", "/home", "total"): 100}, {0: (7, 12), 2: (1, 3)}, {0: UNKNOWN, 2: 0})
        result = await sink.apply(replay, plan_rows(topo, replay))
        assert not result.applied and result.refusal is not None and result.refusal.replay
        assert result.refusal.partition == 0 and result.refusal.held == 9
        # another sink applied more than this one saw: refused too, nothing written
        stale = batch({(0, "site", "/home", "total"): 100}, {2: (1, 3)}, {2: NOTHING_APPLIED})
        result = await sink.apply(stale, plan_rows(topo, stale))
        assert not result.applied and result.refusal is not None and not result.refusal.replay
        assert (await postgres_sink.all_rows(conn, topo, "views"))[(0, 0, "site", "/home")] == Decimal(
            2**62 + 3
        )
        assert await sink.positions() == {0: 9, 2: 0}
    await conn.execute(f"DROP SCHEMA {topo.name} CASCADE")


async def test_an_older_schema_is_migrated(conn: asyncpg.Connection, unique_name: str) -> None:
    topo = make_topology(unique_name)
    s = topo.name
    await conn.execute(f"CREATE SCHEMA {s}")
    await conn.execute(f"CREATE TABLE {s}.migrations (version integer PRIMARY KEY, applied_at timestamptz)")
    for statement in MIGRATIONS[0][1]:
        await conn.execute(statement.format(s=s))
    await conn.execute(f"INSERT INTO {s}.migrations (version) VALUES (1)")
    assert await postgres_sink.migrate(conn, topo) == 1
    versions = [r["version"] for r in await conn.fetch(f"SELECT version FROM {s}.migrations ORDER BY 1")]
    assert versions == [v for v, _ in MIGRATIONS]
    indexes = {
        r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1", s)
    }
    assert "rollups_by_bucket" in indexes
    await conn.execute(f"DROP SCHEMA {s} CASCADE")


async def test_retention_drops_old_minutes_and_keeps_hours(
    conn: asyncpg.Connection, unique_name: str
) -> None:
    topo = make_topology(unique_name)
    await postgres_sink.migrate(conn, topo)
    sink = PostgresSink(conn, topo)
    now = int(time.time())
    old_minute, new_minute = (now - 8 * 86400) // 60 * 60, now // 60 * 60
    old_hour = (now - 400 * 86400) // 3600 * 3600
    cells = {
        (0, "s", "k", f"60:{old_minute}"): 1,
        (0, "s", "k", f"60:{new_minute}"): 2,
        (0, "s", "k", f"3600:{old_hour}"): 3,
    }
    b = batch(cells, {0: (0, 0)}, {0: UNKNOWN})
    assert (await sink.apply(b, plan_rows(topo, b))).applied  # no cutoff given: all written
    policy = {60: 7 * 86400, 3600: 0}
    await sink.record_retention(policy)
    assert await sink.delete_expired(cutoffs(policy, now)) == 1
    rows = await postgres_sink.all_rows(conn, topo, "views")
    assert set(rows) == {(60, new_minute, "s", "k"), (3600, old_hour, "s", "k")}
    # a late partial for a dropped minute does not bring it back
    late = batch({(0, "s", "k", f"60:{old_minute}"): 5}, {0: (1, 1)}, {0: 0})
    plan = plan_rows(topo, late, cutoffs(policy, now))
    assert plan.expired_cells == 1 and not plan.rows
    await conn.execute(f"DROP SCHEMA {topo.name} CASCADE")


async def test_the_hourly_series_of_a_page_is_one_index_range(
    conn: asyncpg.Connection, unique_name: str
) -> None:
    """ "Hourly views of /home over 30 days" reads the primary key's range, not the table."""
    topo = make_topology(unique_name)
    await postgres_sink.migrate(conn, topo)
    s = topo.name
    await conn.execute(
        f"INSERT INTO {s}.rollups (metric, size_s, bucket, channel, key, kind, value) "
        "SELECT 'views', 3600, h * 3600, 'site', 'p' || (h % 500), 0, 1 FROM generate_series(1, 50000) h"
    )
    await conn.execute(f"ANALYZE {s}.rollups")
    plan = "\n".join(
        r[0]
        for r in await conn.fetch(
            f"EXPLAIN SELECT bucket, value FROM {s}.rollups WHERE metric = 'views' AND size_s = 3600 "
            "AND channel = 'site' AND key = 'p7' AND bucket BETWEEN 0 AND 30 * 86400"
        )
    )
    assert "rollups_pkey" in plan and "Seq Scan" not in plan, plan
    hourly = await postgres_sink.bucket_values(
        conn, topo, "views", "site", "p7", 3600, [7 * 3600, 507 * 3600]
    )
    assert hourly == {7 * 3600: 1, 507 * 3600: 1}
    await conn.execute(f"DROP SCHEMA {s} CASCADE")


async def test_the_reader_reads_what_redis_no_longer_holds_from_postgresql(
    conn: asyncpg.Connection, servers: Endpoints, postgres: PostgresEndpoint, unique_name: str
) -> None:
    """Series of a key and of a channel: buckets Redis has come from Redis, the others from the
    sink's rows; without a history they read 0."""
    topo = make_topology(unique_name)
    await postgres_sink.migrate(conn, topo)
    sink = PostgresSink(conn, topo)
    hours = [7200 * 100 + h * 3600 for h in range(4)]
    cells = {(0, "site", "/home", f"3600:{h}"): 10 + i for i, h in enumerate(hours)}
    cells |= {(0, "site", "/about", f"3600:{h}"): 1 for h in hours}
    b = batch(cells, {0: (0, 0)}, {0: UNKNOWN})
    assert (await sink.apply(b, plan_rows(topo, b))).applied
    redis = aioredis.Redis.from_url(servers.redis_url)
    history = PostgresHistory(topo, postgres.url)
    try:
        # Redis holds only the last hour (what the root wrote there, under its retention)
        redis_only = Reader(topo, redis)
        store = RedisSink(redis, topo)
        home = root_partition("/home", topo.partitions.partials)  # the root's partition of the key
        await store.apply(
            MergedBatch(
                cells={(0, "site", "/home", f"3600:{hours[-1]}"): 13},
                ranges={home: (0, 0)},
                expected={home: -1},
            )
        )
        end = hours[-1]
        assert await redis_only.series("views", "site", "/home", size_s=3600, points=4, end_s=end) == [
            (hours[0], 0),
            (hours[1], 0),
            (hours[2], 0),
            (hours[3], 13),
        ]
        reader = Reader(topo, redis, history)
        assert await reader.series("views", "site", "/home", size_s=3600, points=4, end_s=end) == [
            (h, 10 + i) for i, h in enumerate(hours)
        ]
        # the channel's sum per hour: Redis' hour as Redis has it, the older ones summed in PostgreSQL
        assert await reader.series("views", "site", size_s=3600, points=4, end_s=end) == [
            (hours[0], 11),
            (hours[1], 12),
            (hours[2], 13),
            (hours[3], 13),
        ]
    finally:
        await history.aclose()
        await redis.aclose()
        await conn.execute(f"DROP SCHEMA {topo.name} CASCADE")


async def test_distinct_users_merge_as_registers(
    conn: asyncpg.Connection, servers: Endpoints, postgres: PostgresEndpoint, unique_name: str
) -> None:
    """A distinct row holds HyperLogLog registers merged with each batch's under the row's lock, and
    their estimate as its value; batched and naive alike. The reader's history serves them."""
    topo = topology(unique_name, metrics=[distinct_users("users", "v", total(), HOUR)], priorities={"v": 0})
    for naive in (False, True):
        await conn.execute(f"DROP SCHEMA IF EXISTS {topo.name} CASCADE")
        await postgres_sink.migrate(conn, topo)
        sink = PostgresSink(conn, topo, naive=naive)
        first = batch(
            {(0, "s", "k", "total"): {"u1", "u2"}, (0, "s", "k", "3600:0"): {"u1"}}, {0: (0, 0)}, {}
        )
        second = batch(
            {(0, "s", "k", "total"): {"u2", "u3"}, (0, "s", "k", "3600:0"): {"u9"}}, {0: (1, 1)}, {}
        )
        for b in (first, second):
            assert (await sink.apply(b, plan_rows(topo, b))).applied
        assert not (await sink.apply(second, plan_rows(topo, second))).applied  # a replay: refused
        assert await postgres_sink.all_rows(conn, topo, "users") == {
            (0, 0, "s", "k"): Decimal(3),
            (3600, 0, "s", "k"): Decimal(2),
        }
        regs = await conn.fetchval(f"SELECT registers FROM {topo.name}.rollups WHERE size_s = 0")
        assert regs == hll.registers({"u1", "u2", "u3"})
    async with Reader.from_url(topo, servers.redis_url, postgres_url=postgres.url) as reader:
        assert await reader.series("users", "s", "k", size_s=3600, points=2, end_s=3600) == [
            (0, 2),
            (3600, 0),
        ]
    await conn.execute(f"DROP SCHEMA {topo.name} CASCADE")
