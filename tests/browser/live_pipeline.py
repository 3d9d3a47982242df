"""A live_likes pipeline for the browser tests: tier 1, the root and one broadcast node as
worker processes against the session's real servers, and a ledger of what was sent."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp

from pipeline.core import tokens
from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events
from topologies.live_likes import TOPOLOGY

NODE_START_TIMEOUT_S = 30.0


class LivePipeline:
    """live_likes under a fresh name: tier 1, the root and one broadcast node, as processes."""

    def __init__(self, servers: Endpoints, log_dir: Path) -> None:
        self.servers = servers
        self.topology = TOPOLOGY.renamed("t" + uuid.uuid4().hex[:10])
        self.pipe = Pipeline(servers, self.topology, "live_likes", log_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = uuid.uuid4().hex  # signs viewer tokens
        self.operator_key = "op-" + uuid.uuid4().hex  # opens the dashboard
        self.likes: Counter[LedgerKey] = Counter()  # like events the broker acknowledged
        self.events = 0  # every acknowledged event (likes and comments)
        self.node = WorkerProcess(
            "live_likes",
            "broadcast",
            "b1",
            servers.kafka_bootstrap,
            servers.redis_url,
            log_dir,
            extra_env={
                "PIPELINE_BROADCAST_PORT": str(self.port),
                "PIPELINE_BROADCAST_SECRET": self.secret,
                "PIPELINE_BROADCAST_DEV_TOKENS": "true",
                "PIPELINE_OPERATOR_API_KEYS": self.operator_key,
            },
            name=self.topology.name,
        )

    async def start(self) -> None:
        await self.pipe.create_topics()
        self.pipe.add("coalesce", "c1")
        self.pipe.add("merge", "m1")
        self.pipe.workers.append(self.node)
        self.node.start()
        await self.wait_for_node()

    async def wait_for_node(self) -> None:
        """Until the node answers on its port (it registers in Redis before it serves)."""
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(self.url + "/v1/node") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if not self.node.running or time.monotonic() > deadline:
                    raise RuntimeError(f"broadcast node did not start\n{self.pipe.logs()}")
                await asyncio.sleep(0.2)

    def viewer_token(self, *channels: str, viewer: str = "browser-viewer", ttl_s: int = 3600) -> str:
        """A viewer token for `channels` (or every channel), as the application's backend would mint it."""
        return tokens.issue(self.secret.encode(), viewer, channels or ["*"], int(time.time()) + ttl_s)

    async def restart_node(self) -> None:
        self.node.stop()
        self.node.start()
        await self.wait_for_node()

    async def send(self, events: list[dict[str, object]]) -> None:
        """Send events to the events topic; count what the broker acknowledged."""
        acked: Counter[LedgerKey] = Counter()
        await send_events(self.servers.kafka_bootstrap, self.topology.topic("events"), events, acked)
        self.events += sum(acked.values())
        for e in events:
            if e["type"] == "like":
                self.likes[(str(e["channel"]), str(e["key"]))] += 1

    def stop(self) -> None:
        self.pipe.stop()
