"""The naive baseline: a faust-streaming agent that updates a windowed table per event.

This is what tier 1 replaces: one table update (and one changelog message) per
event instead of one partial per window. It runs as its own process
(`python -m pipeline.bench.faust_app`, configured by BENCH_FAUST_* variables)
because a Faust worker owns its event loop, signal handlers and logging.

Faust takes over stdout and logging, so the agent reports through a small JSON
file (BENCH_FAUST_STATUS): `{"seen": n}` while it works, plus `eps` and `seconds`
once it has processed the expected number of events. It then keeps running
until the parent stops it (SIGTERM).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

PROGRESS_EVERY = 1_000
# Tier 1 flushes every 0.25 s, but Faust's hopping/tumbling windows compute their
# ranges with int(step) (faust/windows.py and its Cython twin), so any size under
# 1 s fails with "range() arg 3 must not be zero". 1 s is the smallest that works;
# the per-event cost (one table update, one changelog message) does not depend on it.
WINDOW_S = 1.0


@dataclass
class _Progress:
    seen: int = 0
    first: float = 0.0


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Replace the status file atomically, so the parent never reads half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(status))
    os.replace(tmp, path)


def read_status(path: Path) -> dict[str, Any]:
    try:
        status: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return status


def build_app(
    broker: str, app_id: str, topic_name: str, partitions: int, expected: int, datadir: str, status: Path
) -> Any:
    """A Faust app as a tutorial would write it: JSON values, a tumbling-window count per key."""
    import faust  # here, so the parent can use read_status without importing Faust

    app = faust.App(
        app_id,
        broker=";".join(f"kafka://{host}" for host in broker.split(",")),
        store="memory://",
        topic_partitions=partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        datadir=datadir,
    )
    topic = app.topic(
        topic_name, key_type=bytes, key_serializer="raw", value_serializer="json", partitions=partitions
    )
    likes = app.Table("likes", default=int, partitions=partitions).tumbling(
        WINDOW_S, expires=timedelta(seconds=30)
    )
    progress = _Progress()

    @app.agent(topic)
    async def count_likes(stream: Any) -> None:
        async for event in stream:
            likes[event["key"]] += 1
            progress.seen += 1
            seen = progress.seen
            if seen == 1:
                progress.first = time.perf_counter()
            if seen == expected:
                elapsed = time.perf_counter() - progress.first
                # From the first event to the last, so Faust's start-up and rebalance are not counted.
                eps = (expected - 1) / elapsed if elapsed > 0 else 0.0
                write_status(status, {"seen": seen, "seconds": elapsed, "eps": eps})
            elif seen % PROGRESS_EVERY == 0:
                write_status(status, {"seen": seen})

    return app


def main() -> None:
    env = os.environ
    app = build_app(
        env["BENCH_FAUST_BROKER"],
        env["BENCH_FAUST_APP_ID"],
        env["BENCH_FAUST_TOPIC"],
        int(env["BENCH_FAUST_PARTITIONS"]),
        int(env["BENCH_FAUST_EVENTS"]),
        env["BENCH_FAUST_DATADIR"],
        Path(env["BENCH_FAUST_STATUS"]),
    )
    sys.argv = [sys.argv[0], "worker", "--loglevel", env.get("BENCH_FAUST_LOGLEVEL", "warn")]
    app.main()


if __name__ == "__main__":
    main()
