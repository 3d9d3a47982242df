"""Scale-out: 3 tier-1 workers, 2 root mergers and 2 broadcast nodes, sharing nothing
but Kafka and Redis. While events stream in, a worker of each tier joins, then one
of each tier is stopped gracefully: every count stays exact and every viewer,
including those of the node that left, ends up watching the exact totals."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from pipeline.harness.local_servers import Endpoints
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from tests.integration.test_broadcast_harness import Node, token
from topologies.live_likes import TOPOLOGY as LIVE

pytestmark = pytest.mark.integration

CHANNELS = ["video-1", "video-2", "video-3"]
VIEWERS = [f"viewer-{i}" for i in range(12)]


class FollowingViewer:
    """A viewer page: asks any node for its node, follows redirects, and on a lost
    connection asks again and resumes with `since` (docs/BROADCAST.md)."""

    def __init__(self, viewer: str, channel: str) -> None:
        self.viewer = viewer
        self.channel = channel
        self.seq = -1
        self.values: dict[str, float] = {}
        self.nodes_seen: list[str] = []

    async def run(self, session: aiohttp.ClientSession, nodes: list[Node], stop: asyncio.Event) -> None:
        url: str | None = None
        while not stop.is_set():
            try:
                if url is None:
                    url = await self._route(session, nodes)
                query = f"token={token(self.viewer, [self.channel])}&channels={self.channel}"
                if self.seq >= 0:
                    query += f"&since={self.channel}:{self.seq}"
                self.nodes_seen.append(url)
                async with session.ws_connect(f"{url}/v1/ws?{query}") as ws:
                    url = None
                    async for msg in ws:
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            break
                        body = orjson.loads(msg.data)
                        if body["type"] == "redirect":
                            url = body["url"]
                            break
                        self._take(body)
            except (aiohttp.ClientError, OSError, TimeoutError):
                url = None
                await asyncio.sleep(0.2)

    async def _route(self, session: aiohttp.ClientSession, nodes: list[Node]) -> str:
        for node in random.sample(nodes, len(nodes)):
            if not node.proc.running:
                continue
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"{node.url}/v1/route?viewer={self.viewer}") as r:
                    if r.status == 200:
                        return str((await r.json())["url"])
        raise aiohttp.ClientConnectionError("no node answers /v1/route")

    def _take(self, msg: dict[str, Any]) -> None:
        if msg["type"] not in ("snapshot", "update") or msg["channel"] != self.channel:
            return
        assert msg["seq"] >= self.seq, f"{self.viewer} stepped back: {msg['seq']} < {self.seq}"
        values = {k: v for m, k, v in msg["values"] if m == "likes"}
        if msg["type"] == "snapshot":
            self.values = values
        else:
            self.values.update(values)
        self.seq = msg["seq"]


async def test_adding_and_removing_a_worker_of_each_tier_keeps_counts_exact_and_viewers_served(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = LIVE.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    coalesce = [pipe.add("coalesce", f"c{i}") for i in (1, 2, 3)]
    merge = [pipe.add("merge", f"m{i}") for i in (1, 2)]
    nodes = [Node(servers, topology, tmp_path, instance=f"b{i}") for i in (1, 2, 3)]
    ledger: Counter[LedgerKey] = Counter()
    viewers = [FollowingViewer(v, CHANNELS[i % len(CHANNELS)]) for i, v in enumerate(VIEWERS)]
    stop_viewers, stop_writer = asyncio.Event(), asyncio.Event()

    async def write() -> None:
        n = 0
        while not stop_writer.is_set():
            batch = [
                {"type": "like", "key": f"comment-{(n + i) % 25}", "channel": CHANNELS[(n + i) % 3]}
                for i in range(300)
            ]
            n += len(batch)
            await send_events(servers.kafka_bootstrap, topology.topic("events"), batch, ledger)
            await asyncio.sleep(0.05)

    def served() -> bool:
        want = {ch: {k: n for (c, k), n in ledger.items() if c == ch} for ch in CHANNELS}
        return all(v.values == want[v.channel] for v in viewers)

    try:
        await nodes[0].start(timeout_s=60)
        await nodes[1].start(timeout_s=60)
        async with aiohttp.ClientSession() as session:
            watching = [asyncio.create_task(v.run(session, nodes, stop_viewers)) for v in viewers]
            try:
                writer = asyncio.create_task(write())
                await asyncio.sleep(4)
                # scale out: one more of each tier
                coalesce.append(pipe.add("coalesce", "c4"))
                merge.append(pipe.add("merge", "m3"))
                await nodes[2].start(timeout_s=60)
                await asyncio.sleep(6)
                # scale in, gracefully: the first of each tier leaves
                for worker in (coalesce[0], merge[0]):
                    assert worker.stop() == 0, worker.log_tail()
                nodes[0].stop()
                await asyncio.sleep(6)
                stop_writer.set()
                await writer

                got = await wait_for_totals(servers.redis_url, topology, "likes", ledger, timeout_s=60)
                assert got == dict(ledger), pipe.logs()
                for worker in (coalesce[0], merge[0]):  # they handed their partitions over
                    assert '"ok": true' in worker.log_tail(40) and "left the group" in worker.log_tail(40)
                for _ in range(100):
                    if served():
                        break
                    await asyncio.sleep(0.2)
            finally:
                stop_viewers.set()
                for task in watching:
                    task.cancel()
                await asyncio.gather(*watching, return_exceptions=True)
        assert served(), [(v.viewer, v.seq, sum(v.values.values())) for v in viewers]
        left = nodes[0].url
        moved = [v for v in viewers if left in v.nodes_seen]
        assert moved, "no viewer was on the node that left"
        assert all(v.nodes_seen[-1] != left for v in moved)  # they moved on to a live node
    finally:
        stop_writer.set()
        for node in nodes:
            node.stop()
        pipe.stop()
