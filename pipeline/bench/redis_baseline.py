"""`pipeline bench redis-baseline`: every event applied to Redis as its own command, no coalescing.

The yardstick tier 1 + tier 2 are measured against: what a consumer that skips
the reduction can write. It reads a pre-loaded events topic (the same events as
`bench coalesce`, pipeline/bench/workload.py) with tier 1's consumer settings and
applies each event as one command, in one of these modes:

- hincrby_roundtrip: `HINCRBY <agg key of the channel> <key> 1`, awaited one by
  one (one network round trip per event: the naive per-event writer);
- hincrby_pipelined: the same commands, sent as one pipeline per fetched batch
  (still one command per event, but one round trip per batch);
- incr_pipelined / incr_roundtrip: `INCR <channel>:<key>` on a string key per
  counter instead of a hash field.

Each mode reads the topic as a fresh consumer group and writes under its own
Redis prefix, so every mode applies the same events to the same Redis. The
clock runs from the first record to the last reply. At the end the totals in
Redis are summed and compared with the events applied (`exact`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.bench.coalesce_bench import MAX_RECORDS, BenchError, _Progress, _Stopwatch, machine, say
from pipeline.bench.workload import preload
from pipeline.core.redis_layout import agg_key
from pipeline.core.windows import TOTAL
from pipeline.harness.local_servers import servers_or_local
from pipeline.io import kafka
from pipeline.runtime import observability as obs

MODES = ("hincrby_roundtrip", "hincrby_pipelined", "incr_pipelined", "incr_roundtrip")
DEFAULT_MODES = ("hincrby_roundtrip", "hincrby_pipelined", "incr_pipelined")
PARTITIONS = 6  # like live_likes' events topic
LOADER_PROCESSES = 2
METRIC = "likes"


def incr_key(prefix: str, channel: str, key: str) -> str:
    """The string key the INCR modes count one (channel, key) under."""
    return f"{prefix}:incr:{METRIC}:{channel}:{key}"


async def apply_events(
    bootstrap: str, redis_url: str, topic: str, group: str, events: int, mode: str, prefix: str
) -> dict[str, Any]:
    """Consume the first `events` events of `topic` and apply each as its own Redis command."""
    pipelined = mode.endswith("_pipelined")
    use_hash = mode.startswith("hincrby")
    consumer = kafka.consumer(bootstrap, topic, group, "bench", read_committed=True, max_records=MAX_RECORDS)
    r = aioredis.from_url(redis_url)
    loads = orjson.loads
    n = 0
    batches = 0
    progress = _Progress(mode, events)
    watch: _Stopwatch | None = None
    consumer.subscribe([topic])
    await consumer.start()
    try:
        while n < events:
            fetched = await consumer.getmany(timeout_ms=200, max_records=MAX_RECORDS)
            if fetched and watch is None:
                watch = _Stopwatch()  # like the ceiling: from the first record, not from the group join
            pipe = r.pipeline(transaction=False) if pipelined else None
            target = pipe if pipe is not None else r
            for records in fetched.values():
                for record in records[: events - n]:
                    event = loads(record.value)
                    if use_hash:
                        cmd = target.hincrby(
                            agg_key(prefix, METRIC, TOTAL, event["channel"]), event["key"], 1
                        )
                    else:
                        cmd = target.incr(incr_key(prefix, event["channel"], event["key"]))
                    if pipe is None:
                        await cmd
                    n += 1
                if n >= events:
                    break
            if pipe is not None and len(pipe):
                await pipe.execute()
                batches += 1
            progress.update(n)
        assert watch is not None
        elapsed = watch.read()
        total = await redis_total(r, prefix, mode)
    finally:
        await consumer.stop()
        await r.aclose()
    return {
        "events": n,
        "events_per_s": round(n / elapsed.wall_s) if elapsed.wall_s else 0,
        "seconds": round(elapsed.wall_s, 3),
        "cpu_s": round(elapsed.cpu_s, 3),
        "redis_commands": n,
        "round_trips": batches if pipelined else n,
        "redis_total": total,
        "exact": total == n,
        "redis_prefix": prefix,
    }


async def redis_total(r: aioredis.Redis, prefix: str, mode: str) -> int:
    """The sum of every counter a mode wrote under `prefix`."""
    total = 0
    if mode.startswith("hincrby"):
        async for name in r.scan_iter(match=agg_key(prefix, METRIC, TOTAL, "*"), count=1000):
            total += sum(int(v) for v in await r.hvals(name))
    else:
        names = [name async for name in r.scan_iter(match=f"{prefix}:incr:*", count=1000)]
        for i in range(0, len(names), 1000):
            total += sum(int(v) for v in await r.mget(names[i : i + 1000]) if v is not None)
    return total


def run(
    bootstrap: str,
    redis_url: str,
    events: int,
    keys: int,
    modes: tuple[str, ...] = DEFAULT_MODES,
    roundtrip_events: int | None = None,
) -> dict[str, Any]:
    """Pre-load `events` events once, then apply them to Redis per event in each mode.

    Round-trip modes take only the first `roundtrip_events` of them (one round trip
    per event is slow enough that the full backlog would dominate a suite run).
    """
    base = "bench_rb_" + uuid.uuid4().hex[:8]
    topic = f"{base}.events"
    asyncio.run(kafka.ensure_topics(bootstrap, [kafka.TopicSpec(topic, PARTITIONS)]))
    say(f"redis baseline: pre-loading {events:,} events on {topic} ({PARTITIONS} partitions)")
    preload_eps = preload(bootstrap, topic, PARTITIONS, events, keys, processes=LOADER_PROCESSES)
    say(f"pre-loaded at {preload_eps:,.0f} events/s")
    rt_events = min(events, roundtrip_events or events)
    out: dict[str, Any] = {}
    for mode in modes:
        n = rt_events if mode.endswith("_roundtrip") else events
        say(f"redis baseline: {mode}, {n:,} events, one command per event")
        res = asyncio.run(
            apply_events(bootstrap, redis_url, topic, f"{base}.{mode}", n, mode, f"{base}_{mode}")
        )
        say(
            f"{mode}: {res['events_per_s']:,} events/s, {res['round_trips']:,} round trips, "
            f"Redis total {res['redis_total']:,} ({'exact' if res['exact'] else 'WRONG'})"
        )
        out[mode] = res
    return {
        "modes": out,
        "exact": all(m["exact"] for m in out.values()),
        "topic": topic,
        "preload_eps": round(preload_eps),
        "params": {
            "events": events,
            "roundtrip_events": rt_events,
            "keys": keys,
            "partitions": PARTITIONS,
            "channels": 50,
            "modes": list(modes),
        },
        "machine": machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench redis-baseline` (flags are defined in pipeline/cli/)."""
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if args.events <= 0 or args.keys <= 0 or not modes or bad:
        print(
            "pipeline bench redis-baseline: --events and --keys must be positive, --modes from "
            + ", ".join(MODES),
            file=sys.stderr,
        )
        return 2
    obs.configure_logging("warning")
    try:
        with servers_or_local(args.kafka, args.redis, say=say, broker=args.broker) as (kafka_url, redis_url):
            summary = run(kafka_url, redis_url, args.events, args.keys, modes, args.roundtrip_events)
    except BenchError as exc:
        print(f"pipeline bench redis-baseline: {exc}", file=sys.stderr)
        return 1
    print(f"{'mode':20}{'events':>10}{'events/s':>12}{'round trips':>13}{'Redis total':>13}  exact")
    for mode, r in summary["modes"].items():
        print(
            f"{mode:20}{r['events']:>10,}{r['events_per_s']:>12,}{r['round_trips']:>13,}"
            f"{r['redis_total']:>13,}  {r['exact']}"
        )
    if args.json:
        print(orjson.dumps(summary).decode())
    return 0 if summary["exact"] else 1
