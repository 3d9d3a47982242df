"""Tier-1 consumer-group lag, read from outside the group (for the ingest gateway's backpressure).

Lag = end offset of each events partition minus tier 1's committed offset
there: what has been acknowledged to writers but not yet aggregated. Read
through the admin API, so the gateway needs no group membership.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.core.topology import Topology
from pipeline.io.kafka import KafkaTarget, connection, partitions_of


@dataclass(frozen=True, slots=True)
class LagSample:
    lag: int  # events behind, summed over the partitions
    committed: int  # sum of the committed offsets (how far tier 1 has got; its growth is the drain rate)
    end: int  # sum of the end offsets
    partitions: dict[int, int] = field(default_factory=dict)  # partition -> events behind


class Tier1Lag:
    """Samples the lag of a topology's tier-1 group on its events topic."""

    def __init__(self, bootstrap: KafkaTarget, topology: Topology, request_timeout_ms: int = 5_000) -> None:
        self.topic = topology.topic("events")
        self.group = topology.group("coalesce")
        target = connection(bootstrap).client_kwargs()
        self._admin = AIOKafkaAdminClient(**target, request_timeout_ms=request_timeout_ms)
        # no group: only asks for end offsets (the last stable offset, as tier 1 reads read_committed)
        self._offsets = AIOKafkaConsumer(
            **target,
            enable_auto_commit=False,
            isolation_level="read_committed",
            request_timeout_ms=request_timeout_ms,
        )
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        await self._admin.start()
        await self._offsets.start()

    async def stop(self) -> None:
        await self._offsets.stop()
        await self._admin.close()

    async def sample(self) -> LagSample:
        if not self._partitions:
            parts = await partitions_of(self._admin, self.topic)
            self._partitions = [TopicPartition(self.topic, p) for p in parts]
            if not self._partitions:
                return LagSample(0, 0, 0)
        ends = await self._offsets.end_offsets(self._partitions)
        starts = await self._offsets.beginning_offsets(self._partitions)
        committed = await self._admin.list_consumer_group_offsets(self.group, partitions=self._partitions)
        behind: dict[int, int] = {}
        done = 0
        for tp in self._partitions:
            meta = committed.get(tp)
            at = meta.offset if meta is not None and meta.offset >= 0 else starts.get(tp, 0)
            done += at
            behind[tp.partition] = max(0, ends.get(tp, 0) - at)
        return LagSample(sum(behind.values()), done, sum(ends.values()), behind)
