"""Backpressure and load shedding, driven by real tier-1 lag: events pile up on the events topic while no
tier-1 worker runs, the gateway sheds the low class then throttles everything with 429 and Retry-After,
and it recovers by itself once a tier-1 worker drains the lag. Also: 503 when the broker is unreachable."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.harness.local_servers import Endpoints, free_port
from pipeline.harness.supervisor import WorkerProcess
from tests.integration.pipeline_harness import LedgerKey, Pipeline, send_events
from tests.integration.test_ingest_gateway import Gateway, start_gateway
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

LIKES = [{"type": "like", "key": f"l{i}", "channel": "v"} for i in range(5)]
COMMENTS = [{"type": "comment", "key": f"c{i}", "channel": "v", "user": "u"} for i in range(3)]


async def _backlog(servers: Endpoints, pipe: Pipeline, n: int) -> None:
    """n events on the events topic, with no tier-1 worker to read them: lag n."""
    events: list[dict[str, object]] = [
        {"type": "like", "key": f"b{i % 50}", "channel": "backlog"} for i in range(n)
    ]
    await send_events(servers.kafka_bootstrap, pipe.topology.topic("events"), events, Counter[LedgerKey]())


async def _until(gateway: Gateway, check: Callable[[dict[str, Any]], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, _, body = gateway.request("GET", "/healthz")
        health = orjson.loads(body)
        if check(health):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"gateway never reached the state; last health {health}\n{gateway.worker.log_tail(10)}"
    )


async def _setup(
    servers: Endpoints, name: str, tmp_path: Path, lag_shed: int, lag_high: int
) -> tuple[Pipeline, Gateway]:
    pipe = Pipeline(servers, TOPOLOGY.renamed(name), "live_likes", tmp_path)
    await pipe.create_topics()
    gateway = start_gateway(
        servers,
        name,
        tmp_path,
        ingest_open="true",
        ingest_lag_shed=lag_shed,
        ingest_lag_high=lag_high,
        ingest_lag_interval_ms=200,
    )
    pipe.workers.append(gateway.worker)
    return pipe, gateway


async def test_low_priority_is_shed_first_while_the_high_class_is_accepted(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    pipe, gateway = await _setup(servers, unique_name, tmp_path, lag_shed=200, lag_high=1_000_000)
    try:
        await _until(gateway, lambda h: h["lag"] == 0)
        status, _, body = gateway.post_events(LIKES + COMMENTS)
        assert status == 202 and body["accepted"] == len(LIKES) + len(COMMENTS)

        await _backlog(servers, pipe, 400)
        await _until(gateway, lambda h: h["shedding"] == [0])
        status, headers, body = gateway.post_events(LIKES + COMMENTS)
        assert status == 202
        assert (body["accepted"], body["shed"], body["rejected"]) == (len(COMMENTS), len(LIKES), 0)
        statuses = [r["status"] for r in body["results"]]
        assert statuses == ["shed"] * len(LIKES) + ["accepted"] * len(COMMENTS)
        assert all(r["id"] and "retry" in r["reason"] for r in body["results"][: len(LIKES)])
        assert int(headers["retry-after"]) >= 1

        status, headers, body = gateway.post_events(LIKES)  # nothing but the shed class
        assert status == 429 and body["shed"] == len(LIKES) and int(headers["retry-after"]) >= 1

        _, _, metrics = gateway.request("GET", "/metrics")
        shed_lines = [
            line
            for line in metrics.decode().splitlines()
            if line.startswith("pipeline_ingest_shed_total{") and 'priority="0"' in line
        ]
        assert shed_lines and float(shed_lines[0].rsplit(" ", 1)[1]) == 2 * len(LIKES)

        pipe.add("coalesce", "c1")  # tier 1 drains the backlog: shedding stops by itself
        await _until(gateway, lambda h: h["shedding"] == [] and h["lag"] < 200, timeout_s=20)
        status, _, body = gateway.post_events(LIKES)
        assert status == 202 and body["accepted"] == len(LIKES)
    finally:
        gateway.close()
        pipe.stop()


async def test_lag_over_the_threshold_gives_429_with_retry_after_and_clears_when_drained(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    pipe, gateway = await _setup(servers, unique_name, tmp_path, lag_shed=100, lag_high=300)
    try:
        await _backlog(servers, pipe, 600)
        await _until(gateway, lambda h: h["throttling"])
        status, headers, body = gateway.post_events(COMMENTS)  # even the highest class
        assert status == 429
        retry_after = int(headers["retry-after"])
        assert 1 <= retry_after <= 60 and body["retry_after_s"] == retry_after
        assert "behind" in body["error"]

        pipe.add("coalesce", "c1")
        deadline = time.monotonic() + 20
        while True:
            status, _, body = gateway.post_events(COMMENTS)
            if status == 202:
                break
            assert status == 429 and time.monotonic() < deadline, (status, body)
            await asyncio.sleep(0.3)
        assert body["accepted"] == len(COMMENTS)
        _, _, metrics = gateway.request("GET", "/metrics")
        assert any(
            line.startswith("pipeline_ingest_throttled_total{") and float(line.rsplit(" ", 1)[1]) >= 1
            for line in metrics.decode().splitlines()
        )
    finally:
        gateway.close()
        pipe.stop()


def test_an_unreachable_broker_gives_503_at_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    port = free_port()
    worker = WorkerProcess(
        "live_likes",
        "ingest",
        "g1",
        dead,
        servers.redis_url,
        tmp_path,
        name=unique_name,
        extra_env={"PIPELINE_INGEST_PORT": str(port), "PIPELINE_INGEST_OPEN": "true"},
    ).start()
    gateway = Gateway(worker, port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, body = gateway.request("GET", "/healthz")
                break
            except OSError:
                assert worker.running and time.monotonic() < deadline, worker.log_tail(20)
                time.sleep(0.2)
        assert status == 503 and orjson.loads(body)["broker"] is False
        started = time.monotonic()
        status, headers, answer = gateway.post_events(LIKES)
        assert status == 503 and int(headers["retry-after"]) >= 1 and "broker" in answer["error"]
        assert time.monotonic() - started < 4.0  # fail fast: nothing waits for a broker that is not there
        assert worker.running
    finally:
        gateway.close()
        worker.stop()
