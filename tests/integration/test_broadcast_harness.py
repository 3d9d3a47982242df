"""What the broadcast tests share (no tests here): a node as a real process, a stand-in for the
root merger that writes Redis and the updates topic as tier 2 does, and viewer clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from pipeline.core import tokens
from pipeline.core.model import ChannelUpdate
from pipeline.core.redis_layout import agg_key, partition_tag, seq_key
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL
from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import kafka, redis_client

SECRET = "integration-test-secret"
ROOT = 0  # the root partition the stand-in writes as
# KEYS: the partition's seq hash, the channel's likes hash. ARGV: the channel, then key, total, ...
_WRITE_LUA = """
local seq = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return seq
"""


def token(viewer: str, channels: list[str], ttl_s: int = 600, secret: str = SECRET) -> str:
    return tokens.issue(secret.encode(), viewer, channels, int(time.time()) + ttl_s)


class Node:
    """One broadcast node process of `topology` on its own port."""

    def __init__(
        self, servers: Endpoints, topology: Topology, log_dir: Path, instance: str = "b1", **env: Any
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = WorkerProcess(
            "live_likes",
            "broadcast",
            instance,
            servers.kafka_bootstrap,
            servers.redis_url,
            log_dir,
            name=topology.name,
            extra_env={
                "PIPELINE_BROADCAST_SECRET": SECRET,
                "PIPELINE_BROADCAST_PORT": str(self.port),
                "PIPELINE_BROADCAST_NODE_TTL_S": "1.5",
                **{f"PIPELINE_BROADCAST_{k.upper()}": str(v) for k, v in env.items()},
            },
        )

    async def start(self, timeout_s: float = 20.0) -> Node:
        self.proc.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.running, self.proc.log_tail()
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self.stats()
                return self
            await asyncio.sleep(0.2)
        raise AssertionError(f"node did not come up:\n{self.proc.log_tail()}")

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/v1/node") as r:
            body: dict[str, Any] = await r.json()
            return body

    def stop(self) -> None:
        self.proc.stop()


class RootStandIn:
    """Writes totals and the channel's seq to Redis in one transaction, then publishes the update,
    exactly as the root merger does: enough to drive a node without tiers 1 and 2."""

    def __init__(self, servers: Endpoints, topology: Topology) -> None:
        self.topology = topology
        self.bootstrap = servers.kafka_bootstrap
        self.producer = kafka.producer(servers.kafka_bootstrap, f"{topology.name}.test-root", linger_ms=0)
        self.redis_url = servers.redis_url  # one Redis, or a cluster
        self.totals: dict[tuple[str, str], int] = {}

    async def start(self) -> RootStandIn:
        await kafka.ensure_topics(self.bootstrap, kafka.topology_topics(self.topology))
        await self.producer.start()
        return self

    async def add(self, channel: str, likes: dict[str, int], publish: bool = True) -> int:
        """Add likes to keys of a channel; returns the channel's new seq."""
        name = self.topology.name
        values = []
        for key, n in likes.items():
            total = self.totals[(channel, key)] = self.totals.get((channel, key), 0) + n
            values.append(("likes", key, float(total)))
        # as the root of partition ROOT would (the stand-in is one root partition: its keys carry its tag)
        # in one script, atomically (a client per call: the tests' event loops differ, and a cluster
        # client keeps its loop's sockets)
        client = redis_client.from_url(self.redis_url)
        try:
            tag = partition_tag(name, ROOT, self.topology.partitions.partials)
            flat = [str(x) for _, k, v in values for x in (k, int(v))]
            keys = [seq_key(tag), agg_key(tag, "likes", TOTAL, channel)]
            seq = int(await client.eval(_WRITE_LUA, 2, *keys, channel, *flat))
        finally:
            await client.aclose()
        if publish:
            update = ChannelUpdate(
                channel, seq, int(time.time() * 1000), [(m, k, int(v)) for m, k, v in values], ROOT
            )
            await self.producer.send_and_wait(
                self.topology.topic("updates"), update.to_json(), key=channel.encode()
            )
        return seq

    async def comment(self, channel: str, key: str, text: str, user: str = "u1") -> None:
        event = {
            "type": "comment",
            "key": key,
            "channel": channel,
            "user": user,
            "text": text,
            "id": f"e-{key}",
        }
        await self.producer.send_and_wait(
            self.topology.topic("feed"), orjson.dumps(event), key=channel.encode()
        )

    async def stop(self) -> None:
        await self.producer.stop()


class ViewerState:
    """What a viewer page keeps: per channel the seq and the latest value of each key."""

    def __init__(self) -> None:
        self.seq: dict[str, int] = {}
        self.values: dict[str, dict[str, float]] = {}
        self.messages: list[dict[str, Any]] = []

    def take(self, msg: dict[str, Any]) -> None:
        self.messages.append(msg)
        channel = msg.get("channel", "")
        if msg["type"] == "snapshot":
            assert msg["seq"] > self.seq.get(channel, -1), f"snapshot stepped back: {msg['seq']}"
            self.seq[channel] = msg["seq"]
            self.values[channel] = {k: v for m, k, v in msg["values"] if m == "likes"}
        elif msg["type"] == "update":
            assert msg["seq"] > self.seq.get(channel, -1), f"update stepped back: {msg['seq']}"
            self.seq[channel] = msg["seq"]
            self.values.setdefault(channel, {}).update({k: v for m, k, v in msg["values"] if m == "likes"})


async def sse_messages(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Parse a text/event-stream into its JSON messages (checking event name and id against them)."""
    event: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if "data" in event:
                msg = orjson.loads(event["data"])
                assert event.get("event") == msg["type"]
                if msg["type"] in ("snapshot", "update"):
                    assert event.get("id") == f"{msg['channel']}:{msg['seq']}"
                yield msg
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            event[name] = value


async def next_message(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 10.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout_s)
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, ws.close_code)
    body: dict[str, Any] = orjson.loads(msg.data)
    return body


async def until(
    ws: aiohttp.ClientWebSocketResponse, state: ViewerState, done: Any, timeout_s: float = 10.0
) -> None:
    """Feed `state` from `ws` until `done(state)` holds."""
    deadline = time.monotonic() + timeout_s
    while not done(state):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; last messages: {state.messages[-3:]}"
        state.take(await next_message(ws, left))


async def sse_until(
    messages: AsyncIterator[dict[str, Any]], state: ViewerState, done: Any, timeout_s: float = 10.0
) -> None:
    """Feed `state` from an SSE stream until `done(state)` holds."""
    deadline = time.monotonic() + timeout_s
    while not done(state):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; last messages: {state.messages[-3:]}"
        state.take(await asyncio.wait_for(anext(messages), left))
