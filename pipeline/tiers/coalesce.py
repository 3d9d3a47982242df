"""Tier 1 runtime: events topic -> Coalescer -> partials topic, one Kafka
transaction per window.

The partials, the dead letters and the consumed offsets of a window commit
together or not at all, so a worker killed at any moment leaves either the
whole window or nothing; after a restart it re-reads from the committed
offsets and may cut windows differently, which is harmless because the lost
window was never visible to the root (it reads read_committed).

Only the worker that last claimed a partition (pipeline/io/partition_owners)
can commit its offsets: a newly assigned partition is read only after its
previous holders are fenced, and a worker whose transaction fails hands its
partitions to a new producer only where nobody has claimed them since.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.core.coalescer import Coalescer, DeadLetter
from pipeline.core.topology import Topology
from pipeline.io import incarnation, kafka, redis_client
from pipeline.io.partition_owners import PartitionOwners
from pipeline.runtime import observability as obs
from pipeline.runtime.settings import Settings

LAG_EVERY_S = 2.0
PROGRESS_EVERY_S = 10.0
RETRY_EVERY_S = 1.0
FENCE_TIMEOUT_S = 30.0


class CoalesceWorker:
    tier = "coalesce"

    def __init__(self, topology: Topology, settings: Settings) -> None:
        self.topology = topology
        self.settings = settings
        self.kafka = kafka.connection_from(settings)
        self.max_partial_bytes = settings.max_partial_bytes
        self.partial_messages = 0  # partials sent, counting each chunk of a split one
        self.max_partial_bytes_sent = 0
        self.group = topology.group(self.tier)
        self.events_topic = topology.topic("events")
        self.partials_topic = topology.topic("partials")
        self.dead_topic = topology.topic("dead-letters")
        self.labels = (topology.name, self.tier, settings.instance)
        self.log = obs.log(topology=topology.name, tier=self.tier, instance=settings.instance)
        self.producer: AIOKafkaProducer
        self.transactional_id = ""
        self.coalescer = Coalescer(
            topology, topology.partitions.partials, time.monotonic(), settings.max_partial_bytes
        )
        self._dead: list[DeadLetter] = []
        self._lock = asyncio.Lock()
        self.consumer = kafka.consumer(
            self.kafka,
            self.events_topic,
            self.group,
            settings.instance,
            read_committed=True,
            max_records=settings.max_poll_records,
            fetch_min_bytes=settings.fetch_min_bytes,
        )
        self.redis = redis_client.connect(settings)
        self.owners = PartitionOwners(self.redis, self.group)
        # assigned partitions not read: waiting for their claim, or claimed by another worker since
        self._held: set[TopicPartition] = set()
        self._to_claim: set[TopicPartition] = set()
        self._producer_claimed = False  # the current producer holds claims (renew it for new ones)
        self.feed_topic = topology.topic("feed")
        self.dedup_topic = topology.topic("dedup")
        self.events_in = 0
        self.records_in = 0
        self.partials_out = 0

    async def run(self, stop: asyncio.Event) -> None:
        await kafka.ensure_topics(self.kafka, kafka.topology_topics(self.topology))
        await self._new_producer()
        self.consumer.subscribe([self.events_topic], listener=_FlushOnRevoke(self))
        await kafka.start(self.consumer)
        self.log.info("started", group=self.group, transactional_id=self.transactional_id)
        lag_task = asyncio.create_task(self._report_lag(stop))
        member = None
        try:
            await self._loop(stop)
            await self.flush()
            member = kafka.member_id(self.consumer)
        finally:
            lag_task.cancel()
            await self.consumer.stop()
            await self.producer.stop()
            if member and self.settings.leave_group_on_stop:
                left = await kafka.leave_group(self.kafka, self.group, member)
                self.log.info("left the group", ok=left)
            await self.redis.aclose()
            self.log.info("stopped", events_in=self.events_in, partials_out=self.partials_out)

    async def _loop(self, stop: asyncio.Event) -> None:
        c = self.coalescer
        consumer = self.consumer
        records_in = obs.RECORDS_IN.labels(*self.labels)
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        poller = kafka.Poller(
            consumer, self.settings.max_poll_records, self.settings.idle_backoff_ms / 1000, self._held
        )
        while not stop.is_set():
            if self._to_claim and not await self._claim():
                await asyncio.sleep(RETRY_EVERY_S)
                continue
            # an idle pause never outlasts the open window: it closes on time with no new events
            batch = await poller.poll(c.clock.remaining(time.monotonic()))
            if batch:
                for tp, records in batch.items():
                    dead = c.add_batch(tp.partition, records)
                    records_in.inc(len(records))
                    self.records_in += len(records)
                    if dead:
                        self._dead.extend(dead)
            now = time.monotonic()
            if c.due(now):
                await self.flush()
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.log.info(
                    "progress",
                    events_in=self.events_in,
                    partials_out=self.partials_out,
                    ratio=round(self.events_in / max(1, self.partials_out), 1),
                )

    async def flush(self) -> None:
        """Close the window and commit its partials, dead letters and offsets in one transaction."""
        async with self._lock:
            result = self.coalescer.flush(time.monotonic())
            dead, self._dead = self._dead, []
            if not result.next_offsets:
                return
            offsets = {TopicPartition(self.events_topic, p): o for p, o in result.next_offsets.items()}
            try:
                async with self.producer.transaction():
                    sent = []
                    for partial in result.partials:
                        for message in partial.encode(self.max_partial_bytes):
                            sent.append(
                                await self.producer.send(
                                    self.partials_topic, message, partition=partial.root_partition
                                )
                            )
                            self.partial_messages += 1
                            self.max_partial_bytes_sent = max(self.max_partial_bytes_sent, len(message))
                    for channel, raw in result.feed:
                        sent.append(await self.producer.send(self.feed_topic, raw, key=channel.encode()))
                    for d in dead:
                        sent.append(
                            await self.producer.send(self.dead_topic, d.raw, headers=_dead_headers(self, d))
                        )
                    # the ids this window counted: a new owner of the partition rebuilds from these
                    for partition, records in result.changelog.items():
                        for record in records:
                            sent.append(
                                await self.producer.send(self.dedup_topic, record, partition=partition)
                            )
                    # aiokafka commits a transaction even if a record in it failed (e.g.
                    # OutOfOrderSequenceNumber after a broker restart): wait for every delivery
                    # so that a failure aborts the window instead of committing its offsets alone
                    await asyncio.gather(*sent)
                    await self.producer.send_offsets_to_transaction(offsets, self.group)
            except KafkaError as exc:
                # Nothing of the window is visible; read it again from the committed offsets, with
                # a new producer: the old one may be fenced (a newer owner of some partition) or
                # forgotten by a restarted broker (OutOfOrderSequenceNumber on every later send).
                obs.TX_ABORTS.labels(*self.labels).inc()
                self.log.warning("transaction aborted; rewinding", error=repr(exc), window=result.window)
                self.coalescer.aborted()
                await self._after_abort()
                return
            self.coalescer.committed(result)
            self._count(result.events, len(result.partials), result.cells, dead)

    def drop_dead_letters(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        self._dead = [d for d in self._dead if d.partition not in gone]

    def _count(self, events: int, partials: int, cells: int, dead: list[DeadLetter]) -> None:
        self.events_in += events
        self.partials_out += partials
        obs.EVENTS_IN.labels(*self.labels).inc(events)
        obs.PARTIALS_OUT.labels(*self.labels).inc(partials)
        obs.CELLS_OUT.labels(*self.labels).inc(cells)
        obs.TRANSACTIONS.labels(*self.labels).inc()
        obs.WINDOW_CELLS.labels(*self.labels).set(cells)
        for d in dead:
            obs.DEAD_LETTERS.labels(*self.labels, d.field or "").inc()
        if dead:
            self.log.warning("dead letters", count=len(dead), first_reason=dead[0].reason)
        if self.partials_out:
            obs.COALESCING_RATIO.labels(*self.labels).set(self.events_in / self.partials_out)

    async def _new_producer(self) -> None:
        """A fresh transactional id (fencing this worker's previous one) and its producer."""
        self.transactional_id = await incarnation.begin(
            self.redis, self.kafka, self.group, self.settings.instance
        )
        self.producer = kafka.transactional_producer(self.kafka, self.transactional_id)
        await kafka.start(self.producer)
        self._producer_claimed = False

    async def _renew_producer(self) -> None:
        old = self.producer
        try:
            await asyncio.wait_for(old.stop(), 10)
        except Exception as exc:  # it is being replaced: nothing of it is needed any more
            self.log.warning("stopping the old producer failed", error=repr(exc))
        while True:
            try:
                await self._new_producer()
                break
            except (KafkaError, OSError) as exc:  # the broker is away: no window can commit anyway
                self.log.warning("cannot start a producer yet; retrying", error=repr(exc))
                await asyncio.sleep(RETRY_EVERY_S)
        self.log.info("producer renewed", transactional_id=self.transactional_id)

    def _reading(self) -> set[TopicPartition]:
        return self.consumer.assignment() - self._held

    async def _claim(self) -> bool:
        """Claim newly assigned partitions, fence their previous holders, then read from the commits."""
        async with self._lock:
            claiming = self._to_claim & self.consumer.assignment()
            try:
                if self._producer_claimed:
                    # a new producer per assignment: the new owners of partitions this worker had
                    # fence its previous id, and must not abort the windows of the ones it keeps
                    await self._renew_producer()
                partitions = sorted(tp.partition for tp in claiming)
                for previous in await self.owners.claim(partitions, self.transactional_id):
                    # bounded: a broker that never settles an old transaction must not hold the
                    # lock (and a rebalance waiting for it) for ever; the claim is simply retried
                    await asyncio.wait_for(kafka.fence(self.kafka, previous), FENCE_TIMEOUT_S)
                self._producer_claimed = True
                self.coalescer.forget(partitions)
                self.drop_dead_letters(partitions)
                await self._restore_ids(await self._seek_to_committed(claiming))
            except (KafkaError, OSError, TimeoutError) as exc:
                self.log.warning("claiming partitions failed; retrying", error=repr(exc))
                return False
            self._to_claim.clear()
            self._held.difference_update(claiming)
            self.consumer.resume(*claiming)
            self.log.info("claimed", partitions=partitions, transactional_id=self.transactional_id)
            return True

    async def _after_abort(self) -> None:
        """Renew the producer; keep reading only the partitions nobody claimed meanwhile."""
        old_id = self.transactional_id
        await self._renew_producer()
        reading = self._reading()
        partitions = sorted(tp.partition for tp in reading)
        kept = await self.owners.hand_over(partitions, old_id, self.transactional_id)
        self._producer_claimed = True
        lost = {tp for tp in reading if tp.partition not in kept}
        if lost:
            # another worker claimed them: hold them until the group hands out partitions again
            self.consumer.pause(*lost)
            self._held.update(lost)
            self.coalescer.forget(tp.partition for tp in lost)
            self.coalescer.drop_ids(tp.partition for tp in lost)
            self.drop_dead_letters(tp.partition for tp in lost)
            gone = sorted(tp.partition for tp in lost)
            self.log.warning("partitions claimed by another worker", partitions=gone)
        # A commit that failed on our side may still have committed on the broker (its answer lost
        # with a broker): then its ids are in the changelog though no longer in memory. The offsets
        # say so (they moved past what this worker last saw commit), and the ids are read back.
        await self._restore_ids(await self._seek_to_committed(reading - lost))

    async def _seek_to_committed(self, partitions: Iterable[TopicPartition]) -> dict[int, int]:
        """Seek each partition to its committed offset; returns them (-1: none committed yet)."""
        out: dict[int, int] = {}
        for tp in partitions:
            committed = await self.consumer.committed(tp)
            if committed is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
            out[tp.partition] = -1 if committed is None else committed
        return out

    async def _restore_ids(self, committed: dict[int, int]) -> None:
        """Rebuild the dedup state of claimed partitions from their changelog, unless it is current.

        It is current when this worker committed the partition's last window itself (it kept the
        partition, or got it back with nothing committed meanwhile). Read after the fence: exactly
        the ids of committed windows.
        """
        if not self.topology.dedup_horizon_s:
            return
        c = self.coalescer
        stale = sorted(p for p, offset in committed.items() if not c.ids_current(p, offset))
        if not stale:
            return
        started = time.monotonic()
        logs = await kafka.read_to_end(self.kafka, self.dedup_topic, stale)
        ids = sum(c.restore_ids(p, logs[p], committed[p]) for p in stale)
        self.log.info(
            "dedup state rebuilt",
            partitions=stale,
            ids=ids,
            records=sum(len(r) for r in logs.values()),
            seconds=round(time.monotonic() - started, 2),
        )

    def assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """A new generation: hold every assigned partition until it is claimed."""
        partitions = set(assigned)
        self.coalescer.drop_ids(set(self.coalescer.ids_held()) - {tp.partition for tp in partitions})
        self.consumer.pause(*partitions)
        self._held.clear()
        self._held.update(partitions)
        self._to_claim = set(partitions)

    async def _report_lag(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(LAG_EVERY_S)
            for partition, behind in (await kafka.lag(self.consumer)).items():
                obs.LAG.labels(*self.labels, str(partition)).set(behind)


def _dead_headers(worker: CoalesceWorker, d: DeadLetter) -> list[tuple[str, bytes]]:
    return [
        ("reason", d.reason.encode()),
        ("field", (d.field or "").encode()),
        ("source", f"{worker.events_topic}/{d.partition}/{d.offset}".encode()),
        ("worker", f"{worker.group}.{worker.settings.instance}".encode()),
    ]


class _FlushOnRevoke(ConsumerRebalanceListener):
    """Commit what is pending before partitions move, so their new owner starts exactly there."""

    def __init__(self, worker: CoalesceWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        try:
            await self.worker.flush()
        except Exception:
            # The new owner starts from the committed offsets: never flush this state later.
            self.worker.log.exception("flush before revocation failed; dropping uncommitted state")
            self.worker.coalescer.forget(tp.partition for tp in revoked)
            self.worker.coalescer.drop_ids(tp.partition for tp in revoked)
            self.worker.drop_dead_letters(tp.partition for tp in revoked)
            raise

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.worker.log.info("assigned", partitions=sorted(tp.partition for tp in assigned))
        # claimed in the worker's loop, not here: aiokafka logs and ignores a listener's errors
        self.worker.assigned(assigned)
