"""The sink tier: partials topic -> Merger -> PostgreSQL rollups, exactly once.

It reads `T.partials` with read_committed in its own group (`T.sink`), beside the root merger, and
merges each fetched batch as the root does (core/merger.py). The rows (core/sink_plan.plan_rows) and
the last offset of every partials partition in the batch go to PostgreSQL in one transaction
(io/postgres_sink.py); PostgreSQL, not Kafka, holds the sink's position, so a sink (re)starting or
given partitions seeks to the offsets stored there, and a batch whose range is already applied is
refused before anything of it is written. Kafka offsets are committed only so that lag can be graphed.

A lost connection (PostgreSQL restarted, a network cut, a commit whose answer never came) is not
guessed about: the sink reconnects, reads the applied positions and seeks to them.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.core.merger import Merger
from pipeline.core.sink_plan import (
    cutoffs,
    parse_retention,
    plan_rows,
    retention_policy,
)
from pipeline.core.topology import Topology
from pipeline.io import kafka, postgres_sink
from pipeline.io.postgres_sink import CONNECTION_ERRORS, PostgresSink
from pipeline.runtime import observability as obs
from pipeline.runtime.settings import Settings

LAG_EVERY_S = 2.0
PROGRESS_EVERY_S = 10.0
RECONNECT_S = 0.5

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


class SinkWorker:
    tier = "sink"

    def __init__(self, topology: Topology, settings: Settings) -> None:
        self.topology = topology
        self.settings = settings
        self.kafka = kafka.connection_from(settings)
        self.group = topology.group(self.tier)
        self.partials_topic = topology.topic("partials")
        self.labels = (topology.name, self.tier, settings.instance)
        self.log = obs.log(topology=topology.name, tier=self.tier, instance=settings.instance)
        self.merger = Merger(topology)
        self.policy = retention_policy(topology, parse_retention(settings.sink_retention))
        self.consumer = kafka.consumer(
            self.kafka,
            self.partials_topic,
            self.group,
            settings.instance,
            read_committed=True,
            max_records=settings.sink_max_records,
        )
        self.sink: PostgresSink | None = None
        self.partials_in = 0
        self.rows_out = 0
        self.refused = 0
        self.next_retention = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        await kafka.ensure_topics(self.kafka, kafka.topology_topics(self.topology))
        try:
            await self._connect(stop)
        except CONNECTION_ERRORS:
            return  # stopped while PostgreSQL was away
        self.consumer.subscribe([self.partials_topic], listener=_SeekToApplied(self))
        await kafka.start(self.consumer)
        self.log.info(
            "started",
            group=self.group,
            postgres=postgres_sink.redact(self.settings.postgres),
            retention={str(k): v for k, v in self.policy.items()},
        )
        lag_task = asyncio.create_task(
            kafka.report_lag(self.consumer, obs.LAG, self.labels, stop, LAG_EVERY_S)
        )
        member = None
        try:
            await self._loop(stop)
            member = kafka.member_id(self.consumer)
        finally:
            lag_task.cancel()
            await self.consumer.stop()
            if member and self.settings.leave_group_on_stop:
                left = await kafka.leave_group(self.kafka, self.group, member)
                self.log.info("left the group", ok=left)
            if self.sink is not None:
                try:
                    await self.sink.conn.close(timeout=2)
                except Exception:  # PostgreSQL gone meanwhile
                    self.sink.conn.terminate()
            self.log.info("stopped", partials_in=self.partials_in, rows_out=self.rows_out)

    async def _connect(self, stop: asyncio.Event) -> PostgresSink:
        """Connect (again), migrate the schema, and wait as long as PostgreSQL is away."""
        if self.sink is not None:
            old, self.sink = self.sink, None
            try:
                await old.conn.close(timeout=2)
            except Exception:
                old.conn.terminate()
        warned = False
        while True:
            try:
                conn = await postgres_sink.connect(self.settings.postgres)
                try:
                    was = await postgres_sink.migrate(conn, self.topology)
                    sink = PostgresSink(conn, self.topology)
                    await sink.prepare()
                    await sink.record_retention(self.policy)
                except BaseException:
                    conn.terminate()
                    raise
                if was != postgres_sink.SCHEMA_VERSION:
                    self.log.info("schema migrated", was=was, now=postgres_sink.SCHEMA_VERSION)
                if warned:
                    self.log.warning("PostgreSQL is back")
                self.sink = sink
                return sink
            except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
                raise
            except CONNECTION_ERRORS as exc:
                if not warned:
                    self.log.warning(
                        "PostgreSQL unreachable; retrying",
                        postgres=postgres_sink.redact(self.settings.postgres),
                        error=repr(exc),
                    )
                    warned = True
                if stop.is_set():
                    raise
                await asyncio.sleep(RECONNECT_S)

    async def _loop(self, stop: asyncio.Event) -> None:
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        poller = kafka.Poller(
            self.consumer, self.settings.sink_max_records, self.settings.idle_backoff_ms / 1000
        )
        while not stop.is_set():
            batch = await poller.poll()
            try:
                if batch:
                    await self._apply(batch)
                await self._retention()
            except CONNECTION_ERRORS as exc:
                self.log.warning("PostgreSQL connection lost; reconnecting", error=repr(exc))
                try:
                    await self._connect(stop)
                except CONNECTION_ERRORS:
                    return  # stopping while PostgreSQL is away
                await self.seek_to_applied(self.consumer.assignment())
            now = time.monotonic()
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.log.info("progress", partials_in=self.partials_in, rows_out=self.rows_out)

    async def _apply(self, batch: Records) -> None:
        batch = {tp: records for tp, records in batch.items() if records}
        if not batch:
            return
        sink = self.sink
        assert sink is not None
        merger = self.merger
        for tp, records in batch.items():
            for r in records:
                merger.add(tp.partition, r.offset, r.value)
        merged = merger.take()
        plan = plan_rows(self.topology, merged, cutoffs(self.policy, time.time()))
        result = await sink.apply(merged, plan)
        if not result.applied:
            refusal = result.refusal
            assert refusal is not None
            self.refused += 1
            obs.STALE_APPLIES.labels(*self.labels).inc()
            self.log.warning(
                "batch already applied; seeking to the applied positions"
                if refusal.replay
                else "PostgreSQL holds another position than expected; seeking to it",
                partition=refusal.partition,
                first=refusal.first,
                postgres_position=refusal.held,
                expected=refusal.expected,
            )
            await self.seek_to_applied(self.consumer.assignment())
            return
        merger.applied(merged)
        self.partials_in += merged.partials
        self.rows_out += result.rows
        obs.PARTIALS_IN.labels(*self.labels).inc(merged.partials)
        try:
            await self.consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batch.items()})
        except KafkaError as exc:  # only lag reporting depends on it
            self.log.info("offset commit skipped", error=repr(exc))

    async def _retention(self) -> None:
        now = time.monotonic()
        if now < self.next_retention or self.sink is None:
            return
        self.next_retention = now + self.settings.sink_retention_every_s
        deleted = await self.sink.delete_expired(cutoffs(self.policy, time.time()))
        if deleted:
            self.log.info("expired buckets deleted", rows=deleted)

    async def seek_to_applied(self, partitions: set[TopicPartition] | list[TopicPartition]) -> None:
        if not partitions:
            return
        sink = self.sink
        assert sink is not None
        positions = await sink.positions()
        self.merger.resume({tp.partition: positions.get(tp.partition) for tp in partitions})
        await kafka.seek_after(self.consumer, partitions, positions)
        self.log.info(
            "resuming from applied positions",
            positions={tp.partition: positions.get(tp.partition) for tp in partitions},
        )


class _SeekToApplied(ConsumerRebalanceListener):
    def __init__(self, worker: SinkWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        while True:
            try:
                await self.worker.seek_to_applied(assigned)
                return
            except CONNECTION_ERRORS as exc:
                self.worker.log.warning(
                    "PostgreSQL connection lost while seeking; reconnecting", error=repr(exc)
                )
                await self.worker._connect(asyncio.Event())
