"""Synthetic load: Zipf-distributed keys plus one viral key, written to the events topic.

Counts what the broker acknowledged (`accepted`), which is what the pipeline
must end up counting exactly.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from pipeline.core.model import message_key
from pipeline.core.zipf import Zipf


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
