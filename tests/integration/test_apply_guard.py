"""A key that holds another type than the apply needs (a trap: someone SET a string where the root keeps a
hash) refuses the whole batch before anything is written. Redis keeps a script's earlier writes when a later
command fails, so without the check the root applied half a batch, died, and applied that half again on
every restart. Now it holds, says so (log line, metric), and once the key is repaired the batch applies
whole: every total exact, no event counted twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.core.redis_layout import agg_key, partition_tag
from pipeline.core.windows import TOTAL
from pipeline.harness.local_servers import Endpoints
from pipeline.io import redis_query
from pipeline.topology import count, distinct_users, every, maximum, minimum, sum_of, topology, total
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


async def test_a_wrongly_typed_key_holds_the_batch_whole_until_it_is_repaired(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    redis = aioredis.Redis.from_url(servers.redis_url)
    # the trapped channel's hash in every root partition (each partition applies on its own)
    parts = range(topology.partitions.partials)
    tags = [partition_tag(topology.name, p, len(parts)) for p in parts]
    traps = [agg_key(t, "likes", TOTAL, "trapped") for t in tags]
    ledger: Counter[LedgerKey] = Counter()
    try:
        for trap in traps:
            await redis.set(trap, "not a hash")
        pipe.add("coalesce", "c1")
        merger = pipe.add("merge", "m1")
        # one window: channels the root can write and the trapped one, in the same batches
        events = [
            {"type": "like", "key": f"k{i % 23}", "channel": ("trapped", "a-fine", "z-fine")[i % 3]}
            for i in range(3000)
        ]
        await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)
        async with asyncio.timeout(60):
            while "apply refused" not in merger.log_tail(200):
                assert merger.running, merger.log_tail(40)
                await asyncio.sleep(0.2)
        await asyncio.sleep(3.0)  # retried at least once meanwhile: still nothing written
        fine = [agg_key(t, "likes", TOTAL, ch) for ch in ("a-fine", "z-fine") for t in tags]
        assert await redis.exists(*fine) == 0, "half a batch applied"
        assert (await redis_query.stats(redis, topology)).get("events", 0) == 0
        assert merger.running, merger.log_tail(40)
        assert any('"key": "' + trap + '"' in merger.log_tail(200) for trap in traps)
        assert "holds" in merger.log_tail(200)

        await redis.delete(*traps)  # repaired
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        await asyncio.sleep(2.0)  # settle: nothing applied twice after the hold
        assert await redis_query.key_totals(redis, topology, "likes") == dict(ledger)
        assert (await redis_query.stats(redis, topology))["events"] == len(events)
    finally:
        pipe.stop()
        await redis.aclose()


async def test_the_root_checks_the_redis_version_it_needs(servers: Endpoints) -> None:
    from pipeline.io.redis_sink import MIN_REDIS, RedisSink

    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        version = await RedisSink(client, TOPOLOGY).check_server()
    finally:
        await client.aclose()
    assert tuple(int(x) for x in version.split(".")[:2]) >= MIN_REDIS


SHOP = topology(
    "shop",
    metrics=[
        count("likes", "like", total(), every(60, 3600), leaderboard=10),
        sum_of("amount", "like"),
        minimum("lo", "like"),
        maximum("hi", "like"),
        distinct_users("viewers", "like"),
    ],
    priorities={"like": 0},
)


def _cells() -> dict[Any, Any]:
    return {
        (0, "v", "c1", TOTAL): 5,
        (0, "v", "c2", TOTAL): 3,
        (0, "v", "c1", "60:0"): 5,
        (1, "v", "c1", TOTAL): 2.5,
        (2, "v", "c1", TOTAL): -1.0,
        (3, "v", "c1", TOTAL): 7.0,
        (4, "v", "c1", TOTAL): {"u1", "u2"},
    }


async def test_a_value_a_command_would_fail_on_refuses_the_batch_before_any_write(
    servers: Endpoints, unique_name: str
) -> None:
    """HINCRBY needs an integer, HINCRBYFLOAT and min/max a finite number, PFADD a HyperLogLog: a field (or a
    key) holding anything else refuses the whole batch, named, and nothing of it is written."""
    from pipeline.core.merger import MergedBatch
    from pipeline.core.redis_layout import seq_key, stats_key, top_key, uniq_key

    t0 = partition_tag(unique_name, 0, 3)  # the batches below are partition 0's
    from pipeline.io.redis_sink import RedisSink

    shop = SHOP.renamed(unique_name)
    name = shop.name
    client = aioredis.Redis.from_url(servers.redis_url)
    sink = RedisSink(client, shop)
    traps = [  # (key, field or None for the whole key, value, what the refusal says it holds)
        (agg_key(t0, "likes", TOTAL, "v"), "c2", "1.5", 'field "c2" = "1.5"'),
        (agg_key(t0, "likes", TOTAL, "v"), "c1", str(2**63 - 2), f'field "c1" = "{2**63 - 2}"'),
        (agg_key(t0, "amount", TOTAL, "v"), "c1", "abc", 'field "c1" = "abc"'),
        (agg_key(t0, "amount", TOTAL, "v"), "c1", "inf", 'field "c1" = "inf"'),
        (agg_key(t0, "lo", TOTAL, "v"), "c1", "nan", 'field "c1" = "nan"'),
        (agg_key(t0, "hi", TOTAL, "v"), "c1", " 7", 'field "c1" = " 7"'),
        (seq_key(t0), "v", "x", 'field "v" = "x"'),
        (stats_key(t0), "events", "1.0", 'field "events" = "1.0"'),
        (uniq_key(t0, "viewers", TOTAL, "v", "c1"), None, "not a hyperloglog", "a string that is not"),
        (top_key(t0, "likes", "v"), None, "a string", "string"),
    ]
    try:
        for key, field, value, holds in traps:
            if field is None:
                await client.set(key, value)
            else:
                await client.hset(key, field, value)
            before = {k: await client.dump(k) for k in await client.keys(f"{name}:*")}
            result = await sink.apply(
                MergedBatch(cells=_cells(), ranges={0: (0, 3)}, events=9, expected={0: -1})
            )
            assert not result.applied and result.refused is not None, (key, field, value)
            assert result.refused.key == key and result.refused.holds.startswith(holds), result.refused
            after = {k: await client.dump(k) for k in await client.keys(f"{name}:*")}
            assert after == before, f"written although refused ({key})"
            await client.delete(key)
        result = await sink.apply(MergedBatch(cells=_cells(), ranges={0: (0, 3)}, events=9, expected={0: -1}))
        assert result.applied and result.refused is None
    finally:
        await client.aclose()


async def test_the_plan_counts_the_commands_the_script_runs(servers: Endpoints, unique_name: str) -> None:
    """`plan.commands` (the coalescing-ratio metric and T:stats.redis_commands) is what Redis counted."""
    from pipeline.core.merger import MergedBatch
    from pipeline.io.redis_sink import RedisSink

    shop = SHOP.renamed(unique_name)
    client = aioredis.Redis.from_url(servers.redis_url)
    sink = RedisSink(client, shop)
    not_counted = {"evalsha", "eval", "script|load", "info", "zremrangebyrank"}

    async def calls() -> Counter[str]:
        stats = await client.info("commandstats")
        return Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()})

    try:
        await sink.apply(MergedBatch(cells={(0, "w", "k", TOTAL): 1}, ranges={1: (0, 0)}, expected={1: -1}))
        big: dict[Any, Any] = {(0, "v", f"k{i}", TOTAL): i + 1 for i in range(1500)}
        big[(4, "v", "c9", TOTAL)] = {f"u{i}" for i in range(1500)}  # two PFADDs
        for batch in (
            MergedBatch(cells=_cells(), ranges={0: (0, 3)}, events=9, partials=2, expected={0: -1}),
            MergedBatch(cells=_cells(), ranges={2: (0, 0)}, events=1, expected={2: -1}),
            MergedBatch(cells=big, ranges={0: (4, 6)}, expected={0: 3}),
        ):
            before = await calls()
            result = await sink.apply(batch)
            assert result.applied
            ran = await calls() - before
            counted = sum(n for command, n in ran.items() if command not in not_counted)
            assert counted == result.plan.commands, dict(ran)
    finally:
        await client.aclose()


async def test_counts_stay_exact_where_a_lua_number_cannot_hold_them(
    servers: Endpoints, unique_name: str
) -> None:
    """The script adds counts itself and writes them with one HSET; a sum at or over 2^53, which a Lua
    number cannot hold exactly, goes through HINCRBY. Either way Redis holds the exact integer, and the
    apply's reply (the new values the broadcast pushes) says the same."""
    from pipeline.core.merger import MergedBatch
    from pipeline.io.redis_sink import RedisSink

    shop = SHOP.renamed(unique_name)
    client = aioredis.Redis.from_url(servers.redis_url)
    sink = RedisSink(client, shop)
    t0 = partition_tag(shop.name, 0, 3)
    key = agg_key(t0, "likes", TOTAL, "v")
    held = {"below": 10**15 + 1, "edge": 2**53 - 3, "over": 2**53 + 1, "far": 2**62, "neg": -(2**53) + 2}
    adds = {"below": 2, "edge": 2, "over": 7, "far": 12345, "neg": -5, "new": 3}
    try:
        await client.hset(key, mapping={f: str(v) for f, v in held.items()})
        cells: dict[Any, Any] = {(0, "v", field, TOTAL): n for field, n in adds.items()}
        result = await sink.apply(MergedBatch(cells=cells, ranges={0: (0, 0)}, expected={0: -1}))
        assert result.applied, result
        want = {f: held.get(f, 0) + n for f, n in adds.items()}
        stored = {k.decode(): int(v) for k, v in (await client.hgetall(key)).items()}
        assert stored == want
        board = await client.zrange(f"{t0}:top:likes:v", 0, -1, withscores=True)
        assert {m.decode() for m, _ in board} == set(adds)
        replied = dict(zip([r[2] for r in result.plan.reports if r], result.values, strict=False))
        assert {f: int(v) for f, v in replied.items()} == want
    finally:
        await client.aclose()
