"""A fresh transactional id for every start of a worker, fencing the one before.

Static membership keeps a worker's *group* identity stable across restarts;
its *transactional* id changes with every start and the previous one is
fenced first. Why not reuse one id: a read_committed consumer that resumes
after a transaction aborted by a crash must still recognise later committed
data of the same producer. Apache Kafka answers a fetch with only the aborted
transactions that overlap it, but a broker that reports older ones makes the
consumer skip every later batch of that producer id (seen on the local
broker, docs/ARCHITECTURE.md). A new id per start gives a new producer id,
so an old abort can only ever hide data of a producer that is gone.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from pipeline.io import kafka
from pipeline.io.redis_retry import retrying


def key(group: str, instance: str) -> str:
    """The Redis key holding the transactional id of a worker's current start."""
    return f"{group}:txid:{instance}"


async def begin(client: aioredis.Redis, bootstrap: kafka.KafkaTarget, group: str, instance: str) -> str:
    """Record and return this start's transactional id, after fencing the previous start's."""
    new_id, _ = await start(client, bootstrap, group, instance)
    return new_id


async def start(
    client: aioredis.Redis, bootstrap: kafka.KafkaTarget, group: str, instance: str
) -> tuple[str, str | None]:
    """Like `begin`; also returns the previous start's id, which it fenced (None: first start)."""
    new_id = f"{group}.{instance}.{time.time_ns():x}"
    previous = await retrying(lambda: client.getset(key(group, instance), new_id))
    if not previous:
        return new_id, None
    fenced = previous.decode() if isinstance(previous, bytes) else str(previous)
    await kafka.fence(bootstrap, fenced)
    return new_id, fenced
