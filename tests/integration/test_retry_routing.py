"""A retry meets its original: on the same partition of the events topic, where tier 1 holds the ids.

The cross-partition case is forced: a key turns hot (split over the partitions) or cools between
an original and its retry, and the retry carries no `sub`, only the `ts` its first send returned.
The writers route it by the key's split factor in force at that ts, from the split history they
share in Redis, so it lands where the original did: from the same SDK (i), from another SDK that
sees the key cold (ii), and through the gateway, or an SDK behind it (iii). Each case also resends
without the ts, as a control: routed by the split factor of now, those copies land elsewhere.
The partitions are read back from the topic.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.client import PipelineClient, SendResult, scoped_id
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.core.split_history import decode
from pipeline.core.topology import Topology
from pipeline.harness.local_servers import Endpoints
from pipeline.io import kafka
from pipeline.io.splits import split_history_key
from pipeline.tiers.ingest import key_source
from tests.integration.pipeline_harness import LedgerKey, Pipeline, wait_for_totals
from tests.integration.test_ingest_gateway import API_KEY, Gateway, start_gateway
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

KEY = "viral"
# hot from 200 events/s as one writer sees them; 100 events/s per sub-key: k capped by the partitions
POLICY = SplitPolicy(threshold_eps=200, budget_eps=100, interval_s=0.2, cooldown_s=0.5)
WAIT_S = 20.0


def now_ms() -> int:
    return int(time.time() * 1000)


def like(event_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "like", "key": KEY, "channel": "v", "id": event_id, **extra}


async def read_events(bootstrap: str, topology: Topology) -> list[tuple[int, dict[str, Any]]]:
    """Every record of the events topic up to its current end: (partition, value)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[int, dict[str, Any]]] = []
    topic = topology.topic("events")
    try:
        parts = [TopicPartition(topic, p) for p in range(topology.partitions.events)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        deadline = time.monotonic() + 30
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            assert time.monotonic() < deadline, "topic not read to its end"
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                out.extend((tp.partition, orjson.loads(r.value)) for r in records if r.value)
    finally:
        await consumer.stop()
    return out


def placements(
    records: list[tuple[int, dict[str, Any]]], wire_ids: set[str]
) -> dict[str, list[tuple[int, int]]]:
    """Wire id -> (partition, ts) of each copy on the topic."""
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for partition, value in records:
        if value.get("id") in wire_ids:
            out[value["id"]].append((partition, value["ts"]))
    return out


def check_retries_meet_originals(
    records: list[tuple[int, dict[str, Any]]],
    originals: dict[str, SendResult],
    wire: Callable[[str], str],
    faithful_copies: int,
) -> int:
    """Every copy sent with the original's ts is on the original's partition; returns how many of the
    copies sent without it (the control) landed on another partition."""
    where = placements(records, {wire(i) for i in originals})
    moved = 0
    for event_id, first in originals.items():
        copies = where[wire(event_id)]
        with_ts = {p for p, ts in copies if ts == first.ts}
        assert sum(ts == first.ts for _, ts in copies) == 1 + faithful_copies, (event_id, copies)
        assert len(with_ts) == 1, f"{event_id}: the original and its retries on partitions {with_ts}"
        home = with_ts.pop()
        moved += sum(p != home for p, ts in copies if ts != first.ts)
    return moved


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def heating(client: PipelineClient, per_tick: int = 300) -> AsyncIterator[list[int]]:
    """Keep the key hot as this writer sees it (about 3,000 events/s) while inside; [events accepted]."""
    stop = asyncio.Event()
    accepted = [0]

    async def heat() -> None:
        while not stop.is_set():
            results = await client.send_many([{"type": "like", "key": KEY, "channel": "v"}] * per_tick)
            accepted[0] += sum(r.accepted for r in results)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(heat())
    try:
        yield accepted
    finally:
        stop.set()
        await task


async def topology_for(servers: Endpoints, name: str) -> Topology:
    topology = TOPOLOGY.renamed(name)
    await kafka.ensure_topics(servers.kafka_bootstrap, kafka.topology_topics(topology))
    return topology


def client_for(
    servers: Endpoints, topology: Topology, splitter: HotKeySplitter, source: str
) -> PipelineClient:
    return PipelineClient(
        topology, servers.kafka_bootstrap, redis_url=servers.redis_url, splitter=splitter, source=source
    )


async def test_a_retry_without_sub_meets_its_original_after_the_key_turned_hot_and_after_it_cooled(
    servers: Endpoints, unique_name: str
) -> None:
    topology = await topology_for(servers, unique_name)
    partitions = topology.partitions.events
    splitter = HotKeySplitter(POLICY)
    client = client_for(servers, topology, splitter, "app")
    await client.start()
    try:
        # sent while the key is one key: every copy on the key's own partition
        early = await client.send_many([like(f"early-{i}") for i in range(24)])
        assert {r.sub for r in early} == {0} and all(r.ts for r in early)
        async with heating(client):
            await wait_for(lambda: splitter.k(KEY) > 1, "the key turns hot")
            assert splitter.router.k_at(KEY, now_ms()) == 1  # decided, not in force before the lead
            await wait_for(lambda: splitter.router.k_at(KEY, now_ms()) > 1, "the split takes effect")
            assert splitter.router.k_at(KEY, now_ms()) == partitions  # capped by the partition count
            hot = await client.send_many([like(f"hot-{i}") for i in range(24)])
            assert len({r.sub for r in hot}) > 1
            # the caller's resend: id and ts, no sub (as if it never saw the answer's sub)
            again = await client.send_many([like(r.id or "", ts=r.ts) for r in early])
            assert [r.sub for r in again] == [0] * len(early)
            control = await client.send_many([like(r.id or "") for r in early])  # without ts
            assert any(r.sub for r in control)
            # a sub given is kept, as a resend echoing its answer's sub (the SDK chose anew before)
            echoed = await client.send_many([like(r.id or "", sub=r.sub) for r in early])
            assert [r.sub for r in echoed] == [0] * len(early)
        # the key cools: one key again, after the cooldown and the lead
        await wait_for(lambda: splitter.k(KEY) == 1, "the key cools")
        await wait_for(lambda: splitter.router.k_at(KEY, now_ms()) == 1, "the key is one key again")
        again = await client.send_many([like(r.id or "", ts=r.ts) for r in hot])
        assert [r.sub for r in again] == [r.sub for r in hot]
        control = await client.send_many([like(r.id or "") for r in hot])
        assert {r.sub for r in control} == {0}
    finally:
        await client.stop()

    records = await read_events(servers.kafka_bootstrap, topology)
    wire = lambda event_id: scoped_id("app", event_id)  # noqa: E731
    moved = check_retries_meet_originals(records, {r.id or "": r for r in early}, wire, 1)
    assert moved > 0, "the control never left the original's partition: the case was not forced"
    moved = check_retries_meet_originals(records, {r.id or "": r for r in hot}, wire, 1)
    assert moved > 0


async def test_two_writers_route_a_retry_alike_though_only_one_sees_the_key_hot(
    servers: Endpoints, unique_name: str
) -> None:
    topology = await topology_for(servers, unique_name)
    hot_writer, cold_writer = HotKeySplitter(POLICY), HotKeySplitter(POLICY)
    a = client_for(servers, topology, hot_writer, "app")
    b = client_for(servers, topology, cold_writer, "app")
    await a.start()
    await b.start()
    try:
        early = await b.send_many([like(f"early-{i}") for i in range(24)])
        assert {r.sub for r in early} == {0}
        async with heating(a):
            # b sees a trickle only, but routes by the split a proposed, once both read it back
            await wait_for(
                lambda: min(w.router.k_at(KEY, now_ms()) for w in (hot_writer, cold_writer)) > 1,
                "both follow the split",
            )
            hot = await b.send_many([like(f"hot-{i}") for i in range(24)])
            # b alone sees the key under the threshold (24 events in a 0.2 s interval at most: 120/s),
            # and follows the writers' sums
            assert all(rate < POLICY.threshold_eps for _, rate in cold_writer.top_rates())
            assert cold_writer.k(KEY) > 1
            assert len({r.sub for r in hot}) > 1
            # a resends b's events with b's ts, no sub: where b put them
            again_early = await a.send_many([like(r.id or "", ts=r.ts) for r in early])
            again_hot = await a.send_many([like(r.id or "", ts=r.ts) for r in hot])
            assert [r.sub for r in again_early] == [0] * len(early)
            assert [r.sub for r in again_hot] == [r.sub for r in hot]
            await b.send_many([like(r.id or "") for r in early])  # the control, without ts
    finally:
        await a.stop()
        await b.stop()

    records = await read_events(servers.kafka_bootstrap, topology)
    wire = lambda event_id: scoped_id("app", event_id)  # noqa: E731
    assert check_retries_meet_originals(records, {r.id or "": r for r in early}, wire, 1) > 0
    check_retries_meet_originals(records, {r.id or "": r for r in hot}, wire, 1)


@contextmanager
def heating_gateway(gateway: Gateway, per_request: int = 200) -> Iterator[None]:
    """Keep the key hot as the gateway sees it (about 2,000 events/s) while inside."""
    stop = threading.Event()
    body = orjson.dumps([{"type": "like", "key": KEY, "channel": "v"} for _ in range(per_request)])
    heat = Gateway(gateway.worker, gateway.port)  # a connection of its own

    def run() -> None:
        while not stop.is_set():
            heat.post(body)
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        heat.close()


async def test_through_the_gateway_and_from_an_sdk_behind_it(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = await topology_for(servers, unique_name)
    partitions = topology.partitions.events
    gateway = start_gateway(
        servers,
        unique_name,
        tmp_path,
        ingest_api_keys=API_KEY,
        split_threshold_eps=50,
        split_budget_eps=25,
        ingest_lag_shed=10**9,  # no tier 1 reads here: its lag must not shed or throttle the likes
        ingest_lag_high=2 * 10**9,
    )
    redis = aioredis.Redis.from_url(servers.redis_url)
    source = key_source(API_KEY.encode())
    sdk_splitter = HotKeySplitter(SplitPolicy())  # sees nothing of the gateway's traffic
    sdk = client_for(servers, topology, sdk_splitter, source)
    await sdk.start()

    async def split_in_force() -> int:
        raw = await redis.hget(split_history_key(topology.name), KEY)
        if not raw:
            return 1
        history = decode(raw)
        # in force for a while: the gateway and the SDK have both read it back by now
        return next((k for effective, k in reversed(history) if effective <= now_ms() - 1000), 1)

    def post(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        status, _, body = gateway.post_events(events)
        assert status == 202 and body["accepted"] == len(events), body
        results: list[dict[str, Any]] = body["results"]
        return results

    try:
        early = post([like(f"early-{i}") for i in range(24)])
        assert {r["sub"] for r in early} == {0} and all(r["ts"] for r in early)
        with heating_gateway(gateway):
            deadline = time.monotonic() + WAIT_S
            while await split_in_force() == 1:
                assert time.monotonic() < deadline, gateway.worker.log_tail(30)
                await asyncio.sleep(0.1)
            assert await split_in_force() == partitions
            hot = post([like(f"hot-{i}") for i in range(24)])
            assert len({r["sub"] for r in hot}) > 1
            # resent with id and ts, no sub: through the gateway, and from the SDK
            again = post([like(r["id"], ts=r["ts"]) for r in early])
            assert [r["sub"] for r in again] == [0] * len(early)
            sdk_again = await sdk.send_many([like(r["id"], ts=r["ts"]) for r in early + hot])
            assert [r.sub for r in sdk_again] == [r["sub"] for r in early + hot]
            again_hot = post([like(r["id"], ts=r["ts"]) for r in hot])
            assert [r["sub"] for r in again_hot] == [r["sub"] for r in hot]
            # an explicit sub is kept as given (a resend echoing the sub of its answer)
            echoed = post([like(r["id"], ts=r["ts"] + 1, sub=r["sub"]) for r in hot])
            assert [r["sub"] for r in echoed] == [r["sub"] for r in hot]
            post([like(r["id"]) for r in early])  # the control, without ts
    finally:
        await sdk.stop()
        await redis.aclose()
        gateway.close()
        gateway.worker.stop()

    records = await read_events(servers.kafka_bootstrap, topology)
    wire = lambda event_id: scoped_id(source, event_id)  # noqa: E731
    firsts = {r["id"]: SendResult(r["index"], r["id"], True, sub=r["sub"], ts=r["ts"]) for r in early + hot}
    early_ids = {r["id"] for r in early}
    assert (
        check_retries_meet_originals(records, {i: f for i, f in firsts.items() if i in early_ids}, wire, 2)
        > 0
    )
    check_retries_meet_originals(records, {i: f for i, f in firsts.items() if i not in early_ids}, wire, 2)
    # the copies with the echoed sub (and another ts) went where their sub says: the original's partition
    where = placements(records, {wire(i) for i in firsts if i not in early_ids})
    for event_id, first in firsts.items():
        if event_id in early_ids:
            continue
        home = {p for p, ts in where[wire(event_id)] if ts == first.ts}
        assert {p for p, ts in where[wire(event_id)] if ts == first.ts + 1} == home


async def test_the_pipeline_counts_a_retry_once_though_the_key_was_split_or_merged_in_between(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    """End to end: tier 1 remembers ids per partition, so a retry routed elsewhere would count twice."""
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    pipe.add("coalesce", "c1")
    pipe.add("merge", "m1")
    splitter = HotKeySplitter(POLICY)
    client = client_for(servers, topology, splitter, "app")
    ledger: Counter[LedgerKey] = Counter()
    try:
        await client.start()
        early = await client.send_many([like(f"early-{i}") for i in range(24)])
        async with heating(client) as heat:
            await wait_for(lambda: splitter.router.k_at(KEY, now_ms()) > 1, "the split takes effect")
            hot = await client.send_many([like(f"hot-{i}") for i in range(24)])
            again = await client.send_many([like(r.id or "", ts=r.ts) for r in early])
        await wait_for(lambda: splitter.router.k_at(KEY, now_ms()) == 1, "the key is one key again")
        again += await client.send_many([like(r.id or "", ts=r.ts) for r in hot])
        await client.stop()
        assert all(r.accepted for r in early + hot + again)
        assert len({r.sub for r in hot}) > 1 and {r.sub for r in again[:24]} == {0}
        ledger[("v", KEY)] = len(early) + len(hot) + heat[0]  # the retries count nothing
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        await asyncio.sleep(2.0)  # settle: no retry shows up late
        got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=5)
        assert got == dict(ledger), pipe.logs()
    finally:
        await client.stop()
        pipe.stop()


async def test_a_writer_cut_off_from_the_history_says_its_routes_are_not_settled(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    """While the split history cannot be read, another writer may have split a key meanwhile: the
    SDK marks such routes unsettled, so the caller knows a retry must carry the sub."""
    from pipeline.harness.local_servers import RedisServer

    topology = await topology_for(servers, unique_name)
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    client = PipelineClient(topology, servers.kafka_bootstrap, redis_url=redis.url, source="app")
    await client.start()
    try:
        first = await client.send_many([like("before")])
        assert first[0].accepted and first[0].settled
        redis.stop()
        # a change proposed now would take effect after half the lead at the earliest; past that,
        # this writer cannot know
        await asyncio.sleep(POLICY.lead_s / 2 + 2 * POLICY.refresh_s)
        cut_off = await client.send_many([like("during"), like("echoed", sub=0)])
        assert cut_off[0].accepted and not cut_off[0].settled
        assert cut_off[1].accepted and cut_off[1].settled  # a sub the caller gives is its own route
        redis.start()
        deadline = time.monotonic() + WAIT_S
        while not (await client.send_many([like(f"after-{time.monotonic()}")]))[0].settled:
            assert time.monotonic() < deadline, "routes never settled again after the history came back"
            await asyncio.sleep(0.2)
    finally:
        await client.stop()
        redis.stop()
