"""Async producer SDK: validate events against a topology, give each an id, split hot keys, send.

    async with PipelineClient(topology, "127.0.0.1:9092") as client:
        results = await client.send_many([{"type": "like", "key": "c1", "channel": "v1"}])

Every event leaves with an id (the caller's, or a new uuid4 hex returned in its
SendResult). Tier 1 counts an id once within the topology's dedup horizon
(`Topology.dedup_horizon_s`, 600 s by default), so resending after an error or
a BrokerUnavailable with the same ids never counts twice.

Tier 1 remembers ids per partition, so a retry must reach its original's partition.
Every event leaves with a `ts` (the caller's, or the time of this send) and a `sub`,
both returned in its SendResult: a `sub` the caller gives is kept; otherwise the sub
comes from the key's split factor in force at the event's `ts`, read from the split
history all writers share (with `redis_url`; `core/split_history.py`). So a resend
that carries the original's `ts` (and better its `sub`) lands where the original did,
from this writer or any other.

Sends go through an idempotent producer with acks=all. `send_many` builds
record batches per partition itself (no per-message bookkeeping in aiokafka);
`send` gathers single events for `linger_ms` or `max_batch` events, whichever
comes first. Nothing is buffered without bound: when the broker does not
acknowledge within `ack_timeout_ms`, or too many sends are already waiting, the
call raises BrokerUnavailable and the caller decides (the gateway answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy, SubKeyRouter
from pipeline.core.model import MAX_ID_CHARS, MAX_TS, EventFields, InvalidEvent, check_event, message_key
from pipeline.core.split_history import Entry, SplitHistory, reconcile
from pipeline.core.topology import Topology
from pipeline.io import redis_client
from pipeline.io.kafka import KafkaConnection, check_access
from pipeline.io.kafka import connection as kafka_connection
from pipeline.io.splits import SharedRates, SplitAnnouncer, SplitHistoryStore

MAX_BATCH_BYTES = 512 * 1024
MAX_SENDS_IN_FLIGHT = 64
PARTITION_CACHE_MAX = 100_000
HISTORY_KEEP_MARGIN_MS = 60_000  # split history kept this much longer than the dedup horizon
HISTORY_TRIM_EVERY_S = 30.0

log = logging.getLogger(__name__)

UNKNOWN_FATE = "the broker did not acknowledge in time: resend this event with the same id, ts and sub"


class BrokerUnavailable(Exception):
    """The broker could not be reached or did not acknowledge in time.

    `results` (when the failure came from `send_many`) has one SendResult per event, as a
    success would: accepted (acknowledged), rejected or shed as usual, or `unknown` — sent but
    not acknowledged, so maybe counted. Every result carries its event's id, the SDK's own when
    the caller gave none, and the ts and sub it was sent with: resend the unknown ones
    (`resend()`) with the same id, ts and sub, and those that were counted are not counted twice.
    """

    def __init__(self, message: str, results: list[SendResult] | None = None) -> None:
        super().__init__(message)
        self.results: list[SendResult] = results or []

    def resend(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events whose fate is unknown, each with the id, ts and sub it was sent with."""
        return [{**events[r.index], "id": r.id, "ts": r.ts, "sub": r.sub} for r in self.results if r.unknown]


@dataclass(slots=True)
class SendResult:
    index: int
    id: str | None
    accepted: bool
    reason: str | None = None
    field: str | None = None
    sub: int = 0
    shed: bool = False  # refused on purpose under overload (by the gateway), not invalid
    unknown: bool = False  # sent, not acknowledged: resend with the same id, ts, sub (BrokerUnavailable)
    ts: int = 0  # the event's ts as sent (ms since the epoch; stamped by the SDK when absent)
    # False when this writer could not read the shared split history lately: the route may differ
    # from the one other writers give the same id and ts, so a retry must carry this `sub`
    settled: bool = True


# Per event type: a reason to refuse it now (load shedding), or None to send it.
ShedRule = Callable[[str], str | None]


class PipelineClient:
    def __init__(
        self,
        topology: Topology,
        bootstrap: str | KafkaConnection,
        *,
        redis_url: str | None = None,
        redis_options: Mapping[str, Any] | None = None,
        splitter: HotKeySplitter | None = None,
        linger_ms: int = 5,
        max_batch: int = 1000,
        ack_timeout_ms: int = 5_000,
        client_id: str | None = None,
        source: str = "",
    ) -> None:
        self.topology = topology
        self.kafka = kafka_connection(bootstrap)
        self.bootstrap = self.kafka.bootstrap
        self.topic = topology.topic("events")
        self.splitter = splitter
        self.linger_s = linger_ms / 1000
        self.max_batch = max_batch
        self.ack_timeout_s = ack_timeout_ms / 1000
        self.client_id = client_id or f"{topology.name}.writer.{uuid.uuid4().hex[:8]}"
        self.source = check_source(source)
        self.ack_latency_ms = 0.0  # smoothed time from send to acknowledgement
        self.last_ack_at = 0.0  # time.monotonic() of the last acknowledgement
        self._types = topology.types
        self._redis_url = redis_url
        self._redis_options = dict(redis_options or {})
        self._redis: aioredis.Redis | None = None
        self._producer: AIOKafkaProducer | None = None
        self._announcer: SplitAnnouncer | None = None
        self._partitions: list[int] = []
        self._partitioner = DefaultPartitioner()
        self._partition_cache: dict[bytes, int] = {}
        # routing: the split history this writer follows, and what it proposed there
        self._router = splitter.router if splitter is not None else SubKeyRouter()
        self._policy = splitter.policy if splitter is not None else SplitPolicy()
        self._store: SplitHistoryStore | None = None
        # agreement on what is hot: this writer's rates shared, the writers' sums read back
        self._rates: SharedRates | None = None
        self._reporter = f"{self.client_id}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self._sharing: asyncio.Task[None] | None = None
        self._sharing_failing = False
        self._mine: dict[str, Entry] = {}  # key -> the entry this writer last put in the split history
        self._sync_lock = asyncio.Lock()
        self._trimmed_at = 0.0
        self._history_failing = False
        self.history_read_at = 0.0  # time.monotonic() of the last read of the shared split history
        # routes are settled for events whose ts is before this (ms since the epoch): every split
        # change in force before it was proposed before the last read of the history
        self._settled_before_ms = 0
        self._senders: dict[int, _PartitionSender] = {}
        self._in_flight = asyncio.Semaphore(MAX_SENDS_IN_FLIGHT)
        self._pending: list[tuple[Any, asyncio.Future[SendResult]]] = []
        self._linger_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; BrokerUnavailable if the broker cannot be reached or the events topic is missing,
        AccessRefused if it refuses this client's credentials or certificate."""
        producer = AIOKafkaProducer(
            **self.kafka.client_kwargs(),
            client_id=self.client_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=int(self.linger_s * 1000),
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=8 * MAX_BATCH_BYTES,
            request_timeout_ms=max(1000, int(self.ack_timeout_s * 1000)),
        )
        try:
            await asyncio.wait_for(producer.start(), self.ack_timeout_s * 2)
            partitions = await asyncio.wait_for(producer.partitions_for(self.topic), self.ack_timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            await check_access(self.kafka)  # AccessRefused, not "unreachable", for a refused password
            raise BrokerUnavailable(f"cannot reach the broker at {self.kafka.describe()}: {exc!r}") from exc
        if not partitions:
            await producer.stop()
            raise BrokerUnavailable(f"topic {self.topic} does not exist")
        self._producer = producer
        self._partitions = sorted(partitions)
        if self._redis_url:
            self._redis = redis_client.from_url(self._redis_url, **self._redis_options)
            lead_ms = int(self._policy.lead_s * 1000)
            self._store = SplitHistoryStore(
                self._redis,
                self.topology.name,
                lead_ms=lead_ms,
                guard_ms=lead_ms // 2,
                keep_ms=self.topology.dedup_horizon_s * 1000 + lead_ms + HISTORY_KEEP_MARGIN_MS,
            )
            if self.splitter is not None:
                self._rates = SharedRates(self._redis, self.topology.name)
        self._announcer = SplitAnnouncer(self.topology.name, self.client_id, producer, self._redis)
        self._router.use_partitions(len(self._partitions), self._partition_of)
        if self.splitter is not None:
            self.splitter.restart(time.monotonic())
        if self._store is not None:
            # route by the shared history from the first event (a failure is retried by the ticker)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_splits(), self.ack_timeout_s)
        if self.splitter is not None or self._store is not None:
            self._ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._pending:
            await self._flush_pending()
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        if self._rates is not None:  # this writer's rates leave the writers' sums at once
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._rates.withdraw(self._reporter), self.ack_timeout_s)
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def __aenter__(self) -> PipelineClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def started(self) -> bool:
        return self._producer is not None

    # -- sending ----------------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> SendResult:
        """One event; sent with others gathered within `linger_ms` (or as soon as `max_batch` are waiting)."""
        fut: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._pending.append((event, fut))
        if len(self._pending) >= self.max_batch:
            self._spawn(self._flush_pending())
        elif self._linger_task is None or self._linger_task.done():
            self._linger_task = asyncio.create_task(self._linger())
        return await fut

    async def _linger(self) -> None:
        await asyncio.sleep(self.linger_s)
        await self._flush_pending()

    async def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            results = await self.send_many([e for e, _ in pending])
        except BrokerUnavailable as exc:
            # each caller learns its own event's fate and id
            own = {r.index: r for r in exc.results}
            for i, (_, fut) in enumerate(pending):
                if not fut.done():
                    mine = own.get(i)
                    if mine is not None:
                        mine.index = 0
                    fut.set_exception(BrokerUnavailable(str(exc), [mine] if mine is not None else []))
            return
        except BaseException as exc:
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else BrokerUnavailable(repr(exc)))
            return
        for (_, fut), result in zip(pending, results, strict=True):
            result.index = 0
            if not fut.done():
                fut.set_result(result)

    async def send_many(
        self, events: list[dict[str, Any]], *, shed: ShedRule | None = None, source: str | None = None
    ) -> list[SendResult]:
        """Validate each event; send the good ones; a result per event, in order.

        Invalid events are rejected with field and reason and do not stop the others.
        `shed` may refuse events by type (load shedding); they come back with `shed=True`
        and an id, to resend later. Raises BrokerUnavailable if the sends are not acknowledged.
        """
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable("client not started")
        scope = self.source if source is None else check_source(source)
        results: list[SendResult | None] = [None] * len(events)
        ready: list[tuple[int, EventFields, str, Any, bool]] = []
        types = self._types
        keys: dict[str, int] = {}
        new_ids = _IdSource(len(events))
        now_ms = int(time.time() * 1000)  # the ts of events that come without one
        for i, obj in enumerate(events):
            try:
                fields = check_event(obj, types, now_ms)
            except InvalidEvent as exc:
                results[i] = SendResult(i, _given_id(obj), False, exc.reason, exc.field)
                continue
            event_id = fields[6]
            if event_id is None:
                event_id = new_ids.next()
            if shed is not None:
                reason = shed(fields[0])
                if reason is not None:
                    results[i] = SendResult(i, event_id, False, reason, None, shed=True)
                    continue
            ready.append((i, fields, event_id, obj.get("text") if len(obj) > 3 else None, "sub" in obj))
            key = fields[1]
            keys[key] = keys.get(key, 0) + 1
        splitter = self.splitter
        if splitter is not None and ready:
            splitter.observe_counts(keys)
            self._ticked(splitter.tick(time.monotonic()), now_ms)
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        indexes: dict[int, list[int]] = {}  # partition -> the events it carries
        partition_of = self._partition_of
        router = self._router
        route = router.sub_for if router.active else None
        # without a shared history every route is this writer's own: nothing to agree with
        settled_before = self._settled_before_ms if self._store is not None else MAX_TS
        for i, (etype, key, channel, ts, value, user, _, sub), event_id, text, given_sub in ready:
            if route is not None and not given_sub:
                sub = route(key, event_id, ts)  # by the key's split factor at the event's ts
            mkey = message_key(key, sub)
            wire_id = scoped_id(scope, event_id) if scope else event_id
            value_json = _wire(etype, key, channel, ts, value, user, wire_id, sub, text)
            partition = partition_of(mkey)
            batch = by_partition.get(partition)
            if batch is None:
                by_partition[partition] = batch = []
                indexes[partition] = []
            batch.append((mkey, value_json))
            indexes[partition].append(i)
            results[i] = SendResult(
                i, event_id, True, sub=sub, ts=ts, settled=given_sub or ts < settled_before
            )
        if by_partition:
            try:
                await self._produce(producer, by_partition)
            except _Unacknowledged as exc:
                for partition in exc.partitions:
                    for i in indexes[partition]:
                        r = results[i]
                        assert r is not None
                        r.accepted, r.unknown, r.reason = False, True, UNKNOWN_FATE
                raise BrokerUnavailable(str(exc), [r for r in results if r is not None]) from exc
        return [r for r in results if r is not None]

    def _partition_of(self, mkey: bytes) -> int:
        """The producer's own key partitioner (murmur2), cached: it is pure Python and keys repeat."""
        cache = self._partition_cache
        partition = cache.get(mkey)
        if partition is None:
            if len(cache) >= PARTITION_CACHE_MAX:
                cache.clear()
            parts = self._partitions
            cache[mkey] = partition = self._partitioner(mkey, parts, parts)
        return partition

    async def _produce(
        self, producer: AIOKafkaProducer, by_partition: dict[int, list[tuple[bytes, bytes]]]
    ) -> None:
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._in_flight.acquire(), self.ack_timeout_s)
        except TimeoutError:
            raise _Unacknowledged("too many sends waiting for the broker", list(by_partition)) from None
        acks: dict[int, asyncio.Future[None]] = {}
        try:
            senders = self._senders
            for partition, messages in by_partition.items():
                sender = senders.get(partition)
                if sender is None:
                    senders[partition] = sender = _PartitionSender(producer, self.topic, partition)
                acks[partition] = sender.submit(messages)
            # on timeout, wait_for cancels the gather and so the submissions: those not yet handed
            # to the producer are dropped, which keeps what waits in memory bounded
            await asyncio.wait_for(asyncio.gather(*acks.values()), self.ack_timeout_s)
        except (KafkaError, OSError, TimeoutError, BrokerUnavailable) as exc:
            unacked = [p for p in by_partition if not _acknowledged(acks.get(p))]
            raise _Unacknowledged(f"the broker did not acknowledge in time: {exc!r}", unacked) from exc
        finally:
            self._in_flight.release()
        self.last_ack_at = time.monotonic()
        took_ms = (self.last_ack_at - started) * 1000
        self.ack_latency_ms = (
            took_ms if not self.ack_latency_ms else 0.8 * self.ack_latency_ms + 0.2 * took_ms
        )

    # -- splits -----------------------------------------------------------------------------

    def _announce(self, changes: dict[str, int]) -> None:
        if changes and self._announcer is not None:
            self._spawn(self._announcer.announce(changes))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(_finished(self._background))

    def _ticked(self, changes: dict[str, int], now_ms: int) -> None:
        """After a tick: announce and propose what changed; share the rates of an interval that closed."""
        if changes:
            self._announce(changes)
            if self._store is None:
                self._follow_locally(now_ms)  # a lone writer: in force at once
            else:
                self._spawn(self._sync_splits())  # proposed; in force after the lead
        splitter = self.splitter
        if splitter is None or self._rates is None:
            return
        report = splitter.take_report()
        if report is not None and (self._sharing is None or self._sharing.done()):
            self._sharing = asyncio.create_task(self._share_rates(report))
            self._background.add(self._sharing)
            self._sharing.add_done_callback(_finished(self._background))

    async def _share_rates(self, report: dict[str, int]) -> None:
        """Put this writer's rates in the writers' sums; decide again by the sums (core/hotkeys.py)."""
        splitter, rates = self.splitter, self._rates
        assert splitter is not None and rates is not None
        policy = splitter.policy
        try:
            totals = await asyncio.wait_for(
                rates.share(
                    self._reporter, report, int(policy.shared_ttl * 1000), min_total=policy.threshold_eps / 2
                ),
                self.ack_timeout_s,
            )
        except Exception as exc:  # decided by this writer's own rates until the store answers again
            if not self._sharing_failing:
                self._sharing_failing = True
                log.warning("cannot share hot-key rates: %r", exc)
            return
        if self._sharing_failing:
            self._sharing_failing = False
            log.warning("hot-key rates shared again (%s)", self.topology.name)
        changes = splitter.agree(totals, time.monotonic())
        if changes:
            self._announce(changes)
            await self._sync_splits()

    async def _tick_forever(self) -> None:
        """Close rate intervals without traffic too, so cooled keys are unsplit and announced;
        read the shared split history back and propose this writer's changes."""
        while True:
            await asyncio.sleep(self._policy.refresh_s)
            if self.splitter is not None:
                self._ticked(self.splitter.tick(time.monotonic()), int(time.time() * 1000))
            if self._store is not None:
                await self._sync_splits()
            elif self.splitter is not None:
                self._follow_locally(int(time.time() * 1000))

    def _follow_locally(self, now_ms: int) -> None:
        """Without a shared store: this writer's decisions go into its own history, in force at once."""
        splitter = self.splitter
        assert splitter is not None
        history = splitter.history
        keep_ms = self.topology.dedup_horizon_s * 1000 + HISTORY_KEEP_MARGIN_MS
        for change in reconcile(splitter.asks(history.latest), history, self._mine):
            if history.apply(change, now_ms, now_ms - keep_ms):
                self._took(history, change.key)
        self._forget_mine()

    async def _sync_splits(self) -> None:
        """Read the shared split history; propose what this writer wants changed; trim now and then."""
        store = self._store
        assert store is not None
        history = self._router.history
        async with self._sync_lock:
            try:
                read_ms = int(time.time() * 1000)
                await store.load(history)
                self.history_read_at = time.monotonic()
                self._settled_before_ms = read_ms + store.guard_ms
                if self.splitter is not None:
                    self._adopt(history)
                    for change in reconcile(self.splitter.asks(history.latest), history, self._mine):
                        if await store.propose(history, change):
                            self._took(history, change.key)
                    self._forget_mine()
                if self.history_read_at - self._trimmed_at >= HISTORY_TRIM_EVERY_S:
                    self._trimmed_at = self.history_read_at
                    await store.trim(history)
                if self._history_failing:
                    self._history_failing = False
                    log.warning("split history readable again (%s)", self.topology.name)
            except Exception as exc:  # routing goes on by what is known; the next refresh tries again
                if not self._history_failing:
                    self._history_failing = True
                    log.warning("cannot read or update the split history: %r", exc)

    def _adopt(self, history: SplitHistory) -> None:
        """Splits this writer wants exactly as they stand, decided by the writers' sums, become its own too:
        any writer that agreed on a split may end it once the sums say every writer sees the key cool (so
        a split outlives no writer that proposed it). Decided by its own rates alone, a writer adopts
        nothing: it must not undo a split that others, hotter, hold."""
        splitter = self.splitter
        if splitter is None or not splitter.shared_fresh(time.monotonic()):
            return
        for key, k in splitter.splits.items():
            last = history.last(key)
            if last is not None and last[1] == k:
                self._mine[key] = last

    def _took(self, history: SplitHistory, key: str) -> None:
        """This writer's proposal is the key's last entry now."""
        last = history.last(key)
        if last is not None and last[1] > 1:
            self._mine[key] = last
        else:
            self._mine.pop(key, None)

    def _forget_mine(self) -> None:
        """Keys this writer no longer splits whose last entry another writer put: not its to shrink."""
        wanted = self.splitter.splits if self.splitter is not None else {}
        history = self._router.history
        for key, entry in list(self._mine.items()):
            if key not in wanted and history.last(key) != entry:
                del self._mine[key]


class _PartitionSender:
    """One partition's way to the producer: concurrent sends are merged into shared record batches.

    aiokafka holds one batch per partition and makes every other `send_batch` wait for it
    to drain; many waiters on one partition also trip its timeout accounting. Here a single
    task per partition hands batches over, filled with whatever the callers submitted
    meanwhile (so concurrency makes batches bigger instead of queues longer).
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, partition: int) -> None:
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self._pending: list[tuple[list[tuple[bytes, bytes]], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, messages: list[tuple[bytes, bytes]]) -> asyncio.Future[None]:
        """A future that is done when every message is acknowledged."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((messages, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return fut

    async def _run(self) -> None:
        producer, topic, partition = self.producer, self.topic, self.partition
        while self._pending:
            taken = [(m, f) for m, f in self._pending if not f.done()]  # done: cancelled by a timeout
            self._pending = []
            waits: list[list[asyncio.Future[Any]]] = [[] for _ in taken]
            in_batch: list[int] = []
            try:
                batch = producer.create_batch()
                for index, (messages, _) in enumerate(taken):
                    for key, value in messages:
                        if batch.append(key=key, value=value, timestamp=None) is None:
                            sent = await producer.send_batch(batch, topic, partition=partition)
                            for member in in_batch:
                                waits[member].append(sent)
                            in_batch = []
                            batch = producer.create_batch()
                            batch.append(key=key, value=value, timestamp=None)
                        if not in_batch or in_batch[-1] != index:
                            in_batch.append(index)
                if batch.record_count():
                    sent = await producer.send_batch(batch, topic, partition=partition)
                    for member in in_batch:
                        waits[member].append(sent)
            except Exception as exc:
                for _, fut in taken:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), deps in zip(taken, waits, strict=True):
                _settle_when_acked(fut, deps)


class _Unacknowledged(Exception):
    """Within send_many: the partitions whose events are not known to be acknowledged."""

    def __init__(self, message: str, partitions: list[int]) -> None:
        super().__init__(message)
        self.partitions = partitions


def _acknowledged(fut: asyncio.Future[None] | None) -> bool:
    return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None


def _settle_when_acked(fut: asyncio.Future[None], deps: list[asyncio.Future[Any]]) -> None:
    """Complete `fut` once every batch holding its messages is acknowledged (or with the first error)."""
    remaining = len(deps)
    if not remaining and not fut.done():
        fut.set_result(None)

    def acked(dep: asyncio.Future[Any]) -> None:
        nonlocal remaining
        if fut.done():
            return
        if dep.cancelled():
            fut.set_exception(BrokerUnavailable("send cancelled"))
            return
        exc = dep.exception()
        if exc is not None:
            fut.set_exception(exc)
            return
        remaining -= 1
        if not remaining:
            fut.set_result(None)

    for dep in deps:
        dep.add_done_callback(acked)


class _IdSource:
    """Random 128-bit ids in uuid4 hex form, drawn from the OS in one call per batch (uuid4() is slow)."""

    def __init__(self, n: int) -> None:
        self._raw = bytearray(os.urandom(16 * n))
        self._at = 0

    def next(self) -> str:
        at = self._at
        self._at = at + 16
        raw = self._raw
        raw[at + 6] = (raw[at + 6] & 0x0F) | 0x40  # version 4
        raw[at + 8] = (raw[at + 8] & 0x3F) | 0x80  # RFC 4122 variant
        return raw[at : at + 16].hex()


def _wire(
    etype: str,
    key: str,
    channel: str,
    ts: int,
    value: float,
    user: str | None,
    event_id: str,
    sub: int,
    text: str | None,
) -> bytes:
    """The event as it goes on the events topic (the fields of Event.to_json, without building an Event)."""
    obj: dict[str, Any] = {"type": etype, "key": key, "id": event_id}
    if channel:
        obj["channel"] = channel
    if ts:
        obj["ts"] = ts
    if value != 1:
        obj["value"] = value
    if user is not None:
        obj["user"] = user
    if sub:
        obj["sub"] = sub
    if text is not None:
        obj["text"] = text
    return orjson.dumps(obj)


SOURCE_PATTERN = re.compile(r"[A-Za-z0-9._-]{0,40}")


def check_source(source: str) -> str:
    """A writer's source: up to 40 of A-Z a-z 0-9 . _ - ("" for ids that are global)."""
    if not SOURCE_PATTERN.fullmatch(source):
        raise ValueError(f"source {source!r}: up to 40 characters of A-Z a-z 0-9 . _ -")
    return source


def scoped_id(source: str, event_id: str) -> str:
    """The id on the wire: `<source>/<id>`, so two sources that reuse an id count both events.

    A source never holds "/", so no two (source, id) pairs give one wire id. Where the
    result would exceed the schema's 128 characters, the id part is its 128-bit BLAKE2b
    digest instead (`<source>/#<32 hex digits>`): the same for every retry of the event.
    """
    wire = f"{source}/{event_id}"
    if len(wire) <= MAX_ID_CHARS:
        return wire
    digest = hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{source}/#{digest}"


def _given_id(obj: Any) -> str | None:
    """The caller's id of a rejected event, when it is a usable one (to match results to events)."""
    event_id = obj.get("id") if isinstance(obj, dict) else None
    return event_id if isinstance(event_id, str) and len(event_id) <= MAX_ID_CHARS else None


def _finished(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: announcing is best effort, the next change announces again

    return done
