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
partitions to a new producer only where nobody has claimed them since. Those
decisions are made by the sans-I/O state machine in pipeline/core/ownership.py;
this module only carries out its actions and reports their results.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from pipeline.core import ownership as own
from pipeline.core.coalescer import Coalescer, DeadLetter, Flush
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
        # a closed window's transaction, committing while the loop reads the next window; it holds
        # the lock until it is done, so a window closes, and ownership moves, only after it
        self._committing: asyncio.Task[None] | None = None
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
        self.ownership = own.Ownership(self.coalescer.ids_current if topology.dedup_horizon_s else None)
        # assigned partitions not read (ownership.held), for the poller never to resume them
        self._held: set[TopicPartition] = set()
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
        lag_task = asyncio.create_task(
            kafka.report_lag(self.consumer, obs.LAG, self.labels, stop, LAG_EVERY_S)
        )
        member = None
        try:
            await self._loop(stop)
            await self.flush()
            member = kafka.member_id(self.consumer)
        finally:
            lag_task.cancel()
            if self._committing is not None and not self._committing.done():
                # the loop failed while a window committed: let the transaction end first
                await asyncio.wait([self._committing], timeout=30)
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
            self._committed_or_raise()
            if self.ownership.pending and not await self._proceed():
                await asyncio.sleep(RETRY_EVERY_S)
                continue
            # an idle pause never outlasts the open window: it closes on time with no new events
            batch = await poller.poll(c.clock.remaining(time.monotonic()))
            if batch:
                reading = self.ownership.reading
                for tp, records in batch.items():
                    if tp.partition not in reading:  # fetched before it was paused: read again later
                        continue
                    dead = c.add_batch(tp.partition, records)
                    records_in.inc(len(records))
                    self.records_in += len(records)
                    if dead:
                        self._dead.extend(dead)
            now = time.monotonic()
            if c.due(now):
                await self._flush_behind()
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.log.info(
                    "progress",
                    events_in=self.events_in,
                    partials_out=self.partials_out,
                    ratio=round(self.events_in / max(1, self.partials_out), 1),
                )

    async def flush(self) -> None:
        """Close the window and commit its partials, dead letters and offsets in one transaction;
        return once it has committed (or aborted)."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        """`flush`, the lock held."""
        self._committed_or_raise()
        closed = self._close()
        if closed is not None:
            await self._commit(*closed)

    async def _flush_behind(self) -> None:
        """Close the window and commit it in the background while the loop reads the next one.

        The transaction's round trips (deliveries, offsets, commit) leave the loop idle for a good
        part of each flush; meanwhile the next window fills. Its records come after the closed
        window's, so if the transaction aborts both are read again from the committed offsets
        (`Coalescer.aborted` drops everything since the last committed window).
        """
        await self._lock.acquire()  # the previous window's commit holds it until it is done
        try:
            self._committed_or_raise()
            closed = self._close()
        except BaseException:
            self._lock.release()
            raise
        if closed is None:
            self._lock.release()
            return
        self._committing = asyncio.create_task(self._commit_then_release(*closed))

    async def _commit_then_release(self, result: Flush, dead: list[DeadLetter], started: float) -> None:
        try:
            await self._commit(result, dead, started)
        finally:
            self._lock.release()

    def _committed_or_raise(self) -> None:
        """Forget the background commit once it is done; what failed it (other than an abort,
        which it carried out itself) fails the worker."""
        task = self._committing
        if task is not None and task.done():
            self._committing = None
            task.result()

    def _close(self) -> tuple[Flush, list[DeadLetter], float] | None:
        started = time.perf_counter()
        result = self.coalescer.flush(time.monotonic())
        dead, self._dead = self._dead, []
        if not result.next_offsets:
            return None
        return result, dead, started

    async def _commit(self, result: Flush, dead: list[DeadLetter], started: float) -> None:
        """Commit a closed window's partials, feed, dead letters, ids and offsets in one transaction
        (the lock held); an abort rewinds to the committed offsets."""
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
                        sent.append(await self.producer.send(self.dedup_topic, record, partition=partition))
                # aiokafka commits a transaction even if a record in it failed (e.g.
                # OutOfOrderSequenceNumber after a broker restart): wait for every delivery
                # so that a failure aborts the window instead of committing its offsets alone.
                # (Not meanwhile: adding the offsets while the records are in flight made Apache
                # Kafka 4.1 answer some of them NOT_ENOUGH_REPLICAS, retried after 100 ms.)
                await asyncio.gather(*sent)
                await self.producer.send_offsets_to_transaction(offsets, self.group)
                committing = time.perf_counter()  # the commit runs as the block exits
        except KafkaError as exc:
            # Nothing of the window is visible; read it again from the committed offsets, with
            # a new producer: the old one may be fenced (a newer owner of some partition) or
            # forgotten by a restarted broker (OutOfOrderSequenceNumber on every later send).
            obs.TX_ABORTS.labels(*self.labels).inc()
            self.log.warning("transaction aborted; rewinding", error=repr(exc), window=result.window)
            self.coalescer.aborted()
            self._dead = []  # the next window's, read again with it
            await self._carry_out(self.ownership.handle(own.Aborted()))
            return
        done = time.perf_counter()
        obs.TX_COMMIT_SECONDS.labels(*self.labels).observe(done - committing)
        obs.WINDOW_FLUSH_SECONDS.labels(*self.labels).observe(done - started)
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
        await self._carry_out(self.ownership.handle(await self._start_producer()))

    async def _start_producer(self) -> own.ProducerRenewed:
        transactional_id, fenced = await incarnation.start(
            self.redis, self.kafka, self.group, self.settings.instance
        )
        producer = kafka.transactional_producer(self.kafka, transactional_id)
        await kafka.start(producer)
        self.producer, self.transactional_id = producer, transactional_id
        return own.ProducerRenewed(transactional_id, fenced)

    async def _renew_producer(self) -> own.ProducerRenewed:
        old = self.producer
        try:
            await asyncio.wait_for(old.stop(), 10)
        except Exception as exc:  # it is being replaced: nothing of it is needed any more
            self.log.warning("stopping the old producer failed", error=repr(exc))
        renewed = await self._start_producer()
        self.log.info("producer renewed", transactional_id=self.transactional_id, fenced=renewed.fenced)
        return renewed

    # --- ownership: the state machine decides, this carries it out ---

    def assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """A new generation: hold every assigned partition until it is claimed (local actions only)."""
        for action in self.ownership.handle(own.Assigned(frozenset(tp.partition for tp in assigned))):
            self._local(action)

    async def revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Flush the window before partitions move, so their next owner starts exactly there."""
        partitions = frozenset(tp.partition for tp in revoked)
        async with self._lock:
            await self._carry_out(self.ownership.handle(own.Revoked(partitions)))

    async def _proceed(self) -> bool:
        """Carry out pending ownership work (claims, fences, rewinds); False if a step failed."""
        async with self._lock:
            await self._carry_out(self.ownership.handle(own.Proceed()))
        return not self.ownership.pending

    async def _carry_out(self, actions: list[own.Action]) -> None:
        """Carry out actions in order, feeding each answer back (the lock is held)."""
        for action in actions:
            answer = await self._do(action)
            if answer is not None:
                await self._carry_out(self.ownership.handle(answer))
        self._sync_held()

    async def _do(self, action: own.Action) -> own.Event | None:
        if isinstance(action, own.Flush):
            try:
                await self._flush()
            except Exception:
                # The new owner starts from the committed offsets: never flush this state later.
                self.log.exception("flush before revocation failed; dropping uncommitted state")
                await self._carry_out(self.ownership.handle(own.FlushFailed(action.partitions)))
                raise
            return own.WindowFlushed(action.partitions)
        if isinstance(action, own.RecordFenced):
            try:
                await self.owners.record_fenced(action.ids)
            except (RedisError, OSError) as exc:  # only saves the other workers a fence
                self.log.warning("recording fenced ids failed", error=repr(exc))
            return None
        if not isinstance(action, own.Asking):
            self._local(action)
            return None
        try:
            return await self._ask(action)
        except (KafkaError, RedisError, OSError, TimeoutError) as exc:
            self.log.warning("ownership step failed; retrying", step=type(action).__name__, error=repr(exc))
            return own.Failed(action, repr(exc))

    async def _ask(self, action: own.Asking) -> own.Event:
        match action:
            case own.RenewProducer():
                return await self._renew_producer()
            case own.Claim(partitions, producer_id):
                previous = await self.owners.claim(sorted(partitions), producer_id)
                return own.Claimed(action, frozenset(previous))
            case own.Fence(ids):
                return own.Fenced(action, await self._fence(ids))
            case own.HandOver(partitions, old_id, new_id):
                kept = await self.owners.hand_over(sorted(partitions), old_id, new_id)
                return own.HandedOver(action, frozenset(kept))
            case own.FetchCommitted(partitions):
                committed = await kafka.committed_offsets(self.consumer, self._tps(partitions))
                offsets = {tp.partition: own.NO_OFFSET if o is None else o for tp, o in committed.items()}
                return own.CommittedRead(action, offsets)
            case own.Seek(offsets):
                start = self._tps(p for p, o in offsets.items() if o == own.NO_OFFSET)
                for p, o in offsets.items():
                    if o != own.NO_OFFSET:
                        self.consumer.seek(TopicPartition(self.events_topic, p), o)
                if start:
                    await self.consumer.seek_to_beginning(*start)
                return own.Sought(action)
            case own.RestoreIds(offsets):
                await self._restore_ids(offsets)
                return own.IdsRestored(action)
        raise TypeError(f"not an asking action: {action!r}")

    def _local(self, action: own.Action) -> None:
        match action:
            case own.Pause(partitions):
                self._sync_held()
                self.consumer.pause(*self._tps(partitions))
            case own.Resume(partitions):
                self._sync_held()
                self.consumer.resume(*self._tps(partitions))
                self.log.info(
                    "reading", partitions=sorted(partitions), transactional_id=self.transactional_id
                )
            case own.DropIdsExcept(partitions):
                self.coalescer.drop_ids(set(self.coalescer.ids_held()) - partitions)
            case own.DropState(partitions, ids, reason):
                self.coalescer.forget(partitions)
                if ids:
                    self.coalescer.drop_ids(partitions)
                self.drop_dead_letters(partitions)
                if reason == "taken":
                    self.log.warning("partitions claimed by another worker", partitions=sorted(partitions))
            case _:
                raise TypeError(f"not a local action: {action!r}")

    def _sync_held(self) -> None:
        self._held.clear()
        self._held.update(self._tps(self.ownership.held))

    def _tps(self, partitions: Iterable[int]) -> list[TopicPartition]:
        return [TopicPartition(self.events_topic, p) for p in sorted(partitions)]

    async def _fence(self, ids: Iterable[str]) -> frozenset[str]:
        """Fence ids at once; returns those fenced (the others are retried)."""
        ids = sorted(ids)

        async def fence(transactional_id: str) -> None:
            # bounded: a broker that never settles an old transaction must not hold the lock (and
            # a rebalance waiting for it) for ever; the fence is simply retried
            await asyncio.wait_for(kafka.fence(self.kafka, transactional_id), FENCE_TIMEOUT_S)

        results = await asyncio.gather(*(fence(i) for i in ids), return_exceptions=True)
        failed = {i: r for i, r in zip(ids, results, strict=True) if isinstance(r, BaseException)}
        for transactional_id, error in failed.items():
            self.log.warning("fencing failed; retrying", fenced=transactional_id, error=repr(error))
        return frozenset(ids) - set(failed)

    async def _restore_ids(self, committed: Mapping[int, int]) -> None:
        """Rebuild the dedup state of partitions from their changelog (read after the fence:
        exactly the ids of committed windows)."""
        c = self.coalescer
        stale = sorted(committed)
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
        await self.worker.revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.worker.log.info("assigned", partitions=sorted(tp.partition for tp in assigned))
        # claimed in the worker's loop, not here: aiokafka logs and ignores a listener's errors
        self.worker.assigned(assigned)
