"""`pipeline bench coalesce`: how fast tier 1 drains a backlog, against two yardsticks.

- the ceiling: a bare `getmany` loop that decodes each event (`orjson.loads`) and
  counts it by key, nothing else: what a hand-written consumer of this topic does
  (tier 1 decodes the writers' events with a typed msgspec decoder, which also
  checks them, and so can come close to it or pass it);
- tier 1: the real CoalesceWorker, counted only when a window's Kafka transaction
  (partials + offsets) has committed, so producing and committing are included;
- a naive Faust agent that updates a windowed table per event (pipeline.bench.faust_app).

All three read the same kind of pre-loaded backlog in one run of this command, so
their ratios are measured under the same machine load. Each starts a fresh
consumer group from the earliest offset. See docs/BENCHMARKS.md for results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.bench import faust_app
from pipeline.bench.workload import preload
from pipeline.core.topology import Topology
from pipeline.harness.local_servers import resolve_broker, servers_or_local
from pipeline.harness.machine import machine
from pipeline.io import kafka
from pipeline.runtime import observability as obs
from pipeline.runtime import settings as settings_mod
from pipeline.runtime.settings import Settings

TARGET_VS_CEILING = 0.75
TARGET_VS_FAUST = 50.0
LOADER_PROCESSES = 2
ROUNDS = 5  # ceiling and tier 1 each run this many times, alternating; ratios are per round
WARM_UP_EVENTS = 100_000  # each phase drains this once, unmeasured, before the rounds
MAX_RECORDS = 20_000
PROGRESS_EVERY_S = 2.0
STALL_S = 60.0  # no progress for this long: the measurement failed
FAUST_STOP_S = 20.0


class BenchError(RuntimeError):
    """A measurement could not finish (stalled, crashed); the message says which."""


@dataclass
class Round:
    """One pre-loaded topic, read by the ceiling and by tier 1 (each as a fresh group)."""

    topic: str
    preload_eps: float = 0.0
    ceiling_s: float = 0.0
    tier1_s: float = 0.0
    ceiling_cpu_s: float = 0.0  # CPU time of this process during the measurement
    tier1_cpu_s: float = 0.0
    partials_sent: int = 0
    tier1_ids_s: float = 0.0  # tier 1 on a second, identical backlog whose every event has a uuid id
    dedup_redis_keys: int = 0  # Redis keys under `T:` after the ids run (where id claims used to live)
    dedup_ids: int = 0  # ids tier 1 held in its dedup state at the end of the ids run
    dedup_memory_bytes: int = 0  # and the memory they took


@dataclass
class Results:
    events: int
    faust_events: int
    keys: int
    partitions: int
    rounds: list[Round] = field(default_factory=list)
    faust_eps: float | None = None
    faust_s: float | None = None
    faust_error: str | None = None

    @property
    def preload_eps(self) -> float:
        return max((r.preload_eps for r in self.rounds), default=0.0)

    @property
    def ceiling_s(self) -> float:
        """Best of the rounds: noise from other processes only ever slows a run down."""
        return min((r.ceiling_s for r in self.rounds if r.ceiling_s), default=0.0)

    @property
    def tier1_s(self) -> float:
        return min((r.tier1_s for r in self.rounds if r.tier1_s), default=0.0)

    @property
    def ceiling_eps(self) -> float:
        return self.events / self.ceiling_s if self.ceiling_s else 0.0

    @property
    def tier1_eps(self) -> float:
        return self.events / self.tier1_s if self.tier1_s else 0.0

    @property
    def partials_sent(self) -> int:
        """Partials of tier 1's best round (window cuts, hence partials, vary a little run to run)."""
        best = min((r for r in self.rounds if r.tier1_s), key=lambda r: r.tier1_s, default=None)
        return best.partials_sent if best else 0

    @property
    def round_ratios(self) -> list[float]:
        """tier 1 / ceiling within each round: both read the same topic under the same load."""
        return [r.ceiling_s / r.tier1_s for r in self.rounds if r.ceiling_s and r.tier1_s]

    @property
    def tier1_vs_ceiling(self) -> float:
        """The median of the per-round ratios: a ratio measured in one round, not across rounds."""
        return statistics.median(self.round_ratios) if self.round_ratios else 0.0

    @property
    def tier1_vs_ceiling_cpu(self) -> float:
        """The same ratio in CPU time of the consuming process: much less moved by other processes."""
        ceiling = min((r.ceiling_cpu_s for r in self.rounds if r.ceiling_cpu_s), default=0.0)
        tier1 = min((r.tier1_cpu_s for r in self.rounds if r.tier1_cpu_s), default=0.0)
        return ceiling / tier1 if tier1 else 0.0

    @property
    def tier1_ids_eps(self) -> float:
        best = min((r.tier1_ids_s for r in self.rounds if r.tier1_ids_s), default=0.0)
        return self.events / best if best else 0.0

    @property
    def tier1_ids_vs_tier1(self) -> float:
        """Median over rounds of (tier 1 with ids) / (tier 1 without), each pair on one round's load."""
        ratios = [r.tier1_s / r.tier1_ids_s for r in self.rounds if r.tier1_s and r.tier1_ids_s]
        return statistics.median(ratios) if ratios else 0.0

    @property
    def dedup_redis_keys(self) -> int:
        return max((r.dedup_redis_keys for r in self.rounds), default=0)

    @property
    def dedup_bytes_per_id(self) -> float:
        best = max(self.rounds, key=lambda r: r.dedup_ids, default=None)
        return best.dedup_memory_bytes / best.dedup_ids if best and best.dedup_ids else 0.0

    @property
    def tier1_vs_faust(self) -> float | None:
        return self.tier1_eps / self.faust_eps if self.faust_eps else None

    @property
    def coalescing_ratio(self) -> float:
        return self.events / self.partials_sent if self.partials_sent else 0.0

    def summary(self) -> dict[str, Any]:
        """The JSON object printed with --json (ratios rounded, raw timings kept)."""
        vs_faust = self.tier1_vs_faust
        out: dict[str, Any] = {
            "events": self.events,
            "faust_events": self.faust_events,
            "keys": self.keys,
            "partitions": self.partitions,
        }
        out.update(
            preload_eps=round(self.preload_eps),
            ceiling_eps=round(self.ceiling_eps),
            tier1_eps=round(self.tier1_eps),
            faust_eps=None if self.faust_eps is None else round(self.faust_eps, 1),
            tier1_vs_ceiling=round(self.tier1_vs_ceiling, 3),
            tier1_vs_faust=None if vs_faust is None else round(vs_faust, 1),
            partials_sent=self.partials_sent,
            coalescing_ratio=round(self.coalescing_ratio, 1),
            targets_met={
                "tier1_vs_ceiling": self.tier1_vs_ceiling >= TARGET_VS_CEILING,
                "tier1_vs_faust": vs_faust is not None and vs_faust >= TARGET_VS_FAUST,
            },
            tier1_vs_ceiling_cpu=round(self.tier1_vs_ceiling_cpu, 3),
            tier1_ids_eps=round(self.tier1_ids_eps),
            tier1_ids_vs_tier1=round(self.tier1_ids_vs_tier1, 3),
            tier1_ids_vs_tier1_runs=[
                round(r.tier1_s / r.tier1_ids_s, 3) for r in self.rounds if r.tier1_ids_s
            ],
            dedup_redis_keys=self.dedup_redis_keys,
            dedup_bytes_per_id=round(self.dedup_bytes_per_id, 2),
            ceiling_runs_eps=[round(self.events / r.ceiling_s) for r in self.rounds if r.ceiling_s],
            tier1_runs_eps=[round(self.events / r.tier1_s) for r in self.rounds if r.tier1_s],
            tier1_vs_ceiling_runs=[round(x, 3) for x in self.round_ratios],
            faust_s=self.faust_s,
            faust_error=self.faust_error,
            machine=machine(),
        )
        return out


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


class _Progress:
    """Progress lines on stderr during long phases, and the stall detector."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase = phase
        self.total = total
        self.last_n = -1
        self.last_change = time.monotonic()
        self.next_report = self.last_change + PROGRESS_EVERY_S

    def update(self, n: int) -> None:
        now = time.monotonic()
        if n != self.last_n:
            self.last_n = n
            self.last_change = now
        elif now - self.last_change > STALL_S:
            raise BenchError(f"{self.phase}: no progress for {STALL_S:.0f} s at {n}/{self.total} events")
        if now >= self.next_report:
            self.next_report = now + PROGRESS_EVERY_S
            say(f"{self.phase}: {n:,}/{self.total:,} events")


# -- the three measurements ---------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float


class _Stopwatch:
    """Wall-clock and process CPU time since it was made."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def read(self) -> Timing:
        return Timing(time.perf_counter() - self.wall, time.process_time() - self.cpu)


async def measure_ceiling(bootstrap: str, topic: str, group: str, events: int) -> Timing:
    """Time for a bare consumer, configured like tier 1's, to decode and count `events` events."""
    consumer = kafka.consumer(bootstrap, topic, group, "bench", read_committed=True, max_records=MAX_RECORDS)
    loads = orjson.loads
    counts: dict[str, int] = {}
    n = 0
    progress = _Progress("ceiling", events)
    watch: _Stopwatch | None = None
    consumer.subscribe([topic])
    await consumer.start()
    try:
        while n < events:
            batch = await consumer.getmany(timeout_ms=200, max_records=MAX_RECORDS)
            if batch and watch is None:
                watch = _Stopwatch()  # drain rate: from the first record, not from the group join
            for records in batch.values():
                for record in records:
                    key = loads(record.value)["key"]
                    counts[key] = counts.get(key, 0) + 1
                n += len(records)
            progress.update(n)
        assert watch is not None
        elapsed = watch.read()
    finally:
        await consumer.stop()
    return elapsed


async def measure_tier1(
    topology: Topology, settings: Settings, events: int, inspect: Callable[[Any], None] | None = None
) -> tuple[Timing, int]:
    """Time from the worker's first record until `events` events are committed, and partials sent.

    Like the ceiling, the clock starts at the first record, so start-up (producer
    init, group join) is left out of both; committing the last window is inside.
    """
    from pipeline.tiers.coalesce import CoalesceWorker

    worker = CoalesceWorker(topology, settings)
    stop = asyncio.Event()
    progress = _Progress("tier 1", events)
    watch: _Stopwatch | None = None
    task = asyncio.create_task(worker.run(stop))
    try:
        while worker.events_in < events:
            if watch is None and worker.records_in:
                watch = _Stopwatch()
            if task.done():
                task.result()  # raises what killed the worker
                raise BenchError(f"tier 1 stopped early at {worker.events_in}/{events} events")
            await asyncio.sleep(0.005)
            progress.update(worker.events_in)
        assert watch is not None
        elapsed = watch.read()
        partials = worker.partials_out
        if inspect is not None:
            inspect(worker)
    finally:
        stop.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=30)
            except Exception as exc:  # a failure to stop must not hide the measurement's own error
                say(f"tier 1 did not stop cleanly: {exc!r}")
    return elapsed, partials


def measure_faust(
    bootstrap: str, app_id: str, topic: str, partitions: int, events: int, workdir: Path
) -> tuple[float, float]:
    """Run the Faust baseline in a subprocess until it has processed `events` events: (events/s, seconds)."""
    status = workdir / "faust-status.json"
    log_path = workdir / "faust.log"
    env = dict(
        os.environ,
        BENCH_FAUST_BROKER=bootstrap,
        BENCH_FAUST_APP_ID=app_id,
        BENCH_FAUST_TOPIC=topic,
        BENCH_FAUST_PARTITIONS=str(partitions),
        BENCH_FAUST_EVENTS=str(events),
        BENCH_FAUST_DATADIR=str(workdir / "faust-data"),
        BENCH_FAUST_STATUS=str(status),
    )
    progress = _Progress("faust", events)
    progress.last_change += 30  # Faust takes a while to start and join before its first event
    with (
        log_path.open("wb") as log,
        _child([sys.executable, "-m", "pipeline.bench.faust_app"], env, log, workdir) as proc,
    ):
        while True:
            time.sleep(0.25)
            current = faust_app.read_status(status)
            if "eps" in current:
                return float(current["eps"]), float(current["seconds"])
            if proc.poll() is not None:
                raise BenchError(f"the Faust worker exited with code {proc.returncode}{_tail(log_path)}")
            try:
                progress.update(int(current.get("seen", 0)))
            except BenchError as exc:
                raise BenchError(f"{exc}{_tail(log_path)}") from None


@contextlib.contextmanager
def _child(argv: list[str], env: dict[str, str], log: Any, cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess that is always stopped on the way out: SIGTERM (Faust leaves its group), then SIGKILL."""
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(FAUST_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return f"\n--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


# -- orchestration --------------------------------------------------------------------------


def run(bootstrap: str, redis_url: str, events: int, faust_events: int, keys: int, rounds: int) -> Results:
    """Pre-load, then measure the ceiling, tier 1 and Faust one after the other on the same servers.

    The ceiling and tier 1 run `rounds` times in alternating order (A B, B A, ...),
    each round on its own freshly loaded topic. Rates report the best round (another
    process's burst only ever slows a run down); the ratio is the median of the
    per-round ratios, each measured on one topic under one stretch of machine load.
    """
    from topologies.live_likes import TOPOLOGY

    base = "bench_" + uuid.uuid4().hex[:8]
    partitions = TOPOLOGY.partitions.events
    results = Results(events, faust_events, keys, partitions)
    # One unmeasured pass of every phase first: the first drain in a fresh process and on a fresh
    # broker ran slow (seen in every run: the first round's ratio was the lowest of its run).
    warm = Round("")
    for phase, name, ids in (
        (_ceiling_phase, "warm", False),
        (_tier1_phase, "warm", False),
        (_tier1_ids_phase, "warm_ids", True),
    ):
        topology = TOPOLOGY.renamed(f"{base}_{name}")
        warm.topic = topology.topic("events")
        asyncio.run(kafka.ensure_topics(bootstrap, kafka.topology_topics(topology)))
        if phase is not _tier1_phase:  # the ceiling's backlog serves tier 1 too (its own group)
            say(f"warming up on {WARM_UP_EVENTS:,} events (not measured)")
            preload(
                bootstrap, warm.topic, partitions, WARM_UP_EVENTS, keys, processes=LOADER_PROCESSES, ids=ids
            )
        phase(warm, topology, bootstrap, redis_url, WARM_UP_EVENTS)
    for i in range(rounds):
        # A fresh name per round: fresh topics and consumer groups (CoalesceWorker's group is the topology's).
        topology = TOPOLOGY.renamed(f"{base}_r{i + 1}")
        with_ids = TOPOLOGY.renamed(f"{base}_r{i + 1}_ids")
        rnd = Round(topology.topic("events"))
        results.rounds.append(rnd)
        topics = kafka.topology_topics(topology) + kafka.topology_topics(with_ids)
        asyncio.run(kafka.ensure_topics(bootstrap, topics))
        say(f"round {i + 1}/{rounds}: pre-loading {events:,} events on {rnd.topic} ({partitions} partitions)")
        rnd.preload_eps = preload(bootstrap, rnd.topic, partitions, events, keys, processes=LOADER_PROCESSES)
        say(f"pre-loaded at {rnd.preload_eps:,.0f} events/s")
        topic_ids = with_ids.topic("events")
        say(f"pre-loading the same {events:,} events with a uuid id each on {topic_ids}")
        preload(bootstrap, topic_ids, partitions, events, keys, processes=LOADER_PROCESSES, ids=True)
        # Both backlogs are loaded before any measurement, and the order alternates by round
        # (ceiling, tier 1, tier 1 with ids; then the reverse), so no phase always runs first
        # or always right after a pre-load.
        phases = [(_ceiling_phase, topology), (_tier1_phase, topology), (_tier1_ids_phase, with_ids)]
        for phase, on in phases if i % 2 == 0 else reversed(phases):
            phase(rnd, on, bootstrap, redis_url, events)

    if faust_events:
        topic = f"{base}.faust-events"
        asyncio.run(kafka.ensure_topics(bootstrap, [kafka.TopicSpec(topic, partitions)]))
        preload(bootstrap, topic, partitions, faust_events, keys, processes=1, seed=2)
        say(f"measuring the naive Faust agent on {faust_events:,} events (slow)")
        with tempfile.TemporaryDirectory(prefix="bench-faust-") as tmp:
            try:
                results.faust_eps, results.faust_s = measure_faust(
                    bootstrap, f"{base}_faust", topic, partitions, faust_events, Path(tmp)
                )
                say(f"faust: {results.faust_eps:,.1f} events/s")
            except BenchError as exc:
                results.faust_error = str(exc).splitlines()[0]
                say(f"faust failed: {exc}")
    return results


def _ceiling_phase(rnd: Round, topology: Topology, bootstrap: str, redis_url: str, events: int) -> None:
    say("measuring the ceiling (bare getmany + orjson.loads + dict count)")
    timing = asyncio.run(measure_ceiling(bootstrap, rnd.topic, topology.group("ceiling"), events))
    rnd.ceiling_s, rnd.ceiling_cpu_s = timing.wall_s, timing.cpu_s
    say(f"ceiling: {events / rnd.ceiling_s:,.0f} events/s")


def _tier1_phase(rnd: Round, topology: Topology, bootstrap: str, redis_url: str, events: int) -> None:
    say("measuring tier 1 (CoalesceWorker, until every event is committed)")
    settings = settings_mod.load(
        kafka=bootstrap, redis=redis_url, instance="bench", max_poll_records=MAX_RECORDS
    )
    timing, rnd.partials_sent = asyncio.run(measure_tier1(topology, settings, events))
    rnd.tier1_s, rnd.tier1_cpu_s = timing.wall_s, timing.cpu_s
    say(f"tier 1: {events / rnd.tier1_s:,.0f} events/s, {rnd.partials_sent:,} partials")


def _tier1_ids_phase(rnd: Round, topology: Topology, bootstrap: str, redis_url: str, events: int) -> None:
    """The same backlog with a uuid id on every event (what the SDK sends), drained by tier 1."""
    say("measuring tier 1 on events with ids (deduplication on)")
    settings = settings_mod.load(
        kafka=bootstrap, redis=redis_url, instance="bench", max_poll_records=MAX_RECORDS
    )

    def dedup_state(worker: Any) -> None:
        held = [worker.coalescer.ids(p) for p in worker.coalescer.ids_held()]
        rnd.dedup_ids = sum(ids.committed for ids in held)
        rnd.dedup_memory_bytes = sum(ids.memory_bytes for ids in held)

    timing, _ = asyncio.run(measure_tier1(topology, settings, events, dedup_state))
    rnd.tier1_ids_s = timing.wall_s
    rnd.dedup_redis_keys = asyncio.run(_topology_keys(redis_url, topology.name))
    say(
        f"tier 1 with ids: {events / rnd.tier1_ids_s:,.0f} events/s; dedup state "
        f"{rnd.dedup_memory_bytes / max(1, rnd.dedup_ids):.1f} bytes per id ({rnd.dedup_ids:,} ids); "
        f"{rnd.dedup_redis_keys:,} Redis keys"
    )


async def _topology_keys(redis_url: str, topology: str) -> int:
    """Redis keys under the topology's `T:` prefix, where claims of ids (`T:dedup:<id>`) used to live.

    Tier 1's own keys (partition owners, incarnations) are under its group's prefix, `T.coalesce:`.
    """
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        return sum([1 async for _ in client.scan_iter(match=f"{topology}:*", count=5000)])
    finally:
        await client.aclose()


def table(r: Results) -> str:
    """The human-readable summary (events/s; best round first, every round after it)."""

    def runs(secs: list[float]) -> str:
        return ", ".join(f"{r.events / s:,.0f}" for s in secs if s)

    vs_faust = r.tier1_vs_faust
    faust = "failed" if r.faust_error else "skipped" if r.faust_eps is None else f"{r.faust_eps:,.0f}"
    rows = [
        ("pre-load (2 producer processes)", f"{r.preload_eps:,.0f}", ""),
        ("ceiling: getmany + loads + count", f"{r.ceiling_eps:,.0f}", runs([x.ceiling_s for x in r.rounds])),
        ("tier 1: CoalesceWorker, committed", f"{r.tier1_eps:,.0f}", runs([x.tier1_s for x in r.rounds])),
        (
            "tier 1, a uuid id on every event",
            f"{r.tier1_ids_eps:,.0f}",
            runs([x.tier1_ids_s for x in r.rounds]),
        ),
        ("naive Faust agent, windowed table", faust, ""),
    ]
    width = max(len(name) for name, _, _ in rows)
    vs_faust_text = "n/a" if vs_faust is None else f"{vs_faust:,.0f}"
    return "\n".join(
        [
            f"{r.events:,} events, {r.keys:,} keys, {r.partitions} partitions, {len(r.rounds)} rounds; "
            f"Faust: {r.faust_events:,} events",
            f"{'':{width}}  {'events/s':>10}  rounds",
            *(f"{name:{width}}  {eps:>10}  {each}" for name, eps, each in rows),
            f"tier 1 / ceiling = {r.tier1_vs_ceiling:.2f}, median of rounds "
            f"[{', '.join(f'{x:.2f}' for x in r.round_ratios)}] (target >= {TARGET_VS_CEILING}); "
            f"tier 1 / Faust = {vs_faust_text} (target >= {TARGET_VS_FAUST:g})",
            f"tier 1 / ceiling in CPU time of this process: {r.tier1_vs_ceiling_cpu:.2f}",
            f"tier 1 with ids / without = {r.tier1_ids_vs_tier1:.2f}, median of rounds; dedup state "
            f"{r.dedup_bytes_per_id:.1f} bytes per id in memory; Redis keys under T: after it: "
            f"{r.dedup_redis_keys:,} for {r.events:,} events",
            f"partials sent: {r.partials_sent:,}; coalescing ratio: {r.coalescing_ratio:,.0f} events/partial",
        ]
    )


def _kind(broker: str | None) -> str:
    return "embedded" if resolve_broker(broker) == "embedded" else "apache-kafka"


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench coalesce` (flags are defined in pipeline/cli/)."""
    if args.events <= 0 or args.faust_events < 0 or args.keys <= 0:
        print("pipeline bench coalesce: --events and --keys must be positive", file=sys.stderr)
        return 2
    rounds = int(getattr(args, "rounds", None) or ROUNDS)
    obs.configure_logging("warning")
    brokers = ["kafka", "embedded"] if args.broker == "both" else [args.broker]
    if len(brokers) > 1 and args.kafka:
        print("pipeline bench coalesce: --broker both starts its own brokers (drop --kafka)", file=sys.stderr)
        return 2
    by_broker: dict[str, Results] = {}
    try:
        for broker in brokers:
            with servers_or_local(args.kafka, args.redis, say=say, broker=broker) as (kafka_url, redis_url):
                kind = "external" if args.kafka else _kind(broker)
                by_broker[kind] = run(kafka_url, redis_url, args.events, args.faust_events, args.keys, rounds)
    except BenchError as exc:
        print(f"pipeline bench coalesce: {exc}", file=sys.stderr)
        return 1
    for kind, results in by_broker.items():
        print(f"-- broker: {kind}")
        print(table(results))
    if args.json:
        summaries: dict[str, Any] = {kind: r.summary() | {"broker": kind} for kind, r in by_broker.items()}
        if len(summaries) == 1:
            print(orjson.dumps(next(iter(summaries.values()))).decode())
        else:
            kafka_eps, embedded_eps = by_broker["apache-kafka"].tier1_eps, by_broker["embedded"].tier1_eps
            ratio = round(kafka_eps / embedded_eps, 3) if embedded_eps else None
            summaries["tier1_kafka_vs_embedded"] = ratio
            print(orjson.dumps(summaries).decode())
    return 1 if any(r.faust_error for r in by_broker.values()) else 0
