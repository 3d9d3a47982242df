"""Kafka clients with the settings exactly-once depends on, in one place.

Every worker has a stable identity: its static group membership
(`group_instance_id`) and its transactional id are derived from it, so a
restarted worker takes its partitions back at once and fences its own zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.group import LeaveGroupRequest

from pipeline.core.topology import Topology
from pipeline.io.server_wait import retry_while_unavailable

# A worker may start while the broker restarts: wait for it rather than exit.
broker_retry = retry_while_unavailable(KafkaConnectionError, "broker", 0.1)


@broker_retry
async def start(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Start a client, waiting (up to server_wait.WAIT_FOR_S) for a broker that is not there yet."""
    await client.start()


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topology_topics(topology: Topology) -> list[TopicSpec]:
    parts = topology.partitions
    return [
        TopicSpec(topology.topic("events"), parts.events),
        TopicSpec(topology.topic("partials"), parts.partials),
        TopicSpec(topology.topic("updates"), parts.updates),
        TopicSpec(topology.topic("feed"), parts.updates),
        TopicSpec(topology.topic("dead-letters"), 1),
        TopicSpec(topology.topic("splits"), 1, {"cleanup.policy": "compact"}),
    ]


@broker_retry
async def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec], timeout_s: float = 30.0) -> None:
    """Create topics explicitly, with their partition counts; existing ones are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(s.name, s.partitions, 1, topic_configs=s.config or None)
            for s in specs
            if s.name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was faster
                await admin.create_topics(new)
        await _wait_for_metadata(admin, [s.name for s in specs], timeout_s)
    finally:
        await admin.close()


async def _wait_for_metadata(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if set(names) <= set(await admin.list_topics()):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"topics {names} did not appear within {timeout_s} s")
        await asyncio.sleep(0.1)


def consumer(
    bootstrap: str,
    topic: str,
    group: str,
    instance: str,
    *,
    read_committed: bool = True,
    max_records: int = 20_000,
) -> AIOKafkaConsumer:
    """A group consumer that never auto-commits: offsets move only with the output they produced."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        group_instance_id=f"{group}.{instance}",
        client_id=f"{group}.{instance}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        max_poll_records=max_records,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )


def transactional_producer(bootstrap: str, transactional_id: str) -> AIOKafkaProducer:
    """The producer a worker writes its outputs and offsets through, atomically."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=transactional_id,
        transactional_id=transactional_id,
        transaction_timeout_ms=30_000,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
    )


async def fence(bootstrap: str, transactional_id: str) -> None:
    """Abort whatever `transactional_id` left open and fence any zombie still using it.

    Initializing a producer with an id bumps its epoch: the broker aborts the
    open transaction and refuses the old producer from then on.
    """
    zombie_killer = transactional_producer(bootstrap, transactional_id)
    await start(zombie_killer)
    await zombie_killer.stop()


def member_id(consumer: AIOKafkaConsumer) -> str | None:
    """The consumer's current group member id (aiokafka keeps it on its coordinator)."""
    coordinator = getattr(consumer, "_coordinator", None)
    member = getattr(coordinator, "member_id", None)
    return member if isinstance(member, str) and member else None


async def leave_group(bootstrap: str, group: str, member: str | None, timeout_s: float = 10.0) -> bool:
    """Tell the coordinator a stopped static member is gone, so its partitions move at once.

    aiokafka sends no LeaveGroup for a static member (one with
    `group_instance_id`): its partitions then wait for the session timeout on
    Apache Kafka, and for ever on a broker that does not expire members. A
    LeaveGroup naming the member id removes it on both. Best effort: False if
    it could not be sent.
    """
    if not member:
        return False
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await client.bootstrap()
        node = await client.coordinator_lookup(CoordinationType.GROUP, group)
        response = await client.send(node, LeaveGroupRequest(group, member))
        return getattr(response, "error_code", 1) == 0
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await client.close()


def producer(bootstrap: str, client_id: str, *, linger_ms: int = 5) -> AIOKafkaProducer:
    """An idempotent producer for at-least-once outputs that carry absolute values."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
    )


async def lag(consumer: AIOKafkaConsumer) -> dict[int, int]:
    """Records behind the end of each assigned partition (for the lag gauge)."""
    out: dict[int, int] = {}
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            continue
        try:
            pos = await consumer.position(tp)
        except Exception:  # the partition was revoked meanwhile
            continue
        out[tp.partition] = max(0, high - pos)
    return out


IDLE_PROBE_MS = 5
IDLE_PROBES = 3


class Poller:
    """`getmany` that stops fetching for a while once the partitions run dry.

    A consumer that finds nothing fetches again at once, relying on the broker
    to hold the request for fetch.max.wait.ms; a broker that answers empty
    fetches immediately turns every idle worker into a busy loop. After a few
    empty short polls in a row the partitions are paused for the backoff: at
    most that much latency on the first record after a quiet spell, and no
    pause at all while records keep coming.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        max_records: int,
        idle_backoff_s: float,
        held: set[TopicPartition] | None = None,
    ) -> None:
        self.consumer = consumer
        self.max_records = max_records
        self.idle_backoff_s = idle_backoff_s
        # partitions the owner keeps paused for reasons of its own: never resumed here
        self.held: set[TopicPartition] = held if held is not None else set()
        self._empty = 0

    async def poll(
        self, backoff_s: float | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        consumer = self.consumer
        batch = await consumer.getmany(timeout_ms=IDLE_PROBE_MS, max_records=self.max_records)
        if batch:
            self._empty = 0
            return batch
        self._empty += 1
        if self._empty < IDLE_PROBES:
            return batch
        self._empty = 0
        consumer.pause(*consumer.assignment())
        try:
            await asyncio.sleep(
                self.idle_backoff_s if backoff_s is None else min(backoff_s, self.idle_backoff_s)
            )
        finally:
            # a rebalance during the sleep may have taken some away (or brought new, unpaused ones)
            consumer.resume(*((consumer.assignment() & consumer.paused()) - self.held))
        return {}
