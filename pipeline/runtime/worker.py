"""Process lifecycle shared by every tier: logging, metrics endpoint, signals."""

from __future__ import annotations

import asyncio
import importlib
import signal
from typing import Protocol

from redis.exceptions import AuthenticationError as RedisAuthenticationError

from pipeline.core.topology import Topology
from pipeline.io import kafka, redis_client
from pipeline.runtime import memory_trim
from pipeline.runtime import observability as obs
from pipeline.runtime.settings import Settings

EXIT_REFUSED = 3  # a server refused the credentials or the certificate


class Tier(Protocol):
    tier: str

    async def run(self, stop: asyncio.Event) -> None: ...


TIERS = {
    "coalesce": "pipeline.tiers.coalesce:CoalesceWorker",
    "merge": "pipeline.tiers.merge:MergeWorker",
    "ingest": "pipeline.tiers.ingest:IngestWorker",
    "broadcast": "pipeline.tiers.broadcast:BroadcastNode",
    "sink": "pipeline.tiers.sink:SinkWorker",
}


def load_topology(name: str) -> Topology:
    """`live_likes` loads topologies/live_likes.py; `package.module:ATTR` loads anything else."""
    module_name, _, attr = name.partition(":")
    if "." not in module_name:
        module_name = f"topologies.{module_name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SystemExit(f"no topology {name!r}: {exc}") from None
    topology = getattr(module, attr or "TOPOLOGY", None)
    if not isinstance(topology, Topology):
        raise SystemExit(f"{module_name} has no Topology named {attr or 'TOPOLOGY'}")
    return topology


def make_worker(tier: str, topology: Topology, settings: Settings) -> Tier:
    module_name, _, cls = TIERS[tier].partition(":")
    worker: Tier = getattr(importlib.import_module(module_name), cls)(topology, settings)
    return worker


def run(tier: str, topology: Topology, settings: Settings) -> None:
    """Run one worker until SIGTERM/SIGINT; a second signal is not needed."""
    obs.configure_logging(settings.log_level)
    port = obs.serve_metrics(settings.metrics_port, settings.metrics_host)
    obs.log(topology=topology.name, tier=tier, instance=settings.instance).info(
        "metrics", url=f"http://{settings.metrics_host}:{port}/metrics"
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        trimming = asyncio.create_task(memory_trim.trim_every(settings.memory_trim_interval_s, stop))
        try:
            await make_worker(tier, topology, settings).run(stop)
        finally:
            stop.set()
            await trimming

    try:
        asyncio.run(main())
    except (kafka.AccessRefused, RedisAuthenticationError) as exc:
        # a refused password or certificate: no retry will cure it, so stop with what happened
        server = (
            "kafka"
            if isinstance(exc, kafka.AccessRefused)
            else f"redis at {redis_client.redact(settings.redis)}"
        )
        obs.log(topology=topology.name, tier=tier, instance=settings.instance).error(
            "refused", server=server, error=str(exc)
        )
        raise SystemExit(EXIT_REFUSED) from None
