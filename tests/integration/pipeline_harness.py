"""What the integration tests share: a ledger of acknowledged events, workers as
processes, and waiting until Redis agrees with the ledger."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from pipeline.core.model import message_key
from pipeline.core.topology import Topology
from pipeline.harness.local_servers import Endpoints
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import kafka
from pipeline.read import Reader

LedgerKey = tuple[str, str]  # (channel, key)


async def send_events(
    bootstrap: str,
    topic: str,
    events: Iterable[dict[str, object]],
    ledger: Counter[LedgerKey],
    retries: Iterable[dict[str, object]] = (),
) -> None:
    """Send events; add to the ledger exactly those the broker acknowledged.

    `retries` are re-sends of events already sent (same id): acknowledged, never counted.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5)
    await producer.start()
    try:
        sent = []
        for ev, counts in [(e, True) for e in events] + [(e, False) for e in retries]:
            key = str(ev.get("key", ""))
            sub = int(ev.get("sub", 0))  # type: ignore[call-overload]
            fut = await producer.send(topic, orjson.dumps(ev), key=message_key(key, sub))
            sent.append((fut, (str(ev.get("channel", "")), key), counts))
        for fut, cell, counts in sent:
            await fut
            if counts:
                ledger[cell] += 1
    finally:
        await producer.stop()


async def wait_for_totals(
    redis_url: str, topology: Topology, metric: str, expected: Counter[LedgerKey], timeout_s: float
) -> dict[LedgerKey, float]:
    """Poll until every key's total equals the ledger (or time runs out); return what Redis holds."""
    want = sum(expected.values())
    deadline = time.monotonic() + timeout_s
    async with Reader.from_url(topology, redis_url) as reader:
        while True:
            got = await reader.key_totals(metric)
            if sum(got.values()) >= want and got == dict(expected):
                return got
            if time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.5)


async def settled_totals(
    redis_url: str, topology: Topology, metric: str, at_least: float, timeout_s: float, quiet_s: float = 3.0
) -> dict[LedgerKey, float]:
    """What Redis holds once it has settled: at least `at_least` counted in all, then no value changed
    for `quiet_s` (so a late double count would show), or what it holds when time runs out."""
    deadline = time.monotonic() + timeout_s
    async with Reader.from_url(topology, redis_url) as reader:
        last = await reader.key_totals(metric)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            got = await reader.key_totals(metric)
            if got != last:
                last, quiet_since = got, time.monotonic()
            elif sum(got.values()) >= at_least and time.monotonic() - quiet_since >= quiet_s:
                break
        return last


class Pipeline:
    """A topology's workers as real processes against the test servers."""

    def __init__(
        self,
        servers: Endpoints,
        topology: Topology,
        base: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.servers = servers
        self.topology = topology
        self.base = base
        self.log_dir = log_dir
        self.env = env or {}  # extra PIPELINE_* settings for every worker (credentials, ...)
        self.workers: list[WorkerProcess] = []

    async def create_topics(self) -> None:
        await kafka.ensure_topics(self.servers.kafka_bootstrap, kafka.topology_topics(self.topology))

    def add(self, tier: str, instance: str) -> WorkerProcess:
        w = WorkerProcess(
            self.base,
            tier,
            instance,
            self.servers.kafka_bootstrap,
            self.servers.redis_url,
            self.log_dir,
            name=self.topology.name,
            extra_env=self.env,
        )
        self.workers.append(w)
        return w.start()

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log_tail(15)}" for w in self.workers)
