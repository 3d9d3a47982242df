"""The public API topologies are declared with (see topologies/)."""

from pipeline.core.aggregates import Kind
from pipeline.core.topology import (
    Metric,
    Partitions,
    Topology,
    count,
    distinct_users,
    maximum,
    minimum,
    sum_of,
    topology,
)
from pipeline.core.windows import Rollup, every, total

__all__ = [
    "Kind",
    "Metric",
    "Partitions",
    "Rollup",
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
