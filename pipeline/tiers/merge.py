"""Tier 2 runtime, the root merger: partials topic -> Merger -> Redis, then
absolute totals per channel to the updates topic.

Redis, not Kafka, holds the merger's position: each apply stores the offsets
it covers atomically with the data, and a merger (re)starting, or getting new
partitions in a rebalance, seeks to those stored positions. Kafka offsets are
committed too, but only so that lag can be graphed.

Each partials partition's records are applied on their own (one root partition
per apply: its keys share one hash tag, docs/CONTRACT.md), so a batch the apply
refuses before writing (a key or a value it cannot take) holds only the partials
partition whose cells meet the bad key. That partition is held and tried again every 2 s;
still refused after `quarantine_after_s`, the batch is quarantined and the
partition stays stopped until `pipeline replay-quarantine` lifts it
(pipeline/io/quarantine.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.core.merger import NOTHING_APPLIED, UNKNOWN, MergedBatch, Merger
from pipeline.core.topology import Topology
from pipeline.io import kafka, quarantine, redis_client
from pipeline.io.quarantine import Quarantined, QuarantineState
from pipeline.io.redis_retry import retrying
from pipeline.io.redis_sink import ApplyResult, RedisSink, Refusal
from pipeline.runtime import observability as obs
from pipeline.runtime.settings import Settings
from pipeline.tiers.comment_feed import CommentFeed

LAG_EVERY_S = 2.0
PROGRESS_EVERY_S = 10.0
BLOCKED_RETRY_S = 2.0  # how often a refused batch is tried again, and a quarantine looked up
VERIFY_EVERY_S = 2.0  # how often the applied positions are compared with what Redis holds

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


@dataclass(slots=True)
class _Blocked:
    """A partials partition whose batch the apply refuses: held, and tried again at `retry_at`."""

    since: float  # first refusal (monotonic)
    retry_at: float  # 0: sought back and waiting for the batch to be read again
    refusal: Refusal


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
        self.quarantine_after_s = settings.quarantine_after_s
        self.quarantine = QuarantineState(self.redis, topology)
        self.held: set[TopicPartition] = set()  # paused on purpose: refused or quarantined batches
        self.blocked: dict[TopicPartition, _Blocked] = {}
        self.quarantined: dict[TopicPartition, Quarantined] = {}

    async def run(self, stop: asyncio.Event) -> None:
        await kafka.ensure_topics(
            self.kafka, [*kafka.topology_topics(self.topology), quarantine.topic_spec(self.topology)]
        )
        await retrying(self.redis.ping)  # wait for Redis, as for any apply
        await self.sink.check_server()
        await kafka.start(self.producer)
        self.consumer.subscribe([self.partials_topic], listener=_SeekToApplied(self))
        await kafka.start(self.consumer)
        self.log.info("started", group=self.group)
        lag_task = asyncio.create_task(
            kafka.report_lag(self.consumer, obs.LAG, self.labels, stop, LAG_EVERY_S)
        )
        # the root's second job: the feed's comments into each channel's history, exactly once
        feed_task = asyncio.create_task(CommentFeed(self.topology, self.settings, self.redis).run(stop))
        member = None
        try:
            await self._loop(stop)
            member = kafka.member_id(self.consumer)
        finally:
            lag_task.cancel()
            await asyncio.gather(feed_task, return_exceptions=True)
            await self.consumer.stop()
            await self.producer.stop()
            if member and self.settings.leave_group_on_stop:
                left = await kafka.leave_group(self.kafka, self.group, member)
                self.log.info("left the group", ok=left)
            await self.redis.aclose()
            self.log.info("stopped", partials_in=self.partials_in, redis_commands=self.commands)

    async def _loop(self, stop: asyncio.Event) -> None:
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        next_lookup = 0.0
        next_verify = time.monotonic() + VERIFY_EVERY_S
        poller = kafka.Poller(self.consumer, 2_000, self.settings.idle_backoff_ms / 1000, held=self.held)
        while not stop.is_set():
            batch = await poller.poll()
            if batch:
                await self._apply(batch)
            now = time.monotonic()
            if now >= next_verify:
                next_verify = now + VERIFY_EVERY_S
                await self._verify_positions()
            if self.blocked:
                await self._retry_due(now)
            if self.quarantined and now >= next_lookup:
                next_lookup = now + BLOCKED_RETRY_S
                await self._resume_lifted()
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.log.info(
                    "progress",
                    partials_in=self.partials_in,
                    cells_in=self.cells_in,
                    redis_commands=self.commands,
                )

    async def _verify_positions(self) -> None:
        """Redis may lose applied batches without a later apply to notice it: a promoted replica of a
        Redis Cluster that had not received them, or a master that restarts, accepts writes and then
        learns it was replaced. A partition whose position in Redis is behind what this root applied is
        sought back and applied again from Kafka (as a refused range would be)."""
        held = await self.sink.positions()
        behind = []
        for tp in self.consumer.assignment():
            mine = self.merger.position(tp.partition)
            if tp not in self.held and mine is not None and held.get(tp.partition, -1) < mine:
                behind.append(tp)
        if behind:
            obs.STALE_APPLIES.labels(*self.labels).inc(len(behind))
            self.log.warning(
                "Redis lost applied batches; re-applying them from Kafka",
                redis_positions={tp.partition: held.get(tp.partition) for tp in behind},
                applied={tp.partition: self.merger.position(tp.partition) for tp in behind},
            )
            await self.seek_to_applied(behind)

    async def _apply(self, batch: Records) -> None:
        # one apply per partials (root) partition: its keys share one hash tag, so that on Redis Cluster
        # the apply runs on one shard; a refusal holds only the partition whose cells meet the bad key
        for tp, records in batch.items():
            if not records or tp in self.held:
                continue
            got = await self._apply_records({tp: records})
            if got is None:
                return  # out of step with Redis: sought again
            if got[1].refused is not None:
                await self._refused(tp, records, *got)

    async def _apply_records(self, batch: Records) -> tuple[MergedBatch, ApplyResult] | None:
        """Merge and apply; None when Redis was out of step (refused range) and the partitions sought."""
        merger = self.merger
        for tp, records in batch.items():
            for r in records:
                merger.add(tp.partition, r.offset, r.value)
        merged = merger.take()
        started = time.perf_counter()
        result = await self.sink.apply(merged)
        obs.ROOT_APPLY_SECONDS.labels(*self.labels).observe(time.perf_counter() - started)
        if result.refused is not None:
            return merged, result
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
            return None
        merger.applied(merged)
        for tp in batch:
            self._unblock(tp)
        self.partials_in += merged.partials
        self.cells_in += len(merged.cells)
        self.commands += result.plan.commands
        obs.PARTIALS_IN.labels(*self.labels).inc(merged.partials)
        obs.REDIS_COMMANDS.labels(*self.labels).inc(result.plan.commands)
        obs.REDIS_APPLIES.labels(*self.labels).inc()
        if self.commands:
            obs.COALESCING_RATIO.labels(*self.labels).set(self.cells_in / self.commands)
        sent = await quarantine.publish(self.producer, self.updates_topic, result)
        obs.UPDATES_OUT.labels(*self.labels).inc(sent)
        try:
            await self.consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batch.items()})
        except KafkaError as exc:  # only lag reporting depends on it
            self.log.info("offset commit skipped", error=repr(exc))
        return merged, result

    # --- refused batches: hold, try again, quarantine ------------------------------------------------

    async def _refused(
        self,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        merged: MergedBatch,
        result: ApplyResult,
    ) -> None:
        """Nothing of the batch was written. Hold the partition and try again in a while; quarantine the
        batch once it has been refused for `quarantine_after_s`."""
        refusal = result.refused
        assert refusal is not None
        now = time.monotonic()
        blocked = self.blocked.setdefault(tp, _Blocked(now, 0.0, refusal))
        blocked.refusal = refusal
        obs.APPLIES_REFUSED.labels(*self.labels).inc()
        self._hold(tp)
        quarantine_in = blocked.since + self.quarantine_after_s - now
        self.log.error(
            "apply refused: a key holds what the apply cannot take; nothing written, holding the partition",
            partition=tp.partition,
            key=refusal.key,
            holds=refusal.holds,
            needs=refusal.needs,
            retry_in_s=BLOCKED_RETRY_S,
            quarantine_in_s=round(max(0.0, quarantine_in), 1),
        )
        if quarantine_in <= 0:
            expected = merged.expected.get(tp.partition, UNKNOWN)
            if expected == UNKNOWN:
                expected = (await self.sink.positions()).get(tp.partition, NOTHING_APPLIED)
            await self._quarantine(tp, records, expected, refusal)
        else:
            blocked.retry_at = now + BLOCKED_RETRY_S

    async def _quarantine(
        self,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        expected: int,
        refusal: Refusal,
    ) -> None:
        by = f"{self.group}.{self.settings.instance}"
        messages = [(r.offset, r.key, r.value) for r in records]
        q = await quarantine.send(self.producer, self.topology, tp.partition, messages, refusal, expected, by)
        await self.quarantine.record(q)
        self.blocked.pop(tp, None)
        self.quarantined[tp] = q
        obs.BATCHES_QUARANTINED.labels(*self.labels).inc()
        obs.ROOT_QUARANTINED.labels(*self.labels, str(tp.partition)).set(1)
        self.log.error(
            "batch quarantined: its partials partition stops until the key is repaired and it is replayed",
            partition=tp.partition,
            first_offset=q.first,
            last_offset=q.last,
            partials=q.messages,
            key=q.key,
            holds=q.holds,
            needs=q.needs,
            copies=f"{q.topic}/{q.copy_partition}/{q.copy_first}-{q.copy_last}",
            replay=f"pipeline replay-quarantine {self.topology.name} --partition {tp.partition}",
        )

    async def _retry_due(self, now: float) -> None:
        for tp, blocked in list(self.blocked.items()):
            if blocked.retry_at and now >= blocked.retry_at:
                blocked.retry_at = 0.0
                await self.seek_to_applied([tp])
                self._unhold(tp)

    async def _resume_lifted(self) -> None:
        """Resume the partitions whose quarantine was lifted (replayed, or released) since last looked."""
        current = await self.quarantine.all()
        for tp, q in list(self.quarantined.items()):
            now_held = current.get(tp.partition)
            if now_held is not None:
                self.quarantined[tp] = now_held  # perhaps quarantined again meanwhile, by another root
                continue
            del self.quarantined[tp]
            obs.ROOT_QUARANTINED.labels(*self.labels, str(tp.partition)).set(0)
            self.log.warning(
                "quarantine lifted; resuming the partition from the applied position",
                partition=tp.partition,
                first_offset=q.first,
                last_offset=q.last,
            )
            await self.seek_to_applied([tp])
            self._unhold(tp)
        self._blocked_gauge()

    async def hold_quarantined(self, assigned: list[TopicPartition]) -> None:
        """Partitions given to this root whose batch is in quarantine stay stopped here too."""
        if not assigned:
            return
        current = await self.quarantine.all()
        for tp in assigned:
            q = current.get(tp.partition)
            if q is None:
                continue
            self.quarantined[tp] = q
            self._hold(tp)
            obs.ROOT_QUARANTINED.labels(*self.labels, str(tp.partition)).set(1)
            self.log.error(
                "partition quarantined: held until the batch is replayed",
                partition=tp.partition,
                first_offset=q.first,
                last_offset=q.last,
                reason=q.reason,
                replay=f"pipeline replay-quarantine {self.topology.name} --partition {tp.partition}",
            )

    def forget(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.held.discard(tp)
            self.blocked.pop(tp, None)
            if self.quarantined.pop(tp, None) is not None:
                obs.ROOT_QUARANTINED.labels(*self.labels, str(tp.partition)).set(0)
        self._blocked_gauge()

    def _hold(self, tp: TopicPartition) -> None:
        self.held.add(tp)
        if tp in self.consumer.assignment():
            self.consumer.pause(tp)
        self._blocked_gauge()

    def _unhold(self, tp: TopicPartition) -> None:
        self.held.discard(tp)
        if tp in self.consumer.assignment():
            self.consumer.resume(tp)

    def _unblock(self, tp: TopicPartition) -> None:
        blocked = self.blocked.pop(tp, None)
        if blocked is not None:
            self.log.warning(
                "refused batch applied once repaired",
                partition=tp.partition,
                key=blocked.refusal.key,
                held_s=round(time.monotonic() - blocked.since, 1),
            )
            self._blocked_gauge()

    def _blocked_gauge(self) -> None:
        obs.ROOT_BLOCKED.labels(*self.labels).set(1 if self.blocked or self.quarantined else 0)

    async def seek_to_applied(self, partitions: set[TopicPartition] | list[TopicPartition]) -> None:
        positions = await self.sink.positions()
        self.merger.resume({tp.partition: positions.get(tp.partition) for tp in partitions})
        await kafka.seek_after(self.consumer, partitions, positions)
        if partitions:
            self.log.info(
                "resuming from applied positions",
                positions={tp.partition: positions.get(tp.partition) for tp in partitions},
            )


class _SeekToApplied(ConsumerRebalanceListener):
    def __init__(self, worker: MergeWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.worker.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.worker.seek_to_applied(assigned)
        await self.worker.hold_quarantined(assigned)
