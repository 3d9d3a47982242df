"""Which node a viewer belongs to: consistent hashing over the live nodes registered in Redis,
the route endpoint, redirects, and what moves when a node joins or leaves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from pipeline.harness.local_servers import Endpoints
from pipeline.io.node_registry import NodeRegistry, Ring
from tests.integration.test_broadcast_harness import Node, RootStandIn, next_message, sse_messages, token
from topologies.live_likes import TOPOLOGY as LIVE

pytestmark = pytest.mark.integration

VIEWERS = [f"viewer-{i}" for i in range(10_000)]


def owners(ring: Ring) -> dict[str, str | None]:
    return {v: ring.owner(v) for v in VIEWERS}


async def test_a_joining_or_leaving_node_moves_only_the_viewers_whose_node_changed(
    servers: Endpoints, unique_name: str
) -> None:
    client = aioredis.Redis.from_url(servers.redis_url)
    nodes = [NodeRegistry(client, unique_name, f"n{i}", f"http://n{i}:8765", ttl_s=30) for i in range(4)]
    try:
        for n in nodes[:3]:
            await n.heartbeat()
        three = owners(await nodes[0].live())
        assert set(three.values()) == {"n0", "n1", "n2"}

        await nodes[3].heartbeat()  # 3 -> 4
        four = owners(await nodes[0].live())
        moved = [v for v in VIEWERS if three[v] != four[v]]
        assert all(four[v] == "n3" for v in moved)  # nobody moves between two nodes that stayed
        assert 0.17 < len(moved) / len(VIEWERS) < 0.33  # about a quarter

        await nodes[1].leave()  # 4 -> 3: exactly the leaving node's viewers move
        left = owners(await nodes[0].live())
        moved = [v for v in VIEWERS if four[v] != left[v]]
        assert set(moved) == {v for v in VIEWERS if four[v] == "n1"}

        # a node that stops heartbeating drops out by itself when its entry expires
        short = NodeRegistry(client, unique_name, "n9", "http://n9:8765", ttl_s=0.5)
        await short.heartbeat()
        with_short = owners(await nodes[0].live())
        await asyncio.sleep(0.7)
        expired = owners(await nodes[0].heartbeat())
        moved = [v for v in VIEWERS if with_short[v] != expired[v]]
        assert moved and set(moved) == {v for v in VIEWERS if with_short[v] == "n9"}
        assert expired == left
    finally:
        await client.aclose()


async def test_route_redirects_and_a_joining_node_taking_over_its_viewers(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = LIVE.renamed(unique_name)
    root = await RootStandIn(servers, topology).start()
    await root.add("v", {"k": 1})
    b1 = await Node(servers, topology, tmp_path, "b1").start()
    b2: Node | None = None
    try:
        async with aiohttp.ClientSession() as s:
            # viewers connected to b1 while it is alone
            sockets = {}
            for v in VIEWERS[:12]:
                ws = await s.ws_connect(f"{b1.url}/v1/ws?token={token(v, ['v'])}&channels=v")
                assert (await next_message(ws))["type"] == "snapshot"
                sockets[v] = ws
            b2 = await Node(servers, topology, tmp_path, "b2").start()
            deadline = time.monotonic() + 10
            while (await b1.stats())["nodes"] != ["b1", "b2"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            ring = Ring({"b1": b1.url, "b2": b2.url})
            for v in VIEWERS[:20]:  # both nodes answer the same
                answers = []
                for node in (b1, b2):
                    async with s.get(f"{node.url}/v1/route?viewer={v}") as r:
                        answers.append(await r.json())
                owner = ring.owner(v)
                assert answers[0] == answers[1] == {"node_id": owner, "url": ring.url(owner)}  # type: ignore[arg-type]

            # the connected viewers that now belong to b2 are sent there; the others stay
            moving = {v for v in sockets if ring.owner(v) == "b2"}
            assert moving and moving != set(sockets)
            await root.add("v", {"k": 1})
            for v, ws in sockets.items():
                msg = await next_message(ws)
                if v in moving:
                    assert msg == {"type": "redirect", "url": b2.url}
                    assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.CLOSE
                else:
                    assert msg["type"] == "update"
                await ws.close()

            # a viewer arriving at the wrong node: WS redirect message, SSE 307 (followed by EventSource)
            v = next(iter(moving))
            query = f"token={token(v, ['v'])}&channels=v"
            ws = await s.ws_connect(f"{b1.url}/v1/ws?{query}")
            assert await next_message(ws) == {"type": "redirect", "url": b2.url}
            await ws.close()
            async with s.get(f"{b1.url}/v1/sse?{query}", allow_redirects=False) as r:
                assert r.status == 307 and r.headers["Location"] == f"{b2.url}/v1/sse?{query}"
                # the page that follows it comes from another node: the redirect must allow its origin
                assert r.headers["Access-Control-Allow-Origin"] == "*"
            async with s.get(f"{b1.url}/v1/sse?{query}") as r:
                assert str(r.url).startswith(b2.url)
                assert (await anext(sse_messages(r)))["type"] == "snapshot"
            assert (await b1.stats())["redirects"] >= len(moving) + 2

            # b2 leaves: b1 owns everyone again
            b2.stop()
            deadline = time.monotonic() + 10
            while (await b1.stats())["nodes"] != ["b1"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            async with s.get(f"{b1.url}/v1/route?viewer={v}") as r:
                assert (await r.json())["node_id"] == "b1"
    finally:
        b1.stop()
        if b2 is not None:
            b2.stop()
        await root.stop()
