"""Synthetic load: Zipf-distributed keys plus one viral key, written to the events topic.

Counts what the broker acknowledged (`accepted`), which is what the pipeline
must end up counting exactly. `produce` writes records itself (the fastest way to
fill a topic); `produce_via_sdk` goes through the writers' path, the SDK, with ids
and hot-key splitting, as a real application does.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from pipeline.client import BrokerUnavailable, PipelineClient
from pipeline.core.model import message_key
from pipeline.harness.zipf import Zipf


@dataclass
class Workload:
    """live_likes-shaped events: likes on `keys` comments spread over `channels` videos."""

    keys: int = 10_000
    channels: int = 20
    zipf_s: float = 1.1
    viral_share: float = 0.2  # share of all events that go to the one viral comment
    seed: int = 7
    event_type: str = "like"

    def __post_init__(self) -> None:
        self._zipf = Zipf(self.keys, self.zipf_s)
        self._rng = random.Random(self.seed)

    def channel_of(self, key_id: int) -> str:
        return f"video-{key_id % self.channels}"

    def sample(self, n: int) -> list[tuple[str, str]]:
        """n (key, channel) pairs."""
        rng = self._rng
        ids = self._zipf.ranks(rng, n)
        out = []
        for i in ids:
            if rng.random() < self.viral_share:
                out.append(("comment-viral", "video-0"))
            else:
                out.append((f"comment-{i}", self.channel_of(i)))
        return out

    def encode(self, key: str, channel: str) -> bytes:
        return orjson.dumps({"type": self.event_type, "key": key, "channel": channel})


@dataclass
class LoadResult:
    sent: int = 0
    accepted: int = 0
    failed: int = 0
    wall_s: float = 0.0
    resent: int = 0  # events sent again, with the same id and sub, after BrokerUnavailable
    hot_keys_split: set[str] = field(default_factory=set)  # keys the SDK split at some point


async def produce_via_sdk(
    client: PipelineClient,
    workload: Workload,
    duration_s: float,
    rate: int = 0,
    chunk: int = 1_000,
    on_progress: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """Like `produce`, through a started PipelineClient: ids made by the SDK, hot keys split.

    Up to a few sends in flight; an event the broker may not have taken is resent with its id and
    sub (so it is counted once either way) and counted as accepted only when acknowledged.
    """
    result = LoadResult()
    started = time.monotonic()
    next_report = started + 1.0
    in_flight: set[asyncio.Task[None]] = set()
    event_type = workload.event_type

    async def send(events: list[dict[str, object]]) -> None:
        for _ in range(20):
            try:
                results = await client.send_many(events)
            except BrokerUnavailable as exc:
                result.accepted += sum(r.accepted for r in exc.results)
                events = exc.resend(events)
                result.resent += len(events)
                await asyncio.sleep(0.2)
                continue
            result.accepted += sum(r.accepted for r in results)
            result.failed += sum(not r.accepted for r in results)
            return
        result.failed += len(events)

    while (now := time.monotonic()) - started < duration_s:
        owed = int(rate * (now - started)) - result.sent if rate else chunk
        if owed < 10 or len(in_flight) >= 4:
            await asyncio.sleep(0.005 if in_flight else 0)
            continue
        events: list[dict[str, object]] = [
            {"type": event_type, "key": key, "channel": channel}
            for key, channel in workload.sample(min(chunk, owed))
        ]
        result.sent += len(events)
        task = asyncio.create_task(send(events))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        if client.splitter is not None:
            result.hot_keys_split.update(client.splitter.splits)
        if on_progress and now >= next_report:
            next_report = now + 1.0
            on_progress(result)
    await asyncio.gather(*in_flight)
    result.wall_s = time.monotonic() - started
    return result


async def produce(
    bootstrap: str,
    topic: str,
    workload: Workload,
    duration_s: float,
    rate: int = 0,
    chunk: int = 2_000,
    on_progress: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """Send for `duration_s` seconds (at `rate` events/s, or as fast as the broker takes them).

    At a set rate each send carries what is owed so far (at most `chunk`): a send
    of a partition waits for its previous batch's acknowledgement, so a fixed
    rate/100 per send fell short of the rate whenever a round trip took over 10 ms.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=10,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    result = LoadResult()
    partitioner = DefaultPartitioner()
    partitions = sorted(await producer.partitions_for(topic))
    started = time.monotonic()
    next_report = started + 1.0
    pending: list[tuple[asyncio.Future[object], int]] = []
    try:
        while (now := time.monotonic()) - started < duration_s:
            owed = int(rate * (now - started)) - result.sent if rate else chunk
            if owed < 10:  # paced: many small sends, not bursts
                await asyncio.sleep(0.005)
                continue
            batches: dict[int, list[tuple[bytes, bytes]]] = {}
            for key, channel in workload.sample(min(chunk, owed)):
                k = message_key(key)
                p = partitioner(k, partitions, partitions)
                batches.setdefault(p, []).append((k, workload.encode(key, channel)))
            for p, msgs in batches.items():
                batch = producer.create_batch()
                n = 0
                for k, v in msgs:
                    if batch.append(key=k, value=v, timestamp=None) is None:
                        pending.append((await producer.send_batch(batch, topic, partition=p), n))
                        batch, n = producer.create_batch(), 0
                        batch.append(key=k, value=v, timestamp=None)
                    n += 1
                pending.append((await producer.send_batch(batch, topic, partition=p), n))
                result.sent += len(msgs)
            if len(pending) > 64:
                await _settle(pending, result)
            if on_progress and now >= next_report:
                next_report = now + 1.0
                on_progress(result)
        await _settle(pending, result)
    finally:
        await producer.stop()
    result.wall_s = time.monotonic() - started
    return result


async def _settle(pending: list[tuple[asyncio.Future[object], int]], result: LoadResult) -> None:
    for fut, n in pending:
        try:
            await fut
            result.accepted += n
        except Exception:
            result.failed += n
    pending.clear()
