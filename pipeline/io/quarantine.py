"""Quarantine of a batch the root cannot apply, and its replay on command.

A batch the apply script refuses before its first write (a key of another type,
a field holding a value the command would fail on; `redis_sink.Refusal`) is held
by the root and tried again every 2 s. If it is still refused after
`quarantine_after_s`, the root quarantines it:

1. every partial message of the batch is copied, as it was read, to the topic
   `T.partials-quarantine`, with headers naming the reason and the source
   partition and offsets (`HEADERS`);
2. `T:quarantine` in Redis records the batch under its partials partition
   (`Quarantined`: the range, the position Redis held before it, the reason,
   where the copies are);
3. the root stops applying that partials partition (it pauses it; the others go
   on) and says so: an error log line, `pipeline_batches_quarantined_total`, and
   `pipeline_root_quarantined{partition}` at 1 for as long as it lasts. Any root
   that is given the partition later reads `T:quarantine` and holds it too.

Nothing of the batch was written, and nothing after it in that partition is, so
the positions in Redis still say where the partition stands. Once the operator
has repaired the key, `pipeline replay-quarantine T` (`replay`) reads the copies
back, merges them and applies them with the same script and the same range: the
positions guard the replay as they guard every apply, so it applies once (a
second replay finds the range applied and only lifts the quarantine). Then it
removes the record from `T:quarantine`, and the root, which looks every 2 s,
seeks the partition to the recorded position (after the batch) and goes on.
`--release` lifts a quarantine without applying: the root then reads the batch
again from the partials topic (if Kafka still has it) and applies or refuses it
as any other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.core.merger import NOTHING_APPLIED, Merger
from pipeline.core.redis_layout import channel_updates, quarantine_key
from pipeline.core.topology import Topology
from pipeline.io import kafka
from pipeline.io.redis_retry import redis_retry
from pipeline.io.redis_sink import ApplyResult, RedisSink, Refusal

ROLE = "partials-quarantine"

# the headers of every quarantined partial message
HEADERS = (
    "reason",  # the refusal in words: "<key> holds <what>, the apply needs <what>"
    "refused-key",
    "holds",
    "needs",
    "source",  # <partials topic>/<partition>/<offset> of this message
    "source-partition",
    "source-offset",
    "first-offset",  # the quarantined batch's range in that partition
    "last-offset",
    "expected-position",  # the position Redis held for the partition before the batch (-1: none)
    "quarantined-by",  # <root group>.<instance>
    "quarantined-at-ms",
)


def topic(topology: Topology) -> str:
    return topology.topic(ROLE)


def topic_spec(topology: Topology) -> kafka.TopicSpec:
    """One partition; its messages are copies of partials, so they may be as large."""
    return kafka.TopicSpec(topic(topology), 1, {"max.message.bytes": str(kafka.PARTIALS_MAX_MESSAGE_BYTES)})


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A quarantined batch: what `T:quarantine` holds for its partials partition."""

    partition: int
    first: int  # the batch's first and last offsets in the partials partition
    last: int
    expected: int  # the position Redis held for the partition before the batch (-1: none)
    messages: int
    key: str
    holds: str
    needs: str
    by: str
    at_ms: int
    topic: str  # where the copies are: topic, partition, first and last offset
    copy_partition: int
    copy_first: int
    copy_last: int

    @property
    def reason(self) -> str:
        return str(Refusal(self.key, self.holds, self.needs))

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Quarantined:
        return cls(**orjson.loads(raw))


async def send(
    producer: AIOKafkaProducer,
    topology: Topology,
    partition: int,
    messages: Sequence[tuple[int, bytes | None, bytes | None]],
    refusal: Refusal,
    expected: int,
    by: str,
) -> Quarantined:
    """Copy a batch's partial messages ((offset, key, value), in offset order) to the quarantine topic,
    every copy acknowledged before this returns."""
    now_ms = int(time.time() * 1000)
    first, last = messages[0][0], messages[-1][0]
    source = topology.topic("partials")
    common = [
        ("reason", str(refusal).encode()),
        ("refused-key", refusal.key.encode()),
        ("holds", refusal.holds.encode()),
        ("needs", refusal.needs.encode()),
        ("source-partition", str(partition).encode()),
        ("first-offset", str(first).encode()),
        ("last-offset", str(last).encode()),
        ("expected-position", str(expected).encode()),
        ("quarantined-by", by.encode()),
        ("quarantined-at-ms", str(now_ms).encode()),
    ]
    pending = []
    for offset, key, value in messages:
        headers = [
            *common,
            ("source", f"{source}/{partition}/{offset}".encode()),
            ("source-offset", str(offset).encode()),
        ]
        pending.append(await producer.send(topic(topology), value, key=key, headers=headers, partition=0))
    sent = [await future for future in pending]
    return Quarantined(
        partition=partition,
        first=first,
        last=last,
        expected=expected,
        messages=len(messages),
        key=refusal.key,
        holds=refusal.holds,
        needs=refusal.needs,
        by=by,
        at_ms=now_ms,
        topic=topic(topology),
        copy_partition=sent[0].partition,
        copy_first=min(m.offset for m in sent),
        copy_last=max(m.offset for m in sent),
    )


class QuarantineState:
    """`T:quarantine` in Redis: partials partition -> the batch quarantined there."""

    # remove the record only if it is still the one read: a batch quarantined again meanwhile stays
    _RELEASE = """
    if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
      return redis.call('HDEL', KEYS[1], ARGV[1])
    end
    return 0
    """

    def __init__(self, client: aioredis.Redis, topology: Topology) -> None:
        self.client = client
        self.key = quarantine_key(topology.name)
        self._release = client.register_script(self._RELEASE)

    @redis_retry
    async def record(self, q: Quarantined) -> None:
        await self.client.hset(self.key, str(q.partition), q.to_json())

    @redis_retry
    async def all(self) -> dict[int, Quarantined]:
        raw = await self.client.hgetall(self.key)
        return {int(p): Quarantined.from_json(v) for p, v in raw.items()}

    @redis_retry
    async def release(self, q: Quarantined) -> bool:
        """Lift this quarantine (and not a later one of the same partition)."""
        return bool(await self._release(keys=[self.key], args=[str(q.partition), q.to_json()]))


async def read_copies(
    target: kafka.KafkaTarget, q: Quarantined, timeout_s: float = 30.0
) -> list[tuple[int, bytes]]:
    """The quarantined messages, (source offset, value) in offset order, read back from their topic."""
    tp = TopicPartition(q.topic, q.copy_partition)
    reader = AIOKafkaConsumer(
        **kafka.connection(target).client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await kafka.start(reader)
    found: dict[int, bytes] = {}
    try:
        reader.assign([tp])
        reader.seek(tp, q.copy_first)
        deadline = time.monotonic() + timeout_s
        while await reader.position(tp) <= q.copy_last:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {q.topic}/{q.copy_partition} up to {q.copy_last}")
            for record in (await reader.getmany(tp, timeout_ms=500)).get(tp, []):
                if record.offset > q.copy_last or record.value is None:
                    continue
                headers = {k: v.decode() for k, v in record.headers}
                if (
                    headers.get("source-partition") == str(q.partition)
                    and headers.get("first-offset") == str(q.first)
                    and headers.get("last-offset") == str(q.last)
                ):
                    found[int(headers["source-offset"])] = record.value
    finally:
        await reader.stop()
    return sorted(found.items())


@dataclass(slots=True)
class Replayed:
    partition: int
    outcome: str  # applied | already applied | refused | out of step | missing
    detail: str
    quarantined: Quarantined

    @property
    def ok(self) -> bool:
        return self.outcome in ("applied", "already applied")


async def replay(
    target: kafka.KafkaTarget,
    client: aioredis.Redis,
    topology: Topology,
    q: Quarantined,
    producer: AIOKafkaProducer | None = None,
) -> Replayed:
    """Apply one quarantined batch from its copies, exactly once, and lift the quarantine if it applied.

    The batch is applied with its own range and the position Redis held before it: if Redis already
    holds the batch's last offset (a replay that applied, then stopped before lifting), it is not
    applied again; if Redis holds another position than before the batch, nothing is applied.
    """
    messages = await read_copies(target, q)
    offsets = [offset for offset, _ in messages]
    if not messages or offsets[0] != q.first or offsets[-1] != q.last or len(messages) != q.messages:
        return Replayed(
            q.partition,
            "missing",
            f"{q.topic} holds {len(messages)} of the {q.messages} messages of offsets {q.first}-{q.last}",
            q,
        )
    merger = Merger(topology)
    merger.resume({q.partition: None if q.expected == NOTHING_APPLIED else q.expected})
    for offset, value in messages:
        merger.add(q.partition, offset, value)
    batch = merger.take()
    state = QuarantineState(client, topology)
    result = await RedisSink(client, topology).apply(batch)
    if result.refused is not None:
        return Replayed(q.partition, "refused", f"still refused: {result.refused}", q)
    if not result.applied:
        held = result.stale_position if result.stale_position is not None else NOTHING_APPLIED
        if held >= q.last:
            await state.release(q)
            return Replayed(q.partition, "already applied", f"Redis holds position {held}", q)
        return Replayed(
            q.partition,
            "out of step",
            f"Redis holds position {held} for partition {q.partition}, not {q.expected} as before the batch: "
            "lift the quarantine with --release and the root reads the batch again from Kafka",
            q,
        )
    if producer is not None:
        await publish(producer, topology.topic("updates"), result)
    await state.release(q)
    return Replayed(
        q.partition,
        "applied",
        f"{batch.partials} partials, {batch.events} events, offsets {q.first}-{q.last}",
        q,
    )


async def publish(producer: AIOKafkaProducer, updates_topic: str, result: ApplyResult) -> int:
    """An applied batch's absolute totals, one update per channel, to the updates topic (a lost or
    repeated one is corrected by the next). Returns how many were sent."""
    updates = channel_updates(result.plan, result.seqs, result.values, int(time.time() * 1000))
    for update in updates:
        await producer.send(updates_topic, update.to_json(), key=update.channel.encode())
    return len(updates)
