"""Every acknowledged event is counted exactly once, although workers of both
tiers are killed with SIGKILL mid-stream and restarted with the same identity,
and 5 % of the events are sent again with the same id (a client's retry).

The events go through the SDK, as in production: every one carries an id, and
a viral key is split over sub-keys while it is hot. The retries are sent by the
*other* of two writers, chunks after their originals (so SIGKILLs land between
an original and its retry), with the id and the ts of the first send but no
sub. The viral key turns hot and cools again during the run, so many retries
are sent under another split factor than their originals: routed by the split
of *now* they would land on another partition (the test counts them, so the
case is forced); routed by the split in force at their ts, they meet their
original's partition, where tier 1 holds its id.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline.client import PipelineClient, SendResult
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.harness.local_servers import Endpoints
from pipeline.io import redis_client
from pipeline.read import Reader
from tests.integration.pipeline_harness import LedgerKey, Pipeline, wait_for_totals
from tests.integration.redis_cluster import STORES, on_store
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


@pytest.fixture(params=STORES)
def servers(request: pytest.FixtureRequest, servers: Endpoints) -> Endpoints:
    """On one Redis and on a 3-master Redis Cluster (key layout 2 on both)."""
    return on_store(request, servers)

EVENTS = 60_000
CHUNKS = 12
KILLS = 6
HOT_CHUNKS = range(3, 8)  # the viral key is hot in these chunks, cool before and after
VIRAL = "viral"
# hot from 200 events/s as one writer sees it; cool (one key again) 0.5 s after it slows down
POLICY = SplitPolicy(threshold_eps=200, budget_eps=100, interval_s=0.2, cooldown_s=0.5)
BATCH = 500


def _events(rng: random.Random, n: int, viral_share: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(n):
        if rng.random() < viral_share:
            out.append({"type": "like", "key": VIRAL, "channel": "v0"})
            continue
        k = int(rng.paretovariate(1.2)) % 500
        # keys with characters that must not confuse the sub-key encoding or the key layout
        key = f"c{k}" if k % 7 else f"c:{k}\xff#{{x}}"
        out.append({"type": "like", "key": key, "channel": f"v{k % 5}"})
    return out


async def _send(
    client: PipelineClient, events: list[dict[str, Any]], ledger: Counter[LedgerKey] | None
) -> list[tuple[dict[str, Any], SendResult]]:
    """Send in batches at a steady pace (the writers measure rates); count the acknowledged ones."""
    sent = []
    for at in range(0, len(events), BATCH):
        batch = events[at : at + BATCH]
        results = await client.send_many(batch)
        for event, result in zip(batch, results, strict=True):
            assert result.accepted, result
            sent.append((event, result))
            if ledger is not None:
                ledger[(event["channel"], event["key"])] += 1
        await asyncio.sleep(0.05)
    return sent


async def test_sigkill_mid_stream_counts_every_event_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    workers = [pipe.add("coalesce", "c1"), pipe.add("coalesce", "c2"), pipe.add("merge", "m1")]
    rng = random.Random(2026)
    ledger: Counter[LedgerKey] = Counter()
    chunk = EVENTS // CHUNKS
    kill_at = set(rng.sample(range(1, CHUNKS), KILLS))
    killed: list[str] = []
    splitters = [HotKeySplitter(POLICY), HotKeySplitter(POLICY)]
    writers = [
        PipelineClient(
            topology, servers.kafka_bootstrap, redis_url=servers.redis_url, splitter=s, source="app"
        )
        for s in splitters
    ]
    for w in writers:
        await w.start()
    originals: list[tuple[dict[str, Any], SendResult]] = []
    retries = forced = 0
    try:
        for i in range(CHUNKS):
            writer, other = writers[i % 2], writers[(i + 1) % 2]
            share = 0.5 if i in HOT_CHUNKS else 0.005
            originals += await _send(writer, _events(rng, chunk, share), ledger)
            if i:
                # retries of earlier chunks' events (viral ones first), by the other writer: id and ts
                earlier = originals[: i * chunk]
                viral = [s for s in earlier if s[0]["key"] == VIRAL]
                picked = rng.sample(viral, min(len(viral), chunk // 40))
                picked += rng.sample(earlier, chunk // 20 - len(picked))
                router = splitters[(i + 1) % 2].router
                now = int(time.time() * 1000)
                forced += sum(
                    router.k_at(VIRAL, r.ts) != router.k_at(VIRAL, now)
                    for e, r in picked
                    if e["key"] == VIRAL
                )
                resent = await _send(other, [{**e, "id": r.id, "ts": r.ts} for e, r in picked], None)
                retries += len(resent)
            if i in kill_at:
                victim = workers[len(killed) % len(workers)]
                victim.kill()
                killed.append(victim.name)
                await asyncio.sleep(rng.uniform(0.0, 1.0))
                victim.start()
            await asyncio.sleep(0.3)
        assert sum(ledger.values()) == EVENTS
        assert any(r.sub for _, r in originals), "the viral key was never split"
        assert forced > 50, f"only {forced} retries were sent under another split than their original"
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=120)
        await asyncio.sleep(2.0)  # settle: a retry counted late would show now
        client = redis_client.from_url(servers.redis_url)
        got = await Reader(topology, client).key_totals("likes")
        stats = await Reader(topology, client).stats()
        await client.aclose()
        wrong = {k: (got.get(k), v) for k, v in ledger.items() if got.get(k) != v}
        extra = set(got) - set(ledger)
        assert not wrong and not extra, (
            f"{len(wrong)} keys wrong (got, want), e.g. {list(wrong.items())[:5]}; "
            f"extra {extra}\n{pipe.logs()}"
        )
        assert (stats["events"], stats["deduplicated"]) == (EVENTS, retries)
        assert len(killed) == KILLS and {"coalesce/c1", "coalesce/c2", "merge/m1"} <= set(killed)
        assert all(w.running for w in workers), pipe.logs()
    finally:
        for w in writers:
            await w.stop()
        pipe.stop()
