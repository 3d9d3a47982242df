"""`pipeline demo`: the whole pipeline on one machine, with load, progress and a summary.

Everything it starts (servers, workers) it stops again, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from pipeline.client import PipelineClient
from pipeline.core import tokens
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.core.model import message_key
from pipeline.core.topology import Topology
from pipeline.harness.loadgen import LoadResult, Workload, produce_via_sdk
from pipeline.harness.local_postgres import LocalPostgres
from pipeline.harness.local_servers import free_port, servers_or_local
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import kafka, postgres_sink, redis_query
from pipeline.runtime import settings as settings_mod
from pipeline.runtime.worker import load_topology

DRAIN_TIMEOUT_S = 90.0
NODE_START_TIMEOUT_S = 30.0
COMMENTS_PER_S = 4.0


def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pipeline-demo-"))
    with contextlib.ExitStack() as stack:
        kafka_url, redis_url = stack.enter_context(
            servers_or_local(args.kafka, args.redis, workdir / "servers", say=_say, broker=args.broker)
        )
        postgres_url = getattr(args, "postgres", None)
        if not postgres_url:
            _say("starting a local PostgreSQL (the sink tier's rollups) ...")
            postgres_url = stack.enter_context(LocalPostgres(workdir / "servers" / "postgres")).url
        _say(f"kafka {kafka_url}   redis {redis_url}   postgres {postgres_url}   logs {workdir}")
        try:
            summary = asyncio.run(_run(args, kafka_url, redis_url, workdir, postgres_url))
        except KeyboardInterrupt:
            _say("interrupted; stopping everything")
            return 130
    _print_summary(summary, args.json)
    exact = summary["events_counted"] == summary["events_accepted"] > 0
    return 0 if exact and summary["sink_exact"] else 1


async def _run(
    args: argparse.Namespace, kafka_url: str, redis_url: str, workdir: Path, postgres_url: str
) -> dict[str, Any]:
    topology = load_topology(args.topology)
    metric = next(m for m in topology.metrics if m.kind.value == "count")
    await kafka.ensure_topics(kafka_url, kafka.topology_topics(topology))
    client = aioredis.Redis.from_url(redis_url)
    base_counted = await redis_query.metric_sum(client, topology, metric.name)
    base_stats = await redis_query.stats(client, topology)
    workers = [
        WorkerProcess(args.topology, "coalesce", "demo-c1", kafka_url, redis_url, workdir),
        WorkerProcess(args.topology, "coalesce", "demo-c2", kafka_url, redis_url, workdir),
        WorkerProcess(args.topology, "merge", "demo-m1", kafka_url, redis_url, workdir),
        # durable rollups in PostgreSQL, exactly once, beside the root
        WorkerProcess(
            args.topology,
            "sink",
            "demo-s1",
            kafka_url,
            redis_url,
            workdir,
            extra_env={"PIPELINE_POSTGRES": postgres_url},
        ),
    ]
    pg = await postgres_sink.connect(postgres_url)
    base_sink = await postgres_sink.metric_total(pg, topology, metric.name)
    node = _broadcast_node(args.topology, kafka_url, redis_url, workdir, postgres_url)
    workers.append(node.worker)
    for w in workers:
        w.start()
    _say(f"started {', '.join(w.name for w in workers)} (one process each)")
    try:
        await node.wait_ready(workers)
    except BaseException:
        for w in workers:
            w.stop()
        await client.aclose()
        raise
    _say(f"viewer page  {node.viewer_url}   (live comments and likes; pick any video)")
    _say(f"dashboard    {node.dashboard_url}")
    feeder = asyncio.create_task(_feed_comments(kafka_url, topology, args.channels))
    started = time.monotonic()
    counted = 0.0

    async def poll_counted() -> float:
        return await redis_query.metric_sum(client, topology, metric.name) - base_counted

    async def poll_sink() -> float:
        return await postgres_sink.metric_total(pg, topology, metric.name) - base_sink

    sink_behind: list[int] = []  # Redis' count minus the sink's, once a second during the load

    live: list[LoadResult] = []  # the load's own result, counting as it goes

    def on_progress(r: LoadResult) -> None:
        if not live:
            live.append(r)

    # the writers' path, as an application would use it: the SDK makes ids, splits hot keys
    # (policy from the settings' defaults) and announces the splits
    defaults = settings_mod.load()
    splitter = HotKeySplitter(
        SplitPolicy(threshold_eps=defaults.split_threshold_eps, budget_eps=defaults.split_budget_eps)
    )
    writer = PipelineClient(
        topology, kafka_url, redis_url=redis_url, splitter=splitter, client_id="demo-writer"
    )
    await writer.start()
    try:
        workload = Workload(keys=args.keys, channels=args.channels, event_type=metric.on)
        load_task = asyncio.create_task(
            produce_via_sdk(writer, workload, args.duration, args.rate, on_progress=on_progress)
        )
        # every column counts the same thing, the load's likes (the page's comments are apart), and the
        # counts are read before the acknowledgements, so no column runs ahead of the one before it
        _say(
            f"progress, in {metric.on} events of the load: sent (handed to the SDK), acked (acknowledged "
            f"by the broker), counted in Redis (applied by the root), PostgreSQL (written by the sink)"
        )
        in_redis = in_sink = 0.0
        while not load_task.done():
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - started
            with contextlib.suppress(TimeoutError):  # a slow read keeps the last value
                in_sink = await asyncio.wait_for(poll_sink(), 2.0)
                in_redis = await asyncio.wait_for(poll_counted(), 2.0)
                sink_behind.append(int(in_redis - in_sink))
            sent, acked = (live[0].sent, live[0].accepted) if live else (0, 0)
            _say(
                f"[{elapsed:5.1f}s] sent {sent:>9,}  acked {acked:>9,}  "
                f"counted in Redis {int(in_redis):>9,}  PostgreSQL {int(in_sink):>9,}"
            )
            _check_workers(workers)
        load = await load_task
        _say(
            f"load done: {load.accepted:,} events accepted in {load.wall_s:.1f}s "
            f"({load.accepted / max(load.wall_s, 1e-9):,.0f}/s); waiting for the pipeline to drain ..."
        )
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (counted := await poll_counted()) < load.accepted and time.monotonic() < deadline:
            _check_workers(workers)
            await asyncio.sleep(0.25)
        wall = time.monotonic() - started
        drained = time.monotonic()
        while (sunk := await poll_sink()) < counted and time.monotonic() < deadline:
            _check_workers(workers)
            await asyncio.sleep(0.25)
        sink_after_s = time.monotonic() - drained
        stats = await redis_query.stats(client, topology)
        delta = {k: v - base_stats.get(k, 0) for k, v in stats.items()}
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)  # comments are for the page, not the count
        await writer.stop()
        for w in workers:
            w.stop()
        await client.aclose()
        await pg.close()
    partials = delta.get("partials", 0)
    half = len(sink_behind) // 2
    commands = delta.get("redis_commands", 0)
    return {
        "topology": topology.name,
        "events_sent": load.sent,
        "events_accepted": load.accepted,
        "events_counted": int(counted),
        "events_lost": load.accepted - int(counted),
        "sink_events_counted": int(sunk),
        "sink_exact": int(sunk) == int(counted),
        # the sink's lag behind the root during the load (events): its first and second half's worst,
        # so a lag that grows shows; and how long after the root drained the sink had it all
        "sink_behind_max_first_half": max(sink_behind[:half], default=0),
        "sink_behind_max_second_half": max(sink_behind[half:], default=0),
        "sink_caught_up_after_s": round(sink_after_s, 2),
        "partials_sent": partials,
        "redis_commands": commands,
        "redis_round_trips": delta.get("applies", 0),
        "dead_letters": delta.get("dead_letters", 0),
        "deduplicated": delta.get("deduplicated", 0),
        "hot_keys_split": len(load.hot_keys_split),
        "split_keys": sorted(load.hot_keys_split)[:10],
        "events_per_partial": round(load.accepted / partials, 1) if partials else None,
        "events_per_redis_command": round(load.accepted / commands, 1) if commands else None,
        "load_events_per_s": round(load.accepted / max(load.wall_s, 1e-9)),
        "wall_s": round(wall, 2),
        "logs": str(workdir),
        "viewer_url": node.viewer_url,
        "dashboard_url": node.dashboard_url,
    }


@dataclass
class DemoNode:
    """The demo's broadcast node: it serves the viewer page and the dashboard.

    The dashboard needs an operator key and the viewer page a viewer token, as in production; both
    are this run's only. The URLs carry them: the viewer token in the query (as a page an application
    serves would), the operator key in the fragment, which the browser never sends (the sign-in form
    reads it there and signs in).
    """

    worker: WorkerProcess
    url: str
    secret: str
    operator_key: str

    @property
    def viewer_url(self) -> str:
        token = tokens.issue(
            self.secret.encode(), "demo-viewer", [tokens.ALL_CHANNELS], int(time.time()) + 86400
        )
        return f"{self.url}/?channel=video-0&token={token}"

    @property
    def dashboard_url(self) -> str:
        return f"{self.url}/dashboard#operator-key={self.operator_key}"

    async def wait_ready(self, workers: list[WorkerProcess]) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/v1/node") as response:
                        if response.status == 200:
                            return
                _check_workers(workers)
                if time.monotonic() > deadline:
                    raise SystemExit(f"the broadcast node did not answer; its log:\n{self.worker.log_tail()}")
                await asyncio.sleep(0.2)


def _broadcast_node(
    topology: str, kafka_url: str, redis_url: str, workdir: Path, postgres_url: str = ""
) -> DemoNode:
    port = free_port()
    secret = secrets.token_urlsafe(24)  # this run's only: tokens die with it
    operator_key = secrets.token_urlsafe(24)
    env = {
        "PIPELINE_BROADCAST_PORT": str(port),
        "PIPELINE_BROADCAST_SECRET": secret,
        "PIPELINE_OPERATOR_API_KEYS": operator_key,
        # a signed-in operator's viewer page mints its own tokens; never in production
        "PIPELINE_BROADCAST_DEV_TOKENS": "true",
        # the dashboard's series read the buckets Redis no longer holds from the sink's PostgreSQL
        "PIPELINE_POSTGRES": postgres_url,
    }
    worker = WorkerProcess(topology, "broadcast", "demo-b1", kafka_url, redis_url, workdir, extra_env=env)
    return DemoNode(worker, f"http://127.0.0.1:{port}", secret, operator_key)


COMMENT_TEXTS = (
    "first!",
    "this is wild",
    "who else is watching live?",
    "hello from the demo",
    "that play though",
    "can't believe it",
    "GG",
    "again! again!",
)


async def _feed_comments(kafka_url: str, topology: Topology, channels: int) -> None:
    """A few comments a second on the most liked keys, so that the viewer page has a live feed."""
    if not topology.feed_types:
        return
    event_type = sorted(topology.feed_types)[0]
    shape = Workload(keys=1, channels=channels)  # the load's key -> channel mapping
    rng = random.Random(11)
    producer = kafka.producer(kafka_url, "demo-comments")
    await producer.start()
    try:
        for n in itertools.count(-1):
            # every other comment on video-0 (the page the demo points to), the rest anywhere
            i = n * channels // 2 if n % 2 == 0 else n
            key, channel = ("comment-viral", "video-0") if n < 0 else (f"comment-{i}", shape.channel_of(i))
            event = {
                "type": event_type,
                "key": key,
                "channel": channel,
                "user": f"user{rng.randrange(1000)}",
                "text": rng.choice(COMMENT_TEXTS),
            }
            await producer.send(topology.topic("events"), orjson.dumps(event), key=message_key(key))
            await asyncio.sleep(1 / COMMENTS_PER_S)
    finally:
        await producer.stop()


def _check_workers(workers: list[WorkerProcess]) -> None:
    for w in workers:
        if not w.running:
            raise SystemExit(f"worker {w.name} exited; its log:\n{w.log_tail()}")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    ok = summary["events_counted"] == summary["events_accepted"] > 0
    lines = [
        "",
        f"events sent       {summary['events_sent']:>12,}",
        f"events accepted   {summary['events_accepted']:>12,}   (acknowledged by the broker)",
        f"events counted    {summary['events_counted']:>12,}   (read back from Redis)"
        + ("   exact" if ok else "   MISMATCH"),
        f"in PostgreSQL     {summary['sink_events_counted']:>12,}   (the sink's rollups)"
        + ("   exact" if summary["sink_exact"] else "   MISMATCH")
        + f", behind the root at most {summary['sink_behind_max_first_half']:,} / "
        f"{summary['sink_behind_max_second_half']:,} events (first / second half of the load)",
        f"hot keys split    {summary['hot_keys_split']:>12,}   {', '.join(summary['split_keys'])}",
        f"partials sent     {summary['partials_sent']:>12,}   ({summary['events_per_partial']} events each)",
        f"redis commands    {summary['redis_commands']:>12,}   "
        f"({summary['events_per_redis_command']} events each, {summary['redis_round_trips']} round trips)",
        f"wall time         {summary['wall_s']:>12} s",
    ]
    print("\n".join(lines), file=sys.stderr if as_json else sys.stdout, flush=True)
    if as_json:
        print(orjson.dumps(summary).decode(), flush=True)
