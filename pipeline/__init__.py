"""Hierarchical aggregation pipeline for write-heavy counters.

The public API, importable from `pipeline` itself:

- declaring a topology (topologies/): `topology`, `count`, `sum_of`, `minimum`, `maximum`,
  `distinct_users`, `every`, `total`, and the types they build (`Topology`, `Metric`, `Partitions`,
  `Rollup`, `Kind`);
- writing events: `PipelineClient` (the producer SDK, asyncio), `SyncPipelineClient` (the same for
  synchronous code: thread-safe and fork-safe), their per-event answer `SendResult`, their errors
  `BrokerUnavailable` and `AccessRefused`, and `KafkaConnection` for a secured broker;
- reading aggregates: `Reader` (asyncio) and `SyncReader` — totals, top N, series, distinct users,
  stats — with `Top` and `QueryError` (pipeline/read.py).

The topology names load at once (plain Python). The SDK's and the reader's load on first use, so that
importing a topology, or anything under `pipeline.core`, does not pull in the Kafka and Redis clients.

`pipeline.topology` is the function; topologies import from the module as before
(`from pipeline.topology import count, topology`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.topology import (
    Kind,
    Metric,
    Partitions,
    Rollup,
    Topology,
    count,
    distinct_users,
    every,
    maximum,
    minimum,
    sum_of,
    topology,
    total,
)

if TYPE_CHECKING:
    from pipeline.client import BrokerUnavailable, PipelineClient, SendResult
    from pipeline.io.kafka import AccessRefused, KafkaConnection
    from pipeline.read import QueryError, Reader, SyncReader, Top
    from pipeline.sync_client import SyncPipelineClient

__version__ = "0.1.0"

_LAZY = {
    "PipelineClient": "pipeline.client",
    "SendResult": "pipeline.client",
    "BrokerUnavailable": "pipeline.client",
    "AccessRefused": "pipeline.io.kafka",
    "KafkaConnection": "pipeline.io.kafka",
    "SyncPipelineClient": "pipeline.sync_client",
    "Reader": "pipeline.read",
    "SyncReader": "pipeline.read",
    "Top": "pipeline.read",
    "QueryError": "pipeline.read",
}

__all__ = [
    "AccessRefused",
    "BrokerUnavailable",
    "KafkaConnection",
    "Kind",
    "Metric",
    "Partitions",
    "PipelineClient",
    "QueryError",
    "Reader",
    "Rollup",
    "SendResult",
    "SyncPipelineClient",
    "SyncReader",
    "Top",
    "Topology",
    "count",
    "distinct_users",
    "every",
    "maximum",
    "minimum",
    "sum_of",
    "topology",
    "total",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
