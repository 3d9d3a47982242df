"""Writers agree on hot keys, against the real broker and Redis.

Four SDK writers each send one key steadily at 0.4x the split threshold (1.6x together), paced
from their first event (no start burst): none sees the key hot alone, together they do, and the
key is split within 3 intervals. When they slow to 0.1x each it merges back, after the cooldown
and not before. A control key that one writer alone sends at 0.4x is never split. The rates are
summed in Redis by one Lua script, held to the core's model (RateBoard) here too.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from pipeline.client import PipelineClient, SendResult
from pipeline.core.hotkeys import HotKeySplitter, RateBoard, SplitPolicy
from pipeline.core.split_history import decode
from pipeline.harness.local_servers import Endpoints
from pipeline.io import kafka
from pipeline.io.splits import SharedRates, hot_rates_keys, split_history_key
from pipeline.read import Reader
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

KEY = "viral"
CALM = "calm"
T = 100.0  # split threshold, events/s
INTERVAL_S = 1.0
COOLDOWN_S = 3.0
POLICY = SplitPolicy(threshold_eps=T, budget_eps=T, interval_s=INTERVAL_S, cooldown_s=COOLDOWN_S)


@dataclass
class Pacer:
    """Sends events of its keys at `rate` each, on a schedule counted from its first event."""

    client: PipelineClient
    keys: list[str]
    rate: float
    results: list[tuple[float, SendResult]] = field(default_factory=list)
    sent: int = 0

    def set_rate(self, rate: float, now: float) -> None:
        self.rate, self._start, self._done = rate, now, 0

    async def run(self, stop: asyncio.Event) -> None:
        self._start, self._done = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - self._start) * self.rate) + 1 - self._done  # the first at once
            if due > 0:
                events = [{"type": "like", "key": k, "channel": "v"} for _ in range(due) for k in self.keys]
                at = time.monotonic()
                self.results.extend((at, r) for r in await self.client.send_many(events))
                self._done += due
                self.sent += len(events)
            next_at = self._start + self._done / self.rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def latest_k(redis: aioredis.Redis, topology_name: str, key: str) -> int:
    raw = await redis.hget(split_history_key(topology_name), key)
    return decode(raw)[-1][1] if raw else 1


async def test_four_writers_each_at_0_4_of_the_threshold_split_a_key_together_and_merge_it_back(
    servers: Endpoints, unique_name: str
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    splitters = [HotKeySplitter(POLICY) for _ in range(4)]
    clients = [
        PipelineClient(
            topology,
            servers.kafka_bootstrap,
            redis_url=servers.redis_url,
            splitter=s,
            client_id=f"{unique_name}.writer{i}",
        )
        for i, s in enumerate(splitters)
    ]
    redis = aioredis.Redis.from_url(servers.redis_url)
    reader = Reader(topology, redis)
    await asyncio.gather(*(c.start() for c in clients))  # each measures from its start: start together
    pacers = [Pacer(c, [KEY, CALM] if i == 0 else [KEY], 0.4 * T) for i, c in enumerate(clients)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop)) for p in pacers]
    started = time.monotonic()
    try:
        # together 1.6x the threshold: split within 3 intervals, announced, in the history, by every writer
        split_at = None
        while split_at is None:
            assert time.monotonic() - started < 6 * INTERVAL_S, "the key was never split"
            if (await reader.splits()).get(KEY, 1) >= 2 and await latest_k(redis, topology.name, KEY) >= 2:
                split_at = time.monotonic() - started
            await asyncio.sleep(0.02)
        print(f"split after {split_at:.2f} s ({split_at / INTERVAL_S:.1f} intervals)")
        assert split_at <= 3 * INTERVAL_S
        await asyncio.sleep(POLICY.lead_s + INTERVAL_S)  # in force after the lead; every writer agrees
        assert [s.k(KEY) for s in splitters] == [2, 2, 2, 2]
        assert all(s.top_rates(1)[0][1] < T / 2 for s in splitters)  # none sees it hot alone
        late = [r for p in pacers for at, r in p.results if at > time.monotonic() - INTERVAL_S]
        assert {r.sub for r in late if r.id and r.accepted} != {0}  # events go to both sub-keys now
        assert CALM not in await reader.splits() and splitters[0].k(CALM) == 1  # one writer at 0.4x alone

        # 0.1x each, 0.4x together: merges back after the cooldown, not before
        slowed = time.monotonic()
        for p in pacers:
            p.set_rate(0.1 * T, slowed)
        merged_at = None
        while merged_at is None:
            since = time.monotonic() - slowed
            assert since < COOLDOWN_S + 6 * INTERVAL_S, "the key never merged back"
            if KEY not in await reader.splits() and await latest_k(redis, topology.name, KEY) == 1:
                merged_at = since
            await asyncio.sleep(0.05)
        print(f"merged {merged_at:.2f} s after the slow-down (cooldown {COOLDOWN_S} s)")
        assert COOLDOWN_S <= merged_at <= COOLDOWN_S + 4 * INTERVAL_S
        # the writers whose cooldown ends a moment later agree, and none splits it again meanwhile
        await asyncio.sleep(2 * INTERVAL_S)
        assert [s.k(KEY) for s in splitters] == [1, 1, 1, 1]
        assert await latest_k(redis, topology.name, KEY) == 1 and KEY not in await reader.splits()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.stop()
    try:
        # the writers that stopped took their rates out of the sums
        assert await redis.exists(*hot_rates_keys(topology.name)) == 0
        assert all(p.sent > 0 for p in pacers)
    finally:
        await redis.aclose()


async def test_the_sums_in_redis_follow_the_model(servers: Endpoints, unique_name: str) -> None:
    """Random reports, replacements and withdrawals of 5 writers: Redis sums them as RateBoard does;
    a report that expires leaves the sums at the next writer's call; keys of any character."""
    redis = aioredis.Redis.from_url(servers.redis_url)
    store = SharedRates(redis, unique_name)
    board = RateBoard()
    rng = random.Random(7)
    keys = ["a", "b", "viral", "k:{x}", "\xff", "ключ", "\udcff"]
    try:
        for step in range(200):
            writer = f"w{rng.randrange(5)}"
            if rng.random() < 0.15:
                await store.withdraw(writer)
                board.withdraw(writer)
                continue
            report = {k: rng.randrange(1, 500) for k in rng.sample(keys, rng.randrange(0, 4))}
            least = rng.choice([0, 50, 300])
            got = await store.share(writer, report, 60_000, least)
            assert got == board.put(writer, report, float(step), 1e9, least), step
        await store.share("short", {"a": 1000}, 200, 0)
        assert (await store.share("w9", {}, 60_000, 0))["a"] >= 1000
        await asyncio.sleep(0.3)
        got = await store.share("w9", {}, 60_000, 0)
        assert got == board.totals()  # the expired report is gone
    finally:
        await redis.aclose()
