"""The sync writer against the real broker, Redis and worker processes: 8 threads at once and a child
forked while they send (the gunicorn / Celery prefork case), every event counted exactly once.

The writer is made before any thread or fork and shared by all of them, as a module-level writer of a
web app is. Each thread sends single events (`send`, batched with the other threads' on the writer's
loop) and batches (`send_many`), one invalid event, and retries of events it already sent (same id
and ts: acknowledged, never counted). The keys are split over sub-keys (a static splitter), so the
retries must meet their originals' partitions. The child uses the writer its parent was using at
that moment, and must get a loop thread and a broker connection of its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import BrokerUnavailable, SendResult, SyncPipelineClient, SyncReader
from pipeline.core.hotkeys import HotKeySplitter, SplitPolicy
from pipeline.harness.local_servers import Endpoints, free_port
from tests.integration.pipeline_harness import LedgerKey, Pipeline, settled_totals
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

THREADS = 8
SINGLES = 300  # per thread, one `send` each
BATCHES = 6  # per thread, `send_many` of BATCH events each
BATCH = 200
RETRIES = 50  # per thread: resends of its own events with the same id and ts
CHILD_EVENTS = 2000


def _event(channel: str, i: int) -> dict[str, Any]:
    key = "viral" if i % 3 == 0 else f"c{i % 40}"
    return {"type": "like", "key": key, "channel": channel}


def test_eight_threads_and_a_forked_child_count_every_event_once(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    pipe = Pipeline(servers, topology, "live_likes", tmp_path)
    asyncio.run(pipe.create_topics())
    pipe.add("coalesce", "c1")
    pipe.add("merge", "m1")
    writer = SyncPipelineClient(
        topology, servers.kafka_bootstrap, splitter=HotKeySplitter(SplitPolicy(static_k=4)), source="web"
    )
    ledger: Counter[LedgerKey] = Counter()
    ledger_lock = threading.Lock()
    failures: list[str] = []
    retried = 0
    halfway = threading.Barrier(THREADS + 1)

    def thread_body(t: int) -> None:
        nonlocal retried
        channel = f"thread-{t}"
        sent: list[tuple[dict[str, Any], SendResult]] = []
        try:
            for i in range(SINGLES):
                event = _event(channel, i)
                result = writer.send(event)
                if not result.accepted or result.index != 0 or not result.id or not result.ts:
                    failures.append(f"{channel}: single {i}: {result}")
                sent.append((event, result))
                if i == SINGLES // 2:
                    halfway.wait(60)  # the fork happens while every thread is mid-stream
            for b in range(BATCHES):
                events = [_event(channel, SINGLES + b * BATCH + i) for i in range(BATCH)]
                results = writer.send_many(events)
                if [r.index for r in results] != list(range(BATCH)) or not all(r.accepted for r in results):
                    failures.append(f"{channel}: batch {b}: {[r for r in results if not r.accepted][:3]}")
                sent += zip(events, results, strict=True)
            bad = writer.send({"type": "like", "channel": channel})
            if bad.accepted or bad.field != "key":
                failures.append(f"{channel}: an event without a key was {bad}")
            picked = sent[:: len(sent) // RETRIES][:RETRIES]
            again = writer.send_many([{**e, "id": r.id, "ts": r.ts} for e, r in picked])
            if [r.sub for r in again] != [r.sub for _, r in picked] or not all(r.accepted for r in again):
                failures.append(f"{channel}: retries went elsewhere or were refused")
        except Exception as exc:  # reported below, with the thread
            failures.append(f"{channel}: {exc!r}")
            if halfway.n_waiting:
                halfway.abort()
            return
        with ledger_lock:
            for event, _ in sent:
                ledger[(channel, event["key"])] += 1
            retried += len(picked)

    def child_body() -> int:
        """In the forked child: send through the inherited writer; 0 when every event was accepted."""
        events = [_event("child", i) for i in range(CHILD_EVENTS)]
        results = writer.send_many(events[: CHILD_EVENTS // 2])
        results += [writer.send(e) for e in events[CHILD_EVENTS // 2 : CHILD_EVENTS // 2 + 100]]
        results += writer.send_many(events[CHILD_EVENTS // 2 + 100 :])
        writer.close()
        return 0 if len(results) == CHILD_EVENTS and all(r.accepted for r in results) else 2

    threads = [threading.Thread(target=thread_body, args=(t,)) for t in range(THREADS)]
    try:
        for th in threads:
            th.start()
        halfway.wait(120)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 3
            try:
                code = child_body()
            finally:
                os._exit(code)
        for th in threads:
            th.join(300)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"the forked child's sends failed\n{pipe.logs()}"
        assert not failures, failures[:5]
        for i in range(CHILD_EVENTS):
            ledger[("child", _event("child", i)["key"])] += 1
        # the parent's writer still works after the fork, on its own loop thread
        assert writer.send(_event("parent", 0)).accepted
        ledger[("parent", "viral")] += 1

        total = sum(ledger.values())
        assert total == THREADS * (SINGLES + BATCHES * BATCH) + CHILD_EVENTS + 1
        got = asyncio.run(settled_totals(servers.redis_url, topology, "likes", total, timeout_s=120))
        wrong = {k: (got.get(k), v) for k, v in ledger.items() if got.get(k) != v}
        extra = set(got) - set(ledger)
        assert not wrong and not extra, f"(got, want) {list(wrong.items())[:5]}; extra {extra}\n{pipe.logs()}"
        with SyncReader(topology, servers.redis_url) as reader:
            stats = reader.stats()
            assert reader.total("likes") == total
        assert (stats["events"], stats["deduplicated"]) == (total, retried)
    finally:
        writer.close()
        pipe.stop()


def test_no_broker_is_a_broker_unavailable_in_the_calling_thread(unique_name: str) -> None:
    writer = SyncPipelineClient(
        TOPOLOGY.renamed(unique_name), f"127.0.0.1:{free_port()}", ack_timeout_ms=1000
    )
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailable):
            writer.send({"type": "like", "key": "k"})
        with pytest.raises(BrokerUnavailable):  # tried again at the next call, not cached
            writer.send_many([{"type": "like", "key": "k"}])
        assert time.monotonic() - started < 20
    finally:
        writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.send({"type": "like", "key": "k"})
