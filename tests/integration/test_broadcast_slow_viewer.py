"""A viewer that stops reading is skipped, then disconnected and counted; the others keep up."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from pipeline.harness.local_servers import Endpoints
from tests.integration.test_broadcast_harness import Node, RootStandIn, ViewerState, next_message, token
from topologies.live_likes import TOPOLOGY as LIVE

pytestmark = pytest.mark.integration


def stalled_viewer(port: int, query: str) -> socket.socket:
    """A WebSocket client with a tiny receive window that never reads past the handshake."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /v1/ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: nothing after the headers is consumed
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def test_stalled_viewer_is_dropped_and_counted_while_a_fast_one_keeps_receiving(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = LIVE.renamed(unique_name)
    root = await RootStandIn(servers, topology).start()
    node = await Node(
        servers,
        topology,
        tmp_path,
        push_rate=10,
        max_blocked_s=1,
        max_lag_bytes=16384,  # type: ignore[arg-type]
    ).start()
    keys = {f"comment-{i:05d}": 1 for i in range(2000)}  # ~60 KB per push: the socket fills fast
    try:
        await root.add("big", {"comment-00000": 1})
        query = f"token={token('slow', ['big'])}&channels=big"
        slow = await asyncio.to_thread(stalled_viewer, node.port, query)
        async with aiohttp.ClientSession() as s:
            fast = await s.ws_connect(f"{node.url}/v1/ws?token={token('fast', ['big'])}&channels=big")
            state = ViewerState()
            state.take(await next_message(fast))
            reader = asyncio.create_task(_read_forever(fast, state))
            deadline = time.monotonic() + 15
            while (await node.stats())["slow_disconnected"] == 0:
                assert time.monotonic() < deadline, "the stalled viewer was never disconnected"
                assert not reader.done(), reader
                await root.add("big", keys)
                await asyncio.sleep(0.1)
            stats = await node.stats()
            assert stats["viewers"] == {"ws": 1, "sse": 0}
            assert await asyncio.to_thread(closed_by_peer, slow, 5.0)
            # the fast viewer is still served, and in order
            seen = state.seq["big"]
            for _ in range(2):
                last = await root.add("big", {"comment-00001": 1})
            while state.seq["big"] < last:
                assert not reader.done(), reader
                await asyncio.sleep(0.05)
            assert state.seq["big"] > seen
            assert state.values["big"]["comment-00001"] == root.totals[("big", "comment-00001")]
            reader.cancel()
            await fast.close()
        slow.close()
    finally:
        node.stop()
        await root.stop()


async def _read_forever(ws: aiohttp.ClientWebSocketResponse, state: ViewerState) -> None:
    while True:
        state.take(await next_message(ws, 30))
