"""The PostgreSQL sink's sans-I/O part: rows from a merged batch, the offsets check, retention."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pipeline.core import hll
from pipeline.core.aggregates import Kind, aggregate
from pipeline.core.merger import NOTHING_APPLIED, UNKNOWN, MergedBatch, Merger
from pipeline.core.model import Partial
from pipeline.core.sink_plan import (
    DEFAULT_SHORT_RETENTION_S,
    FOREVER,
    KIND_CODES,
    bucket_name,
    check_ranges,
    cutoffs,
    merge_distinct,
    merge_value,
    new_positions,
    parse_retention,
    plan_rows,
    retention_policy,
    row_key,
    split_bucket,
    to_decimal,
)
from pipeline.topology import count, distinct_users, every, maximum, minimum, sum_of, topology, total

MINUTE = every(60, retention_s=3600)
HOUR = every(3600, retention_s=86400)
TOPO = topology(
    "sinkplan",
    metrics=[
        count("views", "v", total(), MINUTE, HOUR),
        sum_of("spent", "v", total()),
        minimum("lo", "v", total()),
        maximum("hi", "v", total()),
        distinct_users("users", "v", total(), MINUTE),
    ],
    priorities={"v": 0},
)


def batch(cells: dict[Any, Any]) -> MergedBatch:
    return MergedBatch(cells=cells, ranges={0: (5, 9)})


def test_one_row_per_cell_with_its_kind_and_an_exact_value() -> None:
    plan = plan_rows(
        TOPO,
        batch(
            {
                (0, "site", "/home", "total"): 7,
                (0, "site", "/home", "3600:1732269600"): 3,
                (1, "site", "/home", "total"): 0.1,
                (2, "site", "/home", "total"): -2,
                (3, "site", "/home", "total"): 2**60,
                (4, "site", "/home", "total"): {"u1"},
            }
        ),
    )
    assert sorted(plan.rows) == sorted(
        [
            ("views", 0, 0, "site", "/home", KIND_CODES[Kind.COUNT], Decimal(7), None),
            ("views", 3600, 1732269600, "site", "/home", KIND_CODES[Kind.COUNT], Decimal(3), None),
            ("spent", 0, 0, "site", "/home", KIND_CODES[Kind.SUM], Decimal("0.1"), None),
            ("lo", 0, 0, "site", "/home", KIND_CODES[Kind.MIN], Decimal(-2), None),
            ("hi", 0, 0, "site", "/home", KIND_CODES[Kind.MAX], Decimal(2**60), None),
            ("users", 0, 0, "site", "/home", KIND_CODES[Kind.DISTINCT], Decimal(1), hll.registers({"u1"})),
        ]
    )
    assert plan.distinct_cells == 1


def test_cells_of_buckets_retention_dropped_are_not_written() -> None:
    plan = plan_rows(
        TOPO,
        batch({(0, "s", "k", "60:600"): 1, (0, "s", "k", "60:660"): 2, (0, "s", "k", "3600:0"): 4}),
        cutoffs={60: 660},
    )
    assert [(r[1], r[2]) for r in plan.rows] == [(60, 660), (3600, 0)]
    assert plan.expired_cells == 1


def test_buckets_round_trip() -> None:
    assert split_bucket("total") == (0, 0)
    assert split_bucket("3600:1732269600") == (3600, 1732269600)
    for bucket in ("total", "60:120", "3600:1732269600"):
        assert bucket_name(*split_bucket(bucket)) == bucket


@given(st.lists(st.integers(-(2**62), 2**62) | st.floats(-1e15, 1e15, allow_nan=False), min_size=1))
def test_merging_row_values_equals_aggregating_the_events(values: list[float]) -> None:
    """Whatever the split into batches, the upsert's add/compare gives the direct aggregate."""
    for kind in (Kind.COUNT, Kind.SUM, Kind.MIN, Kind.MAX):
        held: Decimal | None = None
        for v in values:
            one = 1 if kind is Kind.COUNT else v
            held = merge_value(kind, held, to_decimal(one))
        direct = aggregate(kind, [(v, None) for v in values])
        if kind is Kind.SUM:
            # PostgreSQL adds exact decimals; the float sum rounds: they agree to float precision
            bound = 1e-12 * sum(abs(v) for v in values) * len(values) + 1e-9
            assert held is not None and abs(float(held) - direct) <= bound
        else:
            assert held == to_decimal(direct)


def test_the_merger_feeds_the_plan_as_the_root_merges() -> None:
    m = Merger(TOPO)
    for offset, n in enumerate((3, 4)):
        cells = {(0, "s", "/home", "60:60"): n, (3, "s", "/home", "total"): float(n)}
        m.add(1, 10 + offset, Partial(0, 1, 1, 0, 0, cells, n).to_json())
    merged = m.take()
    plan = plan_rows(TOPO, merged)
    assert ("views", 60, 60, "s", "/home", KIND_CODES[Kind.COUNT], Decimal(7), None) in plan.rows
    assert ("hi", 0, 0, "s", "/home", KIND_CODES[Kind.MAX], Decimal("4.0"), None) in plan.rows
    assert new_positions(merged.ranges) == [(1, 11)]


def test_a_replay_is_refused() -> None:
    ranges = {0: (10, 20), 1: (5, 6)}
    assert check_ranges(ranges, {0: 9, 1: 4}, {}) is None
    assert check_ranges(ranges, {}, {}) is None  # nothing applied yet
    refusal = check_ranges(ranges, {0: 10, 1: 4}, {})
    assert refusal is not None and refusal.partition == 0 and refusal.replay
    refusal = check_ranges(ranges, {0: 30, 1: 4}, {})
    assert refusal is not None and refusal.replay and refusal.held == 30


def test_a_position_other_than_expected_is_refused() -> None:
    """Another sink applied more (a zombie's batch), or PostgreSQL lost writes: seek, never guess."""
    ranges = {0: (10, 20)}
    assert check_ranges(ranges, {0: 9}, {0: 9}) is None
    assert check_ranges(ranges, {0: 5}, {0: UNKNOWN}) is None  # not known: only replays refused
    refusal = check_ranges(ranges, {0: 5}, {0: 9})
    assert refusal is not None and not refusal.replay and refusal.expected == 9
    refusal = check_ranges(ranges, {}, {0: 9})
    assert refusal is not None and refusal.held == NOTHING_APPLIED


def test_retention_defaults_and_overrides() -> None:
    assert retention_policy(TOPO) == {60: DEFAULT_SHORT_RETENTION_S, 3600: FOREVER}  # distinct's too
    assert retention_policy(TOPO, parse_retention("60=3600, 3600=2592000, 5=1")) == {60: 3600, 3600: 2592000}
    assert parse_retention("") == {}
    for bad in ("60", "0=5", "60=-1"):
        try:
            parse_retention(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_cutoffs_keep_a_bucket_until_it_ended_keep_seconds_ago() -> None:
    policy = {60: 600, 3600: FOREVER}
    cut = cutoffs(policy, now_s=10_000)
    assert cut == {60: 9360}  # 10,000 - 600 = 9,400: the bucket [9,360, 9,420) is still kept
    assert 3600 not in cut


def test_distinct_rows_merge_their_registers_with_what_postgresql_holds() -> None:
    plan = plan_rows(TOPO, batch({(4, "s", "k", "60:60"): {"u1", "u2"}, (0, "s", "k", "60:60"): 2}))
    (distinct,) = [r for r in plan.rows if r[5] == KIND_CODES[Kind.DISTINCT]]
    assert distinct[6] == 2 and distinct[7] == hll.registers({"u1", "u2"})
    held = {row_key(distinct): hll.registers({"u2", "u3", "u4"})}
    merged = merge_distinct(plan.rows, held)
    (after,) = [r for r in merged if r[5] == KIND_CODES[Kind.DISTINCT]]
    assert after[6] == 4 and after[7] == hll.registers({"u1", "u2", "u3", "u4"})
    assert [r for r in merged if r[5] != KIND_CODES[Kind.DISTINCT]] == [
        r for r in plan.rows if r[5] != KIND_CODES[Kind.DISTINCT]
    ]
    assert merge_distinct(plan.rows, {}) == plan.rows  # a new row: its own registers
