"""`pipeline bench cardinality`: the pipeline beside a per-event writer, from 1 to 100 events per key.

Coalescing pays when keys repeat inside a window; when most keys see one event per
window it can only break even. This benchmark measures where the pipeline stands at
several events-per-key ratios, each in one run beside its baseline:

- a backlog of `ratio` events per key, each key's events next to each other (so they
  share a window), live_likes likes over 50 channels;
- **pipeline**: one tier-1 worker and one root as processes (`pipeline run`), started on
  the empty topics and ready before the backlog is written; the clock runs from the first
  event written until Redis `T:stats.events` equals the backlog: exactly once, end to end;
- **baseline**: the same backlog on its own topic, applied by one consumer as one pipelined
  `HINCRBY` per event and fetched batch (`bench redis-baseline`'s hincrby_pipelined), timed
  from its first record to its last reply.

Reported per ratio: `pipeline_eps`, `baseline_eps`, `ratio` (pipeline / baseline),
`redis_commands_per_cell` (T:stats `redis_commands` over the cells tier 1 sent),
`max_partial_bytes` (largest partial message on `T.partials`) and `tier1_peak_rss_mb`
(the tier-1 process's VmHWM). `--plot DIR` draws the ratio curve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from pipeline.bench import redis_baseline
from pipeline.bench.coalesce_bench import BenchError, machine, say
from pipeline.core.coalescer import tier1_memory_bound
from pipeline.core.model import Partial
from pipeline.core.planner import Drain, drain
from pipeline.core.topology import Topology
from pipeline.harness.local_servers import servers_or_local
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import kafka, redis_query
from pipeline.io.partition_owners import owners_key
from pipeline.runtime import observability as obs
from topologies.live_likes import TOPOLOGY as LIVE_LIKES

RATIOS = (1, 2, 10, 100)
CHANNELS = 50
TIER1_RSS_BOUND_MB = tier1_memory_bound(LIVE_LIKES.max_cells) / 1e6
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 600.0


@dataclass
class Point:
    events_per_key: int
    keys: int
    events: int
    pipeline_eps: float
    baseline_eps: float
    redis_commands: int
    cells: int
    max_partial_bytes: int
    partial_messages: int
    tier1_peak_rss_mb: float
    plan: Drain | None = None  # the planner's prediction for this backlog

    @property
    def ratio(self) -> float:
        return self.pipeline_eps / self.baseline_eps if self.baseline_eps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events_per_key": self.events_per_key,
            "keys": self.keys,
            "events": self.events,
            "pipeline_eps": round(self.pipeline_eps),
            "baseline_eps": round(self.baseline_eps),
            "ratio": round(self.ratio, 3),
            "redis_commands": self.redis_commands,
            "cells": self.cells,
            "redis_commands_per_cell": round(self.redis_commands / self.cells, 3) if self.cells else None,
            "max_partial_bytes": self.max_partial_bytes,
            "partial_messages": self.partial_messages,
            "tier1_peak_rss_mb": round(self.tier1_peak_rss_mb, 1),
            # the stated bound at the topology's max_cells (pipeline.core.coalescer, docs/ARCHITECTURE.md)
            "tier1_rss_bound_mb": round(TIER1_RSS_BOUND_MB, 1),
            **self._plan_dict(),
        }

    def _plan_dict(self) -> dict[str, Any]:
        """The planner's prediction and its error against this run: (predicted - measured) / measured."""
        if self.plan is None or not self.cells:
            return {}
        measured_cpc = self.redis_commands / self.cells
        return {
            "plan_eps": round(self.plan.events_per_s),
            "plan_eps_error_pct": round((self.plan.events_per_s / self.pipeline_eps - 1) * 100, 1),
            "plan_redis_commands_per_cell": round(self.plan.redis_commands_per_cell, 3),
            "plan_commands_error_pct": round((self.plan.redis_commands_per_cell / measured_cpc - 1) * 100, 1),
        }


def backlog(keys: int, per_key: int) -> Iterator[tuple[str, str]]:
    """(key, channel) of every event: each key's events one after another."""
    for k in range(keys):
        key, channel = f"comment-{k}", f"video-{k % CHANNELS}"
        for _ in range(per_key):
            yield key, channel


async def write_backlog(bootstrap: str, topic: str, keys: int, per_key: int) -> float:
    """Write the backlog keyed like the SDK does (murmur2 of the key); returns the first send's time."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
    )
    await producer.start()
    try:
        parts = sorted(await producer.partitions_for(topic))
        partitioner = DefaultPartitioner()
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, channel in backlog(keys, per_key):
            kb = key.encode()
            value = orjson.dumps({"type": "like", "key": key, "channel": channel})
            by_partition.setdefault(partitioner(kb, parts, parts), []).append((kb, value))
        # the record batches are built before the clock starts: the writer shares the 2 cores with
        # the pipeline it times, and filling batches (a Python call per record) is its own cost, not
        # the pipeline's (the baseline is timed on a backlog written before it starts)
        batches = []
        for p, messages in by_partition.items():
            batch = producer.create_batch()
            for kb, value in messages:
                if batch.append(key=kb, value=value, timestamp=None) is None:
                    batches.append((p, batch))
                    batch = producer.create_batch()
                    batch.append(key=kb, value=value, timestamp=None)
            if batch.record_count():
                batches.append((p, batch))
        del by_partition
        started = time.monotonic()
        pending = [await producer.send_batch(batch, topic, partition=p) for p, batch in batches]
        await asyncio.gather(*pending)
        return started
    finally:
        await producer.stop()


async def measure_pipeline(
    bootstrap: str, redis_url: str, topology: Topology, keys: int, per_key: int, workdir: Path
) -> tuple[float, dict[str, int], float]:
    """(events/s end to end, T:stats, tier-1 peak RSS in MB) for one backlog."""
    events = keys * per_key
    await kafka.ensure_topics(bootstrap, kafka.topology_topics(topology))
    workers = [
        WorkerProcess(
            "live_likes", tier, f"card-{tier[0]}1", bootstrap, redis_url, workdir, name=topology.name
        )
        for tier in ("coalesce", "merge")
    ]
    client = aioredis.Redis.from_url(redis_url)
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while await client.hlen(owners_key(topology.group("coalesce"))) < topology.partitions.events:
            _alive(workers)
            if time.monotonic() > deadline:
                raise BenchError(f"tier 1 never claimed its partitions:\n{workers[0].log_tail()}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the root joins its group meanwhile
        started = await write_backlog(bootstrap, topology.topic("events"), keys, per_key)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            stats = await redis_query.stats(client, topology)
            if stats.get("events", 0) >= events:
                elapsed = time.monotonic() - started
                break
            _alive(workers)
            if time.monotonic() > deadline:
                raise BenchError(f"the pipeline counted {stats.get('events', 0):,} of {events:,} events")
            await asyncio.sleep(0.02)
        peak_kb = _peak_rss_kb(workers[0].proc.pid if workers[0].proc else None)
        if stats.get("events") != events:
            raise BenchError(f"counted {stats.get('events')} events, not {events}: not exact")
    finally:
        for w in workers:
            w.stop()
        await client.aclose()
    return events / elapsed, stats, peak_kb / 1024


async def partials_sizes(bootstrap: str, topology: Topology) -> tuple[int, int, int]:
    """(cells, largest message in bytes, messages) of every committed partial of the run."""
    consumer = kafka.consumer(
        bootstrap, topology.topic("partials"), topology.group("card-reader"), "bench", read_committed=True
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topology.topic("partials"), p) for p in range(topology.partitions.partials)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        cells = largest = messages = 0
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    if r.value is None:
                        continue
                    cells += len(Partial.from_json(r.value).cells)
                    largest = max(largest, len(r.value))
                    messages += 1
        return cells, largest, messages
    finally:
        await consumer.stop()


def _alive(workers: list[WorkerProcess]) -> None:
    for w in workers:
        if not w.running:
            raise BenchError(f"{w.name} exited:\n{w.log_tail(30)}")


def _peak_rss_kb(pid: int | None) -> int:
    """The process's high-water mark of resident memory (VmHWM), in KiB."""
    if pid is None:
        return 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def run(bootstrap: str, redis_url: str, keys: int, max_events: int, ratios: tuple[int, ...]) -> list[Point]:
    from topologies.live_likes import TOPOLOGY

    points = []
    base = "bench_card_" + uuid.uuid4().hex[:6]
    for per_key in ratios:
        n_keys = max(1, min(keys, max_events // per_key))
        events = n_keys * per_key
        topology = TOPOLOGY.renamed(f"{base}_{per_key}")
        say(f"{per_key} events per key: {n_keys:,} keys, {events:,} events; pipeline (tier 1 + root) ...")
        with tempfile.TemporaryDirectory(prefix="bench-card-") as tmp:
            eps, stats, rss_mb = asyncio.run(
                measure_pipeline(bootstrap, redis_url, topology, n_keys, per_key, Path(tmp))
            )
        cells, largest, messages = asyncio.run(partials_sizes(bootstrap, topology))
        say(f"pipeline: {eps:,.0f} events/s; now the per-event HINCRBY baseline ...")
        topic = f"{base}_{per_key}_baseline.events"
        asyncio.run(kafka.ensure_topics(bootstrap, [kafka.TopicSpec(topic, topology.partitions.events)]))
        asyncio.run(write_backlog(bootstrap, topic, n_keys, per_key))
        baseline = asyncio.run(
            redis_baseline.apply_events(
                bootstrap, redis_url, topic, f"{base}_{per_key}_baseline", events, "hincrby_pipelined", topic
            )
        )
        if not baseline["exact"]:
            raise BenchError(f"the baseline wrote {baseline['redis_total']} for {events} events")
        point = Point(
            per_key,
            n_keys,
            events,
            eps,
            float(baseline["events_per_s"]),
            stats.get("redis_commands", 0),
            cells,
            largest,
            messages,
            rss_mb,
            drain(
                n_keys,
                per_key,
                channels=CHANNELS,
                flush_interval_s=topology.flush_interval_ms / 1000,
                max_cells=topology.max_cells,
                partials_partitions=topology.partitions.partials,
                leaderboard=any(m.leaderboard for m in topology.metrics),
            ),
        )
        d = point.as_dict()
        say(
            f"{per_key}/key: pipeline {d['pipeline_eps']:,}, baseline {d['baseline_eps']:,} events/s, "
            f"ratio {d['ratio']:.2f}; {d['redis_commands_per_cell']} Redis commands per cell; planner "
            f"{d.get('plan_eps_error_pct')} % on events/s, {d.get('plan_commands_error_pct')} % on commands"
        )
        points.append(point)
    return points


def plot(points: list[Point], out_dir: Path) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [p.events_per_key for p in points]
    ax.plot(xs, [p.ratio for p in points], marker="o", label="pipeline / per-event HINCRBY")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="break even")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of ten
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([0.5, 1, 2, 4, 8])
    ax.set_xlabel("events per key in the backlog (a key's events share a window)")
    ax.set_ylabel("events/s, pipeline / baseline")
    ax.set_title("When there is nothing to coalesce")
    for p in points:
        ax.annotate(f"{p.ratio:.2f}", (p.events_per_key, p.ratio), textcoords="offset points", xytext=(4, 6))
    ax.legend()
    fig.tight_layout()
    path = out_dir / "cardinality.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench cardinality` (flags in pipeline/cli/)."""
    try:
        ratios = tuple(int(r) for r in args.ratios.split(","))
    except ValueError:
        print("pipeline bench cardinality: --ratios takes integers, e.g. 1,2,10,100", file=sys.stderr)
        return 2
    if args.keys <= 0 or args.max_events <= 0 or not ratios or min(ratios) <= 0:
        print(
            "pipeline bench cardinality: --keys, --max-events and --ratios must be positive", file=sys.stderr
        )
        return 2
    obs.configure_logging("warning")
    try:
        with servers_or_local(args.kafka, args.redis, say=say, broker=args.broker) as (kafka_url, redis_url):
            points = run(kafka_url, redis_url, args.keys, args.max_events, ratios)
    except BenchError as exc:
        print(f"pipeline bench cardinality: {exc}", file=sys.stderr)
        return 1
    columns = [
        ("events/key", "events_per_key"),
        ("keys", "keys"),
        ("events", "events"),
        ("pipeline/s", "pipeline_eps"),
        ("baseline/s", "baseline_eps"),
        ("ratio", "ratio"),
        ("cmds/cell", "redis_commands_per_cell"),
        ("max partial B", "max_partial_bytes"),
        ("tier1 MB", "tier1_peak_rss_mb"),
        ("bound MB", "tier1_rss_bound_mb"),
        ("plan err %", "plan_eps_error_pct"),
        ("plan cmds %", "plan_commands_error_pct"),
    ]
    print("  ".join(f"{title:>13}" for title, _ in columns))
    for p in points:
        d = p.as_dict()
        print("  ".join(f"{d[field]!s:>13}" for _, field in columns))
    if args.plot:
        say(f"plot: {plot(points, Path(args.plot))}")
    if args.json:
        print(orjson.dumps({"points": [p.as_dict() for p in points], "machine": machine()}).decode())
    return 0
