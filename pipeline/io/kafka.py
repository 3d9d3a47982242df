"""Kafka clients with the settings exactly-once depends on, in one place.

Every worker has a stable identity: its static group membership
(`group_instance_id`) and its transactional id are derived from it, so a
restarted worker takes its partitions back at once and fences its own zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition, errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.group import LeaveGroupRequest

from pipeline.core import dedup
from pipeline.core.topology import Topology
from pipeline.io.server_wait import retry_while_unavailable
from pipeline.runtime.settings import Settings

# A worker may start while the broker restarts, or while the broker it asks is one of a cluster that
# just died (NodeNotReady until the metadata moves on): wait for it rather than exit.
BROKER_AWAY = (
    KafkaConnectionError,
    errors.NodeNotReadyError,
    errors.RequestTimedOutError,
    errors.KafkaTimeoutError,
    errors.NotControllerError,
    errors.LeaderNotAvailableError,
    errors.CoordinatorNotAvailableError,
)
broker_retry = retry_while_unavailable(BROKER_AWAY, "broker", 0.1)

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True)
class KafkaConnection:
    """Where the brokers are and how to reach them: TLS and SASL, as every client here needs them.

    The password never appears in a repr or a log line.
    """

    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    username: str = ""
    password: str = field(default="", repr=False)
    ssl_cafile: str = ""  # trusted CA (PEM); empty: the system's
    ssl_certfile: str = ""  # client certificate, for brokers that ask for one
    ssl_keyfile: str = ""

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"kafka_security_protocol must be one of {', '.join(SECURITY_PROTOCOLS)}")
        if self.sasl and self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"kafka_sasl_mechanism must be one of {', '.join(SASL_MECHANISMS)}")
        if self.sasl and not (self.username and self.password):
            raise ValueError(f"{self.security_protocol} needs kafka_sasl_username and kafka_sasl_password")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol.endswith("SSL")

    def describe(self) -> str:
        """For log lines and errors: where and how, never the secret."""
        who = f" as {self.username} ({self.sasl_mechanism})" if self.sasl else ""
        return f"{self.bootstrap} over {self.security_protocol}{who}"

    @functools.cached_property
    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return create_ssl_context(
            cafile=self.ssl_cafile or None,
            certfile=self.ssl_certfile or None,
            keyfile=self.ssl_keyfile or None,
        )

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
        kwargs: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        if self.security_protocol != "PLAINTEXT":
            kwargs["security_protocol"] = self.security_protocol
        if self.tls:
            kwargs["ssl_context"] = self._ssl_context
        if self.sasl:
            kwargs |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.username,
                "sasl_plain_password": self.password,
            }
        return kwargs


KafkaTarget = str | KafkaConnection


class AccessRefused(Exception):
    """The brokers answered and refused this client: wrong credentials or an untrusted certificate.

    Waiting does not help, so nothing retries it: the worker stops with this message.
    """


REFUSALS = (
    errors.SaslAuthenticationFailed,
    errors.AuthenticationFailedError,
    errors.AuthenticationMethodNotSupported,
    errors.UnsupportedSaslMechanismError,
    errors.IllegalSaslStateError,
    ssl.SSLError,
)


async def check_access(target: KafkaTarget, timeout_s: float = 10.0) -> None:
    """Raise AccessRefused if a broker refuses the TLS handshake or the SASL login.

    aiokafka reports such a refusal only as "unable to bootstrap", like a broker
    that is down; one direct connection tells the two apart. A broker that cannot
    be reached at all is not a refusal (the caller waits for it as usual).
    """
    conn = connection(target)
    if conn.security_protocol == "PLAINTEXT":
        return
    options: dict[str, Any] = {k: v for k, v in conn.client_kwargs().items() if k != "bootstrap_servers"} | {
        "request_timeout_ms": int(timeout_s * 1000)
    }
    for address in conn.bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            link = await asyncio.wait_for(create_conn(host, int(port), **options), timeout_s)
        except REFUSALS as exc:
            raise AccessRefused(f"Kafka at {conn.describe()} refused this client: {exc}") from exc
        except (OSError, KafkaError, TimeoutError, ValueError):
            continue  # this broker is away: try the next
        link.close()
        return


def connection(target: KafkaTarget) -> KafkaConnection:
    """A plain bootstrap string means PLAINTEXT (local servers, tests, benchmarks)."""
    return target if isinstance(target, KafkaConnection) else KafkaConnection(target)


def connection_from(settings: Settings) -> KafkaConnection:
    """The connection the settings describe (PIPELINE_KAFKA, PIPELINE_KAFKA_SECURITY_PROTOCOL, ...)."""
    return KafkaConnection(
        settings.kafka,
        security_protocol=settings.kafka_security_protocol.upper(),
        sasl_mechanism=settings.kafka_sasl_mechanism.upper(),
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value(),
        ssl_cafile=settings.kafka_ssl_cafile,
        ssl_certfile=settings.kafka_ssl_certfile,
        ssl_keyfile=settings.kafka_ssl_keyfile,
    )


@broker_retry
async def start(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Start a client, waiting (up to server_wait.WAIT_FOR_S) for a broker that is not there yet."""
    await client.start()


# Apache Kafka's default message.max.bytes; tier 1's partials stay under max_partial_bytes (900 KB)
PARTIALS_MAX_MESSAGE_BYTES = 1_048_588


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topology_topics(topology: Topology) -> list[TopicSpec]:
    parts = topology.partitions
    return [
        TopicSpec(topology.topic("events"), parts.events),
        # stated, not left to the broker's default: tier 1 keeps each partial under max_partial_bytes
        TopicSpec(
            topology.topic("partials"), parts.partials, {"max.message.bytes": str(PARTIALS_MAX_MESSAGE_BYTES)}
        ),
        TopicSpec(topology.topic("updates"), parts.updates),
        TopicSpec(topology.topic("feed"), parts.updates),
        TopicSpec(topology.topic("dead-letters"), 1),
        TopicSpec(topology.topic("splits"), 1, {"cleanup.policy": "compact"}),
        *_dedup_topics(topology),
    ]


def _dedup_topics(topology: Topology) -> list[TopicSpec]:
    """Tier 1's dedup changelog: one partition per events partition, kept a little over the horizon."""
    horizon_ms = topology.dedup_horizon_s * 1000
    if not horizon_ms:
        return []
    config = {
        "retention.ms": str(dedup.changelog_retention_ms(horizon_ms)),
        "segment.ms": str(max(60_000, horizon_ms // 4)),
        "max.message.bytes": str(PARTIALS_MAX_MESSAGE_BYTES),
    }
    return [TopicSpec(topology.topic("dedup"), topology.partitions.events, config)]


async def read_to_end(
    bootstrap: KafkaTarget, topic: str, partitions: Iterable[int]
) -> dict[int, list[bytes]]:
    """Every committed record of some partitions, from the earliest kept to the end (read_committed)."""
    tps = [TopicPartition(topic, p) for p in partitions]
    out: dict[int, list[bytes]] = {tp.partition: [] for tp in tps}
    if not tps:
        return out
    reader = AIOKafkaConsumer(
        **connection(bootstrap).client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await reader.start()
    try:
        reader.assign(tps)
        end = await reader.end_offsets(tps)
        await reader.seek_to_beginning(*tps)
        left = {tp for tp in tps if end[tp] > 0}
        while left:
            batch = await reader.getmany(*left, timeout_ms=200)
            for tp, records in batch.items():
                out[tp.partition].extend(r.value for r in records if r.value is not None)
            left = {tp for tp in left if await reader.position(tp) < end[tp]}
    finally:
        await reader.stop()
    return out


@broker_retry
async def ensure_topics(
    bootstrap: KafkaTarget, specs: Iterable[TopicSpec], timeout_s: float = 30.0, replication: int = 0
) -> None:
    """Create topics explicitly, with their partition counts; existing ones are left alone.

    `replication` 0 means as many replicas as the cluster allows, up to 3; with 3
    replicas a topic also gets `min.insync.replicas=2`, so an `acks=all` write
    survives the loss of any one broker.
    """
    specs = list(specs)
    admin = AIOKafkaAdminClient(
        **connection(bootstrap).client_kwargs(), request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await admin.start()
    except KafkaConnectionError:
        await check_access(bootstrap)  # a refusal is final: say so instead of waiting
        raise
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            if replication <= 0:
                brokers = (await admin.describe_cluster()).get("brokers") or [None]
                replication = min(3, len(brokers))
            isr = {"min.insync.replicas": "2"} if replication >= 3 else {}
            new = [NewTopic(s.name, s.partitions, replication, topic_configs=isr | s.config) for s in missing]
            response = await admin.create_topics(new)
            for topic_error in getattr(response, "topic_errors", []):
                name, code = topic_error[0], topic_error[1]
                if code not in (0, TopicAlreadyExistsError.errno):  # another worker may have been faster
                    message = topic_error[2] if len(topic_error) > 2 else ""
                    raise KafkaError(f"cannot create topic {name}: error {code} {message or ''}".rstrip())
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


async def partitions_of(admin: AIOKafkaAdminClient, topic: str) -> list[int]:
    """The partition numbers of a topic, sorted (empty if it does not exist).

    Asked of the cluster: a consumer's `partitions_for_topic` knows only the
    topics it already follows.
    """
    described = await admin.describe_topics([topic])
    return sorted(p["partition"] for t in described if t.get("error_code") == 0 for p in t["partitions"])


def consumer(
    bootstrap: KafkaTarget,
    topic: str,
    group: str,
    instance: str,
    *,
    read_committed: bool = True,
    max_records: int = 20_000,
    fetch_min_bytes: int = 1,
) -> AIOKafkaConsumer:
    """A group consumer that never auto-commits: offsets move only with the output they produced."""
    return AIOKafkaConsumer(
        **connection(bootstrap).client_kwargs(),
        group_id=group,
        group_instance_id=f"{group}.{instance}",
        client_id=f"{group}.{instance}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        max_poll_records=max_records,
        fetch_max_wait_ms=100,
        fetch_min_bytes=fetch_min_bytes,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )


def transactional_producer(bootstrap: KafkaTarget, transactional_id: str) -> AIOKafkaProducer:
    """The producer a worker writes its outputs and offsets through, atomically."""
    return AIOKafkaProducer(
        **connection(bootstrap).client_kwargs(),
        client_id=transactional_id,
        transactional_id=transactional_id,
        transaction_timeout_ms=30_000,
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
    )


async def fence(bootstrap: KafkaTarget, transactional_id: str) -> None:
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


async def leave_group(
    bootstrap: KafkaTarget, group: str, member: str | None, timeout_s: float = 10.0
) -> bool:
    """Tell the coordinator a stopped static member is gone, so its partitions move at once.

    aiokafka sends no LeaveGroup for a static member (one with
    `group_instance_id`): its partitions then wait for the session timeout on
    Apache Kafka, and for ever on a broker that does not expire members. A
    LeaveGroup naming the member id removes it on both. Best effort: False if
    it could not be sent.
    """
    if not member:
        return False
    try:
        async with _client(bootstrap, timeout_s) as client:
            node = await client.coordinator_lookup(CoordinationType.GROUP, group)
            response = await client.send(node, LeaveGroupRequest(group, member))
            return getattr(response, "error_code", 1) == 0
    except (KafkaError, OSError, TimeoutError):
        return False


async def transaction_coordinator(
    bootstrap: KafkaTarget, transactional_id: str, timeout_s: float = 5.0
) -> int:
    """The node id of the broker coordinating a transactional id's transactions."""
    async with _client(bootstrap, timeout_s) as client:
        return int(await client.coordinator_lookup(CoordinationType.TRANSACTION, transactional_id))


@contextlib.asynccontextmanager
async def _client(bootstrap: KafkaTarget, timeout_s: float) -> AsyncIterator[AIOKafkaClient]:
    """A bare aiokafka client, bootstrapped, for a request no producer or consumer makes."""
    client = AIOKafkaClient(**connection(bootstrap).client_kwargs(), request_timeout_ms=int(timeout_s * 1000))
    try:
        await client.bootstrap()
        yield client
    finally:
        await client.close()


def producer(bootstrap: KafkaTarget, client_id: str, *, linger_ms: int = 5) -> AIOKafkaProducer:
    """An idempotent producer for at-least-once outputs that carry absolute values."""
    return AIOKafkaProducer(
        **connection(bootstrap).client_kwargs(),
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
    )


async def committed_offsets(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int | None]:
    """The group's committed offset of each partition (None: none yet), in one OffsetFetch request.

    aiokafka's `committed()` asks about one partition per request; its group coordinator asks
    about any number at once (and retries what is retriable, as `committed()` does).
    """
    tps = list(partitions)
    if not tps:
        return {}
    fetch = getattr(getattr(consumer, "_coordinator", None), "fetch_committed_offsets", None)
    if fetch is None:  # an aiokafka without it: one request per partition, all at once
        answers = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        return dict(zip(tps, answers, strict=True))
    got = await fetch(tps)
    out: dict[TopicPartition, int | None] = {}
    for tp in tps:
        meta = got.get(tp)
        out[tp] = None if meta is None or meta.offset < 0 else int(meta.offset)
    return out


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


async def report_lag(
    consumer: AIOKafkaConsumer, gauge: Any, labels: tuple[str, ...], stop: asyncio.Event, every_s: float = 2.0
) -> None:
    """Set `gauge` (labels, then the partition) to each assigned partition's lag, every `every_s`."""
    while not stop.is_set():
        await asyncio.sleep(every_s)
        for partition, behind in (await lag(consumer)).items():
            gauge.labels(*labels, str(partition)).set(behind)


async def seek_after(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition], applied: dict[int, int]
) -> None:
    """Seek each partition just past its applied offset, or to its beginning when none was applied."""
    for tp in partitions:
        last = applied.get(tp.partition)
        if last is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, last + 1)


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
