"""The PostgreSQL sink tier end to end, SIGKILLed mid-stream: tier 1, the root and the sink as
processes; the sink killed while partials flow and started again, three times. Every key's total and
every minute and hour bucket in PostgreSQL equals the ledger exactly once, and agrees with Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from pipeline.harness.local_postgres import PostgresEndpoint
from pipeline.harness.local_servers import Endpoints
from pipeline.io import postgres_sink
from pipeline.read import Reader
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.analytics import TOPOLOGY

pytestmark = pytest.mark.integration

BucketKey = tuple[int, int, str, str]  # (size_s, bucket start, channel, key)
KILLS = 3
EVENTS = 10_000
CHUNK = 250
CHUNK_EVERY_S = 0.75  # 40 chunks: the stream lasts about 30 s


def _events(t0_ms: int, start: int, n: int) -> list[dict[str, object]]:
    # in time order (each partition's watermark only moves forward: nothing is late), 2 s apart: about
    # 5.5 hours and 330 minutes over the whole run
    return [
        {
            "type": "page_view",
            "key": f"/p{i % 37}",
            "channel": f"site{i % 3}",
            "user": f"u{i % 11}",
            "ts": t0_ms + i * 2_000,
            "id": f"e{i}",
        }
        for i in range(start, start + n)
    ]


def _buckets(
    events: list[dict[str, object]], users: dict[BucketKey, set[str]] | None = None
) -> Counter[BucketKey]:
    """Views per (size, bucket, channel, key); `users` gets their distinct visitors (size 0: all time)."""
    out: Counter[BucketKey] = Counter()
    for e in events:
        ts_s = int(e["ts"]) // 1000  # type: ignore[call-overload]
        channel, key = str(e["channel"]), str(e["key"])
        for size in (60, 3600):
            out[(size, ts_s // size * size, channel, key)] += 1
        if users is not None:
            for size in (0, 60, 3600):
                start = ts_s // size * size if size else 0
                users.setdefault((size, start, channel, key), set()).add(str(e["user"]))
    return out


async def _stream(
    bootstrap: str,
    topic: str,
    t0_ms: int,
    ledger: Counter[LedgerKey],
    buckets: Counter[BucketKey],
    users: dict[BucketKey, set[str]],
) -> None:
    """The events, paced: a chunk every CHUNK_EVERY_S; the ledger and the buckets get what was acked."""
    for start in range(0, EVENTS, CHUNK):
        chunk = _events(t0_ms, start, CHUNK)
        await send_events(bootstrap, topic, chunk, ledger)
        buckets += _buckets(chunk, users)
        await asyncio.sleep(CHUNK_EVERY_S)


async def _applied(url: str, topology_name: str) -> int:
    """Events the sink has applied so far (the all-time totals of views)."""
    return sum(v for k, v in (await _postgres_rows(url, topology_name)).items() if k[0] == 0)


async def _postgres_rows(url: str, topology_name: str, metric: str = "views") -> dict[BucketKey, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await postgres_sink.all_rows(conn, TOPOLOGY.renamed(topology_name), metric)
    finally:
        await conn.close()
    return {k: int(v) for k, v in rows.items()}


async def _settled_postgres(
    url: str, name: str, want: int, timeout_s: float, quiet_s: float = 3.0
) -> dict[BucketKey, int]:
    """The rows once the totals reach `want` and nothing changed for `quiet_s` (a late double count
    would show), or what is there when time runs out."""
    deadline = time.monotonic() + timeout_s
    last = await _postgres_rows(url, name)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        got = await _postgres_rows(url, name)
        if got != last:
            last, quiet_since = got, time.monotonic()
        elif (
            sum(v for k, v in got.items() if k[0] == 0) >= want and time.monotonic() - quiet_since >= quiet_s
        ):
            break
    return last


async def test_sink_killed_mid_stream_counts_every_key_and_bucket_once(
    servers: Endpoints, postgres: PostgresEndpoint, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    # small batches: many transactions, so a kill lands between and inside them
    env = {"PIPELINE_POSTGRES": postgres.url, "PIPELINE_SINK_MAX_RECORDS": "3"}
    pipe = Pipeline(servers, topology, "analytics", tmp_path, env=env)
    await pipe.create_topics()
    t0_ms = (int(time.time()) - 6 * 3600) // 3600 * 3600 * 1000  # six hours ago: within the 7 days of minutes
    ledger: Counter[LedgerKey] = Counter()
    buckets: Counter[BucketKey] = Counter()
    users: dict[BucketKey, set[str]] = {}
    try:
        pipe.add("coalesce", "c1")
        pipe.add("coalesce", "c2")
        pipe.add("merge", "m1")
        sink = pipe.add("sink", "s1")
        stream = asyncio.create_task(
            _stream(servers.kafka_bootstrap, topology.topic("events"), t0_ms, ledger, buckets, users)
        )
        applied_at_kill: list[int] = []
        for _ in range(KILLS):
            # once the (re)started sink has applied something more, and while partials still flow
            seen = applied_at_kill[-1] if applied_at_kill else 0
            deadline = time.monotonic() + 60
            while (now := await _applied(postgres.url, topology.name)) <= seen:
                assert time.monotonic() < deadline and not stream.done(), pipe.logs()
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.3)
            sink.kill()  # SIGKILL: no commit, no goodbye, perhaps inside a transaction
            applied_at_kill.append(max(now, await _applied(postgres.url, topology.name)))
            await asyncio.sleep(0.5)
            sink.start()
        await stream
        assert sink.starts == KILLS + 1

        total = sum(ledger.values())
        got = await wait_for_totals(servers.redis_url, topology, "views", ledger, timeout_s=90)
        assert got == dict(ledger), pipe.logs()
        rows = await _settled_postgres(postgres.url, topology.name, total, timeout_s=90)
        totals = {(c, k): v for (size, _b, c, k), v in rows.items() if size == 0}
        assert totals == dict(ledger), pipe.logs()
        assert {k: v for k, v in rows.items() if k[0] != 0} == dict(buckets), pipe.logs()
        # distinct visitors per key, minute and hour: HyperLogLog registers, merged across the kills
        # (a few users a row: counted exactly)
        visitors = await _postgres_rows(postgres.url, topology.name, "visitors")
        assert visitors == {k: len(v) for k, v in users.items()}, pipe.logs()
        # the kills came mid-stream: each after the sink had applied more of the stream, none at its end
        assert all(0 < n < total for n in applied_at_kill), applied_at_kill
        assert applied_at_kill == sorted(applied_at_kill), applied_at_kill
        # and PostgreSQL agrees with Redis, bucket by bucket
        async with Reader.from_url(topology, servers.redis_url) as reader:
            for size, start, channel, key in list(buckets)[:50]:
                bucket = f"{size}:{start}"
                assert await reader.value("views", channel, key, bucket) == rows[(size, start, channel, key)]
        print(
            f"sink killed {KILLS} times; {total} events, {len(rows)} rows exact; "
            f"applied at the kills: {applied_at_kill}"
        )
    finally:
        pipe.stop()
