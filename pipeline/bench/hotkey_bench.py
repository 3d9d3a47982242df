"""`pipeline bench hotkey`: one viral key plus a Zipf background, hot-key splitting off then on.

Per mode, on a fresh copy of live_likes (6 events partitions): three tier-1
workers and a root merger run as processes; `--writers` producer processes
send through the SDK (PipelineClient) for `--duration` seconds, as fast as they
can (or at `--rate`), `--viral-share` of the events on the key "viral" and the
rest on Zipf-distributed keys. With splitting on, each writer has a
HotKeySplitter (threshold 1000 events/s, budget 500 events/s per sub-key, of
its own traffic).

Measured per mode:
- busiest_share_ratio: the busiest events partition's share of the events sent,
  over the mean share (1.0 is perfectly even);
- max_lag, lag_growing, lag_slope_eps: tier-1 lag sampled every 0.5 s (end
  offsets minus the group's committed offsets, summed over partitions); growing
  when its least-squares slope over the second half of the load exceeds 5 % of
  the input rate (the backlog gains over 3 s of input per minute);
- p99_visible_ms: probes (likes on the viral key, each on a channel of its
  own, 10 per second, over the same sub-keys as the writers' viral events)
  from send to their total being visible in Redis;
- events_per_s: events acknowledged by the broker over the load period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from pipeline.bench.coalesce_bench import machine
from pipeline.bench.probes import Prober, percentiles, warm_up
from pipeline.client import BrokerUnavailable, PipelineClient
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.core.topology import Topology
from pipeline.harness.local_servers import servers_or_local
from pipeline.harness.supervisor import WorkerProcess
from pipeline.harness.zipf import Zipf
from pipeline.io import kafka, redis_query
from pipeline.io.lag import Tier1Lag
from pipeline.runtime import observability as obs

TIER1_WORKERS = 3
WRITER_ACK_TIMEOUT_MS = 30_000
BATCH = 1000
CONCURRENCY = 4  # send_many calls in flight per writer
THRESHOLD_EPS = 1000.0
BUDGET_EPS = 500.0  # a viral key at a few thousand events/s per writer gets one sub-key per partition
SAMPLE_EVERY_S = 0.5
DRAIN_TIMEOUT_S = 60.0
TARGET_SHARE_RATIO = 1.5
# lag "grows" when its trend exceeds this share of the input rate: tier 1 commits every 250 ms, so a
# pipeline that keeps up still shows a lag of a few hundred ms of input that jitters from sample to sample
GROWING_SHARE = 0.05
ZIPF_S = 1.0
CHANNELS = 50


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class WriterJob:
    bootstrap: str
    redis_url: str | None  # where the splits are announced
    topology: Topology
    split: bool
    duration_s: float
    rate: float  # events/s for this writer (0: as fast as possible)
    viral_share: float
    keys: int
    seed: int


@dataclass(frozen=True)
class WriterResult:
    acked: int
    failed: int  # events in sends that were not acknowledged in time
    started: float  # time.time()
    finished: float
    viral_k: int


def _writer(job: WriterJob) -> WriterResult:
    return asyncio.run(_write(job))


async def _write(job: WriterJob) -> WriterResult:
    rng = random.Random(job.seed)
    background = [{"type": "like", "key": f"c{k}", "channel": f"v{k % CHANNELS}"} for k in range(job.keys)]
    zipf = Zipf(job.keys, ZIPF_S)
    viral = {"type": "like", "key": "viral", "channel": "v0"}
    splitter = (
        HotKeySplitter(SplitPolicy(threshold_eps=THRESHOLD_EPS, budget_eps=BUDGET_EPS)) if job.split else None
    )
    acked = failed = 0
    async with PipelineClient(
        job.topology,
        job.bootstrap,
        redis_url=job.redis_url,
        splitter=splitter,
        linger_ms=2,
        ack_timeout_ms=WRITER_ACK_TIMEOUT_MS,
    ) as client:
        started = time.time()
        deadline = time.monotonic() + job.duration_s
        t0 = time.monotonic()

        async def loop() -> None:
            nonlocal acked, failed
            while (now := time.monotonic()) < deadline:
                if job.rate and acked >= job.rate * (now - t0):
                    await asyncio.sleep(0.002)
                    continue
                n_viral = sum(1 for _ in range(BATCH) if rng.random() < job.viral_share)
                batch = [viral] * n_viral + zipf.items(rng, background, BATCH - n_viral)
                try:
                    results = await client.send_many(batch)
                except BrokerUnavailable:
                    failed += len(batch)
                    continue
                acked += sum(1 for r in results if r.accepted)

        await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
        finished = time.time()
    return WriterResult(acked, failed, started, finished, splitter.k("viral") if splitter else 1)


@dataclass
class ModeResult:
    split: bool
    events_per_s: float = 0.0
    events: int = 0
    failed: int = 0
    busiest_share_ratio: float = 0.0
    partition_shares: list[float] = field(default_factory=list)
    max_lag: int = 0
    lag_growing: bool = False
    lag_slope_eps: float = 0.0
    lag_at_end: int = 0
    drain_s: float | None = None
    p50_visible_ms: float | None = None
    p99_visible_ms: float | None = None
    probes: int = 0
    probes_lost: int = 0
    viral_k: list[int] = field(default_factory=list)
    announced_splits: dict[str, int] = field(default_factory=dict)
    load_avg_1m: float = 0.0  # the machine's load average at the end of the mode (others share it)
    lag_samples: list[tuple[float, int]] = field(default_factory=list)


def _caught_up(samples: list[tuple[float, int]], since: float) -> bool:
    return bool(samples) and samples[-1][0] > since and samples[-1][1] == 0


async def _sample_lag(lag: Tier1Lag, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            s = await lag.sample()
            samples.append((time.time(), s.lag))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


def run_mode(
    bootstrap: str,
    redis_url: str,
    base: Topology,
    split: bool,
    args: argparse.Namespace,
    workdir: Path,
) -> ModeResult:
    topology = base.renamed(f"{base.name}_{'on' if split else 'off'}")
    result = ModeResult(split)
    asyncio.run(kafka.ensure_topics(bootstrap, kafka.topology_topics(topology)))
    workers = [
        WorkerProcess("live_likes", "coalesce", f"c{i}", bootstrap, redis_url, workdir, name=topology.name)
        for i in range(TIER1_WORKERS)
    ] + [WorkerProcess("live_likes", "merge", "m1", bootstrap, redis_url, workdir, name=topology.name)]
    for w in workers:
        w.start()
    try:
        asyncio.run(warm_up(bootstrap, redis_url, topology))
        say(f"split {'on' if split else 'off'}: workers up; {args.writers} writers for {args.duration:.0f} s")
        per_writer_rate = args.rate / args.writers if args.rate else 0.0
        jobs = [
            WriterJob(
                bootstrap,
                redis_url,
                topology,
                split,
                args.duration,
                per_writer_rate,
                args.viral_share,
                args.keys,
                100 + i,
            )
            for i in range(args.writers)
        ]
        asyncio.run(_measure(jobs, bootstrap, redis_url, topology, split, result))
        for w in workers:
            if not w.running:
                say(f"worker {w.name} exited:\n{w.log_tail(20)}")
    finally:
        for w in workers:
            w.stop()
    return result


async def _measure(
    jobs: list[WriterJob], bootstrap: str, redis_url: str, topology: Topology, split: bool, result: ModeResult
) -> None:
    lag = Tier1Lag(bootstrap, topology)
    await lag.start()
    ends_before = await _partition_ends(bootstrap, topology)
    stop = asyncio.Event()
    drained = asyncio.Event()
    samples: list[tuple[float, int]] = []  # (time.time(), lag)
    prober = Prober(topology, bootstrap, redis_url, split=split)
    sampler = asyncio.create_task(_sample_lag(lag, samples, drained))
    probing = asyncio.create_task(prober.run(stop))
    loop = asyncio.get_running_loop()
    try:
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            writers = await loop.run_in_executor(None, pool.map, _writer, jobs)
        stop.set()  # the probes stop; the sampler goes on until tier 1 has caught up
        load_end = time.time()
        while time.time() - load_end < DRAIN_TIMEOUT_S and not _caught_up(samples, load_end):
            await asyncio.sleep(0.05)
        if _caught_up(samples, load_end):
            result.drain_s = round(samples[-1][0] - load_end, 2)
        drained.set()
        await sampler
        await probing
        ends_after = await _partition_ends(bootstrap, topology)
        redis = aioredis.Redis.from_url(redis_url)
        try:
            result.announced_splits = await redis_query.splits(redis, topology)
        finally:
            await redis.aclose()
    finally:
        stop.set()
        drained.set()
        await lag.stop()
        await prober.close()
    wall = max(w.finished for w in writers) - min(w.started for w in writers)
    result.events = sum(w.acked for w in writers)
    result.failed = sum(w.failed for w in writers)
    result.events_per_s = round(result.events / max(wall, 1e-9))
    per_partition = [ends_after[p] - ends_before.get(p, 0) for p in sorted(ends_after)]
    total = sum(per_partition) or 1
    shares = [n / total for n in per_partition]
    result.partition_shares = [round(s, 4) for s in shares]
    result.busiest_share_ratio = round(max(shares) / (1 / len(shares)), 3)
    load_start = min(w.started for w in writers)
    load = [(t - load_start, n) for t, n in samples if load_start <= t <= load_end]
    result.lag_samples = [(round(t - load_start, 2), n) for t, n in samples]
    result.max_lag = max((n for _, n in load), default=0)
    result.lag_at_end = load[-1][1] if load else 0
    result.lag_slope_eps = round(_slope(load), 1)
    result.lag_growing = result.lag_slope_eps > GROWING_SHARE * result.events_per_s
    result.viral_k = [w.viral_k for w in writers]
    result.load_avg_1m = round(os.getloadavg()[0], 2)
    result.probes = len(prober.visible_ms) + len(prober.sent)
    result.probes_lost = prober.lost
    visible = percentiles(prober.visible_ms)
    result.p50_visible_ms, result.p99_visible_ms = visible["p50"], visible["p99"]


async def _partition_ends(bootstrap: str, topology: Topology) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(topology.topic("events"), p) for p in range(topology.partitions.events)]
        ends = await consumer.end_offsets(parts)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


def _slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope (events/s) of lag over time, over the second half of the load."""
    half = samples[len(samples) // 2 :]
    if len(half) < 2:
        return 0.0
    xs = [t for t, _ in half]
    ys = [float(n) for _, n in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def run(bootstrap: str, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    from topologies.live_likes import TOPOLOGY

    base = TOPOLOGY.renamed("bench_hk_" + uuid.uuid4().hex[:8])
    with tempfile.TemporaryDirectory(prefix="bench-hotkey-") as tmp:
        off = run_mode(bootstrap, redis_url, base, False, args, Path(tmp))
        say(f"split off: {_line(off)}")
        on = run_mode(bootstrap, redis_url, base, True, args, Path(tmp))
        say(f"split on:  {_line(on)}")
    targets = {
        "split_on_busiest_share_ratio_le_1_5": on.busiest_share_ratio <= TARGET_SHARE_RATIO,
        "split_on_lag_bounded": not on.lag_growing,
        "split_off_lag_grows": off.lag_growing,
    }
    return {
        "split_off": _summary(off),
        "split_on": _summary(on),
        "targets_met": targets,
        "params": {
            "duration_s": args.duration,
            "writers": args.writers,
            "rate": args.rate,
            "viral_share": args.viral_share,
            "keys": args.keys,
            "zipf_s": ZIPF_S,
            "partitions": TOPOLOGY.partitions.events,
            "tier1_workers": TIER1_WORKERS,
            "threshold_eps": THRESHOLD_EPS,
            "budget_eps": BUDGET_EPS,
        },
        "machine": machine(),
    }


def _summary(r: ModeResult) -> dict[str, Any]:
    out = asdict(r)
    out["lag_samples"] = r.lag_samples[:: max(1, len(r.lag_samples) // 40)]
    return out


def _line(r: ModeResult) -> str:
    return (
        f"{r.events_per_s:,.0f} events/s, busiest partition {r.busiest_share_ratio:.2f}x mean, "
        f"max lag {r.max_lag:,}, lag slope {r.lag_slope_eps:,.0f}/s "
        f"({'growing' if r.lag_growing else 'bounded'}), visible p50 {r.p50_visible_ms} ms "
        f"p99 {r.p99_visible_ms} ms, drain {r.drain_s} s, viral k {r.viral_k}"
    )


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench hotkey` (flags are defined in pipeline/cli/)."""
    if args.duration <= 0 or args.writers <= 0 or not 0 <= args.viral_share <= 1 or args.keys <= 0:
        print("pipeline bench hotkey: bad parameters", file=sys.stderr)
        return 2
    args.rate = float(getattr(args, "rate", 0) or 0)
    obs.configure_logging("warning")
    with servers_or_local(args.kafka, args.redis, say=say, broker=args.broker) as (kafka_url, redis_url):
        summary = run(kafka_url, redis_url, args)
    off, on = summary["split_off"], summary["split_on"]
    rows = [
        ("events/s", "events_per_s"),
        ("busiest partition / mean", "busiest_share_ratio"),
        ("max tier-1 lag", "max_lag"),
        ("lag slope (events/s)", "lag_slope_eps"),
        ("lag growing", "lag_growing"),
        ("visible p50 (ms)", "p50_visible_ms"),
        ("visible p99 (ms)", "p99_visible_ms"),
        ("drain after load (s)", "drain_s"),
        ("load average (1 min)", "load_avg_1m"),
    ]
    print(f"{'':28}{'split off':>14}{'split on':>14}")
    for label, name in rows:
        print(f"{label:28}{off[name]!s:>14}{on[name]!s:>14}")
    print(f"targets met: {summary['targets_met']}")
    if args.json:
        print(orjson.dumps(summary).decode())
    return 0
