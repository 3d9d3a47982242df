"""`pipeline bench e2e`: latency from send to Redis and to a viewer, and each tier's reduction.

The live_likes pipeline as the demo runs it (2 tier-1 workers, 1 root merger,
1 broadcast node, each a process) on a fresh topology name, loaded by paced
writer processes (`pipeline.harness.loadgen.produce`: Zipf keys, s = 1.1, plus 20 % of
the events on one viral key, over `--channels` videos) at `--rate` events/s.

Measured over the load minus its first seconds (start-up is not the steady state):
- send -> Redis: 10 probes a second (`pipeline.bench.probes.Prober`), each a
  like on a key of its own on one of 4 probe channels, from just before the
  send until Redis holds the key;
- send -> viewer: one WebSocket viewer per probe channel on the broadcast node;
  from the same send until a push carrying the probe's key arrives;
- per second: events into tier 1, partials out of it, Redis commands of the
  root's applies, channel updates it publishes, pushes of the node, from the
  workers' Prometheus counters at both ends of the interval;
- the planner's prediction (`pipeline.core.planner`) for the same workload at
  the event rate measured, and its error.

`--viewers` ordinary viewers (fanout_bench's light WebSocket clients, in a
child process) watch the busy channels, so that the node pushes as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import multiprocessing
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from pipeline.bench.coalesce_bench import machine
from pipeline.bench.fanout_bench import (
    raise_fd_limit,
    recv_child,
    stop_children,
    viewer_process,
    wait_for_node,
)
from pipeline.bench.probes import Probe, Prober, percentiles, warm_up
from pipeline.core import planner, tokens
from pipeline.core.topology import Topology
from pipeline.harness.loadgen import LoadResult, Workload, produce
from pipeline.harness.local_servers import free_port, servers_or_local
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import kafka
from pipeline.runtime import observability as obs
from pipeline.runtime.worker import load_topology

TIER1_WORKERS = 2
ZIPF_S = Workload.zipf_s  # the load generator's workload, which the planner is given too
VIRAL_SHARE = Workload.viral_share
PROBE_CHANNELS = 4  # 10 probes/s over 4 channels: 2.5/s each, under the node's 4 pushes/s per channel
PROBE_EVERY_S = 0.1
SETTLE_S = 2.0  # seconds of load left out at the start (at most a quarter of the load)
END_MARGIN_S = 0.5  # the interval ends this long before the writers stop
EVENTS_PER_WRITER = 15_000.0  # one paced Python producer keeps this up with room to spare
VIEWERS_PER_PROCESS = 2_500
START_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 60.0

# per_s name -> (tier whose workers count it, Prometheus counter)
COUNTERS = {
    "events": ("coalesce", "pipeline_events_in_total"),
    "partials": ("coalesce", "pipeline_partials_out_total"),
    "tier1_windows": ("coalesce", "pipeline_transactions_total"),  # one transaction per flushed window
    "redis_applies": ("merge", "pipeline_redis_applies_total"),
    "redis_commands": ("merge", "pipeline_redis_commands_total"),
    "updates": ("merge", "pipeline_updates_out_total"),
    "pushes": ("broadcast", "pipeline_broadcast_pushes_total"),
}


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def defaults() -> argparse.Namespace:
    """The parameters `pipeline bench e2e` runs with when no flag is given."""
    return argparse.Namespace(
        rate=20_000.0,
        duration=20.0,
        keys=10_000,
        channels=20,
        viewers=200,
        json=False,
        kafka=None,
        redis=None,
    )


def probe_of(n: int) -> Probe:
    """Probe n: a like on a key of its own, on one of the probe channels the probe viewers watch."""
    return f"probe-{n % PROBE_CHANNELS}", f"p{n}"


# --- writers (child processes) -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WriterJob:
    bootstrap: str
    topic: str
    keys: int
    channels: int
    rate: float
    duration_s: float
    seed: int


def writer_process(conn: Connection, job: WriterJob) -> None:
    """Child entry point: say when the load starts, send paced for the duration, report the counts."""
    workload = Workload(keys=job.keys, channels=job.channels, seed=job.seed)
    conn.send(("started", time.time()))
    result = asyncio.run(produce(job.bootstrap, job.topic, workload, job.duration_s, int(job.rate)))
    conn.send(("done", dataclasses.asdict(result)))


# --- probe viewers (in this process) --------------------------------------------


class ProbeViewers:
    """One WebSocket viewer per probe channel: when each probe's like reaches a viewer."""

    def __init__(self, base: str, secret: str, prober: Prober) -> None:
        self.base = base
        self.secret = secret.encode()
        self.prober = prober
        self.arrived_ms: dict[Probe, float] = {}
        self.snapshots = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(self, session: aiohttp.ClientSession) -> None:
        expires = int(time.time()) + 3600
        for i in range(PROBE_CHANNELS):
            channel = probe_of(i)[0]
            token = tokens.issue(self.secret, f"probe-viewer-{i}", [channel], expires)
            ws = await session.ws_connect(f"{self.base}/v1/ws?token={quote(token)}&channels={quote(channel)}")
            self._tasks.append(asyncio.create_task(self._read(ws)))
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.snapshots < PROBE_CHANNELS:  # subscribed: each channel's snapshot came
            if time.monotonic() > deadline:
                raise RuntimeError("the probe viewers got no snapshot from the broadcast node")
            await asyncio.sleep(0.05)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            data = orjson.loads(msg.data)
            if data.get("type") == "snapshot":
                self.snapshots += 1
            if data.get("type") not in ("update", "snapshot"):
                continue
            channel = data["channel"]
            for _metric, key, _total in data.get("values", ()):
                sent = self.prober.sent_at.get((channel, key))
                if sent is not None and (channel, key) not in self.arrived_ms:
                    self.arrived_ms[(channel, key)] = (now - sent) * 1000

    async def wait_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.arrived_ms) < len(self.prober.sent_at) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- metrics --------------------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, ports: dict[str, list[int]]) -> dict[str, float]:
    """Every counter of COUNTERS, summed over the workers of its tier."""
    texts: dict[str, list[str]] = {}
    for tier, tier_ports in ports.items():
        texts[tier] = []
        for port in tier_ports:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                texts[tier].append(await response.text())
    totals = dict.fromkeys(COUNTERS, 0.0)
    for name, (tier, sample_name) in COUNTERS.items():
        for text in texts[tier]:
            for family in text_string_to_metric_families(text):
                totals[name] += sum(s.value for s in family.samples if s.name == sample_name)
    return totals


def plan_for(topology: Topology, events_per_s: float, keys: int, channels: int) -> planner.Plan:
    """The planner's prediction for this run's workload at the event rate tier 1 actually saw."""
    return planner.plan(
        planner.Workload(
            events_per_s=events_per_s,
            keys=keys,
            zipf_s=ZIPF_S,
            hot_share=VIRAL_SHARE,
            channels=channels,
            flush_interval_s=topology.flush_interval_ms / 1000,
            events_partitions=topology.partitions.events,
            partials_partitions=topology.partitions.partials,
            tier1_workers=TIER1_WORKERS,
            # the load generator never splits a key: no key can pass a threshold of the whole rate
            split_threshold_eps=max(events_per_s, 1.0),
            partition_budget_eps=max(events_per_s, 1.0),
        )
    )


def error_pct(predicted: float, measured: float) -> float | None:
    return round((predicted - measured) / measured * 100, 1) if measured else None


# --- the run --------------------------------------------------------------------


def _check(workers: list[WorkerProcess]) -> None:
    for w in workers:
        if not w.running:
            raise RuntimeError(f"worker {w.name} exited; its log:\n{w.log_tail()}")


async def _sleep_until(wall: float, workers: list[WorkerProcess]) -> None:
    while (left := wall - time.time()) > 0:
        _check(workers)
        await asyncio.sleep(min(left, 0.5))


async def measure(bootstrap: str, redis_url: str, p: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    topology = load_topology("live_likes").renamed(f"e2e_{uuid.uuid4().hex[:8]}")
    await kafka.ensure_topics(bootstrap, kafka.topology_topics(topology))
    secret = secrets.token_urlsafe(24)
    node_port = free_port()
    base = f"http://127.0.0.1:{node_port}"

    def worker(tier: str, instance: str, env: dict[str, str] | None = None) -> WorkerProcess:
        return WorkerProcess(
            "live_likes",
            tier,
            instance,
            bootstrap,
            redis_url,
            workdir,
            log_level="warning",
            extra_env=env,
            name=topology.name,
            metrics_port=free_port(),
        )

    workers = [worker("coalesce", f"e2e-c{i + 1}") for i in range(TIER1_WORKERS)]
    workers.append(worker("merge", "e2e-m1"))
    node_env = {"PIPELINE_BROADCAST_SECRET": secret, "PIPELINE_BROADCAST_PORT": str(node_port)}
    workers.append(worker("broadcast", "e2e-b1", node_env))
    ports: dict[str, list[int]] = {}
    for w in workers:
        ports.setdefault(w.tier, []).append(w.metrics_port)
    ctx = multiprocessing.get_context("spawn")
    children: list[multiprocessing.process.BaseProcess] = []
    viewer_pipes: list[Connection] = []
    writer_pipes: list[Connection] = []
    prober = Prober(topology, bootstrap, redis_url, probe=probe_of, every_s=PROBE_EVERY_S)
    probe_viewers = ProbeViewers(base, secret, prober)
    stop_probes = asyncio.Event()
    probing: asyncio.Task[None] | None = None
    for w in workers:
        w.start()
    say(f"{topology.name}: {', '.join(w.name for w in workers)} started")
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for_node(base, workers[-1])
            await warm_up(bootstrap, redis_url, topology)
            await probe_viewers.connect(session)
            viewers_connected = viewers_failed = 0
            if p.viewers:
                expires = int(time.time()) + 3600
                specs = [
                    (tokens.issue(secret.encode(), f"viewer-{i}", [c], expires), c)
                    for i in range(p.viewers)
                    for c in [f"video-{i % p.channels}"]
                ]
                procs = math.ceil(p.viewers / VIEWERS_PER_PROCESS)
                for k in range(procs):
                    parent, child = ctx.Pipe()
                    proc = ctx.Process(
                        target=viewer_process, args=(child, "127.0.0.1", node_port, specs[k::procs])
                    )
                    proc.start()
                    children.append(proc)
                    viewer_pipes.append(parent)
                for pipe in viewer_pipes:
                    _, ok, failed = await recv_child(pipe, START_TIMEOUT_S + p.viewers / 100)
                    viewers_connected += ok
                    viewers_failed += failed
            say(f"pipeline up; {viewers_connected} viewers connected ({viewers_failed} failed)")

            writers = max(1, math.ceil(p.rate / EVENTS_PER_WRITER))
            for i in range(writers):
                parent, child = ctx.Pipe()
                job = WriterJob(
                    bootstrap,
                    topology.topic("events"),
                    p.keys,
                    p.channels,
                    p.rate / writers,
                    p.duration,
                    100 + i,
                )
                proc = ctx.Process(target=writer_process, args=(child, job))
                proc.start()
                children.append(proc)
                writer_pipes.append(parent)
            starts = [(await recv_child(pipe, START_TIMEOUT_S))[1] for pipe in writer_pipes]
            t0 = max(starts) + min(SETTLE_S, p.duration / 4)
            t1 = min(starts) + p.duration - END_MARGIN_S
            if t1 - t0 < 1.0:
                raise RuntimeError("--duration is too short to leave a measured interval")
            say(f"{writers} writers, {p.rate:,.0f} events/s, {p.duration:.0f} s; measuring {t1 - t0:.1f} s")
            await _sleep_until(t0, workers)
            before, m0 = await scrape(session, ports), time.monotonic()
            for pipe in viewer_pipes:
                pipe.send("measure")
            probing = asyncio.create_task(prober.run(stop_probes))
            await _sleep_until(t1, workers)
            stop_probes.set()
            after, m1 = await scrape(session, ports), time.monotonic()
            for pipe in viewer_pipes:
                pipe.send("stop")
            tallies = [(await recv_child(pipe, 60.0))[1] for pipe in viewer_pipes]
            loads = [
                LoadResult(**(await recv_child(pipe, p.duration + DRAIN_TIMEOUT_S))[1])
                for pipe in writer_pipes
            ]
            await probing
            await probe_viewers.wait_all(DRAIN_TIMEOUT_S)
            _check(workers)
    finally:
        stop_probes.set()
        if probing is not None and not probing.done():
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)
        await probe_viewers.close()
        await prober.close()
        stop_children(viewer_pipes, children)
        for w in workers:
            w.stop()

    elapsed = m1 - m0
    per_s = {name: (after[name] - before[name]) / elapsed for name in COUNTERS}
    achieved = sum(r.accepted / r.wall_s for r in loads if r.wall_s)
    prediction = plan_for(topology, per_s["events"], p.keys, p.channels)
    open_viewers = sum(t["open"] for t in tallies)
    received = sum(t["messages"] for t in tallies) / elapsed
    sent_probes = len(prober.sent_at)
    return {
        "send_to_redis_ms": {
            **percentiles(prober.visible_ms),
            "probes": sent_probes,
            "lost": sent_probes - len(prober.visible_ms),
        },
        "send_to_viewer_ms": {
            **percentiles(list(probe_viewers.arrived_ms.values())),
            "probes": sent_probes,
            "lost": sent_probes - len(probe_viewers.arrived_ms),
        },
        "rate": {"asked": float(p.rate), "achieved": round(achieved, 1)},
        "per_s": {name: round(v, 1) for name, v in per_s.items()},
        "ratios": {
            "events_per_partial": _ratio(per_s["events"], per_s["partials"]),
            "partials_per_tier1_window": _ratio(per_s["partials"], per_s["tier1_windows"]),
            "tier1_windows_per_s_per_worker": _ratio(per_s["tier1_windows"], TIER1_WORKERS, 2),
            "partials_per_redis_command": _ratio(per_s["partials"], per_s["redis_commands"], 4),
            "events_per_redis_command": _ratio(per_s["events"], per_s["redis_commands"]),
            "redis_commands_per_apply": _ratio(per_s["redis_commands"], per_s["redis_applies"]),
            "pushes_per_redis_command": _ratio(per_s["pushes"], per_s["redis_commands"], 3),
            "pushes_per_update": _ratio(per_s["pushes"], per_s["updates"]),
        },
        "viewers": {
            "asked": p.viewers,
            "connected": viewers_connected,
            "open_at_end": open_viewers,
            "pushes_received_per_s": round(received, 1),
            "pushes_per_s_per_viewer": _ratio(received, open_viewers),
        },
        "plan": dataclasses.asdict(prediction),
        "plan_error_pct": {
            "partials_per_s": error_pct(prediction.partials_per_s, per_s["partials"]),
            "redis_commands_per_s": error_pct(prediction.redis_commands_per_s, per_s["redis_commands"]),
        },
        "events_accepted": sum(r.accepted for r in loads),
        "events_failed": sum(r.failed for r in loads),
        "measured_s": round(elapsed, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "params": {
            "rate": p.rate,
            "duration_s": p.duration,
            "keys": p.keys,
            "channels": p.channels,
            "viewers": p.viewers,
            "zipf_s": ZIPF_S,
            "viral_share": VIRAL_SHARE,
            "writers": len(loads),
            "tier1_workers": TIER1_WORKERS,
            "partitions": dataclasses.asdict(topology.partitions),
            "flush_interval_ms": topology.flush_interval_ms,
            "probe_channels": PROBE_CHANNELS,
            "probes_per_s": 1 / PROBE_EVERY_S,
        },
        "machine": machine(),
    }


def _ratio(a: float, b: float, digits: int = 1) -> float | None:
    return round(a / b, digits) if b else None


def run(bootstrap: str, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement against running servers; flags missing from `args` take their defaults."""
    p = argparse.Namespace(**{**vars(defaults()), **vars(args)})
    if p.rate <= 0 or p.duration <= 0 or p.keys <= 0 or p.channels <= 0 or p.viewers < 0:
        raise ValueError("rate, duration, keys and channels must be positive, viewers not negative")
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        result = asyncio.run(measure(bootstrap, redis_url, p, workdir))
    except BaseException:
        say(f"worker logs kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def table(r: dict[str, Any]) -> str:
    per_s, plan, err = r["per_s"], r["plan"], r["plan_error_pct"]
    redis, viewer = r["send_to_redis_ms"], r["send_to_viewer_ms"]
    rows = [
        ("rate asked / achieved", f"{r['rate']['asked']:,.0f} / {r['rate']['achieved']:,.0f} events/s"),
        (
            "send -> Redis p50 / p99",
            f"{redis['p50']} / {redis['p99']} ms ({redis['probes']} probes, {redis['lost']} lost)",
        ),
        (
            "send -> viewer p50 / p99",
            f"{viewer['p50']} / {viewer['p99']} ms ({viewer['probes']} probes, {viewer['lost']} lost)",
        ),
        ("events/s into tier 1", f"{per_s['events']:,.0f}"),
        (
            "partials/s",
            f"{per_s['partials']:,.1f}  ({r['ratios']['events_per_partial']} events each; "
            f"plan {plan['partials_per_s']:,.1f}, {err['partials_per_s']:+} %)",
        ),
        (
            "Redis commands/s",
            f"{per_s['redis_commands']:,.0f}  ({r['ratios']['events_per_redis_command']} events each; "
            f"plan {plan['redis_commands_per_s']:,.0f}, {err['redis_commands_per_s']:+} %)",
        ),
        (
            "tier-1 windows/s, applies/s",
            f"{per_s['tier1_windows']:,.1f} ({r['ratios']['partials_per_tier1_window']} partials each), "
            f"{per_s['redis_applies']:,.1f}",
        ),
        ("channel updates/s", f"{per_s['updates']:,.1f}"),
        (
            "pushes/s",
            f"{per_s['pushes']:,.0f}  ({r['viewers']['pushes_per_s_per_viewer']}/s per viewer, "
            f"{r['viewers']['open_at_end']} viewers)",
        ),
        ("measured over", f"{r['measured_s']} s; load average {r['load_average']}"),
    ]
    return "\n".join(f"{k:<26}{v}" for k, v in rows)


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench e2e` (flags are defined in pipeline/cli/)."""
    obs.configure_logging("warning")
    try:
        with servers_or_local(args.kafka, args.redis, say=say, broker=args.broker) as (kafka_url, redis_url):
            result = run(kafka_url, redis_url, args)
    except (ValueError, RuntimeError) as exc:
        print(f"pipeline bench e2e: {exc}", file=sys.stderr)
        return 1
    print(table(result))
    if args.json:
        print(orjson.dumps(result).decode())
    return 0
