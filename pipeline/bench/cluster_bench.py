"""How evenly a Redis Cluster's masters share the pipeline's Redis commands (issue 11).

A local 3-master cluster (pipeline/harness/local_servers.LocalRedisCluster, no replicas: only the
masters' work is measured), live_likes under a fresh name, and a Zipf workload over `--keys` keys
(10,000 by default) and 20 channels, folded by tier 1's Coalescer into windows of `--window` events,
each window's partials merged per root partition and applied by the root's RedisSink, as the tiers do
(in one process: this measures where the commands land, not how fast). Then the readers' work on top:
every channel's values, top 10 and snapshot through `Reader`. Each master's `INFO commandstats` calls
(the commands scripts run included; the measuring itself, INFO, CONFIG, CLUSTER and the like, left
out) give the spread: the busiest master's commands over the mean, which the issue bounds by 1.3.

    python -m pipeline.bench.cluster_bench [--events 300000] [--keys 10000] [--window 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from pipeline.core.coalescer import Coalescer
from pipeline.core.merger import Merger
from pipeline.core.model import Partial
from pipeline.core.planner import Workload, plan
from pipeline.harness.local_servers import LocalRedisCluster
from pipeline.harness.zipf import Zipf
from pipeline.io import redis_client
from pipeline.io.redis_sink import RedisSink
from pipeline.read import Reader
from topologies.live_likes import TOPOLOGY

NOT_WORKLOAD = {
    "info",
    "config|resetstat",
    "config",
    "cluster",
    "cluster|info",
    "cluster|nodes",
    "cluster|slots",
    "cluster|shards",
    "ping",
    "client",
    "hello",
    "command",
    "command|docs",
    "script|load",
    "readonly",
}
CHANNELS = 20


@dataclass
class _Record:
    offset: int
    value: bytes
    timestamp: int


def _calls(port: int) -> int:
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(
        int(v["calls"])
        for k, v in stats.items()
        if k.removeprefix("cmdstat_") not in NOT_WORKLOAD and not k.startswith("cmdstat_cluster")
    )


def _reset(port: int) -> None:
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        client.config_resetstat()
    finally:
        client.close()


async def _load(url: str, events: int, keys: int, window: int, seed: int) -> dict[str, Any]:
    topology = TOPOLOGY.renamed(f"spread{uuid.uuid4().hex[:8]}")
    roots = topology.partitions.partials
    rng = random.Random(seed)
    zipf = Zipf(keys)
    names = [f"comment-{i}" for i in range(keys)]
    client = redis_client.from_url(url)
    sink = RedisSink(client, topology)
    offsets = dict.fromkeys(range(roots), 0)
    applies = cells = 0
    started = time.perf_counter()
    ts = int(time.time() * 1000)
    try:
        for start in range(0, events, window):
            n = min(window, events - start)
            picked = zipf.ranks(rng, n)
            batch = [
                _Record(
                    start + i,
                    orjson.dumps({"type": "like", "key": names[r], "channel": f"video-{r % CHANNELS}"}),
                    ts,
                )
                for i, r in enumerate(picked)
            ]
            coalescer = Coalescer(topology, root_partitions=roots, now=0.0)
            assert coalescer.add_batch(0, batch) == []
            by_root: dict[int, list[Partial]] = {}
            for partial in coalescer.flush(1.0).partials:
                by_root.setdefault(partial.root_partition, []).append(partial)
            for root, partials in sorted(by_root.items()):
                merger = Merger(topology)
                merger.resume({root: offsets[root] - 1 if offsets[root] else None})
                for partial in partials:
                    merger.add(root, offsets[root], partial.to_json())
                    offsets[root] += 1
                merged = merger.take()
                cells += len(merged.cells)
                result = await sink.apply(merged)
                assert result.applied, result
                applies += 1
        apply_s = time.perf_counter() - started
        async with Reader(topology, client) as reader:
            for c in range(CHANNELS):
                await reader.values("likes", f"video-{c}")
                await reader.top("likes", f"video-{c}", 10)
                await reader.snapshot(f"video-{c}")
            counted = (await reader.stats())["events"]
    finally:
        await client.aclose()
    assert counted == events, (counted, events)
    return {"topology": topology.name, "applies": applies, "cells": cells, "apply_s": round(apply_s, 1)}


def run(events: int, keys: int, window: int, seed: int = 1) -> dict[str, Any]:
    with LocalRedisCluster(
        Path(tempfile.mkdtemp(prefix="pipeline-spread-")), masters=3, replicas=0
    ) as cluster:
        masters = cluster.master_nodes()
        for node in masters:
            _reset(node.port)
        loaded = asyncio.run(_load(cluster.url, events, keys, window, seed))
        per_master = [_calls(node.port) for node in masters]
    mean = sum(per_master) / len(per_master)
    predicted = plan(Workload(events_per_s=events / 60, keys=keys, channels=CHANNELS, redis_shards=3))
    return {
        "events": events,
        "keys": keys,
        "window_events": window,
        "masters": len(masters),
        "commands_per_master": per_master,
        "busiest_over_mean": round(max(per_master) / mean, 3),
        "planned_busiest_over_mean": round(
            max(predicted.redis_commands_per_s_per_shard) / (predicted.redis_commands_per_s / 3), 3
        ),
        **loaded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.cluster_bench", description=__doc__)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=5_000, help="events per tier-1 window")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.events, args.keys, args.window, args.seed)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0 if result["busiest_over_mean"] <= 1.3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
