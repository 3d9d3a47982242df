"""Tier 2 runtime, the root merger: partials topic -> Merger -> Redis, then
absolute totals per channel to the updates topic.

Redis, not Kafka, holds the merger's position: each apply stores the offsets
it covers atomically with the data, and a merger (re)starting, or getting new
partitions in a rebalance, seeks to those stored positions. Kafka offsets are
committed too, but only so that lag can be graphed.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from pipeline import observability as obs
from pipeline.core.merger import Merger
from pipeline.core.model import ChannelUpdate
from pipeline.core.topology import Topology
from pipeline.io import kafka, redis_client, redis_query
from pipeline.io.redis_retry import retrying
from pipeline.io.redis_sink import ApplyResult, RedisSink
from pipeline.settings import Settings

LAG_EVERY_S = 2.0
PROGRESS_EVERY_S = 10.0
BLOCKED_RETRY_S = 2.0  # how often a refused batch is tried again


class MergeWorker:
    tier = "merge"

    def __init__(self, topology: Topology, settings: Settings) -> None:
        self.topology = topology
        self.settings = settings
        self.kafka = kafka.connection_from(settings)
        self.group = topology.group(self.tier)
        self.partials_topic = topology.topic("partials")
        self.updates_topic = topology.topic("updates")
        self.labels = (topology.name, self.tier, settings.instance)
        self.log = obs.log(topology=topology.name, tier=self.tier, instance=settings.instance)
        self.merger = Merger(topology)
        self.redis = redis_client.connect(settings)
        self.sink = RedisSink(self.redis, topology)
        self.consumer = kafka.consumer(
            self.kafka,
            self.partials_topic,
            self.group,
            settings.instance,
            read_committed=True,
            max_records=2_000,
        )
        self.producer = kafka.producer(self.kafka, f"{self.group}.{settings.instance}.updates")
        self.partials_in = 0
        self.cells_in = 0
        self.commands = 0

    async def run(self, stop: asyncio.Event) -> None:
        await kafka.ensure_topics(self.kafka, kafka.topology_topics(self.topology))
        await retrying(self.redis.ping)  # wait for Redis, as for any apply
        await self.sink.check_server()
        await kafka.start(self.producer)
        self.consumer.subscribe([self.partials_topic], listener=_SeekToApplied(self))
        await kafka.start(self.consumer)
        self.log.info("started", group=self.group)
        lag_task = asyncio.create_task(self._report_lag(stop))
        member = None
        try:
            await self._loop(stop)
            member = kafka.member_id(self.consumer)
        finally:
            lag_task.cancel()
            await self.consumer.stop()
            await self.producer.stop()
            if member and self.settings.leave_group_on_stop:
                left = await kafka.leave_group(self.kafka, self.group, member)
                self.log.info("left the group", ok=left)
            await self.redis.aclose()
            self.log.info("stopped", partials_in=self.partials_in, redis_commands=self.commands)

    async def _loop(self, stop: asyncio.Event) -> None:
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        poller = kafka.Poller(self.consumer, 2_000, self.settings.idle_backoff_ms / 1000)
        while not stop.is_set():
            batch = await poller.poll()
            if batch:
                await self._apply(batch)
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.log.info(
                    "progress",
                    partials_in=self.partials_in,
                    cells_in=self.cells_in,
                    redis_commands=self.commands,
                )

    async def _apply(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        merger = self.merger
        for tp, records in batch.items():
            for r in records:
                merger.add(tp.partition, r.offset, r.value)
        merged = merger.take()
        result = await self.sink.apply(merged)
        if result.wrong_type is not None:
            await self._hold(result.wrong_type)
            return
        if not result.applied:
            obs.STALE_APPLIES.labels(*self.labels).inc()
            partition = result.stale_partition
            expected = merged.expected.get(partition) if partition is not None else None
            behind = expected is not None and (result.stale_position or -1) < expected
            self.log.warning(
                "Redis lost applied batches; re-applying them from Kafka"
                if behind
                else "batch already applied; seeking to the applied positions",
                partition=partition,
                redis_position=result.stale_position,
                expected=expected,
            )
            await self.seek_to_applied(self.consumer.assignment())
            return
        merger.applied(merged)
        obs.ROOT_BLOCKED.labels(*self.labels).set(0)
        self.partials_in += merged.partials
        self.cells_in += len(merged.cells)
        self.commands += result.plan.commands
        obs.PARTIALS_IN.labels(*self.labels).inc(merged.partials)
        obs.REDIS_COMMANDS.labels(*self.labels).inc(result.plan.commands)
        obs.REDIS_APPLIES.labels(*self.labels).inc()
        if self.commands:
            obs.COALESCING_RATIO.labels(*self.labels).set(self.cells_in / self.commands)
        await self._publish(result)
        try:
            await self.consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batch.items()})
        except KafkaError as exc:  # only lag reporting depends on it
            self.log.info("offset commit skipped", error=repr(exc))

    async def _hold(self, wrong_type: tuple[str, str, str]) -> None:
        """A key holds another type than the apply needs: nothing was written. Say so, wait, and read
        the same partials again: once the key is repaired the batch applies whole, exactly once."""
        key, have, wanted = wrong_type
        obs.APPLIES_REFUSED.labels(*self.labels).inc()
        obs.ROOT_BLOCKED.labels(*self.labels).set(1)
        self.log.error(
            "apply refused: a key holds another type; nothing written, holding until it is repaired",
            key=key,
            holds=have,
            needs=wanted,
            retry_in_s=BLOCKED_RETRY_S,
        )
        await asyncio.sleep(BLOCKED_RETRY_S)
        await self.seek_to_applied(self.consumer.assignment())

    async def _publish(self, result: ApplyResult) -> None:
        """Absolute totals per channel: a lost or repeated update is corrected by the next one."""
        now_ms = int(time.time() * 1000)
        updates: dict[str, ChannelUpdate] = {}
        for report, value in zip(result.plan.reports, result.values, strict=True):
            if report is None:
                continue
            channel, metric, key = report
            update = updates.get(channel)
            if update is None:
                update = updates[channel] = ChannelUpdate(channel, result.seqs[channel], now_ms)
            update.values.append((metric, key, redis_query.number(value)))
        for channel, update in updates.items():
            await self.producer.send(self.updates_topic, update.to_json(), key=channel.encode())
        obs.UPDATES_OUT.labels(*self.labels).inc(len(updates))

    async def seek_to_applied(self, partitions: set[TopicPartition] | list[TopicPartition]) -> None:
        positions = await self.sink.positions()
        self.merger.resume({tp.partition: positions.get(tp.partition) for tp in partitions})
        for tp in partitions:
            last = positions.get(tp.partition)
            if last is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, last + 1)
        if partitions:
            self.log.info(
                "resuming from applied positions",
                positions={tp.partition: positions.get(tp.partition) for tp in partitions},
            )

    async def _report_lag(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(LAG_EVERY_S)
            for partition, behind in (await kafka.lag(self.consumer)).items():
                obs.LAG.labels(*self.labels, str(partition)).set(behind)


class _SeekToApplied(ConsumerRebalanceListener):
    def __init__(self, worker: MergeWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.worker.seek_to_applied(assigned)
