"""The PostgreSQL sink's logic, sans-I/O: which rows a merged batch becomes, which offsets it may
apply, and which buckets retention drops.

The sink (pipeline/tiers/sink.py, I/O in pipeline/io/postgres_sink.py) merges partials with the
root's `Merger`, so a batch is already one delta per cell. Here a cell becomes one row per
(metric, rollup, bucket, channel, key):

- `count` and `sum` are added to the row, `min` and `max` compared with it (the kind travels with the
  row, so one upsert statement serves every metric);
- `distinct` is not additive: the row holds HyperLogLog registers (core/hll.py), merged register by
  register with the row's (`merge_distinct`, on the registers the sink read under the row's lock in
  the same transaction), and `value` is the merged registers' estimate.

Exactly once: every batch is one PostgreSQL transaction that writes its rows and the last offset of
every partials partition it covers. `check_ranges` refuses a batch whose range starts at or before
the applied offset (a replay) or that finds another position than this sink last saw applied (a
zombie sink, or a lost write): nothing of it is written, and the sink seeks to the applied offsets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pipeline.core import hll
from pipeline.core.aggregates import Kind
from pipeline.core.merger import NOTHING_APPLIED, UNKNOWN, MergedBatch
from pipeline.core.topology import Topology
from pipeline.core.windows import TOTAL

# kind codes stored with each row (smallint): what the upsert does with a new value
KIND_CODES: dict[Kind, int] = {Kind.COUNT: 0, Kind.SUM: 1, Kind.MIN: 2, Kind.MAX: 3, Kind.DISTINCT: 4}
CODE_KINDS: dict[int, Kind] = {v: k for k, v in KIND_CODES.items()}
DISTINCT_CODE = KIND_CODES[Kind.DISTINCT]

# Default retention in PostgreSQL per bucket size: buckets under an hour for 7 days, hours and
# longer (and the all-time totals) for good. `parse_retention` reads the setting that overrides it.
DEFAULT_SHORT_RETENTION_S = 7 * 24 * 3600
FOREVER = 0


# One row: (metric, size_s, bucket start in epoch seconds (0: total), channel, key, kind code, value,
# registers). The value is a Decimal, so nothing is rounded on the way (a float's shortest repr, an
# int exactly); registers only for distinct metrics (HyperLogLog, core/hll.py), else None.
Row = tuple[str, int, int, str, str, int, Decimal, bytes | None]
RowKey = tuple[str, int, str, str, int]  # (metric, size_s, channel, key, bucket): the primary key


@dataclass(slots=True)
class RowPlan:
    rows: list[Row] = field(default_factory=list)
    distinct_cells: int = 0  # cells of distinct metrics (rows with registers)
    expired_cells: int = 0  # cells of buckets retention already dropped from PostgreSQL


def to_decimal(value: Any) -> Decimal:
    """An aggregate value as an exact decimal: an int as is, a float by its shortest repr."""
    if type(value) is int:
        return Decimal(value)
    return Decimal(repr(float(value)))


def split_bucket(bucket: str) -> tuple[int, int]:
    """`"3600:1732269600"` -> (3600, 1732269600); the total -> (0, 0)."""
    if bucket == TOTAL:
        return 0, 0
    size, _, start = bucket.partition(":")
    return int(size), int(start)


def bucket_name(size_s: int, start: int) -> str:
    return TOTAL if not size_s else f"{size_s}:{start}"


def plan_rows(topology: Topology, batch: MergedBatch, cutoffs: Mapping[int, int] | None = None) -> RowPlan:
    """The rows a merged batch adds to PostgreSQL; `cutoffs` (size_s -> first bucket start kept) skips
    cells of buckets retention has already dropped, so a late partial does not bring one back."""
    metrics = topology.metrics
    plan = RowPlan()
    rows = plan.rows
    cutoffs = cutoffs or {}
    for (index, channel, key, bucket), value in batch.cells.items():
        metric = metrics[index]
        size_s, start = split_bucket(bucket)
        cutoff = cutoffs.get(size_s)
        if cutoff is not None and start < cutoff:
            plan.expired_cells += 1
            continue
        if metric.kind is Kind.DISTINCT:
            plan.distinct_cells += 1
            regs = hll.registers(value)
            rows.append(
                (metric.name, size_s, start, channel, key, DISTINCT_CODE, Decimal(hll.estimate(regs)), regs)
            )
            continue
        rows.append(
            (metric.name, size_s, start, channel, key, KIND_CODES[metric.kind], to_decimal(value), None)
        )
    return plan


def row_key(row: Row) -> RowKey:
    return (row[0], row[1], row[3], row[4], row[2])


def merge_distinct(rows: list[Row], held: Mapping[RowKey, bytes | None]) -> list[Row]:
    """The rows with each distinct row's registers merged with those PostgreSQL holds for it (read
    under the row's lock), and its value the merged estimate; the other rows as they are."""
    out: list[Row] = []
    for row in rows:
        if row[5] == DISTINCT_CODE:
            old = held.get(row_key(row))
            if old is not None:
                regs = hll.merge(old, row[7])
                row = (*row[:6], Decimal(hll.estimate(regs)), regs)
        out.append(row)
    return out


def merge_value(kind: Kind, old: Decimal | None, new: Decimal) -> Decimal:
    """What the upsert does, in Python (the naive sink and the tests): add, or compare."""
    if old is None:
        return new
    if kind is Kind.MIN:
        return min(old, new)
    if kind is Kind.MAX:
        return max(old, new)
    return old + new


# --- offsets -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RangeRefusal:
    """Why a batch was refused: its range on `partition` does not follow `held`, the applied offset."""

    partition: int
    first: int
    held: int  # NOTHING_APPLIED when PostgreSQL holds no position
    expected: int  # what this sink last saw applied (UNKNOWN: it does not know)

    @property
    def replay(self) -> bool:
        return self.first <= self.held


def check_ranges(
    ranges: Mapping[int, tuple[int, int]], held: Mapping[int, int], expected: Mapping[int, int]
) -> RangeRefusal | None:
    """Refuse a batch (the first offending partition) when a range starts at or before the offset
    PostgreSQL holds for its partition (a replay), or when PostgreSQL holds another position than the
    sink expects (another sink applied more; only checked when the sink knows what to expect)."""
    for partition, (first, _last) in sorted(ranges.items()):
        have = held.get(partition, NOTHING_APPLIED)
        want = expected.get(partition, UNKNOWN)
        if first <= have or (want != UNKNOWN and want != have):
            return RangeRefusal(partition, first, have, want)
    return None


def new_positions(ranges: Mapping[int, tuple[int, int]]) -> list[tuple[int, int]]:
    """(partition, last offset) to store with the batch, in partition order (a stable lock order)."""
    return [(partition, last) for partition, (_first, last) in sorted(ranges.items())]


# --- retention -----------------------------------------------------------------------------------


def parse_retention(text: str) -> dict[int, int]:
    """`"60=604800,3600=0"` -> {60: 604800, 3600: 0}: bucket size (s) -> seconds kept (0: for good)."""
    out: dict[int, int] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        size, sep, keep = part.partition("=")
        if not sep:
            raise ValueError(f"retention {part!r} is not SIZE=SECONDS")
        size_s, keep_s = int(size), int(keep)
        if size_s <= 0 or keep_s < 0:
            raise ValueError(f"retention {part!r}: the size must be positive and the seconds 0 or more")
        out[size_s] = keep_s
    return out


def retention_policy(topology: Topology, overrides: Mapping[int, int] | None = None) -> dict[int, int]:
    """Seconds each bucket size of the topology is kept in PostgreSQL (0: for good). Default: under an
    hour for 7 days, an hour or more for good; `overrides` (from the setting) win."""
    sizes = {r.size_s for m in topology.metrics for r in m.rollups if r.size_s}
    policy = {s: (DEFAULT_SHORT_RETENTION_S if s < 3600 else FOREVER) for s in sorted(sizes)}
    for size_s, keep in (overrides or {}).items():
        if size_s in policy:
            policy[size_s] = keep
    return policy


def cutoffs(policy: Mapping[int, int], now_s: float) -> dict[int, int]:
    """size_s -> the first bucket start still kept at `now_s`, for the sizes not kept for good. A
    bucket is dropped once it has ended `keep` seconds ago."""
    out = {}
    for size_s, keep in policy.items():
        if keep:
            out[size_s] = (int(now_s) - keep) // size_s * size_s
    return out


def rows_by_kind(rows: Iterable[Row]) -> dict[Kind, int]:
    counts: dict[Kind, int] = {}
    for row in rows:
        kind = CODE_KINDS[row[5]]
        counts[kind] = counts.get(kind, 0) + 1
    return counts
