"""A broadcast node against the real broker and Redis: what viewers get over WebSocket and SSE,
comments, and what the node refuses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from pipeline.core.topology import Topology
from pipeline.harness.local_servers import Endpoints
from tests.integration.redis_cluster import STORES, on_store
from tests.integration.test_broadcast_harness import (
    Node,
    RootStandIn,
    ViewerState,
    next_message,
    sse_messages,
    sse_until,
    token,
    until,
)
from topologies.live_likes import TOPOLOGY as LIVE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=STORES)
def servers(request: pytest.FixtureRequest, servers: Endpoints) -> Endpoints:
    """Every test here on one Redis and on a 3-master Redis Cluster (the node reads its snapshots there)."""
    return on_store(request, servers)


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    yield LIVE.renamed("t" + uuid.uuid4().hex[:10])


@pytest.fixture(scope="module")
async def root(servers: Endpoints, topology: Topology) -> AsyncIterator[RootStandIn]:
    stand_in = await RootStandIn(servers, topology).start()
    yield stand_in
    await stand_in.stop()


@pytest.fixture(scope="module")
async def node(
    servers: Endpoints, topology: Topology, root: RootStandIn, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Node]:
    n = await Node(servers, topology, tmp_path_factory.mktemp("broadcast")).start()
    yield n
    n.stop()


async def test_ws_snapshot_then_changed_keys_of_subscribed_channels_only(
    node: Node, root: RootStandIn
) -> None:
    await root.add("a1", {"c1": 2, "c2": 1})
    await root.add("a2", {"x": 5})
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"{node.url}/v1/ws?token={token('v1', ['a1', 'a2'])}&channels=a1")
        first = await next_message(ws)
        assert first == {
            "type": "snapshot",
            "channel": "a1",
            "seq": 1,
            "values": [["likes", "c1", 2], ["likes", "c2", 1]],
            "top": [],
        }
        state = ViewerState()
        state.take(first)
        await root.add("a2", {"x": 1})
        seq = await root.add("a1", {"c1": 3})
        await until(ws, state, lambda st: st.seq.get("a1", 0) >= seq)
        assert state.messages[-1] == {
            "type": "update",
            "channel": "a1",
            "seq": 2,
            "values": [["likes", "c1", 5]],
        }
        assert {m["channel"] for m in state.messages} == {"a1"}
        # subscribe to another channel in scope: its snapshot, then its updates
        await ws.send_json({"type": "subscribe", "channels": ["a2"]})
        await until(ws, state, lambda st: "a2" in st.seq)
        assert state.values["a2"] == {"x": 6}
        await ws.send_json({"type": "unsubscribe", "channels": ["a1"]})
        await asyncio.sleep(0.3)
        await root.add("a1", {"c1": 1})
        a2 = await root.add("a2", {"x": 1})
        await until(ws, state, lambda st: st.seq["a2"] >= a2)
        await asyncio.sleep(0.5)
        assert state.seq["a1"] == seq and state.values["a2"] == {"x": 7}
        await ws.close()


async def test_sse_gets_the_same_protocol_with_resumable_ids(node: Node, root: RootStandIn) -> None:
    await root.add("b1", {"k": 1})
    async with aiohttp.ClientSession() as s:
        response = await s.get(f"{node.url}/v1/sse?token={token('v2', ['b1'])}&channels=b1")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        messages = sse_messages(response)  # checks event: and id: against each message
        state = ViewerState()
        await sse_until(messages, state, lambda st: "b1" in st.seq)
        assert state.messages[0]["type"] == "snapshot" and state.values["b1"] == {"k": 1}
        for _ in range(3):
            seq = await root.add("b1", {"k": 1, "j": 2})
        await sse_until(messages, state, lambda st: st.seq["b1"] >= seq)
        assert state.values["b1"] == {"k": 4, "j": 6}
        response.close()


async def test_comments_reach_viewers_with_their_like_counts(node: Node, root: RootStandIn) -> None:
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"{node.url}/v1/ws?token={token('v3', ['*'])}&channels=c1")
        state = ViewerState()
        await until(ws, state, lambda st: "c1" in st.seq)
        await root.comment("c1", "comment-7", "hello")
        await until(ws, state, lambda st: st.messages[-1]["type"] == "comments")
        assert state.messages[-1] == {
            "type": "comments",
            "channel": "c1",
            "items": [
                {
                    "id": "e-comment-7",
                    "key": "comment-7",
                    "user": "u1",
                    "text": "hello",
                    "ts": None,
                    "likes": 0,
                }
            ],
        }
        await root.add("c1", {"comment-7": 4})

        def resent(st: ViewerState) -> bool:
            return any(m["type"] == "comments" and m["items"][0]["likes"] == 4 for m in st.messages)

        await until(ws, state, resent)
        await ws.close()


def _refusals(node: Node) -> list[tuple[str, str, int]]:
    """(query, reason, SSE status) for each way a token is refused."""
    expired = token("v", ["d1"], ttl_s=-10)
    forged = token("v", ["d1"], secret="not the node's secret")
    return [
        ("channels=d1", "missing", 401),
        (f"token={forged}&channels=d1", "bad_signature", 401),
        (f"token={expired}&channels=d1", "expired", 401),
        (f"token={token('v', ['d1'])}&channels=d2", "out_of_scope", 403),
    ]


async def test_refused_tokens_over_ws_and_sse(node: Node) -> None:
    before: dict[str, Any] = (await node.stats())["refused_by_reason"]
    async with aiohttp.ClientSession() as s:
        for query, reason, status in _refusals(node):
            ws = await s.ws_connect(f"{node.url}/v1/ws?{query}")
            error = await next_message(ws)
            assert error["type"] == "error" and error["reason"]
            closing = await ws.receive(timeout=5)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert (ws.close_code, closing.extra) == (1008, reason)
            async with s.get(f"{node.url}/v1/sse?{query}") as response:
                assert response.status == status
                assert (await response.json())["type"] == "error"
    after = (await node.stats())["refused_by_reason"]
    for _, reason, _ in _refusals(node):
        assert after.get(reason, 0) - before.get(reason, 0) == 2


async def test_client_messages_are_limited(node: Node) -> None:
    url = f"{node.url}/v1/ws?token={token('v4', ['e1'])}&channels=e1"
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(url)
        await ws.send_json({"type": "subscribe", "channels": ["e2"]})  # outside the token's scope
        msg = await ws.receive(timeout=5)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)
        assert (ws.close_code, msg.extra) == (1008, "out_of_scope")

        ws = await s.ws_connect(url)
        await ws.send_str('{"type":"subscribe","channels":["' + "x" * 5000 + '"]}')
        while (msg := await ws.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT:
            pass
        assert ws.close_code == 1009  # message too big

        ws = await s.ws_connect(url)
        for _ in range(20):
            if ws.closed:
                break
            await ws.send_json({"type": "unsubscribe", "channels": ["nothing"]})
        while (msg := await ws.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT:
            pass
        assert (ws.close_code, msg.extra) == (1008, "rate")
