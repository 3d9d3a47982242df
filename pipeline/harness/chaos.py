"""`pipeline chaos`: the whole pipeline under injected faults, then an exact count per key.

Writers (producer SDK, hot keys split) send a seeded workload and keep a ledger of
every event the SDK reports accepted; a failed send is resent later with the same
ids and counted in the ledger once. Meanwhile workers are SIGKILLed and restarted
with the same identity, Redis and the broker are restarted, workers join and leave.
At the end every key's all-time total in Redis must equal the ledger: exactly once.

On a cluster of Apache Kafka brokers (`--broker kafka --brokers 3`) brokers are also
SIGKILLed at any moment (the leader of a partials partition, the transaction
coordinator of a tier-1 worker, or any), and a tier-1 worker and a root are
SIGKILLed for good, so their partitions fail over after the session timeout.
The embedded broker needs the workers frozen and tier 1 idle before it stops
(it loses acknowledged writes and splits open transactions otherwise); that
workaround runs only there (docs/ARCHITECTURE.md, "Chaos").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.exceptions import RedisClusterException

from pipeline.client import BrokerUnavailable, PipelineClient
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.core.topology import Topology
from pipeline.harness.fault_plan import (
    ADDS,
    CLUSTER_REQUIRED,
    CLUSTER_WEIGHTS,
    DEFAULT_WEIGHTS,
    KILLS,
    REDIS_CLUSTER_REQUIRED,
    REDIS_CLUSTER_WEIGHTS,
    REMOVALS,
    SERVER_FAULTS,
    SINK_REQUIRED,
    SINK_WEIGHTS,
    Fault,
    FaultKind,
    breakdown,
    plan_faults,
)
from pipeline.harness.local_kafka import KafkaCluster, KafkaNode
from pipeline.harness.local_postgres import LocalPostgres, PostgresEndpoint
from pipeline.harness.local_servers import Endpoints, LocalRedisCluster, LocalServers, free_port
from pipeline.harness.supervisor import WorkerProcess
from pipeline.harness.zipf import Zipf
from pipeline.io import incarnation, kafka, postgres_sink, redis_client, redis_query
from pipeline.io.lag import Tier1Lag
from pipeline.io.partition_owners import owners_key
from pipeline.runtime.worker import load_topology

LedgerKey = tuple[str, str]  # (channel, key)

BASE_TOPOLOGY = "live_likes"
# what a read of Redis may meet while a server restarts or a cluster master fails over
REDIS_DOWN = (aioredis.RedisError, RedisClusterException, OSError)  # ConnectionError, TimeoutError among them
METRIC = "likes"
# The local broker snapshots ~0.4 s after a change, and a SIGTERM while writes still arrive can
# lose the last acknowledged ones (measured: a committed transaction gone after the restart).
# Apache Kafka keeps an acknowledged write; to restart the local broker as Kafka would behave,
# everything that writes to it is quiet for this long first.
BROKER_QUIET_S = 1.2
# A SIGKILLed broker of a cluster is back in every ISR before the next broker fault: with replication
# 3 and min.insync.replicas 2 the cluster rides out one lost broker at a time, not two.
ISR_TIMEOUT_S = 90.0
IDLE_TIMEOUT_S = 20.0
PROGRESS_EVERY_S = 5.0
CLIENT_STOP_TIMEOUT_S = 5.0

# Keys and channels with characters that have tripped key layouts elsewhere: ':' (Redis key
# separators), '{x}' (cluster hash tags), '#', U+00FF (its UTF-8 holds the 0xFF sub-key mark's
# byte value), non-Latin text, spaces. NUL is left out: Redis glob patterns and C clients mishandle it.
KEY_STYLES = ("c{i}", "c{i}:x", "{{c{i}}}", "#c{i}", "c{i}\xff", "ключ{i}", "c {i}/é")
CHANNEL_STYLES = ("video-{i}", "video:{i}", "{{video-{i}}}", "#video-{i}", "video-{i}\xff")
VIRAL_KEY = "viral:{hot}#\xff"


@dataclass
class ChaosConfig:
    seed: int = 1
    faults: int = 20
    duration_s: float = 60.0
    writers: int = 2
    rate: float = 1500.0  # events/s per writer
    batch: int = 100
    keys: int = 2000
    channels: int = 8
    viral_share: float = 0.3
    split_threshold_eps: float = 200.0  # low, so that the viral key is split at this rate
    ack_timeout_ms: int = 1000  # shorter than most broker restarts: sends then fail and are resent
    # after a failed send: a fresh producer (the embedded broker can leave one wedged), or keep it
    # (Apache Kafka's producer follows the new leaders by itself)
    reopen_after_failure: bool = True
    coalesce_workers: int = 2
    merge_workers: int = 2
    max_added: int = 1
    drain_timeout_s: float = 90.0
    # a client's retries: this share of the accepted events is sent again, with its id and first-send
    # ts (half of them without their sub), by the next writer, this long after the original
    retry_share: float = 0.05
    retry_delay_s: float = 5.0
    plan: list[Fault] | None = None  # explicit faults instead of the seeded plan (tests)
    # "cluster": Redis is a 3-master Redis Cluster (one replica each) and masters are SIGKILLed
    redis: str = "single"
    # "postgres": a sink tier writes the rollups to PostgreSQL too (killed, PostgreSQL restarted), and
    # every key's total there is checked against the ledger and Redis
    sink: str = ""

    @classmethod
    def for_cluster(cls, **overrides: Any) -> ChaosConfig:
        """A run on 3 Apache Kafka brokers: 10,000 events/s, more workers (two of them die for good)."""
        return cls(
            **{
                "duration_s": 90.0,
                "writers": 4,
                "rate": 3750.0,
                "batch": 500,  # 5 sends/s per writer: acks=all from 3 replicas takes tens of ms
                "coalesce_workers": 2,
                "merge_workers": 2,
                "drain_timeout_s": 150.0,
                # a SIGKILLed leader's partitions move after the brokers' 3 s session timeout
                "ack_timeout_ms": 4000,
                "reopen_after_failure": False,
                **overrides,
            }
        )


@dataclass
class ChaosReport:
    seed: int
    topology: str
    broker: str  # apache-kafka, embedded, or external
    brokers: int
    redis: str  # single or cluster
    redis_masters: int  # masters serving slots at the start (1: one Redis)
    rate_eps: float  # events accepted per second of load, achieved
    events_accepted: int
    events_counted: int
    keys_checked: int
    keys_wrong: int
    lost: int
    duplicated: int
    faults_injected: int
    faults_by_kind: dict[str, int]
    faults_skipped: int
    events_resent: int
    retries_sent: int  # acknowledged copies of accepted events (same id): each must count zero times
    retries_forced: int  # of those, sent without sub under another split of their key than the original
    events_on_subkeys: int
    events_rejected: int
    send_failures: int
    unexpected_exits: int
    broadcast_ok: bool
    wall_s: float
    workdir: str
    wrong_keys: list[dict[str, Any]] = field(default_factory=list)
    # the PostgreSQL sink (`--sink postgres`): its totals against the ledger, and against Redis
    sink: str = ""
    sink_keys_checked: int = 0
    sink_keys_wrong: int = 0
    sink_lost: int = 0
    sink_duplicated: int = 0
    sink_keys_unlike_redis: int = 0
    sink_wrong_keys: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        sink_ok = not self.sink or (self.sink_keys_wrong == 0 and self.sink_keys_checked > 0)
        return self.keys_wrong == 0 and self.events_accepted > 0 and sink_ok

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CountCheck:
    keys_checked: int
    keys_wrong: int
    lost: int
    duplicated: int
    wrong: list[tuple[LedgerKey, int, float]]  # (key, expected, got), first few


def compare_counts(ledger: Counter[LedgerKey], got: dict[LedgerKey, float], show: int = 10) -> CountCheck:
    """Every key in either side; lost = counts missing from Redis, duplicated = counts too many."""
    keys = set(ledger) | set(got)
    lost = duplicated = 0
    wrong: list[tuple[LedgerKey, int, float]] = []
    for key in sorted(keys):
        want, have = ledger.get(key, 0), got.get(key, 0.0)
        if want != have:
            lost += max(0, int(want - have))
            duplicated += max(0, int(have - want))
            wrong.append((key, want, have))
    return CountCheck(len(keys), len(wrong), lost, duplicated, wrong[:show])


class Workload:
    """One writer's deterministic event stream: Zipf keys over channels plus one viral key."""

    def __init__(self, seed: int, writer: int, keys: int, channels: int, viral_share: float) -> None:
        self.rng = random.Random(seed * 1009 + writer)
        self.writer = writer
        self.viral_share = viral_share
        self.keys = [KEY_STYLES[i % len(KEY_STYLES)].format(i=i) for i in range(keys)]
        self.channels = [CHANNEL_STYLES[i % len(CHANNEL_STYLES)].format(i=i) for i in range(channels)]
        self.zipf = Zipf(keys, 1.1)
        self.seq = 0

    def batch(self, n: int) -> list[dict[str, Any]]:
        rng, out = self.rng, []
        for _ in range(n):
            if rng.random() < self.viral_share:
                key, channel = VIRAL_KEY, self.channels[0]
            else:
                i = self.zipf.ranks(rng)[0]
                key, channel = self.keys[i], self.channels[i % len(self.channels)]
            self.seq += 1
            out.append({"type": "like", "key": key, "channel": channel, "id": f"w{self.writer}-{self.seq}"})
        return out


class Writer:
    """Sends batches through the SDK at a steady rate; resends failed batches with the same ids."""

    def __init__(
        self,
        index: int,
        topology: Topology,
        endpoints: Endpoints,
        cfg: ChaosConfig,
        ledger: Counter[LedgerKey],
    ) -> None:
        self.index = index
        self.topology = topology
        self.endpoints = endpoints
        self.cfg = cfg
        self.ledger = ledger
        self.workload = Workload(cfg.seed, index, cfg.keys, cfg.channels, cfg.viral_share)
        policy = SplitPolicy(threshold_eps=cfg.split_threshold_eps, budget_eps=cfg.split_threshold_eps)
        self.splitter = HotKeySplitter(policy)
        self.client: PipelineClient | None = None
        self.retry: list[list[dict[str, Any]]] = []
        self.peer: Writer = self  # sends the client retries of this writer's events
        self.echoes: list[tuple[float, list[dict[str, Any]]]] = []  # (due, copies of accepted events)
        self.sending = False
        self.accepted = self.resent = self.on_subkeys = self.rejected = self.failures = 0
        self.retries_sent = self.retries_forced = 0

    async def run(self, stop: asyncio.Event, gate: asyncio.Event) -> None:
        interval = self.cfg.batch / self.cfg.rate
        try:
            while not stop.is_set():
                await gate.wait()
                started = time.monotonic()
                if not await self._send_one():
                    await asyncio.sleep(0.5)
                    continue
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        finally:
            self.sending = False

    async def flush(self, gate: asyncio.Event, deadline: float) -> None:
        """Resend what failed until it is accepted (or the deadline passes)."""
        while (self.retry or self.echoes) and time.monotonic() < deadline:
            await gate.wait()
            if not await self._send_one(new=False):
                await asyncio.sleep(0.5)

    async def _send_one(self, new: bool = True) -> bool:
        resend = bool(self.retry)
        # due retries of the other writer's events ride in the same send, after the batch
        copies = self._due_echoes(time.monotonic() if new else float("inf"))
        if not resend and not new and not copies:
            return True
        batch = self.retry.pop(0) if resend else self.workload.batch(self.cfg.batch) if new else []
        self.sending = True
        try:
            client = await self._client()
            now = int(time.time() * 1000)
            router = self.splitter.router
            forced = sum(
                router.k_at(e["key"], e["ts"]) != router.k_at(e["key"], now) for e in copies if "sub" not in e
            )
            results = await client.send_many(batch + copies)
        except BrokerUnavailable as exc:
            self.failures += 1
            if len(exc.results) == len(batch) + len(copies):
                # resent with the ts and sub of the first send: same partition
                batch = [
                    {**event, "ts": r.ts, "sub": r.sub} if r.ts else event
                    for event, r in zip(batch, exc.results, strict=False)
                ]
            if batch:
                self.retry.insert(0, batch)
            if copies:  # sent again later: they carry their id and ts (and sub), so they route alike
                self.echoes.insert(0, (0.0, copies))
            await self._after_failure()
            return False
        finally:
            self.sending = False
        self.resent += len(batch) if resend else 0
        self.retries_sent += sum(r.accepted for r in results[len(batch) :])
        self.retries_forced += forced
        echoes: list[dict[str, Any]] = []
        for event, result in zip(batch, results, strict=False):
            if result.accepted:
                self.ledger[(event["channel"], event["key"])] += 1
                self.accepted += 1
                self.on_subkeys += result.sub != 0
                if self.workload.rng.random() < self.cfg.retry_share:
                    # the caller's retry: same id and ts; half also echo the sub, half rely on the ts
                    # (all do when the writer could not read the split history: the SDK says so)
                    echo = {**event, "id": result.id, "ts": result.ts}
                    if len(echoes) % 2 or not result.settled:
                        echo["sub"] = result.sub
                    echoes.append(echo)
            else:
                self.rejected += 1
        if echoes:
            self.peer.echoes.append((time.monotonic() + self.cfg.retry_delay_s, echoes))
        return True

    def _due_echoes(self, now_s: float) -> list[dict[str, Any]]:
        """Take the copies of another writer's events due by now (a client's retries): none may count."""
        due = 0
        while due < len(self.echoes) and self.echoes[due][0] <= now_s:
            due += 1
        taken = [c for _, copies in self.echoes[:due] for c in copies]
        del self.echoes[:due]
        return taken

    async def _after_failure(self) -> None:
        if self.cfg.reopen_after_failure or self.failures % 5 == 0:
            await self.close()  # a fresh producer after a broker restart, not a wedged one

    async def _client(self) -> PipelineClient:
        if self.client is None:
            client = PipelineClient(
                self.topology,
                self.endpoints.kafka_bootstrap,
                redis_url=self.endpoints.redis_url,
                splitter=self.splitter,
                ack_timeout_ms=self.cfg.ack_timeout_ms,
                client_id=f"{self.topology.name}.chaos-writer-{self.index}",
            )
            await client.start()
            self.client = client
        return self.client

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), CLIENT_STOP_TIMEOUT_S)


class Workers:
    """Every worker process of the run, by tier; those that exit on their own are restarted."""

    def __init__(
        self,
        topology: Topology,
        endpoints: Endpoints,
        workdir: Path,
        postgres: PostgresEndpoint | None = None,
    ) -> None:
        self.topology = topology
        self.endpoints = endpoints
        self.workdir = workdir
        self.postgres = postgres  # the sink's PostgreSQL (restartable when its server is set)
        self.tiers: dict[str, list[WorkerProcess]] = {
            "coalesce": [],
            "merge": [],
            "broadcast": [],
            "sink": [],
        }
        self.down: set[str] = set()  # killed on purpose, waiting for their restart
        self.retired: set[str] = set()  # stopped gracefully for good (scale-in), or killed for good
        self.killed_for_good: list[str] = []
        self.broker_kills: list[str] = []
        self.unexpected_exits: list[str] = []
        self.broadcast_port = free_port()

    def add(self, tier: str) -> WorkerProcess:
        env: dict[str, str] = {}
        if tier == "broadcast":
            env = {
                "PIPELINE_BROADCAST_PORT": str(self.broadcast_port),
                "PIPELINE_BROADCAST_SECRET": secrets.token_urlsafe(24),
            }
        if tier == "sink" and self.postgres is not None:
            env = {"PIPELINE_POSTGRES": self.postgres.url}
        instance = f"chaos-{tier[0]}{len(self.tiers[tier]) + 1}"
        worker = WorkerProcess(
            BASE_TOPOLOGY,
            tier,
            instance,
            self.endpoints.kafka_bootstrap,
            self.endpoints.redis_url,
            self.workdir,
            extra_env=env,
            name=self.topology.name,
        )
        self.tiers[tier].append(worker)
        return worker.start()

    @property
    def all(self) -> list[WorkerProcess]:
        return [w for ws in self.tiers.values() for w in ws]

    def active(self, tier: str) -> list[WorkerProcess]:
        return [w for w in self.tiers[tier] if w.name not in self.retired]

    async def remove(self, tier: str, target: int) -> WorkerProcess:
        """Stop one worker of the tier gracefully (SIGTERM: it commits, leaves its group) for good."""
        victims = self.active(tier)
        victim = victims[target % len(victims)]
        self.retired.add(victim.name)
        await asyncio.to_thread(victim.stop)
        return victim

    def kill_for_good(self, tier: str, target: int) -> WorkerProcess:
        """SIGKILL one worker of the tier and never restart it: its partitions must fail over."""
        victims = self.active(tier)
        victim = victims[target % len(victims)]
        self.retired.add(victim.name)
        self.killed_for_good.append(victim.name)
        victim.kill()
        return victim

    def freeze(self) -> list[WorkerProcess]:
        """SIGSTOP every running worker (they resume with `thaw`, none the wiser)."""
        frozen = [w for w in self.all if w.proc is not None and w.running]
        for w in frozen:
            with contextlib.suppress(OSError):
                w.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        return frozen

    @staticmethod
    def thaw(frozen: list[WorkerProcess]) -> None:
        for w in frozen:
            with contextlib.suppress(OSError):
                w.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

    def revive(self) -> None:
        for w in self.all:
            if w.name not in self.down and w.name not in self.retired and not w.running:
                self.unexpected_exits.append(w.name)
                _say(
                    f"!! {w.name} exited on its own (code {w.proc.returncode if w.proc else None}); "
                    "restarting"
                )
                w.start()

    def stop(self) -> None:
        """SIGTERM to all at once (they commit in parallel), then wait for each."""
        for w in self.all:
            if w.proc is not None and w.running:
                with contextlib.suppress(OSError):
                    w.proc.send_signal(signal.SIGTERM)
        for w in self.all:
            w.stop()


async def run_chaos(
    endpoints: Endpoints,
    cfg: ChaosConfig,
    workdir: Path,
    name: str | None = None,
    postgres: PostgresEndpoint | None = None,
) -> ChaosReport:
    """Run the whole pipeline under faults against `endpoints`; servers are restarted only if given."""
    started = time.monotonic()
    topology = load_topology(BASE_TOPOLOGY).renamed(name or f"chaos{cfg.seed}x{uuid.uuid4().hex[:6]}")
    cluster = (
        endpoints.broker if isinstance(endpoints.broker, KafkaCluster) and endpoints.broker.size > 1 else None
    )
    weights = dict(CLUSTER_WEIGHTS if cluster else DEFAULT_WEIGHTS)
    if endpoints.broker is None:
        weights[FaultKind.RESTART_BROKER] = 0
    if endpoints.redis is None:
        weights[FaultKind.RESTART_REDIS] = 0
    redis_cluster = endpoints.redis_cluster
    if redis_cluster is not None:
        weights.update(REDIS_CLUSTER_WEIGHTS)
    required = dict(CLUSTER_REQUIRED) if cluster else {}
    if redis_cluster is not None:
        required.update(REDIS_CLUSTER_REQUIRED)
    if cfg.sink:
        if postgres is None:
            raise ValueError("a chaos run with a sink needs a PostgreSQL")
        weights.update(SINK_WEIGHTS)
        required.update(SINK_REQUIRED)
        if postgres.server is None:
            weights[FaultKind.RESTART_POSTGRES] = 0
            required.pop(FaultKind.RESTART_POSTGRES)
    plan = (
        cfg.plan
        if cfg.plan is not None
        else plan_faults(
            cfg.seed,
            cfg.faults,
            cfg.duration_s,
            weights=weights,
            max_added=cfg.max_added,
            workers={"coalesce": cfg.coalesce_workers, "merge": cfg.merge_workers},
            # the broker kills and kills for good a cluster run is for, and the sink's kills and
            # PostgreSQL restarts of a sink run, if that many faults fit
            required=required if required and cfg.faults >= sum(required.values()) else None,
        )
    )
    await kafka.ensure_topics(endpoints.kafka_bootstrap, kafka.topology_topics(topology))
    workers = Workers(topology, endpoints, workdir, postgres if cfg.sink else None)
    ledger: Counter[LedgerKey] = Counter()
    writers = [Writer(i, topology, endpoints, cfg, ledger) for i in range(cfg.writers)]
    for i, w in enumerate(writers):
        w.peer = writers[(i + 1) % len(writers)]
    stop, gate = asyncio.Event(), asyncio.Event()
    gate.set()
    injected: list[Fault] = []
    skipped: list[Fault] = []
    redis = redis_client.from_url(endpoints.redis_url, socket_timeout=5)
    masters = len(redis_cluster.master_nodes()) if redis_cluster is not None else 1
    tasks: list[asyncio.Task[None]] = []
    sink_got: dict[LedgerKey, float] = {}
    _say(
        f"chaos: topology {topology.name}, seed {cfg.seed}, {len(plan)} faults in {cfg.duration_s:g} s, "
        f"{cfg.writers * cfg.rate:,.0f} events/s on {_broker_label(endpoints)}, logs {workdir}"
    )
    try:
        for _ in range(cfg.coalesce_workers):
            workers.add("coalesce")
        for _ in range(cfg.merge_workers):
            workers.add("merge")
        workers.add("broadcast")
        if cfg.sink:
            workers.add("sink")
        await _tier1_ready(redis, topology, workers)
        load_started = time.monotonic()
        tasks = [asyncio.create_task(w.run(stop, gate)) for w in writers]
        faults = asyncio.create_task(
            _inject_all(plan, load_started, workers, writers, endpoints, gate, injected, skipped)
        )
        counted = 0.0
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while time.monotonic() - load_started < cfg.duration_s or not faults.done():
            await asyncio.sleep(0.25)
            workers.revive()
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if faults.done() and faults.exception() is not None:
                raise faults.exception()  # type: ignore[misc]
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY_S
                counted = await _counted(redis, topology, counted)
                _progress(load_started, ledger, counted, injected, plan, workers)
        stop.set()
        await asyncio.gather(*tasks)
        load_s = time.monotonic() - load_started
        load_accepted = sum(ledger.values())
        deadline = time.monotonic() + cfg.drain_timeout_s
        await asyncio.gather(*(w.flush(gate, deadline) for w in writers))
        for w in writers:
            await w.close()
        _say(f"load done: {sum(ledger.values()):,} events accepted; waiting for the pipeline to drain ...")
        got = await _drain(redis, topology, ledger, workers, deadline, load_started, injected, plan)
        if cfg.sink and postgres is not None:
            _say("Redis drained; waiting for the sink's PostgreSQL ...")
            sink_deadline = max(deadline, time.monotonic() + 60.0)
            sink_got = await _drain_sink(postgres.url, topology, ledger, workers, sink_deadline)
        broadcast_ok = await _node_answers(workers.broadcast_port)
    finally:
        stop.set()
        gate.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in writers:
            await w.close()
        workers.stop()
        await redis.aclose()
    check = compare_counts(ledger, got)
    sink_check = compare_counts(ledger, sink_got) if cfg.sink else None
    unlike_redis = (
        compare_counts(Counter({k: int(v) for k, v in got.items()}), sink_got) if cfg.sink else None
    )
    return ChaosReport(
        seed=cfg.seed,
        topology=topology.name,
        broker=endpoints.broker_kind,
        brokers=len(endpoints.kafka_bootstrap.split(",")),
        redis="cluster" if redis_cluster is not None else "single",
        redis_masters=masters,
        rate_eps=round(load_accepted / load_s, 1) if load_s > 0 else 0.0,
        events_accepted=sum(ledger.values()),
        events_counted=int(sum(got.values())),
        keys_checked=check.keys_checked,
        keys_wrong=check.keys_wrong,
        lost=check.lost,
        duplicated=check.duplicated,
        faults_injected=len(injected),
        faults_by_kind=breakdown(injected),
        faults_skipped=len(skipped),
        events_resent=sum(w.resent for w in writers),
        retries_sent=sum(w.retries_sent for w in writers),
        retries_forced=sum(w.retries_forced for w in writers),
        events_on_subkeys=sum(w.on_subkeys for w in writers),
        events_rejected=sum(w.rejected for w in writers),
        send_failures=sum(w.failures for w in writers),
        unexpected_exits=len(workers.unexpected_exits),
        broadcast_ok=broadcast_ok,
        wall_s=round(time.monotonic() - started, 2),
        workdir=str(workdir),
        wrong_keys=[{"channel": k[0], "key": k[1], "expected": e, "got": g} for k, e, g in check.wrong],
        sink=cfg.sink,
        sink_keys_checked=sink_check.keys_checked if sink_check else 0,
        sink_keys_wrong=sink_check.keys_wrong if sink_check else 0,
        sink_lost=sink_check.lost if sink_check else 0,
        sink_duplicated=sink_check.duplicated if sink_check else 0,
        sink_keys_unlike_redis=unlike_redis.keys_wrong if unlike_redis else 0,
        sink_wrong_keys=[
            {"channel": k[0], "key": k[1], "expected": e, "got": g} for k, e, g in sink_check.wrong
        ]
        if sink_check
        else [],
    )


async def _inject_all(
    plan: list[Fault],
    load_started: float,
    workers: Workers,
    writers: list[Writer],
    endpoints: Endpoints,
    gate: asyncio.Event,
    injected: list[Fault],
    skipped: list[Fault],
) -> None:
    """Each fault at its moment (or at once, if the one before ran late), one at a time."""
    for n, fault in enumerate(plan, 1):
        await asyncio.sleep(max(0.0, load_started + fault.at_s - time.monotonic()))
        at = time.monotonic() - load_started
        if await _inject(fault, workers, writers, endpoints, gate):
            injected.append(fault)
            _say(f"[{at:6.1f}s] fault {n}/{len(plan)}: {_describe(fault, workers)}")
        else:
            skipped.append(fault)
            _say(f"[{at:6.1f}s] fault {n}/{len(plan)}: {fault.kind} skipped (server not ours to restart)")


async def _inject(
    fault: Fault, workers: Workers, writers: list[Writer], endpoints: Endpoints, gate: asyncio.Event
) -> bool:
    kind = fault.kind
    if kind in KILLS:
        victims = workers.active(KILLS[kind])
        victim = victims[fault.target % len(victims)]
        workers.down.add(victim.name)
        try:
            victim.kill()
            await asyncio.sleep(fault.pause_s)
            victim.start()
        finally:
            workers.down.discard(victim.name)
        return True
    if kind in ADDS:
        workers.add(ADDS[kind])
        return True
    if kind in REMOVALS:
        await workers.remove(REMOVALS[kind], fault.target)
        return True
    if kind is FaultKind.KILL_FOR_GOOD:
        workers.kill_for_good(fault.tier, fault.target)
        return True
    if kind is FaultKind.KILL_BROKER:
        if not isinstance(endpoints.broker, KafkaCluster) or endpoints.broker.size < 2:
            return False
        await _kill_broker(endpoints.broker, fault, workers)
        return True
    if kind is FaultKind.RESTART_POSTGRES:
        server = workers.postgres.server if workers.postgres is not None else None
        if server is None:
            return False
        await asyncio.to_thread(server.stop)  # fast shutdown: the sink's connection is cut mid-batch
        await asyncio.sleep(fault.pause_s)
        await asyncio.to_thread(server.start, 60.0)
        return True
    if kind is FaultKind.KILL_REDIS_MASTER:
        if endpoints.redis_cluster is None:
            return False
        await _kill_redis_master(endpoints.redis_cluster, fault)
        return True
    if kind is FaultKind.RESTART_REDIS:
        if endpoints.redis is None:
            return False
        await asyncio.to_thread(endpoints.redis.stop)
        await asyncio.sleep(fault.pause_s)
        await asyncio.to_thread(endpoints.redis.start)
        return True
    if kind is FaultKind.RESTART_BROKER:
        if endpoints.broker is None:
            return False
        if isinstance(endpoints.broker, KafkaCluster):
            # Apache Kafka keeps what it acknowledged and its transactions' state: no quiet needed
            await _restart_kafka(endpoints.broker, fault)
            return True
        gate.clear()  # writers pause, and the workers freeze: a quiet broker before SIGTERM
        frozen: list[WorkerProcess] = []
        try:
            while any(w.sending for w in writers):
                await asyncio.sleep(0.05)
            await _tier1_idle(endpoints, workers.topology)
            frozen = workers.freeze()
            await asyncio.sleep(BROKER_QUIET_S)
            await asyncio.to_thread(endpoints.broker.stop)
            # while it is down, workers see it gone, and sends fail (BrokerUnavailable) and are
            # resent later
            workers.thaw(frozen)
            gate.set()
            await asyncio.sleep(fault.pause_s)
            await asyncio.to_thread(endpoints.broker.start)
        finally:
            workers.thaw(frozen)
            gate.set()
        return True
    raise ValueError(f"unknown fault {kind}")


async def _kill_redis_master(cluster: LocalRedisCluster, fault: Fault) -> None:
    """SIGKILL one master of the Redis Cluster. With replicas, its replica is promoted once the others
    see it fail (the node timeout, 2 s), and the killed node, restarted after the pause, comes back as
    the replica of its successor; without, its slots are down until it restarts from its AOF. Whatever
    an async replica had not received is lost: the root finds its positions behind and applies those
    partials again from Kafka, as after a Redis restart. The next fault waits for every slot."""
    masters = await asyncio.to_thread(cluster.master_nodes)
    victim = masters[fault.target % len(masters)]
    victim.kill()
    if cluster.replicas:
        await asyncio.to_thread(cluster.wait_promoted, 30.0)  # its replica took over its slots
    await asyncio.sleep(fault.pause_s)
    await asyncio.to_thread(victim.start)
    await asyncio.to_thread(cluster.wait_ok, 30.0)
    # the next fault only once every replica caught up (a replica promoted mid-resync would serve an
    # old copy of its slots: one failure at a time, as the cluster's fail-over assumes)
    await asyncio.to_thread(cluster.wait_synced, 60.0)


async def _tier1_ready(
    redis: aioredis.Redis, topology: Topology, workers: Workers, timeout_s: float = 60.0
) -> None:
    """Until tier 1 has claimed every events partition: the load and the fault clock start then."""
    owners = owners_key(topology.group("coalesce"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers.revive()
        with contextlib.suppress(*REDIS_DOWN):
            if await redis.hlen(owners) >= topology.partitions.events:
                return
        await asyncio.sleep(0.2)
    _say(f"   (tier 1 had not claimed every partition after {timeout_s:g} s; starting anyway)")


async def _restart_kafka(cluster: KafkaCluster, fault: Fault) -> None:
    """SIGTERM (a controlled shutdown) of one broker of a cluster, or of the only one, mid-stream."""
    if cluster.size == 1:
        await asyncio.to_thread(cluster.stop)
        await asyncio.sleep(fault.pause_s)
        await asyncio.to_thread(cluster.start)
        return
    node = cluster.nodes[fault.target % cluster.size]
    await _bounce(cluster, node, node.stop, fault.pause_s)


async def _kill_broker(cluster: KafkaCluster, fault: Fault, workers: Workers) -> None:
    """SIGKILL one broker mid-stream: by turns the leader of a partials partition, the transaction
    coordinator of a tier-1 worker, or any broker; restart it after the pause, wait until in sync."""
    node_id, role = await _pick_broker(cluster, fault.target, workers)
    node = cluster.nodes[node_id - 1]
    workers.broker_kills.append(f"node {node_id} ({role})")
    await _bounce(cluster, node, node.kill, fault.pause_s)


async def _bounce(cluster: KafkaCluster, node: KafkaNode, down: Callable[[], None], pause_s: float) -> None:
    """Take one broker down (`down`: stop or kill), start it after the pause, wait until it is in sync."""
    await asyncio.to_thread(down)
    await asyncio.sleep(pause_s)
    await asyncio.to_thread(node.start, 90.0)
    await _wait_in_sync(cluster)


async def _partitions_meta(cluster: KafkaCluster, topics: list[str] | None = None) -> list[dict[str, Any]]:
    """Partition metadata (leader, replicas, isr) of `topics`, or of every topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        described: list[dict[str, Any]] = await admin.describe_topics(
            topics or sorted(await admin.list_topics())
        )
        return described
    finally:
        await admin.close()


async def _pick_broker(cluster: KafkaCluster, target: int, workers: Workers) -> tuple[int, str]:
    """(node id, why): by turns a partials partition's leader, a tier-1 transaction coordinator, any."""
    topology = workers.topology
    try:
        if target % 3 == 0:
            topic = topology.topic("partials")
            partition = target % topology.partitions.partials
            described = await _partitions_meta(cluster, [topic])
            leaders = {p["partition"]: p["leader"] for t in described for p in t.get("partitions", [])}
            if leaders.get(partition, -1) >= 1:
                return leaders[partition], f"leader of {topic}[{partition}]"
        if target % 3 == 1:
            txids = await _tier1_transactional_ids(workers)
            if txids:
                txid = txids[target % len(txids)]
                node = await kafka.transaction_coordinator(cluster.bootstrap, txid)
                return node, f"transaction coordinator of {txid}"
    except (KafkaError, OSError, TimeoutError, aioredis.RedisError) as exc:
        _say(f"   (could not find a leader or coordinator: {exc!r}; killing any broker)")
    return target % cluster.size + 1, "any"


async def _tier1_transactional_ids(workers: Workers) -> list[str]:
    """The transactional ids the running tier-1 workers commit with (recorded in Redis at start)."""
    group = workers.topology.group("coalesce")
    keys = [incarnation.key(group, w.instance) for w in workers.active("coalesce")]
    redis = redis_client.from_url(workers.endpoints.redis_url, socket_timeout=5)
    try:
        found = [await redis.get(k) for k in keys]  # one GET each: on a cluster they are in different slots
        return [v.decode() if isinstance(v, bytes) else str(v) for v in found if v is not None]
    finally:
        await redis.aclose()


async def _wait_in_sync(cluster: KafkaCluster, timeout_s: float = ISR_TIMEOUT_S) -> None:
    """Until every partition has all its replicas in sync again (or the timeout: then say so)."""
    deadline = time.monotonic() + timeout_s
    behind = -1
    while time.monotonic() < deadline:
        with contextlib.suppress(KafkaError, OSError, TimeoutError):  # a broker still on its way up
            described = await _partitions_meta(cluster)
            behind = sum(
                len(p["isr"]) < len(p["replicas"]) for t in described for p in t.get("partitions", [])
            )
            if behind == 0:
                return
        await asyncio.sleep(0.5)
    _say(f"   ({behind} partitions still under-replicated after {timeout_s:g} s; going on)")


async def _tier1_idle(endpoints: Endpoints, topology: Topology, timeout_s: float = IDLE_TIMEOUT_S) -> bool:
    """Wait until tier 1 has committed every event (so no worker has a transaction open).

    The local broker does not keep a transaction that is open when it stops atomic: after the
    restart it aborted the partials of one and still took its offsets (118 events lost in a short
    run). Apache Kafka keeps transaction state in a replicated log, so a restart there aborts or
    completes such a transaction whole; here the harness restarts the broker between transactions.
    """
    lag = Tier1Lag(endpoints.kafka_bootstrap, topology)
    deadline = time.monotonic() + timeout_s
    try:
        await lag.start()
        while time.monotonic() < deadline:
            if (await lag.sample()).lag == 0:
                return True
            await asyncio.sleep(0.1)
    except KafkaError as exc:
        _say(f"   (could not read tier-1 lag: {exc!r})")
    finally:
        with contextlib.suppress(Exception):
            await lag.stop()
    _say(f"   (tier 1 still had uncommitted events after {timeout_s:g} s; restarting the broker anyway)")
    return False


def _broker_label(endpoints: Endpoints) -> str:
    nodes = len(endpoints.kafka_bootstrap.split(","))
    return f"{endpoints.broker_kind} ({nodes} broker{'s' if nodes > 1 else ''})"


def _describe(fault: Fault, workers: Workers) -> str:
    if fault.kind is FaultKind.KILL_BROKER:
        return f"{fault.kind}: SIGKILL {workers.broker_kills[-1]}, restarted after {fault.pause_s:.2f} s"
    if fault.kind is FaultKind.KILL_FOR_GOOD:
        return (
            f"{fault.kind}: SIGKILL {workers.killed_for_good[-1]}, never restarted (its partitions fail over)"
        )
    if fault.kind is FaultKind.KILL_REDIS_MASTER:
        return f"{fault.kind}: SIGKILL a master of the Redis Cluster, restarted after {fault.pause_s:.2f} s"
    if fault.kind in SERVER_FAULTS:
        return f"{fault.kind}, down {fault.pause_s:.2f} s"
    if fault.kind in ADDS:
        return f"{fault.kind}: {workers.tiers[ADDS[fault.kind]][-1].name} joins"
    if fault.kind in REMOVALS:
        gone = [w.name for w in workers.tiers[REMOVALS[fault.kind]] if w.name in workers.retired]
        return f"{fault.kind}: {gone[-1]} stopped gracefully (SIGTERM) and leaves"
    victims = workers.active(KILLS[fault.kind])
    victim = victims[fault.target % len(victims)].name
    return f"{fault.kind}: SIGKILL {victim}, restarted after {fault.pause_s:.2f} s"


async def _counted(redis: aioredis.Redis, topology: Topology, last: float) -> float:
    """Events counted so far (the last known value while Redis is down)."""
    try:
        return await redis_query.metric_sum(redis, topology, METRIC)
    except REDIS_DOWN:
        return last


async def _drain(
    redis: aioredis.Redis,
    topology: Topology,
    ledger: Counter[LedgerKey],
    workers: Workers,
    deadline: float,
    load_started: float,
    injected: list[Fault],
    plan: list[Fault],
) -> dict[LedgerKey, float]:
    """Poll until Redis agrees with the ledger, or until the deadline; the last totals read."""
    want = dict(ledger)
    got: dict[LedgerKey, float] = {}
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    while True:
        workers.revive()
        with contextlib.suppress(*REDIS_DOWN):
            got = await redis_query.key_totals(redis, topology, METRIC)
        if got == want or time.monotonic() > deadline:
            return got
        if time.monotonic() >= next_progress:
            next_progress += PROGRESS_EVERY_S
            _progress(load_started, ledger, sum(got.values()), injected, plan, workers)
        await asyncio.sleep(0.5)


async def _drain_sink(
    url: str, topology: Topology, ledger: Counter[LedgerKey], workers: Workers, deadline: float
) -> dict[LedgerKey, float]:
    """Poll until PostgreSQL's totals agree with the ledger, or until the deadline; the last read."""
    want = dict(ledger)
    got: dict[LedgerKey, float] = {}
    while True:
        workers.revive()
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            conn = await postgres_sink.connect(url, timeout_s=5)
            try:
                rows = await postgres_sink.all_rows(conn, topology, METRIC)
            finally:
                await conn.close()
            got = {(c, k): int(v) for (size, _b, c, k), v in rows.items() if size == 0}
        if got == want or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.5)


async def _node_answers(port: int, timeout_s: float = 15.0) -> bool:
    """The broadcast node is up again after its faults (it serves /v1/node)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"http://127.0.0.1:{port}/v1/node") as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(0.3)
    return False


def _progress(
    load_started: float,
    ledger: Counter[LedgerKey],
    counted: float,
    injected: list[Fault],
    plan: list[Fault],
    workers: Workers,
) -> None:
    up = sum(w.running for w in workers.all)
    _say(
        f"[{time.monotonic() - load_started:6.1f}s] accepted {sum(ledger.values()):>9,}  "
        f"counted {int(counted):>9,}  faults {len(injected)}/{len(plan)}  workers up {up}/{len(workers.all)}"
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """The CLI entry: local servers unless --kafka/--redis (then no server faults)."""
    overrides: dict[str, Any] = {"seed": args.seed, "faults": args.faults}
    if args.duration is not None:
        overrides["duration_s"] = args.duration
    cfg = ChaosConfig.for_cluster(**overrides) if args.brokers > 1 else ChaosConfig(**overrides)
    if args.rate is not None:
        cfg.rate = args.rate / cfg.writers  # --rate is for all writers together
    if args.redis in ("cluster", "single"):  # `--redis cluster`: a local Redis Cluster, not a URL
        cfg.redis, args.redis = args.redis, None
    cfg.sink = getattr(args, "sink", None) or ""
    # the writers' producers complain on every broker restart; the progress lines say what happens
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-chaos-"))
    try:
        with contextlib.ExitStack() as stack:
            if args.kafka and args.redis:
                endpoints = Endpoints(args.kafka, args.redis)
            else:
                local = stack.enter_context(
                    LocalServers(workdir / "servers", broker=args.broker, brokers=args.brokers)
                )
                endpoints = Endpoints(
                    args.kafka or local.kafka_bootstrap,
                    args.redis or local.redis_url,
                    None if args.kafka else local.broker,
                    None if args.redis else local.redis,
                )
            if cfg.redis == "cluster" and not args.redis:
                _say("starting a local Redis Cluster: 3 masters, one replica each ...")
                redis_cluster = stack.enter_context(LocalRedisCluster(workdir / "redis-cluster"))
                endpoints = replace(
                    endpoints, redis_url=redis_cluster.url, redis=None, redis_cluster=redis_cluster
                )
            postgres: PostgresEndpoint | None = None
            if cfg.sink and getattr(args, "postgres", None):
                postgres = PostgresEndpoint(args.postgres)  # not ours: no restart_postgres faults
            elif cfg.sink:
                server = stack.enter_context(LocalPostgres(workdir / "postgres"))
                postgres = PostgresEndpoint(server.url, server)
            report = asyncio.run(run_chaos(endpoints, cfg, workdir, postgres=postgres))
    except KeyboardInterrupt:
        _say(f"interrupted; everything stopped (logs in {workdir})")
        return 130
    except (RuntimeError, ValueError) as exc:  # a server that would not start, an impossible plan
        _say(f"pipeline chaos: {exc} (logs in {workdir})")
        return 2
    _print_report(report, args.json)
    return 0 if report.ok else 1


def _print_report(report: ChaosReport, as_json: bool) -> None:
    kinds = ", ".join(f"{k} {n}" for k, n in report.faults_by_kind.items() if n)
    lines = [
        "",
        f"events accepted   {report.events_accepted:>10,}   (ledger: acknowledged by the broker, once each)",
        f"events counted    {report.events_counted:>10,}   (read back from Redis)",
        f"keys checked      {report.keys_checked:>10,}   wrong {report.keys_wrong}",
        f"lost              {report.lost:>10,}   duplicated {report.duplicated:,}",
        f"faults injected   {report.faults_injected:>10}   ({kinds})",
        f"broker            {report.broker:>10}   x{report.brokers}, {report.rate_eps:,.0f} events/s",
        f"redis             {report.redis:>10}   {report.redis_masters} master(s)",
        f"resent events     {report.events_resent:>10,}   after {report.send_failures} failed sends",
        f"client retries    {report.retries_sent:>10,}   (same id, by another writer; "
        f"{report.retries_forced:,} under another split than their original)",
        f"on sub-keys       {report.events_on_subkeys:>10,}   (hot key split)",
        f"unexpected exits  {report.unexpected_exits:>10}   broadcast node up at the end: "
        f"{report.broadcast_ok}",
        f"wall time         {report.wall_s:>10} s   logs {report.workdir}",
        *(
            [
                f"in PostgreSQL     {report.sink_keys_checked:>10,}   keys checked, wrong "
                f"{report.sink_keys_wrong} (lost {report.sink_lost:,}, duplicated "
                f"{report.sink_duplicated:,}; {report.sink_keys_unlike_redis} unlike Redis)"
            ]
            if report.sink
            else []
        ),
        "RESULT            " + ("exact" if report.ok else "WRONG COUNTS"),
    ]
    for wrong in report.wrong_keys:
        lines.append(f"  {wrong}")
    for wrong in report.sink_wrong_keys:
        lines.append(f"  postgres: {wrong}")
    print("\n".join(lines), file=sys.stderr if as_json else sys.stdout, flush=True)
    if as_json:
        print(orjson.dumps(report.as_dict()).decode(), flush=True)
