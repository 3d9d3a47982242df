"""Every acknowledged event is counted exactly once, although workers of both
tiers are killed with SIGKILL mid-stream and restarted with the same identity,
and some events are sent twice with the same id (a client's retry)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.io import redis_query
from pipeline.local_servers import Endpoints
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

EVENTS = 60_000
CHUNKS = 12
KILLS = 6


def _events(rng: random.Random, n: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for i in range(n):
        if rng.random() < 0.3:
            # one viral comment, split over sub-keys the way writers will split hot keys
            ev: dict[str, object] = {"type": "like", "key": "viral", "channel": "v0", "sub": rng.randrange(8)}
        else:
            k = int(rng.paretovariate(1.2)) % 500
            # keys with characters that must not confuse the sub-key encoding or the key layout
            key = f"c{k}" if k % 7 else f"c:{k}\xff#{{x}}"
            ev = {"type": "like", "key": key, "channel": f"v{k % 5}"}
        if i % 2:
            ev["id"] = f"e{i}"  # half carry ids, so replays after a kill go through deduplication
        out.append(ev)
    return out


def _retries(rng: random.Random, events: list[dict[str, object]]) -> list[dict[str, object]]:
    """Re-sends of some events with ids, on another sub-key (so usually another partition)."""
    picked = rng.sample([e for e in events if "id" in e], len(events) // 20)
    return [{**e, "sub": (int(e.get("sub", 0)) + 1) % 8} for e in picked]  # type: ignore[call-overload]


async def test_sigkill_mid_stream_counts_every_event_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    workers = [pipe.add("coalesce", "c1"), pipe.add("coalesce", "c2"), pipe.add("merge", "m1")]
    rng = random.Random(2026)
    ledger: Counter[LedgerKey] = Counter()
    events = _events(rng, EVENTS)
    chunk = EVENTS // CHUNKS
    kill_at = set(rng.sample(range(1, CHUNKS), KILLS))
    killed: list[str] = []
    try:
        for i in range(CHUNKS):
            part = events[i * chunk : (i + 1) * chunk]
            await send_events(
                servers.kafka_bootstrap, topology.topic("events"), part, ledger, _retries(rng, part)
            )
            if i in kill_at:
                victim = workers[len(killed) % len(workers)]
                victim.kill()
                killed.append(victim.name)
                await asyncio.sleep(rng.uniform(0.0, 1.0))
                victim.start()
            await asyncio.sleep(0.3)
        assert sum(ledger.values()) == EVENTS
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=120)
        wrong = {k: (got.get(k), v) for k, v in ledger.items() if got.get(k) != v}
        extra = set(got) - set(ledger)
        assert not wrong and not extra, (
            f"{len(wrong)} keys wrong (got, want), e.g. {list(wrong.items())[:5]}; "
            f"extra {extra}\n{pipe.logs()}"
        )
        client = aioredis.Redis.from_url(servers.redis_url)
        stats = await redis_query.stats(client, topology.name)
        await client.aclose()
        assert stats["events"] == EVENTS
        assert stats["deduplicated"] == CHUNKS * (chunk // 20)
        assert len(killed) == KILLS and {"coalesce/c1", "coalesce/c2", "merge/m1"} <= set(killed)
        assert all(w.running for w in workers), pipe.logs()
    finally:
        pipe.stop()
