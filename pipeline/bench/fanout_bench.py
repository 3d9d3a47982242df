"""`pipeline bench fanout`: how many viewers one broadcast node keeps current, and how fresh.

One broadcast node (a real `pipeline run ... --tier broadcast` process) serves
simulated viewers from several processes while this process plays the root
merger: for every channel, `--update-rate` times a second, it writes the new
totals and the channel's seq to Redis in one transaction, as tier 2 does, and
publishes the ChannelUpdate to the updates topic. Each update carries one extra
value, ("bench", "ts", publication time in ms), so a viewer can tell how old
the newest value it was pushed is: that is the staleness reported.

The viewers are WebSocket clients written on a bare asyncio Protocol (handshake
and frame parsing only), not aiohttp: on a 2-core machine the clients share the
CPU with the node, and a client that costs less leaves more of it to what is
measured. The node knows nothing of this; it sees ordinary WebSocket clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing
import os
import random
import resource
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import redis.asyncio as aioredis

from pipeline.core import tokens
from pipeline.core.model import ChannelUpdate
from pipeline.core.redis_layout import agg_key, partition_tag, seq_key
from pipeline.core.topology import Partitions
from pipeline.core.windows import TOTAL
from pipeline.harness.local_servers import free_port
from pipeline.harness.supervisor import WorkerProcess, rss_kb
from pipeline.io import kafka
from pipeline.runtime import observability as obs
from pipeline.runtime.worker import load_topology

HIST_MS = 60_000  # staleness histogram: 1 ms buckets up to a minute
CONNECTS_IN_FLIGHT = 100  # handshakes in flight per viewer process
CONNECT_TIMEOUT_S = 180.0
SETTLE_S = 3.0
TARGET_VIEWERS = 10_000
TARGET_UPDATES_PER_VIEWER_S = 2.0
TARGET_P99_MS = 1000.0
TS_MARK = b'["bench","ts",'


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- simulated viewers (run in child processes) ----------------------------


class Tally:
    """What one viewer process saw."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = 0
        self.updates = 0
        self.snapshots = 0
        self.comments = 0
        self.other = 0
        self.bad_frames = 0
        self.hist = array("q", bytes(8 * HIST_MS))

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "updates": self.updates,
            "snapshots": self.snapshots,
            "comments": self.comments,
            "other": self.other,
            "bad_frames": self.bad_frames,
            "hist": self.hist.tobytes(),
        }


class ViewerProtocol(asyncio.Protocol):
    """A WebSocket client reduced to what the bench needs: handshake, frames, pongs."""

    def __init__(self, request: bytes, tally: Tally, opened: asyncio.Future[bool]) -> None:
        self.request = request
        self.tally = tally
        self.opened = opened
        self.buf = bytearray()
        self.upgraded = False
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.opened.done():
            self.opened.set_result(False)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = buf.startswith(b"HTTP/1.1 101")
            del buf[: end + 4]
            self.upgraded = self.open = ok
            if not self.opened.done():
                self.opened.set_result(ok)
            if not ok:
                assert self.transport is not None
                self.transport.close()
                return
        while len(buf) >= 2:
            first, second = buf[0], buf[1]
            n = second & 0x7F
            head = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = int.from_bytes(buf[2:4], "big")
                head = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = int.from_bytes(buf[2:10], "big")
                head = 10
            if len(buf) < head + n:
                return
            payload = bytes(buf[head : head + n])
            del buf[: head + n]
            opcode = first & 0x0F
            if opcode == 1 and first & 0x80:
                self.message(payload)
            elif opcode == 9:  # ping: answer with a (masked, as a client must) pong
                assert self.transport is not None
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            elif opcode == 8:
                self.open = False
                assert self.transport is not None
                self.transport.close()
                return
            else:
                self.tally.bad_frames += 1

    def message(self, payload: bytes) -> None:
        tally = self.tally
        tally.messages += 1
        kind = payload[9:16]
        if kind == b'update"':
            tally.updates += 1
            at = payload.rfind(TS_MARK)
            if at >= 0:
                start = at + len(TS_MARK)
                ts = int(payload[start : payload.index(b"]", start)])
                age = int(time.time() * 1000) - ts
                tally.hist[min(HIST_MS - 1, max(0, age))] += 1
        elif kind == b"snapsho":
            tally.snapshots += 1
        elif kind == b"comment":
            tally.comments += 1
        else:
            tally.other += 1


def viewer_process(conn: Connection, host: str, port: int, specs: list[tuple[str, str]]) -> None:
    """Child entry point: connect every (token, channel), then tally until told to stop."""
    raise_fd_limit()
    asyncio.run(_viewers(conn, host, port, specs))


async def _viewers(conn: Connection, host: str, port: int, specs: list[tuple[str, str]]) -> None:
    loop = asyncio.get_running_loop()
    tally = Tally()
    protocols: list[ViewerProtocol] = []
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    key = base64.b64encode(os.urandom(16)).decode()

    async def connect(token: str, channel: str) -> bool:
        request = (
            f"GET /v1/ws?token={quote(token)}&channels={quote(channel)} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        async with gate:
            for _attempt in range(3):
                opened: asyncio.Future[bool] = loop.create_future()
                try:
                    _, proto = await loop.create_connection(
                        lambda opened=opened: ViewerProtocol(request, tally, opened),  # type: ignore[misc]
                        host,
                        port,
                    )
                    if await asyncio.wait_for(opened, 30):
                        protocols.append(proto)
                        return True
                except (OSError, TimeoutError):
                    pass
                await asyncio.sleep(0.5)
        return False

    results = await asyncio.gather(*(connect(t, c) for t, c in specs))
    conn.send(("connected", sum(results), len(results) - sum(results)))
    while True:
        while not conn.poll():
            await asyncio.sleep(0.05)
        command = conn.recv()
        if command == "measure":
            tally.reset()
        elif command == "stop":
            summary = tally.summary()
            summary["open"] = sum(1 for p in protocols if p.open)
            conn.send(("done", summary))
            break
    for p in protocols:
        if p.transport is not None:
            p.transport.abort()


# --- the root merger's part ------------------------------------------------


ROOT = 0  # the bench's publisher is one root partition's merger: its keys carry that partition's hash tag


class Publisher:
    """Writes totals and seq to Redis like the root of partition ROOT, then publishes the ChannelUpdate
    (its values are read back by snapshots only, which merge every partition)."""

    def __init__(self, bootstrap: str, redis_url: str, topology: str, channels: list[str], keys: int) -> None:
        self.producer = kafka.producer(bootstrap, f"{topology}.bench-root")
        self.redis = aioredis.Redis.from_url(redis_url)
        self.topology = topology
        self.tag = partition_tag(topology, ROOT, Partitions().partials)  # the topology's default partitions
        self.channels = channels
        self.keys = [f"comment-{k}" for k in range(keys)]
        self.seq = dict.fromkeys(channels, 0)
        self.totals: dict[str, dict[str, int]] = {c: {} for c in channels}
        self.published = 0
        self.rng = random.Random(7)

    async def run(self, rate: float, stop: asyncio.Event) -> None:
        await self.producer.start()
        topic = f"{self.topology}.updates"
        interval = 1.0 / rate
        next_tick = time.monotonic()
        try:
            while not stop.is_set():
                ts = int(time.time() * 1000)
                pipe = self.redis.pipeline(transaction=True)
                updates = []
                for channel in self.channels:
                    self.seq[channel] += 1
                    values: list[tuple[str, str, float]] = []
                    totals = self.totals[channel]
                    for key in self.rng.sample(self.keys, min(3, len(self.keys))):
                        totals[key] = totals.get(key, 0) + self.rng.randint(1, 5)
                        values.append(("likes", key, totals[key]))
                    pipe.hset(
                        agg_key(self.tag, "likes", TOTAL, channel),
                        mapping={k: v for _, k, v in values},
                    )
                    pipe.hset(seq_key(self.tag), channel, self.seq[channel])
                    values.append(("bench", "ts", ts))
                    updates.append(ChannelUpdate(channel, self.seq[channel], ts, values, ROOT))
                await pipe.execute()
                for update in updates:
                    await self.producer.send(topic, update.to_json(), key=update.channel.encode())
                self.published += len(updates)
                next_tick += interval
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        finally:
            await self.producer.stop()
            await self.redis.aclose()


# --- the run ---------------------------------------------------------------


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def node_stats(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(base + "/v1/node") as response:
        stats: dict[str, Any] = await response.json()
        return stats


async def wait_for_node(base: str, node: WorkerProcess, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node.running:
            raise RuntimeError(f"the broadcast node exited:\n{node.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await node_stats(base)
            return
        await asyncio.sleep(0.3)
    raise RuntimeError(f"the broadcast node did not answer within {timeout_s} s:\n{node.log_tail()}")


def percentile(hist: array, q: float) -> float | None:
    total = sum(hist)
    if not total:
        return None
    rank = q * (total - 1)
    seen = 0
    for ms, n in enumerate(hist):
        seen += n
        if seen > rank:
            return float(ms)
    return float(HIST_MS)


async def measure(args: argparse.Namespace, bootstrap: str, redis_url: str, workdir: Path) -> dict[str, Any]:
    name = f"fanout_{uuid.uuid4().hex[:8]}"
    topology = load_topology("live_likes").renamed(name)
    await kafka.ensure_topics(bootstrap, kafka.topology_topics(topology))
    secret = secrets.token_urlsafe(24)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    node = WorkerProcess(
        "live_likes",
        "broadcast",
        "bench-b1",
        bootstrap,
        redis_url,
        workdir,
        log_level="warning",
        name=name,
        extra_env={
            "PIPELINE_BROADCAST_SECRET": secret,
            "PIPELINE_BROADCAST_PORT": str(port),
            "PIPELINE_BROADCAST_PUSH_RATE": str(args.push_rate),
        },
    )
    channels = [f"video-{i}" for i in range(args.channels)]
    stop_publishing = asyncio.Event()
    publisher = Publisher(bootstrap, redis_url, name, channels, args.keys)
    procs: list[multiprocessing.process.BaseProcess] = []
    pipes: list[Connection] = []
    node.start()
    try:
        await wait_for_node(base, node)
        assert node.proc is not None
        pid = node.proc.pid
        rss_idle = rss_kb(pid) or 0
        publish_task = asyncio.create_task(publisher.run(args.update_rate, stop_publishing))
        say(f"node up at {base} (RSS {rss_idle / 1024:.0f} MB); connecting {args.viewers} viewers ...")
        expires = int(time.time()) + 3600
        specs = [
            (
                tokens.issue(secret.encode(), f"viewer-{i}", [channels[i % len(channels)]], expires),
                channels[i % len(channels)],
            )
            for i in range(args.viewers)
        ]
        ctx = multiprocessing.get_context("spawn")
        started = time.monotonic()
        for p in range(args.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=viewer_process, args=(child, "127.0.0.1", port, specs[p :: args.procs]))
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        connected = failed = 0
        for pipe in pipes:
            reply = await recv_child(pipe, CONNECT_TIMEOUT_S)
            connected += reply[1]
            failed += reply[2]
        connect_s = time.monotonic() - started
        say(f"{connected} connected, {failed} failed, in {connect_s:.1f} s; settling ...")
        await asyncio.sleep(SETTLE_S)
        rss_full = rss_kb(pid) or 0
        viewer_pids = [p.pid for p in procs if p.pid is not None]
        published0, cpu0, t0 = publisher.published, cpu_s(pid), time.monotonic()
        viewers_cpu0 = sum(cpu_s(p) for p in viewer_pids)
        for pipe in pipes:
            pipe.send("measure")
        say(f"measuring for {args.duration:.0f} s ...")
        ages = []  # how old the newest update is when the node reads it (publication to node)
        while time.monotonic() - t0 < args.duration:
            await asyncio.sleep(1.0)
            ages.append((await node_stats(base))["update_age_ms"])
        for pipe in pipes:
            pipe.send("stop")
        elapsed = time.monotonic() - t0
        cpu = cpu_s(pid) - cpu0
        viewers_cpu = sum(cpu_s(p) for p in viewer_pids) - viewers_cpu0
        published = publisher.published - published0
        rss_peak = rss_kb(pid) or 0
        stats = await node_stats(base)
        summaries = [(await recv_child(pipe, 60.0))[1] for pipe in pipes]
        stop_publishing.set()
        await publish_task
    finally:
        stop_publishing.set()
        stop_children(pipes, procs)
        node.stop()
    hist = array("q")
    hist.frombytes(summaries[0]["hist"])
    for s in summaries[1:]:
        other = array("q")
        other.frombytes(s["hist"])
        for i, n in enumerate(other):
            if n:
                hist[i] += n
    open_viewers = sum(s["open"] for s in summaries)
    messages = sum(s["messages"] for s in summaries)
    updates = sum(s["updates"] for s in summaries)
    p50, p99 = percentile(hist, 0.50), percentile(hist, 0.99)
    per_viewer = updates / max(1, open_viewers) / elapsed
    result: dict[str, Any] = {
        "viewers": open_viewers,
        "viewers_asked": args.viewers,
        "connect_failures": failed,
        "connect_s": round(connect_s, 1),
        "viewer_processes": args.procs,
        "channels": args.channels,
        "keys_per_channel": args.keys,
        "updates_published_per_s": round(published / elapsed, 1),
        "push_rate": args.push_rate,
        "pushes_per_s": round(messages / elapsed),
        "updates_per_viewer_per_s": round(per_viewer, 2),
        "p50_staleness_ms": p50,
        "p99_staleness_ms": p99,
        "max_staleness_ms": float(max((i for i, n in enumerate(hist) if n), default=0)),
        "rss_per_viewer_kb": round((rss_full - rss_idle) / max(1, open_viewers), 1),
        "node_rss_mb": round(rss_peak / 1024, 1),
        "node_cpu_percent": round(100 * cpu / elapsed, 1),
        "viewer_processes_cpu_percent": round(100 * viewers_cpu / elapsed, 1),
        "node_input_age_ms_median": sorted(ages)[len(ages) // 2] if ages else None,
        "load_average": os.getloadavg()[0],
        "slow_disconnected": stats.get("slow_disconnected", 0),
        "duration_s": round(elapsed, 1),
    }
    result["targets_met"] = bool(
        open_viewers >= TARGET_VIEWERS
        and per_viewer >= TARGET_UPDATES_PER_VIEWER_S
        and p99 is not None
        and p99 <= TARGET_P99_MS
    )
    return result


def stop_children(pipes: list[Connection], procs: list[multiprocessing.process.BaseProcess]) -> None:
    """Ask each child process to stop, give it 10 s, then kill it."""
    for pipe in pipes:
        with contextlib.suppress(OSError):
            pipe.send("stop")
    for child_proc in procs:
        child_proc.join(10)
        if child_proc.is_alive():
            child_proc.kill()


async def recv_child(pipe: Connection, timeout_s: float) -> Any:
    """The next message from a child process, without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while not pipe.poll():
        if time.monotonic() > deadline:
            raise RuntimeError("a child process did not answer in time")
        await asyncio.sleep(0.02)
    return pipe.recv()


def table(r: dict[str, Any]) -> str:
    rows = [
        (
            "viewers connected",
            f"{r['viewers']:,} of {r['viewers_asked']:,} ({r['viewer_processes']} processes)",
        ),
        ("channels x keys", f"{r['channels']} x {r['keys_per_channel']}"),
        ("updates published", f"{r['updates_published_per_s']:,}/s"),
        ("pushes received", f"{r['pushes_per_s']:,}/s"),
        (
            "updates per viewer",
            f"{r['updates_per_viewer_per_s']}/s (target >= {TARGET_UPDATES_PER_VIEWER_S})",
        ),
        (
            "staleness p50 / p99 / max",
            f"{r['p50_staleness_ms']} / {r['p99_staleness_ms']} / {r['max_staleness_ms']} ms",
        ),
        ("node RSS per viewer", f"{r['rss_per_viewer_kb']} KB (node {r['node_rss_mb']} MB)"),
        ("node CPU", f"{r['node_cpu_percent']} % of one core"),
        ("viewer processes CPU", f"{r['viewer_processes_cpu_percent']} % of one core (all together)"),
        ("update age on arrival", f"{r['node_input_age_ms_median']} ms (median, publication to node)"),
        ("load average (1 min)", str(r["load_average"])),
        ("slow viewers disconnected", str(r["slow_disconnected"])),
        ("targets met", str(r["targets_met"])),
    ]
    return "\n".join(f"{k:<28}{v}" for k, v in rows)


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench fanout` (flags are defined in pipeline/cli/)."""
    if args.viewers <= 0 or args.procs <= 0 or args.channels <= 0 or args.update_rate <= 0:
        print(
            "pipeline bench fanout: --viewers, --procs, --channels and --update-rate must be positive",
            file=sys.stderr,
        )
        return 2
    obs.configure_logging("warning")
    say(f"open files limit: {raise_fd_limit()}")
    workdir = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    try:
        if args.kafka and args.redis:
            result = asyncio.run(measure(args, args.kafka, args.redis, workdir))
        else:
            from pipeline.harness.local_servers import LocalServers

            say("starting a local broker and Redis")
            with LocalServers(workdir / "servers", broker=args.broker) as servers:
                result = asyncio.run(
                    measure(
                        args, args.kafka or servers.kafka_bootstrap, args.redis or servers.redis_url, workdir
                    )
                )
    except RuntimeError as exc:
        print(f"pipeline bench fanout: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print(table(result))
    if args.json:
        print(orjson.dumps(result).decode())
    return 0
