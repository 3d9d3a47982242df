"""The operator's Grafana dashboard and Prometheus alert rules name only metrics the workers export.

ops/grafana/pipeline.json and ops/prometheus/alerts.yml are loaded; every `pipeline_*` metric their
queries name must be exported by a running worker: tier 1, a root and a broadcast node run as processes,
events and a viewer go through them, and their real /metrics endpoints are scraped. The metrics that
count traffic must also hold samples of this topology. With promtool on PATH the rules are checked too.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml

from pipeline.core import tokens
from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events, wait_for_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "pipeline.json"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
SECRET = "grafana-test-secret"
NAME = re.compile(r"\bpipeline_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# metrics the traffic below must give samples of (the others count failures, which a healthy run has none of)
TRAFFIC = {
    "pipeline_events_in_total",
    "pipeline_partials_out_total",
    "pipeline_partials_in_total",
    "pipeline_cells_out_total",
    "pipeline_redis_commands_total",
    "pipeline_redis_applies_total",
    "pipeline_transactions_total",
    "pipeline_consumer_lag",
    "pipeline_coalescing_ratio",
    "pipeline_dead_letters_total",
    "pipeline_broadcast_viewers",
    "pipeline_broadcast_pushes_total",
    "pipeline_comment_history_appended_total",
    "pipeline_window_flush_seconds_bucket",
    "pipeline_transaction_commit_seconds_bucket",
    "pipeline_root_apply_seconds_bucket",
    "pipeline_broadcast_push_age_seconds_bucket",
}


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
    for var in doc.get("templating", {}).get("list", []):
        query = var.get("query")
        out.append(query["query"] if isinstance(query, dict) else str(query or ""))
    return out


def alert_queries() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def exported(name: str, scrapes: list[str]) -> bool:
    """A family the endpoint declares (# TYPE), or a histogram's series of one."""
    bases = [name] + [name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)]
    for text in scrapes:
        for base in bases:
            if re.search(rf"^# TYPE {re.escape(base)} ", text, re.M):
                return True
    return False


def has_samples(name: str, scrapes: list[str], topology: str) -> bool:
    pattern = re.compile(rf'^{re.escape(name)}\{{[^}}]*topology="{re.escape(topology)}"[^}}]*\}} ', re.M)
    return any(pattern.search(text) for text in scrapes)


def test_the_dashboard_and_the_rules_cover_what_operators_asked_for() -> None:
    doc = json.loads(DASHBOARD.read_text())
    titles = " / ".join(p["title"].lower() for p in doc["panels"])
    for words in ("events in", "partials", "coalescing ratio", "lag per partition", "aborts", "dead letters"):
        assert words in titles, words
    for words in ("redis commands", "viewers", "pushes", "window flush", "commit", "apply", "age at push"):
        assert words in titles, words
    named = {n for q in dashboard_queries() for n in NAME.findall(q)}
    for histogram in ("window_flush", "transaction_commit", "root_apply", "broadcast_push_age"):
        assert f"pipeline_{histogram}_seconds_bucket" in named
    alerts = {rule["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]}
    want = {"PipelineLagGrowing", "PipelineTransactionAborts", "PipelineDeadLetters", "PipelineRootStalled"}
    assert want | {"PipelineSlowViewersDropped"} <= alerts
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    if shutil.which("promtool"):
        subprocess.run(["promtool", "check", "rules", str(ALERTS)], check=True, capture_output=True)


async def test_every_metric_the_dashboard_and_the_rules_name_is_exported_by_running_workers(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    await pipe.create_topics()
    ports = {tier: free_port() for tier in ("coalesce", "merge", "broadcast")}
    node_port = free_port()
    for tier in ("coalesce", "merge", "broadcast"):
        env = {"PIPELINE_BROADCAST_SECRET": SECRET, "PIPELINE_BROADCAST_PORT": str(node_port)}
        w = WorkerProcess(
            "live_likes",
            tier,
            "g1",
            servers.kafka_bootstrap,
            servers.redis_url,
            tmp_path,
            name=unique_name,
            metrics_port=ports[tier],
            extra_env=env if tier == "broadcast" else None,
        )
        pipe.workers.append(w.start())
    try:
        token = tokens.issue(SECRET.encode(), "op-viewer", ["video-g"], int(time.time()) + 600)
        async with aiohttp.ClientSession() as session:
            ws = await connect(session, f"http://127.0.0.1:{node_port}", token, pipe)
            ledger: Counter[LedgerKey] = Counter()
            events: list[dict[str, object]] = [
                {"type": "like", "key": f"k{i % 5}", "channel": "video-g"} for i in range(300)
            ]
            events += [{"type": "comment", "key": "c1", "channel": "video-g", "text": "hi"}, {"type": "like"}]
            await send_events(servers.kafka_bootstrap, topology.topic("events"), events, ledger)
            want = Counter({k: v for k, v in ledger.items() if k[1].startswith("k")})
            got = await wait_for_totals(servers.redis_url, topology, "likes", want, 60)
            assert got == dict(want), pipe.logs()
            await read_until_update(ws)
            await asyncio.sleep(2.5)  # lag gauges refresh every 2 s
            deadline = time.monotonic() + 30  # and the root's feed group may still be joining
            while not has_samples(
                "pipeline_comment_history_appended_total", [scrape(ports["merge"])], unique_name
            ):
                assert time.monotonic() < deadline, pipe.logs()
                await asyncio.sleep(0.5)
            scrapes = [scrape(port) for port in ports.values()]
            await ws.close()
    finally:
        pipe.stop()

    named = {n for q in dashboard_queries() + alert_queries() for n in NAME.findall(q)}
    assert len(named) >= 20
    missing = sorted(n for n in named if not exported(n, scrapes))
    assert not missing, f"named but exported by no worker: {missing}"
    silent = sorted(n for n in named & TRAFFIC if not has_samples(n, scrapes, unique_name))
    assert not silent, f"no samples after traffic: {silent}"


async def connect(
    session: aiohttp.ClientSession, url: str, token: str, pipe: Pipeline
) -> aiohttp.ClientWebSocketResponse:
    deadline = time.monotonic() + 30
    while True:
        try:
            return await session.ws_connect(f"{url}/v1/ws?token={token}&channels=video-g")
        except (aiohttp.ClientError, OSError):
            assert time.monotonic() < deadline, pipe.logs()
            await asyncio.sleep(0.3)


async def read_until_update(ws: aiohttp.ClientWebSocketResponse) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("type") == "update":
            return
    raise AssertionError("the viewer got no update")
