"""Each worker serves Prometheus metrics an operator can graph."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from tests.integration.pipeline_harness import LedgerKey, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_workers_expose_throughput_ratio_lag_and_dead_letters(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    ports = {"coalesce": free_port(), "merge": free_port()}
    workers = []
    for tier, port in ports.items():
        w = WorkerProcess(
            "live_likes",
            tier,
            "x1",
            servers.kafka_bootstrap,
            servers.redis_url,
            tmp_path,
            name=unique_name,
            metrics_port=port,
        )
        workers.append(w.start())
    try:
        ledger: Counter[LedgerKey] = Counter()
        events = [{"type": "like", "key": f"k{i % 10}", "channel": "v"} for i in range(500)]
        events.append({"type": "like"})  # a dead letter: no key
        await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)
        got = await wait_for_totals(
            servers.redis_url, topology, "likes", Counter({("v", f"k{i}"): 50 for i in range(10)}), 60
        )
        assert sum(got.values()) == 500
        await asyncio.sleep(2.5)  # the lag gauge is refreshed every 2 s
        labels = {"topology": unique_name}
        tier1 = _scrape(ports["coalesce"])
        assert _value(tier1, "pipeline_events_in_total", **labels) == 500
        assert _value(tier1, "pipeline_dead_letters_total", **labels, field="key") == 1
        partials = _value(tier1, "pipeline_partials_out_total", **labels)
        assert partials >= 1
        assert _value(tier1, "pipeline_coalescing_ratio", **labels) == pytest.approx(500 / partials)
        assert re.search(r'pipeline_consumer_lag\{[^}]*partition="\d"[^}]*\} 0\.0', tier1)
        tier2 = _scrape(ports["merge"])
        assert _value(tier2, "pipeline_partials_in_total", **labels) == partials
        assert _value(tier2, "pipeline_redis_commands_total", **labels) > 0
        assert _value(tier2, "pipeline_coalescing_ratio", **labels) > 0
    finally:
        for w in workers:
            w.stop()
