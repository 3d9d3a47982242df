"""Resume without gaps, through the whole pipeline: events -> tier 1 -> root -> Redis and the
updates topic -> broadcast node -> viewers that disconnect and come back with `since`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.harness.local_servers import Endpoints
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from tests.integration.redis_cluster import STORES, on_store
from tests.integration.test_broadcast_harness import (
    Node,
    ViewerState,
    next_message,
    sse_messages,
    sse_until,
    token,
    until,
)
from topologies.live_likes import TOPOLOGY as LIVE

pytestmark = pytest.mark.integration


@pytest.fixture(params=STORES)
def servers(request: pytest.FixtureRequest, servers: Endpoints) -> Endpoints:
    """On one Redis and on a 3-master Redis Cluster (key layout 2 on both)."""
    return on_store(request, servers)

CHANNEL = "video-1"


def likes(n: int, start: int) -> list[dict[str, object]]:
    """n likes on 8 comments of CHANNEL, and some on another video nobody here watches."""
    return [
        {"type": "like", "key": f"comment-{i % 8}", "channel": CHANNEL if i % 5 else "video-2"}
        for i in range(start, start + n)
    ]


async def test_viewers_resume_with_since_without_gaps_over_ws_and_sse(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = LIVE.renamed(unique_name)
    pipeline = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipeline.create_topics()
    pipeline.add("coalesce", "c1")
    pipeline.add("merge", "m1")
    node = await Node(servers, topology, tmp_path).start()
    ledger: Counter[LedgerKey] = Counter()
    events = topology.topic("events")

    def current(st: ViewerState) -> bool:
        want = {k: v for (ch, k), v in ledger.items() if ch == CHANNEL}
        return st.values.get(CHANNEL) == want

    try:
        async with aiohttp.ClientSession() as s:
            query = f"token={token('viewer-1', [CHANNEL])}&channels={CHANNEL}"
            ws = await s.ws_connect(f"{node.url}/v1/ws?{query}")
            sse = await s.get(f"{node.url}/v1/sse?{query}")
            ws_state, sse_state = ViewerState(), ViewerState()
            sse_stream = sse_messages(sse)
            await send_events(servers.kafka_bootstrap, events, likes(300, 0), ledger)
            await until(ws, ws_state, current, timeout_s=15)
            await sse_until(sse_stream, sse_state, current, timeout_s=15)
            left_at = {"ws": ws_state.seq[CHANNEL], "sse": sse_state.seq[CHANNEL]}
            await ws.close()
            sse.close()

            # while they are away
            await send_events(servers.kafka_bootstrap, events, likes(300, 300), ledger)
            redis_totals = await wait_for_totals(servers.redis_url, topology, "likes", ledger, 15)
            assert redis_totals == dict(ledger)

            ws = await s.ws_connect(f"{node.url}/v1/ws?{query}&since={CHANNEL}:{left_at['ws']}")
            sse = await s.get(f"{node.url}/v1/sse?{query}&since={CHANNEL}:{left_at['sse']}")
            sse_stream = sse_messages(sse)
            firsts = {"ws": await next_message(ws), "sse": await anext(sse_stream)}
            for name, first in firsts.items():
                assert first["type"] == "snapshot", name
                assert first["seq"] > left_at[name], name  # fresh from Redis, and forward
                assert _likes(first) == {k: v for (ch, k), v in ledger.items() if ch == CHANNEL}, name
            # and the live stream goes on from there, in order (ViewerState refuses a step back)
            ws_state, sse_state = ViewerState(), ViewerState()
            ws_state.take(firsts["ws"])
            sse_state.take(firsts["sse"])
            await send_events(servers.kafka_bootstrap, events, likes(200, 600), ledger)
            await until(ws, ws_state, current, timeout_s=15)
            await sse_until(sse_stream, sse_state, current, timeout_s=15)
            assert all(m["type"] != "snapshot" for m in ws_state.messages[1:] + sse_state.messages[1:])
            await ws.close()
            sse.close()
    finally:
        node.stop()
        pipeline.stop()


def _likes(snapshot: dict[str, Any]) -> dict[str, float]:
    return {k: v for m, k, v in snapshot["values"] if m == "likes"}
