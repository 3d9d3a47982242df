"""Announcing hot-key splits so operators and dashboards can see them.

Readers never need this (they merge every sub-key anyway); it is for people.
Two places: the Redis hash `{topology}:splits` (field = key, value = k, removed
when the key is one key again) and the compacted topic `{topology}.splits`
(message key = the key, value = {"key", "k", "writer", "ts"}, a tombstone when
unsplit). Several writers may split the same key with different k: the last
announcement wins, which is enough to see what is hot.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from pipeline.core.redis_layout import splits_key


class SplitAnnouncer:
    def __init__(
        self,
        topology: str,
        writer: str,
        producer: AIOKafkaProducer | None = None,
        redis: aioredis.Redis | None = None,
    ) -> None:
        self.topology = topology
        self.writer = writer
        self.topic = f"{topology}.splits"
        self.producer = producer
        self.redis = redis

    async def announce(self, changes: Mapping[str, int]) -> None:
        """Publish changed splits (k = 1: the key is no longer split)."""
        if not changes:
            return
        if self.redis is not None:
            pipe = self.redis.pipeline(transaction=False)
            name = splits_key(self.topology)
            for key, k in changes.items():
                if k > 1:
                    pipe.hset(name, key, k)
                else:
                    pipe.hdel(name, key)
            await pipe.execute()
        if self.producer is not None:
            now_ms = int(time.time() * 1000)
            futures = []
            for key, k in changes.items():
                value = (
                    orjson.dumps({"key": key, "k": k, "writer": self.writer, "ts": now_ms}) if k > 1 else None
                )
                futures.append(await self.producer.send(self.topic, value, key=key.encode()))
            for fut in futures:
                await fut
