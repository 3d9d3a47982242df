"""Probe events: likes sent while a benchmark's load runs, timed until Redis shows them.

Shared by `pipeline bench hotkey` and `pipeline bench e2e`. A probe is one like
on a (channel, key) that no other event touches, so "visible" is simply "its
field exists in Redis": no baseline to read, nothing to subtract.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from pipeline.client import PipelineClient
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.core.redis_layout import agg_key, key_tag
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL

PROBE_EVERY_S = 0.1
DRAIN_TIMEOUT_S = 60.0
METRIC = "likes"

Probe = tuple[str, str]  # (channel, key)


def channel_per_probe(n: int) -> Probe:
    """Probe n is a like on the key "viral" on a channel of its own (the hot-key bench's probes)."""
    return f"probe-{n}", "viral"


class Prober:
    """Likes, each on a (channel, key) of its own, timed from send until Redis shows them.

    `probe(n)` names the n-th probe's (channel, key). With `split`, the probes go
    over every events partition by id, as a writer that splits the key would send them.
    """

    def tag(self, key: str) -> str:
        """The hash tag of the root partition that holds `key`."""
        return key_tag(self.topology, key)

    def __init__(
        self,
        topology: Topology,
        bootstrap: str,
        redis_url: str,
        split: bool = False,
        probe: Callable[[int], Probe] = channel_per_probe,
        every_s: float = PROBE_EVERY_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
    ) -> None:
        self.topology = topology
        splitter = HotKeySplitter(SplitPolicy(static_k=topology.partitions.events)) if split else None
        self.client = PipelineClient(topology, bootstrap, splitter=splitter, linger_ms=0)
        self.redis = aioredis.Redis.from_url(redis_url)
        self.probe = probe
        self.every_s = every_s
        self.drain_timeout_s = drain_timeout_s
        self.sent_at: dict[Probe, float] = {}  # every probe sent: time.monotonic() just before its send
        self.sent: dict[Probe, float] = {}  # acknowledged probes Redis does not show yet
        self.visible_ms: list[float] = []
        self._n = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Send a probe every `every_s` until `stop`, then wait for the last ones to be visible."""
        await self.client.start()
        try:
            watcher = asyncio.create_task(self._watch(stop))
            while not stop.is_set():
                self._n += 1
                channel, key = self.probe(self._n)
                sent_at = time.monotonic()
                self.sent_at[(channel, key)] = sent_at
                await self.client.send_many([{"type": "like", "key": key, "channel": channel}])
                self.sent[(channel, key)] = sent_at
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.every_s)
            await watcher
        finally:
            await self.client.stop()

    async def _watch(self, stop: asyncio.Event) -> None:
        """Poll for the outstanding probes until all are visible (or, after stop, the drain timeout)."""
        give_up: float | None = None
        while True:
            if stop.is_set() and give_up is None:
                give_up = time.monotonic() + self.drain_timeout_s
            pending = list(self.sent)
            if pending:
                pipe = self.redis.pipeline(transaction=False)
                for channel, key in pending:
                    pipe.hget(agg_key(self.tag(key), METRIC, TOTAL, channel), key)
                seen = await pipe.execute()
                now = time.monotonic()
                for probe, value in zip(pending, seen, strict=True):
                    if value is not None:
                        self.visible_ms.append((now - self.sent.pop(probe)) * 1000)
            elif give_up is not None:
                return
            if give_up is not None and time.monotonic() > give_up:
                return
            await asyncio.sleep(0.02)

    @property
    def lost(self) -> int:
        """Probes acknowledged by the broker that Redis never showed."""
        return len(self.sent)

    async def close(self) -> None:
        await self.redis.aclose()


def percentiles(samples: list[float]) -> dict[str, float | None]:
    """p50 (median) and p99 (nearest rank) in ms, as the benchmarks report them."""
    if not samples:
        return {"p50": None, "p99": None}
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 1),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


async def wait_visible(
    redis_url: str, topology: Topology, channel: str = "warmup", key: str = "w", timeout_s: float = 60.0
) -> None:
    """Until the like on (channel, key) is counted: tiers 1 and 2 are up and have joined their groups."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await client.hget(agg_key(key_tag(topology, key), METRIC, TOTAL, channel), key) is not None:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the pipeline did not count the warm-up event in time")
    finally:
        await client.aclose()


async def warm_up(bootstrap: str, redis_url: str, topology: Topology) -> None:
    """Send one like and wait until Redis counts it, so that no measurement includes start-up."""
    async with PipelineClient(topology, bootstrap, linger_ms=0) as client:
        await client.send_many([{"type": "like", "key": "w", "channel": "warmup"}])
    await wait_visible(redis_url, topology)
