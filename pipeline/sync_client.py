"""The producer SDK for synchronous code (Django, Flask, Celery workers, scripts).

    writer = SyncPipelineClient(TOPOLOGY, "127.0.0.1:9092")      # at import: connects at first use
    result = writer.send({"type": "like", "key": "c1", "channel": "v1"})
    results = writer.send_many(events)

The semantics are those of `PipelineClient` (pipeline/client.py), which does the work: every
event leaves with an id and a ts (returned in its SendResult), hot keys are split the same way
(`splitter`, `redis_url`), invalid events come back rejected with field and reason, and a broker
that does not acknowledge in time raises `BrokerUnavailable` whose `results` carry every event's
id, ts, sub and fate (`resend()` gives the ones to send again).

One PipelineClient runs on one background event-loop thread per process. Any number of threads
may call `send` and `send_many` at once: their events meet on that loop, and concurrent `send`
calls are batched together (`linger_ms`, `max_batch`). A call returns once the broker has
acknowledged its events, so nothing is left in a buffer when it returns.

Fork-safe: a process forked from one that used the writer (gunicorn workers, Celery's prefork
pool) gets a fresh loop thread and a fresh PipelineClient at its first call; nothing of the
parent's connection is used or closed in the child. `close()` (or the `with` block, or the exit of
the interpreter) stops the client of the calling process.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

from pipeline.client import PipelineClient, SendResult, ShedRule
from pipeline.core.hotkeys import HotKeySplitter
from pipeline.core.topology import Topology
from pipeline.io.kafka import KafkaConnection
from pipeline.runtime.loop_thread import PerProcess


class SyncPipelineClient:
    """A blocking, thread-safe and fork-safe `PipelineClient`; takes the same arguments."""

    def __init__(
        self,
        topology: Topology,
        bootstrap: str | KafkaConnection,
        *,
        redis_url: str | None = None,
        redis_options: Mapping[str, Any] | None = None,
        splitter: HotKeySplitter | None = None,
        linger_ms: int = 5,
        max_batch: int = 1000,
        ack_timeout_ms: int = 5_000,
        client_id: str | None = None,
        source: str = "",
    ) -> None:
        self.topology = topology
        options: dict[str, Any] = {
            "redis_url": redis_url,
            "redis_options": redis_options,
            "splitter": splitter,
            "linger_ms": linger_ms,
            "max_batch": max_batch,
            "ack_timeout_ms": ack_timeout_ms,
            "client_id": client_id,
            "source": source,
        }
        PipelineClient(topology, bootstrap, **options)  # the arguments are checked here, at once

        async def make() -> PipelineClient:
            client = PipelineClient(topology, bootstrap, **options)
            await client.start()
            return client

        async def close(client: PipelineClient) -> None:
            await client.stop()

        self._client = PerProcess(f"{topology.name}.sync-writer", make, close)

    def start(self) -> None:
        """Connect now instead of at the first send (BrokerUnavailable, AccessRefused as `start()`)."""
        self._client.get()

    def send(self, event: dict[str, Any]) -> SendResult:
        """One event, batched with the events other threads send meanwhile; its result once acknowledged.

        Raises BrokerUnavailable (its `results` hold this event's id, ts, sub and fate) when the
        broker does not acknowledge in time."""
        return self._client.call(lambda client: client.send(event))

    def send_many(
        self, events: list[dict[str, Any]], *, shed: ShedRule | None = None, source: str | None = None
    ) -> list[SendResult]:
        """A result per event, in order (see `PipelineClient.send_many`)."""
        return self._client.call(lambda client: client.send_many(events, shed=shed, source=source))

    def close(self) -> None:
        """Flush and stop this process's client and its loop thread; the writer cannot send after."""
        self._client.close()

    def __enter__(self) -> SyncPipelineClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
