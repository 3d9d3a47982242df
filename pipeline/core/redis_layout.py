"""The Redis key layout dashboards read, and the plan of one atomic apply.

Pure functions: the sink (pipeline/io/redis_sink.py) ships the plan to a Lua
script; everything that names a key lives here so readers and writers agree.
The layout is documented in docs/CONTRACT.md.

Every key starts with the topology name. Variable parts that may hold any
character (channel, key) come last or are JSON-encoded, so two different
cells can never share a key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.core.aggregates import Kind
from pipeline.core.merger import UNKNOWN, MergedBatch
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL, Rollup


def agg_key(topology: str, metric: str, bucket: str, channel: str) -> str:
    """HASH of key -> value for one metric, bucket and channel (count, sum, min, max)."""
    return f"{topology}:agg:{metric}:{bucket}:{channel}"


def uniq_key(topology: str, metric: str, bucket: str, channel: str, key: str) -> str:
    """HyperLogLog of distinct users of one (channel, key) in one bucket."""
    return f"{topology}:uniq:{metric}:{bucket}:" + orjson.dumps([channel, key]).decode()


def top_key(topology: str, metric: str, channel: str) -> str:
    """ZSET of key -> total: the channel's leaderboard."""
    return f"{topology}:top:{metric}:{channel}"


def positions_key(topology: str) -> str:
    """HASH of partials partition -> last offset applied: the root's exactly-once ledger."""
    return f"{topology}:pos:merge"


def stats_key(topology: str) -> str:
    """HASH of pipeline-wide counters (events, dead_letters, late_dropped, partials, applies)."""
    return f"{topology}:stats"


def splits_key(topology: str) -> str:
    """HASH of hot key -> number of sub-keys the writers currently split it into."""
    return f"{topology}:splits"


def seq_key(topology: str) -> str:
    """HASH of channel -> sequence number of its last update."""
    return f"{topology}:seq"


# Operation codes understood by the apply script.
OP_INCR = "i"  # HINCRBY (count)
OP_INCRF = "f"  # HINCRBYFLOAT (sum)
OP_MIN = "n"
OP_MAX = "x"
OP_HLL = "d"  # PFADD + PFCOUNT

_OPS = {Kind.COUNT: OP_INCR, Kind.SUM: OP_INCRF, Kind.MIN: OP_MIN, Kind.MAX: OP_MAX, Kind.DISTINCT: OP_HLL}


@dataclass(slots=True)
class ApplyPlan:
    """One atomic apply: the script arguments, and how to read its answer back into updates."""

    payload: bytes
    channels: list[str]
    # per op, (channel, metric, key) for total-bucket values that viewers see, else None
    reports: list[tuple[str, str, str] | None] = field(default_factory=list)
    commands: int = 0  # Redis commands the script will run (for the coalescing-ratio metric)


ZADD_MEMBERS = 1000  # members per ZADD in the apply script (2,000 arguments)


def plan_apply(topology: Topology, batch: MergedBatch) -> ApplyPlan:
    name = topology.name
    metrics = topology.metrics
    rollups: dict[tuple[int, str], Rollup] = {}
    for i, m in enumerate(metrics):
        for r in m.rollups:
            rollups[(i, r.name)] = r
    ops: list[list[Any]] = []
    reports: list[tuple[str, str, str] | None] = []
    channels: dict[str, None] = {}
    boards: dict[str, int] = {}  # leaderboard sorted set -> members this apply updates
    commands = 0
    for (index, channel, key, bucket), value in batch.cells.items():
        metric = metrics[index]
        kind = metric.kind
        is_total = bucket == TOTAL
        ttl = 0
        if not is_total:
            ttl = rollups[(index, f"{bucket.split(':', 1)[0]}s")].retention_s
        if kind is Kind.DISTINCT:
            if not value:
                continue
            target = uniq_key(name, metric.name, bucket, channel, key)
            ops.append([OP_HLL, target, "", sorted(value), ttl, "", 0])
            commands += 2
        else:
            target = agg_key(name, metric.name, bucket, channel)
            arg = str(value) if kind is Kind.COUNT else repr(float(value))
            zkey = top_key(name, metric.name, channel) if is_total and metric.leaderboard else ""
            ops.append([_OPS[kind], target, key, arg, ttl, zkey, metric.leaderboard])
            commands += 1
            if zkey:
                boards[zkey] = boards.get(zkey, 0) + 1
        commands += 1 if ttl else 0
        if is_total:
            channels[channel] = None
            reports.append((channel, metric.name, key))
        else:
            reports.append(None)
    # per sorted set: a ZADD per 1,000 members and a ZCARD (a trim now and then is not counted)
    commands += sum(-(-members // ZADD_MEMBERS) + 1 for members in boards.values())
    # a TYPE per key the apply touches, checked before anything is written (stats, seq, positions too)
    commands += len({op[1] for op in ops} | set(boards)) + 3
    channel_list = list(channels)
    counters = [
        ["events", batch.events],
        ["late_dropped", batch.late_dropped],
        ["dead_letters", batch.dead],
        ["deduplicated", batch.duplicates],
        ["partials", batch.partials],
        ["bad_partials", batch.bad_partials],
        ["applies", 1],
    ]
    commands += len(batch.ranges) * 2 + len(channel_list) + sum(1 for c in counters if c[1]) + 1
    counters.append(["redis_commands", commands])
    payload = orjson.dumps(
        {
            "pos": positions_key(name),
            "ranges": [
                [p, first, last, batch.expected.get(p, UNKNOWN)]
                for p, (first, last) in sorted(batch.ranges.items())
            ],
            "ops": ops,
            "stats": stats_key(name),
            "counters": [c for c in counters if c[1]],
            "seq": seq_key(name),
            "channels": channel_list,
        }
    )
    return ApplyPlan(payload, channel_list, reports, commands)
