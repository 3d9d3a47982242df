"""`pipeline bench ingest`: how many events/s the HTTP gateway takes, beside the SDK it is built on.

In one run, against the same broker:
1. the gateway (`pipeline run live_likes --tier ingest`, a separate process)
   receives `--concurrency` concurrent POST /v1/events requests of `--batch`
   like events each (JSON arrays without ids: the gateway generates them) from
   an aiohttp client in this process, for `--duration` seconds. Reported:
   accepted events/s, requests/s, p50/p99 response time. Every response must
   be 202 with every event accepted (anything else is counted as a failure);
2. the SDK (PipelineClient.send_many) in this process sends the same batches
   with the same concurrency for the same time: its events/s is the ceiling the
   gateway adds HTTP, JSON and auth on top of.

Tier 1 does not run: the gateway's lag thresholds are set out of reach, so
nothing is throttled; this measures the front door alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from pipeline.bench.coalesce_bench import machine
from pipeline.client import PipelineClient
from pipeline.core.topology import Topology
from pipeline.harness.local_servers import free_port, servers_or_local
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import kafka
from pipeline.runtime import observability as obs

API_KEY = "bench-key"
KEYS = 10_000


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@dataclass
class Rate:
    events_per_s: float = 0.0
    requests_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    events: int = 0
    failures: int = 0


def _batches(batch: int, count: int = 64) -> list[list[dict[str, Any]]]:
    out = []
    for b in range(count):
        out.append(
            [
                {"type": "like", "key": f"c{(b * batch + i) % KEYS}", "channel": f"v{(b + i) % 50}"}
                for i in range(batch)
            ]
        )
    return out


async def _drive(
    send: Callable[[int], Awaitable[tuple[int, bool]]], concurrency: int, duration_s: float
) -> Rate:
    """`concurrency` closed loops of `send(i)` -> (events accepted, whole batch ok) until the deadline."""
    latencies: list[float] = []
    rate = Rate()
    deadline = time.perf_counter() + duration_s

    async def loop(worker: int) -> None:
        i = worker
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            accepted, ok = await send(i)
            latencies.append(time.perf_counter() - started)
            i += concurrency
            rate.events += accepted
            if not ok:
                rate.failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(concurrency)))
    wall = time.perf_counter() - started
    rate.events_per_s = round(rate.events / wall)
    rate.requests_per_s = round(len(latencies) / wall, 1)
    _percentiles(rate, latencies)
    return rate


async def measure_gateway(port: int, batch: int, concurrency: int, duration_s: float) -> Rate:
    bodies = [orjson.dumps(b) for b in _batches(batch)]
    url = f"http://127.0.0.1:{port}/v1/events"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(i: int) -> tuple[int, bool]:
            async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                answer = await resp.read()
            accepted = int(orjson.loads(answer).get("accepted", 0)) if resp.status == 202 else 0
            return accepted, accepted == batch

        return await _drive(post, concurrency, duration_s)


async def measure_sdk(
    topology: Topology, bootstrap: str, batch: int, concurrency: int, duration_s: float
) -> Rate:
    batches = _batches(batch)
    async with PipelineClient(topology, bootstrap) as client:

        async def send(i: int) -> tuple[int, bool]:
            results = await client.send_many(batches[i % len(batches)])
            return sum(1 for r in results if r.accepted), True

        return await _drive(send, concurrency, duration_s)


def _percentiles(rate: Rate, latencies: list[float]) -> None:
    if latencies:
        ordered = sorted(latencies)
        rate.p50_ms = round(statistics.median(ordered) * 1000, 2)
        rate.p99_ms = round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2)


def _wait_ready(worker: WorkerProcess, port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not worker.running:
            raise RuntimeError(f"the gateway exited:\n{worker.log_tail(20)}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp,
        ):
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the gateway did not become ready:\n{worker.log_tail(20)}")


def run(bootstrap: str, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    from topologies.live_likes import TOPOLOGY

    topology = TOPOLOGY.renamed("bench_in_" + uuid.uuid4().hex[:8])
    asyncio.run(kafka.ensure_topics(bootstrap, kafka.topology_topics(topology)))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        gateway = WorkerProcess(
            "live_likes",
            "ingest",
            "bench",
            bootstrap,
            redis_url,
            Path(tmp),
            log_level="warning",
            name=topology.name,
            extra_env={
                "PIPELINE_INGEST_PORT": str(port),
                "PIPELINE_INGEST_API_KEYS": API_KEY,
                "PIPELINE_INGEST_LAG_SHED": str(10**12),
                "PIPELINE_INGEST_LAG_HIGH": str(10**12),
                "PIPELINE_INGEST_LATENCY_HIGH_MS": "0",
            },
        ).start()
        try:
            _wait_ready(gateway, port)
            say(f"gateway: {args.concurrency} concurrent POSTs of {args.batch} events, {args.duration:.0f} s")
            http = asyncio.run(measure_gateway(port, args.batch, args.concurrency, args.duration))
            say(f"gateway: {http.events_per_s:,.0f} events/s, p99 {http.p99_ms} ms")
        finally:
            gateway.stop()
    say(f"sdk: {args.concurrency} concurrent send_many of {args.batch} events for {args.duration:.0f} s")
    sdk = asyncio.run(measure_sdk(topology, bootstrap, args.batch, args.concurrency, args.duration))
    say(f"sdk: {sdk.events_per_s:,.0f} events/s")
    sdk_1000 = asyncio.run(measure_sdk(topology, bootstrap, 1000, 4, args.duration))
    say(f"sdk, batches of 1000: {sdk_1000.events_per_s:,.0f} events/s")
    return {
        "gateway": asdict(http),
        "sdk": asdict(sdk),
        "sdk_batch_1000": asdict(sdk_1000),
        "gateway_vs_sdk": round(http.events_per_s / sdk.events_per_s, 3) if sdk.events_per_s else None,
        "params": {"batch": args.batch, "concurrency": args.concurrency, "duration_s": args.duration},
        "machine": machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench ingest` (flags are defined in pipeline/cli/)."""
    if args.duration <= 0 or args.batch <= 0 or args.concurrency <= 0:
        print(
            "pipeline bench ingest: --duration, --batch and --concurrency must be positive", file=sys.stderr
        )
        return 2
    obs.configure_logging("warning")
    with servers_or_local(args.kafka, args.redis, say=say, broker=args.broker) as (kafka_url, redis_url):
        summary = run(kafka_url, redis_url, args)
    print(f"{'':34}{'events/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for label, name in (
        (f"gateway, POST of {args.batch}", "gateway"),
        (f"SDK send_many of {args.batch}", "sdk"),
        ("SDK send_many of 1000", "sdk_batch_1000"),
    ):
        r = summary[name]
        print(f"{label:34}{r['events_per_s']:>10,}{r['p50_ms']!s:>10}{r['p99_ms']!s:>10}")
    g = summary["gateway"]
    print(f"gateway / SDK = {summary['gateway_vs_sdk']}; failed requests: {g['failures']}")
    if args.json:
        print(orjson.dumps(summary).decode())
    return 0 if g["failures"] == 0 else 1
