"""A batch the root cannot apply is quarantined, and applied exactly once when replayed on command.

A trap: someone SET a string where the root keeps a channel's counter hash. The apply refuses every batch
that touches it before writing anything; the root holds that partials partition, tries again, and after
`quarantine_after_s` quarantines the batch: its partials are copied to `T.partials-quarantine` (reason and
source offsets in headers), `T:quarantine` records it, metrics and a log line say so, and the partition
stops while the other partitions go on. Repairing the key is not enough (the stop is deliberate);
`pipeline replay-quarantine` applies the batch from its copies, once, and the root resumes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.core.coalescer import root_partition
from pipeline.core.redis_layout import agg_key, key_tag, quarantine_key
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL
from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import quarantine
from pipeline.read import Reader
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

QUARANTINE_AFTER_S = 3


def _metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _copies(bootstrap: str, topic: str) -> list[dict[str, str]]:
    """The headers of every message in the quarantine topic."""
    tp = TopicPartition(topic, 0)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await reader.start()
    try:
        reader.assign([tp])
        end = (await reader.end_offsets([tp]))[tp]
        out = []
        while await reader.position(tp) < end:
            for r in (await reader.getmany(tp, timeout_ms=500)).get(tp, []):
                out.append({k: v.decode() for k, v in r.headers})
        return out
    finally:
        await reader.stop()


async def _fine_totals(redis: aioredis.Redis, topology: Topology) -> dict[LedgerKey, float]:
    """The totals of the channels without a trap (reading all keys would meet the trap)."""
    reader = Reader(topology, redis)
    out = {}
    for channel in ("a-fine", "z-fine"):
        for key, value in (await reader.values("likes", channel)).items():
            out[(channel, key)] = value
    return out


def _replay_command(servers: Endpoints, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    where = ["--kafka", servers.kafka_bootstrap, "--redis", servers.redis_url]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "replay-quarantine",
            "live_likes",
            "--name",
            name,
            "--json",
            *where,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_batch_that_stays_refused_is_quarantined_and_replayed_exactly_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    roots = topology.partitions.partials
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    redis = aioredis.Redis.from_url(servers.redis_url)
    stopped = root_partition("kt", roots)  # the one key of the trapped channel: its cells meet there
    trap = agg_key(key_tag(topology, "kt"), "likes", TOTAL, "trapped")  # the channel's hash in that partition
    port = free_port()
    ledger: Counter[LedgerKey] = Counter()
    try:
        await redis.set(trap, "not a hash")
        pipe.add("coalesce", "c1")
        merger = WorkerProcess(
            "live_likes",
            "merge",
            "m1",
            servers.kafka_bootstrap,
            servers.redis_url,
            tmp_path,
            name=unique_name,
            metrics_port=port,
            extra_env={"PIPELINE_QUARANTINE_AFTER_S": str(QUARANTINE_AFTER_S)},
        )
        pipe.workers.append(merger.start())
        events = [
            {"type": "like", "key": "kt", "channel": "trapped"}
            if i % 3 == 0
            else {"type": "like", "key": f"k{i % 23}", "channel": ("a-fine", "z-fine")[i % 2]}
            for i in range(3000)
        ]
        assert {root_partition(f"k{i}", roots) for i in range(23)} == set(range(roots))
        await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)

        # held, tried again, then quarantined; the root keeps running
        async with asyncio.timeout(60):
            while "batch quarantined" not in merger.log_tail(300):
                assert merger.running, merger.log_tail(40)
                await asyncio.sleep(0.2)
        log = merger.log_tail(300)
        assert log.count("apply refused") >= 2, log  # held and tried again before the quarantine
        assert f'"key": "{trap}"' in log and f"--partition {stopped}" in log

        # the other partitions went on; the stopped one wrote nothing: no key of it, no half batch
        elsewhere = Counter({k: n for k, n in ledger.items() if root_partition(k[1], roots) != stopped})
        async with asyncio.timeout(60):
            while await _fine_totals(redis, topology) != dict(elsewhere):
                await asyncio.sleep(0.5)
        assert await redis.type(trap) == b"string"

        # reported: metrics, a record in Redis, the partials in the quarantine topic with their source
        assert _metric(port, "pipeline_batches_quarantined_total", topology=unique_name) == 1
        assert _metric(port, "pipeline_root_quarantined", topology=unique_name, partition=str(stopped)) == 1
        assert _metric(port, "pipeline_root_blocked", topology=unique_name) == 1
        assert _metric(port, "pipeline_applies_refused_total", topology=unique_name) >= 2
        (raw,) = (await redis.hgetall(quarantine_key(topology.name))).values()
        held = quarantine.Quarantined.from_json(raw)
        assert (held.partition, held.key, held.holds, held.needs) == (stopped, trap, "string", "hash")
        copies = await _copies(servers.kafka_bootstrap, quarantine.topic(topology))
        assert len(copies) == held.messages >= 1
        for headers in copies:
            assert headers["reason"] == f"{trap} holds string, the apply needs hash"
            assert headers["source-partition"] == str(stopped)
            assert headers["first-offset"] == str(held.first) and headers["last-offset"] == str(held.last)
            assert held.first <= int(headers["source-offset"]) <= held.last
            assert headers["source"] == f"{topology.topic('partials')}/{stopped}/{headers['source-offset']}"

        # the key is repaired, but the stop is deliberate: nothing moves until the replay
        await redis.delete(trap)
        await asyncio.sleep(3.0)
        assert await _fine_totals(redis, topology) == dict(elsewhere)
        listed = _replay_command(servers, unique_name, "--list")
        assert listed.returncode == 0 and json.loads(listed.stdout)["outcome"] == "quarantined", listed

        replayed = _replay_command(servers, unique_name)
        assert replayed.returncode == 0, replayed.stderr + replayed.stdout
        assert json.loads(replayed.stdout)["outcome"] == "applied", replayed.stdout
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        assert (await Reader(topology, redis).stats())["events"] == len(events)

        # the positions guard the replay too: the same batch again is not applied twice
        again = await quarantine.replay(servers.kafka_bootstrap, redis, topology, held)
        assert again.outcome == "already applied", again
        assert _replay_command(servers, unique_name).returncode == 0  # nothing quarantined now
        assert await Reader(topology, redis).key_totals("likes") == dict(ledger)

        # the root resumed the partition: later events, in every partition, keep counting
        async with asyncio.timeout(30):
            while "quarantine lifted" not in merger.log_tail(300):
                await asyncio.sleep(0.2)
        more = [
            {"type": "like", "key": ("kt", f"k{i % 23}")[i % 2], "channel": ("trapped", "a-fine")[i % 2]}
            for i in range(600)
        ]
        await send_events(servers.kafka_bootstrap, topology.topic("events"), more, ledger)
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        await asyncio.sleep(2.0)  # settle: nothing applied twice
        assert await Reader(topology, redis).key_totals("likes") == dict(ledger)
        assert (await Reader(topology, redis).stats())["events"] == len(events) + len(more)
        assert _metric(port, "pipeline_root_quarantined", topology=unique_name, partition=str(stopped)) == 0
        assert _metric(port, "pipeline_root_blocked", topology=unique_name) == 0
        assert await redis.hlen(quarantine_key(topology.name)) == 0
        assert merger.running, merger.log_tail(40)
    finally:
        pipe.stop()
        await redis.aclose()
