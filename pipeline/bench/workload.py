"""The benchmark's events and a fast pre-loader for them.

A benchmark of the consumers must not wait on its producer, so the topic is
filled before anything is timed, by several processes (one Python producer is
client-bound at ~40k msg/s, see shared/design/local-broker.md) that build
record batches themselves (`create_batch`/`send_batch`) instead of paying
`send()`'s per-message bookkeeping.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from pipeline.harness.zipf import Zipf

ZIPF_S = 1.0
CHANNELS = 50
BATCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Keyspace:
    """Every distinct message of the workload, pre-encoded: key id -> (key bytes, value bytes, partition).

    A like carries nothing but its key and channel, so the K possible messages
    are encoded once and the loaders only pick key ids.
    """

    keys: tuple[bytes, ...]
    values: tuple[bytes, ...]
    partition_of: tuple[int, ...]
    zipf: Zipf

    @classmethod
    def build(cls, n_keys: int, partitions: int) -> Keyspace:
        # aiokafka's own key partitioner, so the layout is what a keyed producer would give.
        partitioner = DefaultPartitioner()
        all_parts = list(range(partitions))
        keys = tuple(f"c{k}".encode() for k in range(n_keys))
        values = tuple(
            orjson.dumps({"type": "like", "key": f"c{k}", "channel": f"v{k % CHANNELS}"})
            for k in range(n_keys)
        )
        part_of = tuple(partitioner(key, all_parts, all_parts) for key in keys)
        return cls(keys, values, part_of, Zipf(n_keys, ZIPF_S))

    def sample(self, n: int, seed: int) -> list[int]:
        """n key ids, Zipf-distributed (key c0 is the hottest), reproducible from the seed."""
        return self.zipf.ranks(random.Random(seed), n)


@dataclass(frozen=True)
class LoadJob:
    """What one loader process sends (plain data: it crosses a process boundary)."""

    bootstrap: str
    topic: str
    partitions: int
    n_keys: int
    events: int
    seed: int
    ids: bool = False  # every event also carries a random uuid id (what the SDK sends)


@dataclass(frozen=True)
class LoadResult:
    events: int
    started: float  # time.time(), comparable across processes
    finished: float


def _load_one(job: LoadJob) -> LoadResult:
    return asyncio.run(_produce(job))


async def _produce(job: LoadJob) -> LoadResult:
    space = Keyspace.build(job.n_keys, job.partitions)
    by_partition: list[list[int]] = [[] for _ in range(job.partitions)]
    part_of = space.partition_of
    for k in space.sample(job.events, job.seed):
        by_partition[part_of[k]].append(k)
    producer = AIOKafkaProducer(
        bootstrap_servers=job.bootstrap,
        client_id=f"bench-loader-{job.seed}",
        enable_idempotence=True,
        acks="all",
        linger_ms=0,
        max_batch_size=BATCH_BYTES,
        max_request_size=4 * BATCH_BYTES,
    )
    await producer.start()
    try:
        started = time.time()
        await asyncio.gather(
            *(
                _send_partition(producer, job.topic, p, ids, space, with_ids=job.ids)
                for p, ids in enumerate(by_partition)
                if ids
            )
        )
        finished = time.time()
    finally:
        await producer.stop()
    return LoadResult(job.events, started, finished)


async def send_in_batches(
    producer: AIOKafkaProducer, topic: str, partition: int, messages: Iterable[tuple[bytes, bytes]]
) -> list[asyncio.Future[object]]:
    """Fill record batches with (key, value) messages and hand each to the producer; their acks."""
    pending: list[asyncio.Future[object]] = []
    batch = producer.create_batch()
    for key, value in messages:
        if batch.append(key=key, value=value, timestamp=None) is None:
            pending.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    if batch.record_count():
        pending.append(await producer.send_batch(batch, topic, partition=partition))
    return pending


async def _send_partition(
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    ids: list[int],
    space: Keyspace,
    *,
    with_ids: bool = False,
) -> None:
    """Fill batches and hand each to the accumulator; aiokafka keeps one in flight per partition."""
    keys, values = space.keys, space.values
    uuids = os.urandom(16 * len(ids)).hex() if with_ids else ""

    def messages() -> Iterable[tuple[bytes, bytes]]:
        for n, k in enumerate(ids):
            # the same like, with `,"id":"<32 hex digits>"` before its closing brace
            yield (
                keys[k],
                values[k][:-1] + b',"id":"' + uuids[32 * n : 32 * n + 32].encode() + b'"}'
                if with_ids
                else values[k],
            )

    await asyncio.gather(*await send_in_batches(producer, topic, partition, messages()))


def preload(
    bootstrap: str,
    topic: str,
    partitions: int,
    events: int,
    n_keys: int,
    *,
    processes: int = 2,
    seed: int = 1,
    ids: bool = False,
) -> float:
    """Put `events` events on `topic` using `processes` loader processes; return events/s.

    The rate is measured from the first loader's first send to the last loader's
    last acknowledgement, so process start-up and event generation are left out.
    """
    shares = [events // processes + (1 if i < events % processes else 0) for i in range(processes)]
    jobs = [
        LoadJob(bootstrap, topic, partitions, n_keys, share, seed * 1000 + i, ids)
        for i, share in enumerate(shares)
        if share
    ]
    if not jobs:
        return 0.0
    if len(jobs) == 1:
        results: Sequence[LoadResult] = [_load_one(jobs[0])]
    else:
        # spawn, not fork: the parent may hold threads and sockets a forked child must not share.
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(_load_one, jobs)
    elapsed = max(r.finished for r in results) - min(r.started for r in results)
    return sum(r.events for r in results) / max(elapsed, 1e-9)
