"""The Redis key layout dashboards read, and the plan of one atomic apply.

Pure functions: the sink (pipeline/io/redis_sink.py) ships the plan to a Lua
script; everything that names a key lives here so readers and writers agree.
The layout is documented in docs/CONTRACT.md.

Every key starts with the topology name. Every key one root apply touches
carries the hash tag of its root partition, `T:{T:<partition>:<s>}:...` (layout 2,
docs/CONTRACT.md): on Redis Cluster they share one slot, so the apply stays one
atomic script; a single Redis holds the same keys. A channel's hashes,
leaderboards and sequence numbers are therefore one per root partition (a key's
cells always go to `root_partition(key, R)`), and readers merge them
(pipeline/io/redis_reader.py). Variable parts that may hold any character
(channel, key) come last or are JSON-encoded, so two different cells can never
share a key.

The apply: one JSON object, ARGV[1] of the script in pipeline/io/redis_sink.py.

    {
      "positions": "T:{T:2:s}:pos:merge",   HASH partials partition -> last offset applied
      "ranges": [                      one: the root partition of the batch (every key carries its tag)
        {"partition": 2, "first": 120, "last": 131, "expected": 119}
      ],
      "seq": "T:{T:2:s}:seq",            HASH channel -> sequence number of its last update in partition 2
      "channels": ["v1", "v2"],        channels whose sequence number this apply increments, in order
      "stats": "T:{T:2:s}:stats",        HASH of the counters of partition 2's applies
      "counters": {"events": 3000, "partials": 9, "applies": 1, "redis_commands": 57},   non-zero only
      "ops": [                         one per key written, in the order the reply answers
        {"kind": "count", "key": "T:{T:2:s}:agg:likes:total:v1", "fields": ["c1", "c2"], "values": ["3", "5"],
         "ttl": 0, "board": "T:{T:2:s}:top:likes:v1", "board_size": 100},
        {"kind": "sum" | "min" | "max", ... the same fields},
        {"kind": "distinct", "key": "T:{T:2:s}:uniq:viewers:60:0:[\\"v1\\",\\"c1\\"]",
         "members": ["u1", "u7"], "ttl": 7200}
      ]
    }

- `ranges[].expected` is the last offset this merger saw applied for the partition (-1: nothing yet;
  -2: unknown, then only a range starting at or before what Redis holds is refused).
- `values` are decimal strings, so that no number is rounded on its way: integers for `count`, Python's
  `repr` of a float for the others. `fields[i]` takes `values[i]`.
- `ttl` > 0 sets the key's retention if it has none (`EXPIRE key ttl NX`); `board` (a ZSET) and
  `board_size` (N) come only with the total cells of a leaderboard metric: every field's new value
  is its score, and the set is trimmed to N once it holds more than 2N members.

The reply is an array:

- `[1, seq of each channel..., values]` (`values`: the new value of each field of each op, in order,
  as decimal text joined by commas into one string; a `distinct` op answers one value, its PFCOUNT):
  the batch is applied. One string, not an element per value: at 100,000 cells an element each cost
  the root more to read than Redis took to run the apply;
- `[0, partition, position Redis holds]`: a range is refused (already applied, or Redis holds
  another position than expected); nothing written;
- `[-1, key, what it holds, what the apply needs]`: refused before the first write, because a key
  holds another type, or a field holds a value the command would fail on (a count that is not an
  integer, a number that is not one); nothing written.
"""

from __future__ import annotations

import binascii
import functools
import itertools
from dataclasses import dataclass, field
from itertools import repeat
from typing import Required, TypedDict

import orjson

from pipeline.core.aggregates import Kind
from pipeline.core.coalescer import root_partition as root_partition  # readers find a key by it
from pipeline.core.merger import UNKNOWN, MergedBatch
from pipeline.core.model import ChannelUpdate
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL, Rollup

SLOTS = 16384  # Redis Cluster's hash slots


def slot(key: str) -> int:
    """Redis Cluster's hash slot of a key: CRC16 (XMODEM) of its hash tag (the text inside its first
    {...}, when not empty; else the whole key), modulo 16384."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % SLOTS


@functools.lru_cache(maxsize=4096)
def partition_tag(topology: str, part: int, parts: int) -> str:
    """The prefix of every key root partition `part` (of `parts`) writes: `T:{T:<part>:<s>}`.

    Redis Cluster hashes only the text inside the braces, so all of one partition's keys share one
    slot (one shard), and its apply, one Lua script, stays atomic there. `s` is the smallest integer
    that puts that slot in the part-th of `parts` equal ranges of the 16,384 slots: a cluster whose
    masters hold equal ranges of slots (as `redis-cli --cluster create` and pipeline/harness/
    local_servers.py assign them) gets the partitions spread evenly over its masters."""
    if not 0 <= part < parts:
        raise ValueError(f"root partition {part} is not one of the topology's {parts}")
    for s in itertools.count():
        inner = f"{topology}:{part}:{s}"
        if slot(inner) * parts // SLOTS == part:
            return f"{topology}:{{{inner}}}"
    raise AssertionError("unreachable")


def key_tag(topology: Topology, key: str) -> str:
    """The hash tag of the root partition that holds `key`'s cells in `topology`."""
    parts = topology.partitions.partials
    return partition_tag(topology.name, root_partition(key, parts), parts)


def agg_key(tag: str, metric: str, bucket: str, channel: str) -> str:
    """HASH of key -> value for one metric, bucket and channel (count, sum, min, max), of the keys of
    one root partition (`tag`: its `partition_tag`): a channel's keys are spread over one hash per
    root partition."""
    return f"{tag}:agg:{metric}:{bucket}:{channel}"


def uniq_key(tag: str, metric: str, bucket: str, channel: str, key: str) -> str:
    """HyperLogLog of distinct users of one (channel, key) in one bucket; `tag` is the key's root
    partition's (`root_partition(key, R)`)."""
    return f"{tag}:uniq:{metric}:{bucket}:" + orjson.dumps([channel, key]).decode()


def top_key(tag: str, metric: str, channel: str) -> str:
    """ZSET of key -> total: the channel's leaderboard among the keys of one root partition (readers
    merge the partitions' boards)."""
    return f"{tag}:top:{metric}:{channel}"


def positions_key(tag: str) -> str:
    """HASH of partials partition -> last offset applied (only the partition itself): the root's
    exactly-once ledger, in the slot of the data it guards."""
    return f"{tag}:pos:merge"


def stats_key(tag: str) -> str:
    """HASH of the counters (events, dead_letters, late_dropped, partials, applies) of the applies of
    one root partition: the pipeline's are the sums over the partitions."""
    return f"{tag}:stats"


def seq_key(tag: str) -> str:
    """HASH of channel -> how many applies of one root partition touched the channel (its sequence
    number there); a channel's seq is the sum over the partitions."""
    return f"{tag}:seq"


def splits_key(topology: str) -> str:
    """HASH of hot key -> number of sub-keys the writers currently split it into."""
    return f"{topology}:splits"


def quarantine_key(topology: str) -> str:
    """HASH of partials partition -> the batch quarantined there (JSON), while the root holds it."""
    return f"{topology}:quarantine"


# Operation kinds understood by the apply script (the "kind" of an op).
OP_COUNT = "count"  # added in the script, one HSET per 1,000 fields
OP_SUM = "sum"  # HINCRBYFLOAT per field
OP_MIN = "min"  # compare with the value held, HSET where smaller
OP_MAX = "max"  # compare with the value held, HSET where larger
OP_DISTINCT = "distinct"  # PFADD of the members, then PFCOUNT

_OPS = {
    Kind.COUNT: OP_COUNT,
    Kind.SUM: OP_SUM,
    Kind.MIN: OP_MIN,
    Kind.MAX: OP_MAX,
    Kind.DISTINCT: OP_DISTINCT,
}


class Range(TypedDict):
    partition: int
    first: int
    last: int
    expected: int


class Op(TypedDict, total=False):
    kind: Required[str]
    key: Required[str]
    ttl: Required[int]
    fields: list[str]  # count, sum, min, max
    values: list[str]
    board: str  # count, sum, min, max of a leaderboard metric's total bucket
    board_size: int
    members: list[str]  # distinct


@dataclass(slots=True)
class ApplyPlan:
    """One atomic apply: the script argument, and how to read its answer back into updates."""

    payload: bytes
    channels: list[str]
    # per value the reply carries, (channel, metric, key) for total-bucket values that viewers see, else None
    reports: list[tuple[str, str, str] | None] = field(default_factory=list)
    commands: int = 0  # Redis commands the script runs (for the coalescing-ratio metric; see plan_apply)
    partition: int = 0  # the root partition: every key of the apply carries its hash tag


BATCH = 1000  # fields per HMGET, members per PFADD and per ZADD, pairs per HSET in the apply script


def _chunks(n: int) -> int:
    return -(-n // BATCH)


def plan_apply(topology: Topology, batch: MergedBatch) -> ApplyPlan:
    """The apply of a merged batch of one root partition (the format above), its reports and the
    commands it runs. Every key it names carries the partition's hash tag (`partition_tag`), so on
    Redis Cluster the whole apply runs on the one shard that holds that slot.

    Commands, as the script runs them, each "per 1,000" of its fields or members: the positions hash
    read (HMGET) and written (HSET) per 1,000 ranges. Per op, first a read of what it will change,
    before the first write: an HMGET per 1,000 fields, or a PFCOUNT of a HyperLogLog. Then its
    writes: for count, min and max an HSET per 1,000 fields (the script adds the counts; a sum of
    2^53 or more, which a Lua number cannot hold exactly, takes an HINCRBY of its own and is not
    counted here); for sum an HINCRBYFLOAT per field; a PFADD per 1,000 members and a PFCOUNT; an
    EXPIRE when it has a TTL. Per leaderboard a ZCARD (read first: it also checks the type), a ZADD
    per 1,000 members (a trim now and then is not counted). The sequence hash and the stats hash:
    an HMGET and an HSET each, per 1,000 channels or counters.
    """
    if len(batch.ranges) != 1:
        raise ValueError(
            f"an apply covers one root partition (its keys share one hash tag), not {sorted(batch.ranges)}"
        )
    (part,) = batch.ranges
    name = topology.name
    tag = partition_tag(name, part, topology.partitions.partials)
    metrics = topology.metrics
    rollups: dict[tuple[int, str], Rollup] = {}
    for i, m in enumerate(metrics):
        for r in m.rollups:
            rollups[(i, r.name)] = r
    ops: dict[str, Op] = {}
    op_reports: dict[str, list[tuple[str, str, str] | None]] = {}
    channels: dict[str, None] = {}
    cells = batch.cells
    groups = batch.groups
    if groups is None:  # not known from the partials: group the cells here
        groups = {}
        for index, channel, key, bucket in cells:
            keys = groups.get((index, channel, bucket))
            if keys is None:
                groups[(index, channel, bucket)] = [key]
            else:
                keys.append(key)
    # a group at a time (one hash, or a HyperLogLog per key): no Python-level step per cell but the
    # values' text
    for (index, channel, bucket), keys in groups.items():
        metric = metrics[index]
        kind = metric.kind
        is_total = bucket == TOTAL
        values = list(map(cells.__getitem__, zip(repeat(index), repeat(channel), keys, repeat(bucket))))
        ttl = 0 if is_total else rollups[(index, f"{bucket.split(':', 1)[0]}s")].retention_s
        if kind is Kind.DISTINCT:
            if not any(values):
                continue  # empty sets write nothing, nor name their channel
            for key, members in zip(keys, values, strict=True):
                if not members:
                    continue
                target = uniq_key(tag, metric.name, bucket, channel, key)
                ops[target] = {"kind": OP_DISTINCT, "key": target, "members": sorted(members), "ttl": ttl}
                op_reports[target] = [(channel, metric.name, key) if is_total else None]
        else:
            target = agg_key(tag, metric.name, bucket, channel)
            op = ops.get(target)
            if op is None:
                op = ops[target] = {"kind": _OPS[kind], "key": target, "fields": [], "values": [], "ttl": ttl}
                if is_total and metric.leaderboard:
                    op["board"] = top_key(tag, metric.name, channel)
                    op["board_size"] = metric.leaderboard
                op_reports[target] = []
            op["fields"].extend(keys)
            op["values"].extend(map(str, values) if kind is Kind.COUNT else (repr(float(v)) for v in values))
            if is_total:
                op_reports[target].extend(zip(repeat(channel), repeat(metric.name), keys))
            else:
                op_reports[target].extend(repeat(None, len(keys)))
        if is_total:
            channels[channel] = None
    commands = 0
    for op in ops.values():
        if op["kind"] == OP_DISTINCT:
            commands += 2 + _chunks(len(op["members"]))  # PFCOUNT (checked first), PFADD per 1,000, PFCOUNT
        else:
            n = len(op["fields"])
            commands += _chunks(n)  # HMGET
            commands += n if op["kind"] == OP_SUM else _chunks(n)  # HINCRBYFLOAT each, or HSET
            if "board" in op:
                commands += 1 + _chunks(n)  # ZCARD, ZADD per 1,000 members
        commands += 1 if op["ttl"] else 0
    channel_list = list(channels)
    counters = {
        "events": batch.events,
        "late_dropped": batch.late_dropped,
        "dead_letters": batch.dead,
        "deduplicated": batch.duplicates,
        "partials": batch.partials,
        "bad_partials": batch.bad_partials,
        "applies": 1,
    }
    counters = {k: v for k, v in counters.items() if v}
    commands += 2 * _chunks(len(batch.ranges))  # HMGET, HSET of the positions
    commands += 2 * _chunks(len(channel_list))  # HMGET, HSET of the sequence numbers
    commands += 2 * _chunks(len(counters) + 1)  # HMGET, HSET of the counters and redis_commands
    counters["redis_commands"] = commands
    ranges: list[Range] = [
        {"partition": p, "first": first, "last": last, "expected": batch.expected.get(p, UNKNOWN)}
        for p, (first, last) in sorted(batch.ranges.items())
    ]
    payload = orjson.dumps(
        {
            "positions": positions_key(tag),
            "ranges": ranges,
            "seq": seq_key(tag),
            "channels": channel_list,
            "stats": stats_key(tag),
            "counters": counters,
            "ops": list(ops.values()),
        }
    )
    reports = [r for target in ops for r in op_reports[target]]
    return ApplyPlan(payload, channel_list, reports, commands, part)


def channel_updates(
    plan: ApplyPlan, seqs: dict[str, int], values: list[str], now_ms: int
) -> list[ChannelUpdate]:
    """What an applied plan left: the absolute totals of its total cells, one update per channel, from the
    values the script answered (in the order of `plan.reports`) and the channels' new sequence numbers."""
    updates: dict[str, ChannelUpdate] = {}
    for report, value in zip(plan.reports, values, strict=True):
        if report is None:
            continue
        channel, metric, key = report
        update = updates.get(channel)
        if update is None:
            update = updates[channel] = ChannelUpdate(channel, seqs[channel], now_ms, root=plan.partition)
        update.values.append((metric, key, int(value) if value.isdecimal() else _number(value)))
    return list(updates.values())


def _number(raw: str) -> float:
    """A stored value as int when it is one (counts), else float (sums)."""
    try:
        return int(raw)
    except ValueError:
        return float(raw)
