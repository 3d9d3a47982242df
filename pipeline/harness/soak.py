"""`pipeline soak`: the live_likes pipeline at half its measured capacity for N minutes.

Issue 5: does anything leak or fall behind over time? The run has three phases:

1. capacity: writer processes send as fast as they can for `--capacity-seconds`; the
   capacity is the events counted in Redis divided by the time from the first send
   until Redis has counted them all (end to end, on this machine, with the writers
   competing for the same CPUs);
2. soak: paced writers at `--rate` (default: half that capacity) for `--minutes`,
   sampling every worker's RSS (/proc/PID/status VmRSS), the broker's and Redis's,
   and the consumer lag of tier 1 (events topic) and of the root (partials topic);
3. drain: wait until Redis has counted every event the broker acknowledged, then
   compare (exactly once makes the check cheap: the totals must be equal).

RSS "start" is read when the warm-up ends (the first 10 % of the soak, at most 60 s):
Python workers grow while their caches, buffers and allocator arenas fill up, which is
not a leak. The lag does not grow when the least-squares line through the second half
of the tier-1 lag samples gains less than one second of input over that half.

The local broker (noida-db) keeps every record in memory and rewrites its whole
snapshot (DATA/kafka.json) after changes; it honours `retention.ms` only once a
segment rolls, so the soak's topics get `retention.ms` and `segment.ms` (see
docs/SOAK.md for the measurements behind this).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.core.model import message_key
from pipeline.core.topology import Topology
from pipeline.harness.loadgen import LoadResult, Workload, produce
from pipeline.harness.local_servers import LocalServers, free_port
from pipeline.harness.machine import machine
from pipeline.harness.supervisor import WorkerProcess, rss_kb
from pipeline.io import kafka, redis_query
from pipeline.io.lag import LagSample, Tier1Lag
from pipeline.runtime.worker import load_topology

BASE_TOPOLOGY = "live_likes"
METRIC = "likes"
WRITERS = 2  # one paced Python producer manages ~45k events/s here; two leave headroom
SAMPLE_EVERY_S = 2.0
PROGRESS_EVERY_S = 15.0
WARMUP_SHARE = 0.1
WARMUP_MAX_S = 60.0
DRAIN_TIMEOUT_S = 120.0
START_TIMEOUT_S = 60.0
RSS_TARGET_PCT = 5.0
# Records older than this are deleted by the broker (once their segment rolls). It must exceed any
# lag the pipeline can reach, or events vanish before they are counted (the exact check would say so).
RETENTION_MS = 60_000
SEGMENT_MS = 10_000
RETAINED_ROLES = ("events", "partials", "updates", "feed")


@dataclass(frozen=True)
class WriterJob:
    bootstrap: str
    topic: str
    duration_s: float
    rate: int  # events/s of this writer; 0: as fast as the broker takes them
    seed: int


@dataclass(frozen=True)
class WriterResult:
    load: LoadResult
    started: float  # time.time() of its first send: process start-up is not load time
    finished: float


def _write(job: WriterJob) -> WriterResult:
    """One writer process: loadgen's producer (plain likes without ids, keyed, acks=all)."""
    workload = Workload(seed=job.seed)
    result = asyncio.run(produce(job.bootstrap, job.topic, workload, job.duration_s, job.rate))
    finished = time.time()
    return WriterResult(result, finished - result.wall_s, finished)


def _span(results: list[WriterResult]) -> tuple[float, float]:
    """(first send, last acknowledgement) over the writers, time.time()."""
    return min(r.started for r in results), max(r.finished for r in results)


class GroupLag(Tier1Lag):
    """Tier1Lag for any (topic, group): the root's lag on the partials topic."""

    def __init__(self, bootstrap: str, topology: Topology, role: str, tier: str) -> None:
        super().__init__(bootstrap, topology)
        self.topic = topology.topic(role)
        self.group = topology.group(tier)


def lag_trend(samples: list[tuple[float, int]], input_rate: float) -> dict[str, Any]:
    """Slope of the second half, and the largest lag of the first and last quarters."""
    n = len(samples)
    half = samples[n // 2 :]
    slope = 0.0
    if len(half) >= 2 and len({t for t, _ in half}) >= 2:
        slope = statistics.linear_regression([t for t, _ in half], [float(v) for _, v in half]).slope
    span = half[-1][0] - half[0][0] if len(half) >= 2 else 0.0
    quarter = max(1, n // 4)
    return {
        "slope_eps": round(slope, 2),
        "gain_over_second_half": round(slope * span),
        "allowed_gain": round(input_rate),  # one second of input
        "max_first_quarter": max((v for _, v in samples[:quarter]), default=0),
        "max_last_quarter": max((v for _, v in samples[-quarter:]), default=0),
        "growing": slope * span > input_rate,
    }


@dataclass
class Sampler:
    """Every SAMPLE_EVERY_S: RSS of each process, lag of tier 1 and of the root."""

    processes: dict[str, int | None]  # name -> pid
    tier1: Tier1Lag
    root: GroupLag
    t0: float = field(default_factory=time.monotonic)
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    tier1_lag: list[tuple[float, int]] = field(default_factory=list)
    root_lag: list[tuple[float, int]] = field(default_factory=list)
    produced: list[tuple[float, int]] = field(default_factory=list)  # sum of events end offsets
    snapshot: Path | None = None  # the local broker's DATA/kafka.json, if the broker is ours
    snapshot_bytes: list[tuple[float, int]] = field(default_factory=list)
    load_avg_1m: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)

    async def sample(self) -> None:
        t = round(time.monotonic() - self.t0, 2)
        self.load_avg_1m.append((t, os.getloadavg()[0]))
        if self.snapshot is not None:
            with contextlib.suppress(OSError):
                self.snapshot_bytes.append((t, self.snapshot.stat().st_size))
        for name, pid in self.processes.items():
            kb = rss_kb(pid)
            if kb is not None:
                self.rss.setdefault(name, []).append((t, kb))
        try:
            s1: LagSample = await self.tier1.sample()
            s2: LagSample = await self.root.sample()
        except Exception:
            self.errors += 1
            return
        self.tier1_lag.append((t, s1.lag))
        self.produced.append((t, s1.end))
        self.root_lag.append((t, s2.lag))


def _say(text: str) -> None:
    print(f"soak: {text}", file=sys.stderr, flush=True)


def _topics(topology: Topology) -> list[kafka.TopicSpec]:
    """The topology's topics, the high-volume ones with retention (the local broker keeps all in RAM)."""
    retention = {"retention.ms": str(RETENTION_MS), "segment.ms": str(SEGMENT_MS)}
    roles = {topology.topic(r) for r in RETAINED_ROLES}
    return [
        kafka.TopicSpec(s.name, s.partitions, {**s.config, **retention} if s.name in roles else s.config)
        for s in kafka.topology_topics(topology)
    ]


def _workers(topology: Topology, kafka_url: str, redis_url: str, workdir: Path) -> list[WorkerProcess]:
    """The demo's topology: 2 tier-1 workers, 1 root merger, 1 broadcast node."""
    node_env = {
        "PIPELINE_BROADCAST_PORT": str(free_port()),
        "PIPELINE_BROADCAST_SECRET": secrets.token_urlsafe(24),
    }

    def worker(tier: str, instance: str, env: dict[str, str] | None = None) -> WorkerProcess:
        return WorkerProcess(
            BASE_TOPOLOGY, tier, instance, kafka_url, redis_url, workdir, extra_env=env, name=topology.name
        )

    return [
        worker("coalesce", "soak-c1"),
        worker("coalesce", "soak-c2"),
        worker("merge", "soak-m1"),
        worker("broadcast", "soak-b1", node_env),
    ]


def _check_workers(workers: list[WorkerProcess]) -> None:
    for w in workers:
        if not w.running:
            raise RuntimeError(f"worker {w.name} exited; its log:\n{w.log_tail()}")


async def _counted(client: aioredis.Redis, topology: Topology) -> int:
    return int(await redis_query.metric_sum(client, topology, METRIC))


async def _wait_counted(
    client: aioredis.Redis, topology: Topology, want: int, workers: list[WorkerProcess], timeout_s: float
) -> int:
    deadline = time.monotonic() + timeout_s
    while (got := await _counted(client, topology)) < want and time.monotonic() < deadline:
        _check_workers(workers)
        await asyncio.sleep(0.2)
    return got


async def _warm_up(kafka_url: str, topology: Topology) -> int:
    """One like, so that the capacity clock starts only once every worker has joined its group."""
    producer = kafka.producer(kafka_url, "soak-warmup")
    await producer.start()
    try:
        event = {"type": "like", "key": "warmup", "channel": "video-0"}
        await producer.send_and_wait(topology.topic("events"), orjson.dumps(event), key=message_key("warmup"))
    finally:
        await producer.stop()
    return 1


async def _writers(jobs: list[WriterJob]) -> list[WriterResult]:
    """Writer processes; cancelling (a worker died, Ctrl-C) terminates them instead of waiting."""
    pool = multiprocessing.get_context("spawn").Pool(len(jobs))
    try:
        pending = pool.map_async(_write, jobs)
        while not pending.ready():
            await asyncio.sleep(0.2)
        return pending.get()
    finally:
        pool.terminate()
        pool.join()


def _jobs(kafka_url: str, topology: Topology, seconds: float, rate: int, seed: int) -> list[WriterJob]:
    per = [rate // WRITERS + (1 if i < rate % WRITERS else 0) for i in range(WRITERS)]  # 0: flat out
    return [WriterJob(kafka_url, topology.topic("events"), seconds, per[i], seed + i) for i in range(WRITERS)]


@dataclass
class SoakConfig:
    minutes: float = 30.0
    rate: int = 0  # 0: half the measured capacity
    capacity_s: float = 20.0


async def run_soak(
    kafka_url: str,
    redis_url: str,
    cfg: SoakConfig,
    workdir: Path,
    servers: dict[str, int | None] | None = None,
    snapshot: Path | None = None,
) -> dict[str, Any]:
    """The whole soak against these servers; `servers` names the broker/Redis pids to watch (if ours)."""
    started = time.monotonic()
    topology = load_topology(BASE_TOPOLOGY).renamed(f"soak_{uuid.uuid4().hex[:8]}")
    await kafka.ensure_topics(kafka_url, _topics(topology))
    workers = _workers(topology, kafka_url, redis_url, workdir)
    client = aioredis.Redis.from_url(redis_url)
    tier1 = Tier1Lag(kafka_url, topology)
    root = GroupLag(kafka_url, topology, "partials", "merge")
    await tier1.start()
    await root.start()
    accepted = sent = 0
    _say(f"topology {topology.name}, logs {workdir}")
    try:
        for w in workers:
            w.start()
        accepted = sent = await _warm_up(kafka_url, topology)
        if await _wait_counted(client, topology, accepted, workers, START_TIMEOUT_S) < accepted:
            raise RuntimeError(f"the warm-up event was not counted within {START_TIMEOUT_S:g} s")
        _say(f"workers up: {', '.join(w.name for w in workers)}")

        capacity: dict[str, Any] = {"measured": False}
        rate = cfg.rate
        if not rate:
            capacity = await _capacity(kafka_url, client, topology, workers, cfg.capacity_s, accepted)
            accepted += capacity["events"]
            sent += capacity["events_sent"]
            rate = max(1, int(capacity["events_per_s"] / 2))
            _say(
                f"capacity {capacity['events_per_s']:,.0f} events/s end to end; soaking at {rate:,} events/s"
            )
        else:
            _say(f"soaking at {rate:,} events/s (--rate; capacity not measured)")

        soak_s = cfg.minutes * 60
        warmup_s = min(WARMUP_MAX_S, WARMUP_SHARE * soak_s)
        pids = {w.name: (w.proc.pid if w.proc else None) for w in workers} | (servers or {})
        sampler = Sampler(pids, tier1, root, snapshot=snapshot)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop))
        load = asyncio.create_task(_writers(_jobs(kafka_url, topology, soak_s, rate, 100)))
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        try:
            while not load.done():
                await asyncio.wait({load}, timeout=0.5)
                _check_workers(workers)
                if time.monotonic() >= next_progress:
                    next_progress += PROGRESS_EVERY_S
                    _progress(sampler, await _counted(client, topology), workers)
            results = await load
            load_end = time.monotonic() - sampler.t0
            soak_accepted = sum(r.load.accepted for r in results)
            accepted += soak_accepted
            sent += sum(r.load.sent for r in results)
            _say(f"load done: {soak_accepted:,} events accepted; draining ...")
            counted = await _wait_counted(client, topology, accepted, workers, DRAIN_TIMEOUT_S)
            await sampler.sample()
        finally:
            stop.set()
            if not load.done():
                load.cancel()
            await asyncio.gather(sampling, load, return_exceptions=True)
        stats = await redis_query.stats(client, topology)
    finally:
        for w in workers:
            w.stop()
        await tier1.stop()
        await root.stop()
        await client.aclose()
    first, last = _span(results)
    wall_load = last - first
    achieved = soak_accepted / max(wall_load, 1e-9)
    return _report(
        topology=topology,
        cfg=cfg,
        rate=rate,
        achieved=achieved,
        capacity=capacity,
        sampler=sampler,
        warmup_s=warmup_s,
        load_end=load_end,
        worker_names=[w.name for w in workers],
        sent=sent,
        accepted=accepted,
        counted=counted,
        failed=sum(r.load.failed for r in results),
        stats=stats,
        wall_s=time.monotonic() - started,
        workdir=workdir,
    )


async def _capacity(
    kafka_url: str,
    client: aioredis.Redis,
    topology: Topology,
    workers: list[WorkerProcess],
    seconds: float,
    before: int,
) -> dict[str, Any]:
    """Writers flat out for `seconds`; events counted / time until Redis has counted them all."""
    _say(f"measuring capacity: {WRITERS} writers as fast as they can for {seconds:g} s ...")
    results = await _writers(_jobs(kafka_url, topology, seconds, 0, 1))
    first, last = _span(results)
    events = sum(r.load.accepted for r in results)
    counted = await _wait_counted(client, topology, before + events, workers, DRAIN_TIMEOUT_S) - before
    load_s, total_s = last - first, time.time() - first
    if counted < events:
        raise RuntimeError(f"capacity phase: only {counted:,} of {events:,} events counted in time")
    return {
        "measured": True,
        "seconds": seconds,
        "events": events,
        "events_sent": sum(r.load.sent for r in results),
        "writers_events_per_s": round(events / max(load_s, 1e-9)),
        "events_per_s": round(events / total_s),
        "drain_after_load_s": round(total_s - load_s, 2),
        # the pipeline kept up with the writers: the capacity is at least this, maybe more
        "writer_bound": total_s - load_s < 1.0,
    }


def _progress(sampler: Sampler, counted: int, workers: list[WorkerProcess]) -> None:
    t = time.monotonic() - sampler.t0
    lag1 = sampler.tier1_lag[-1][1] if sampler.tier1_lag else -1
    lag2 = sampler.root_lag[-1][1] if sampler.root_lag else -1
    rate = 0.0
    recent = [p for p in sampler.produced if p[0] >= t - PROGRESS_EVERY_S]
    if len(recent) >= 2:
        rate = (recent[-1][1] - recent[0][1]) / max(recent[-1][0] - recent[0][0], 1e-9)
    rss = "  ".join(
        f"{w.instance} {sampler.rss[w.name][-1][1] / 1024:.0f}MB" for w in workers if sampler.rss.get(w.name)
    )
    _say(
        f"[{t:6.0f}s] input {rate:>8,.0f}/s  counted {counted:>11,}  lag tier1 {lag1:>7,}  "
        f"root {lag2:>4,}  rss {rss}"
    )


def _at(series: list[tuple[float, int]], t: float) -> tuple[float, int] | None:
    """The first sample at or after t (the last one if none is)."""
    for point in series:
        if point[0] >= t:
            return point
    return series[-1] if series else None


def _thin(series: list[tuple[float, int]], most: int = 60) -> list[tuple[float, int]]:
    step = max(1, len(series) // most)
    out = series[::step]
    if series and out[-1] != series[-1]:
        out.append(series[-1])
    return out


def _report(
    *,
    topology: Topology,
    cfg: SoakConfig,
    rate: int,
    achieved: float,
    capacity: dict[str, Any],
    sampler: Sampler,
    warmup_s: float,
    load_end: float,
    worker_names: list[str],
    sent: int,
    accepted: int,
    counted: int,
    failed: int,
    stats: dict[str, int],
    wall_s: float,
    workdir: Path,
) -> dict[str, Any]:
    rss: dict[str, dict[str, Any]] = {}
    for name, series in sampler.rss.items():
        during = [p for p in series if p[0] <= load_end] or series
        start, end = _at(during, warmup_s), during[-1]
        assert start is not None
        rss[name] = {
            "start_kb": start[1],
            "start_at_s": start[0],
            "end_kb": end[1],
            "end_at_s": end[0],
            "peak_kb": max(v for _, v in during),
            "growth_pct": round(100 * (end[1] - start[1]) / start[1], 2),
            "worker": name in worker_names,
        }
    soak_lag = [p for p in sampler.tier1_lag if warmup_s <= p[0] <= load_end]
    trend = lag_trend(soak_lag, achieved)
    root_lag = [p for p in sampler.root_lag if warmup_s <= p[0] <= load_end]
    root_trend = lag_trend(root_lag, max(1.0, _partials_rate(stats, load_end)))
    worker_growth = [r["growth_pct"] for n, r in rss.items() if r["worker"]]
    rss_ok = len(worker_growth) == len(worker_names) and max(worker_growth) < RSS_TARGET_PCT
    return {
        "topology": topology.name,
        "minutes": cfg.minutes,
        "capacity": capacity,
        "rate_asked": rate,
        "rate_achieved": round(achieved),
        "events_sent": sent,
        "events_accepted": accepted,
        "events_failed": failed,
        "events_counted": counted,
        "exact": counted == accepted,
        "partials": stats.get("partials", 0),
        "redis_commands": stats.get("redis_commands", 0),
        "warmup_s": round(warmup_s, 1),
        "rss": rss,
        "tier1_lag": {
            "samples": _thin(sampler.tier1_lag),
            "max": max((v for _, v in soak_lag), default=0),
            "trend": trend,
        },
        "root_lag": {
            "samples": _thin(sampler.root_lag),
            "max": max((v for _, v in root_lag), default=0),
            "trend": root_trend,
        },
        "lag_sample_errors": sampler.errors,
        "broker_snapshot_mb": {
            "max": round(max((v for _, v in sampler.snapshot_bytes), default=0) / 1e6, 1),
            "end": round(sampler.snapshot_bytes[-1][1] / 1e6, 1) if sampler.snapshot_bytes else None,
        },
        "load_avg_1m": {
            "start": round(sampler.load_avg_1m[0][1], 2) if sampler.load_avg_1m else None,
            "mean": round(statistics.fmean(v for _, v in sampler.load_avg_1m), 2)
            if sampler.load_avg_1m
            else None,
        },
        "targets_met": {
            "rss_growth_under_5pct": rss_ok,
            "lag_not_growing": not (trend["growing"] or root_trend["growing"]),
        },
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(wall_s, 1),
        "logs": str(workdir),
        "retention": {"retention.ms": RETENTION_MS, "segment.ms": SEGMENT_MS, "topics": list(RETAINED_ROLES)},
        "machine": machine(),
    }


def _partials_rate(stats: dict[str, int], seconds: float) -> float:
    return stats.get("partials", 0) / max(seconds, 1e-9)


def _print(report: dict[str, Any], as_json: bool) -> None:
    cap = report["capacity"]
    lines = [""]
    if cap.get("measured"):
        lines.append(
            f"capacity          {cap['events_per_s']:>12,} events/s end to end "
            f"(writers {cap['writers_events_per_s']:,}/s for {cap['seconds']:g} s, "
            f"then {cap['drain_after_load_s']} s to drain)"
        )
    lines += [
        f"rate asked        {report['rate_asked']:>12,} events/s   achieved {report['rate_achieved']:,}",
        f"events accepted   {report['events_accepted']:>12,}   counted {report['events_counted']:,}"
        + ("   exact" if report["exact"] else "   MISMATCH"),
        f"RSS (start after {report['warmup_s']:g} s warm-up -> end)",
    ]
    for name, r in report["rss"].items():
        lines.append(
            f"  {name:22} {r['start_kb'] / 1024:8.1f} MB -> {r['end_kb'] / 1024:8.1f} MB  "
            f"{r['growth_pct']:+6.2f} %  (peak {r['peak_kb'] / 1024:.1f} MB)"
            + ("" if r["worker"] else "  [server, informational]")
        )
    for label, key in (("tier-1 lag", "tier1_lag"), ("root lag", "root_lag")):
        lag = report[key]
        t = lag["trend"]
        lines.append(
            f"{label:17} max {lag['max']:,}; first quarter max {t['max_first_quarter']:,}, last quarter max "
            f"{t['max_last_quarter']:,}; slope {t['slope_eps']:+,.1f}/s over the second half"
        )
    lines.append(f"targets met       {report['targets_met']}")
    snap = report["broker_snapshot_mb"]
    if snap["end"] is not None:
        lines.append(f"broker snapshot   {snap['end']} MB at the end, {snap['max']} MB at most (kafka.json)")
    lines.append(
        f"load average      {report['load_avg']} at the end, {report['load_avg_1m']['mean']} mean (1 min)"
    )
    lines.append(f"wall              {report['wall_s']} s   logs {report['logs']}")
    print("\n".join(lines), file=sys.stderr if as_json else sys.stdout, flush=True)
    if as_json:
        print(orjson.dumps(report).decode(), flush=True)


def main(args: argparse.Namespace) -> int:
    """`pipeline soak` (flags in pipeline/cli/): embedded servers unless --kafka and --redis."""
    if args.minutes <= 0 or args.rate < 0 or args.capacity_seconds <= 0:
        print("pipeline soak: --minutes and --capacity-seconds must be > 0, --rate >= 0", file=sys.stderr)
        return 2
    cfg = SoakConfig(minutes=args.minutes, rate=args.rate, capacity_s=args.capacity_seconds)
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-soak-"))
    try:
        with contextlib.ExitStack() as stack:
            servers: dict[str, int | None] = {}
            snapshot = None
            kafka_url, redis_url = args.kafka, args.redis
            if not (kafka_url and redis_url):
                _say("starting a local broker and Redis ...")
                local = stack.enter_context(LocalServers(workdir / "servers", broker=args.broker))
                if not kafka_url:
                    kafka_url, servers["server/broker"] = local.kafka_bootstrap, local.broker.pid
                    if local.broker.kind == "embedded":  # its whole log is one JSON snapshot
                        snapshot = local.broker.data_dir / "kafka.json"
                if not redis_url:
                    redis_url, servers["server/redis"] = local.redis_url, local.redis.pid
            report = asyncio.run(run_soak(kafka_url, redis_url, cfg, workdir, servers, snapshot))
    except KeyboardInterrupt:
        _say(f"interrupted; everything stopped (logs in {workdir})")
        return 130
    except RuntimeError as exc:  # a worker exited, or the pipeline did not start
        _say(f"failed: {exc}")
        return 1
    _print(report, args.json)
    return 0 if report["exact"] else 1
