"""The root tier's second loop: the feed topic -> each channel's comment history in Redis, exactly once.

It runs inside every root merger (`merge.py` starts it) as a member of its own consumer
group, `T.merge-feed`, reading `read_committed` (tier 1 writes the feed in its
transactions). Each batch goes through `core/comment_history.plan` and one Lua script
per channel (`io/comment_history.py`) that skips what was already applied, by feed
offset: a replay after a crash, a rebalance or a zombie never repeats a comment. Kafka
offsets are committed after the apply, only to resume near where the group stopped.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from pipeline.core import comment_history
from pipeline.core.comment_history import FeedRecord
from pipeline.core.topology import Topology
from pipeline.io import kafka
from pipeline.io.comment_history import CommentHistory, history_policy
from pipeline.runtime import observability as obs
from pipeline.runtime.settings import Settings

RETRY_S = 1.0


class CommentFeed:
    tier = "merge"

    def __init__(self, topology: Topology, settings: Settings, redis: aioredis.Redis) -> None:
        self.topology = topology
        self.settings = settings
        self.feed_types = topology.feed_types
        self.topic = topology.topic("feed")
        self.group = topology.group("merge-feed")
        self.labels = (topology.name, self.tier, settings.instance)
        self.log = obs.log(topology=topology.name, tier=self.tier, instance=settings.instance, loop="feed")
        self.history = CommentHistory(redis, topology.name, history_policy(settings))
        self.kafka = kafka.connection_from(settings)
        self.consumer = kafka.consumer(
            self.kafka, self.topic, self.group, settings.instance, max_records=2_000
        )
        self.appended = 0

    async def run(self, stop: asyncio.Event) -> None:
        if not self.feed_types:
            return  # a topology without feed types has no comments
        self.consumer.subscribe([self.topic])
        await kafka.start(self.consumer)
        self.log.info("comment history: reading the feed", group=self.group)
        member = None
        try:
            await self._loop(stop)
            member = kafka.member_id(self.consumer)
        except Exception as exc:  # the root goes on applying partials; the log says why comments stopped
            self.log.error("comment history: the feed loop failed", error=repr(exc))
            raise
        finally:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            if member and self.settings.leave_group_on_stop:  # as the root itself: hand the feed over at once
                with contextlib.suppress(Exception):
                    await kafka.leave_group(self.kafka, self.group, member)
            self.log.info("comment history: stopped", appended=self.appended)

    async def _loop(self, stop: asyncio.Event) -> None:
        poller = kafka.Poller(self.consumer, 2_000, self.settings.idle_backoff_ms / 1000)
        while not stop.is_set():
            batch = await poller.poll()
            if not batch:
                continue
            records = [
                FeedRecord(tp.partition, r.offset, r.timestamp, r.value)
                for tp, rs in batch.items()
                for r in rs
            ]
            appends = comment_history.plan(records, self.feed_types)
            while True:
                try:
                    added = await self.history.append(appends)
                    break
                except (RedisError, OSError) as exc:
                    if stop.is_set():
                        return  # not applied, not committed: read again at the next start
                    self.log.warning("comment history: Redis unavailable; retrying", error=repr(exc))
                    await asyncio.sleep(RETRY_S)
            self.appended += added
            obs.COMMENT_HISTORY.labels(*self.labels).inc(added)
            try:
                await self.consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
            except KafkaError as exc:  # the offsets in Redis keep it exact; this only saves re-reads
                self.log.info("feed offset commit skipped", error=repr(exc))
