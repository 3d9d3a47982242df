"""The capacity model: limits it must respect and the advice it must give."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.planner import Workload, plan


def test_one_partial_per_source_and_root_partition_per_window_at_most() -> None:
    p = plan(Workload(events_per_s=200_000, keys=100_000, events_partitions=6, partials_partitions=3))
    assert p.partials_per_s == pytest.approx(6 * 3 / 0.25, rel=1e-3)


def test_viral_key_is_split_by_its_rate() -> None:
    p = plan(Workload(events_per_s=100_000, keys=10_000, hot_share=0.5, partition_budget_eps=20_000))
    assert p.hot_keys == [("viral", 50_000, 3)]


def test_sparse_keys_get_the_window_warning_and_dense_ones_do_not() -> None:
    sparse = plan(Workload(events_per_s=1_000, keys=1_000_000, zipf_s=0.1))
    dense = plan(Workload(events_per_s=100_000, keys=1_000))
    assert any("saves almost no writes" in w for w in sparse.warnings)
    assert not dense.warnings
    assert dense.events_per_redis_command > 10 * sparse.events_per_redis_command


def test_too_few_partitions_for_the_workers_is_flagged() -> None:
    p = plan(Workload(events_per_s=2_000_000, keys=1_000, events_partitions=4))
    assert p.workers["coalesce"] > 4
    assert any("add partitions" in w for w in p.warnings)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(100, 500_000),
    keys=st.integers(1, 20_000),
    window=st.sampled_from([0.1, 0.25, 1.0]),
)
def test_more_events_never_mean_fewer_cells_and_writes_never_exceed_one_per_cell_apply(
    rate: float, keys: int, window: float
) -> None:
    w = Workload(events_per_s=rate, keys=keys, flush_interval_s=window)
    more = Workload(events_per_s=rate * 2, keys=keys, flush_interval_s=window)
    assert plan(more).cells_per_window >= plan(w).cells_per_window
    p = plan(w)
    assert p.cells_per_window <= min(keys * 6, rate * window) + 1e-6  # a split key has up to 6 sub-keys
    assert p.partials_per_s <= 6 * 3 / window + 1e-6


def test_dedup_memory_is_the_ids_of_a_horizon_at_the_stated_bytes_each() -> None:
    from pipeline.core import dedup

    p = plan(Workload(events_per_s=100_000, keys=10_000, dedup_horizon_s=600))
    assert p.dedup_ids == pytest.approx(100_000 * 600 * (1 + 1 / dedup.BUCKETS))
    assert p.dedup_bytes_per_id <= 16
    assert p.dedup_memory_bytes == pytest.approx(p.dedup_ids * dedup.bytes_per_id())
    assert p.dedup_changelog_bytes >= 100_000 * 600 * dedup.BYTES_PER_ID
    half = plan(Workload(events_per_s=100_000, keys=10_000, dedup_horizon_s=600, id_share=0.5))
    assert half.dedup_memory_bytes == pytest.approx(p.dedup_memory_bytes / 2)
    off = plan(Workload(events_per_s=100_000, keys=10_000, dedup_horizon_s=0))
    assert (off.dedup_ids, off.dedup_memory_bytes, off.dedup_changelog_bytes) == (0, 0, 0)


def test_plan_command_reports_dedup_memory(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["plan", "--rate", "100000"]) == 0
    out = capsys.readouterr().out
    assert "dedup memory (tier 1)" in out and "67,500,000 ids in the horizon" in out


def test_a_backlog_drains_faster_the_more_events_share_a_cell() -> None:
    from pipeline.core.planner import drain

    points = [drain(100_000, per_key, channels=50) for per_key in (1, 2, 10, 100)]
    assert [p.events_per_s for p in points] == sorted(p.events_per_s for p in points)
    assert all(p.redis_commands_per_cell > 0 for p in points)
    # one event per key: an HMGET and an HSET per 1,000 fields of a hash, far under one command per
    # cell; few cells per apply: the fixed costs show
    assert points[0].redis_commands_per_cell < 0.1 < drain(10_000, 100, channels=50).redis_commands_per_cell
    # the root applies each window on its own while it keeps up (10 per key: a window's cells over the
    # 3 root partitions per apply), and falls behind where cells arrive fastest (one per key): each
    # apply then takes what arrived during the last, more than one window
    ten, one = points[2], points[0]
    window_cells = ten.events_per_s * 0.25 / 10
    assert ten.applies == pytest.approx(ten.cells / (window_cells / 3))
    assert one.applies < one.cells / (one.events_per_s * 0.25 / 3)
    # a bigger backlog drains faster: the fixed latency weighs less
    assert drain(500_000, 1, channels=50).events_per_s > one.events_per_s


def test_the_plan_states_a_tier1_workers_memory_bound() -> None:
    from pipeline.core import coalescer

    p = plan(Workload(events_per_s=100_000, keys=10_000, dedup_horizon_s=0))
    per_worker_cells = p.cells_per_window / p.workers["coalesce"]
    assert p.tier1_memory_bytes == pytest.approx(
        coalescer.tier1_memory_bound(0) + coalescer.BYTES_PER_OPEN_CELL * per_worker_cells
    )
    # a long tail fills windows to max_cells at most; ids add their bytes inside the horizon
    tail = plan(Workload(events_per_s=100_000, keys=50_000_000, dedup_horizon_s=0, max_cells=1_000))
    assert tail.tier1_memory_bytes == coalescer.tier1_memory_bound(1_000)
    with_ids = plan(Workload(events_per_s=100_000, keys=10_000))
    assert with_ids.tier1_memory_bytes == pytest.approx(
        p.tier1_memory_bytes + with_ids.dedup_memory_bytes / with_ids.workers["coalesce"]
    )


def test_redis_commands_per_shard_follow_the_root_partitions() -> None:
    """Each root partition's applies go to the shard of its hash tag; the tags spread the partitions
    evenly over masters holding equal slot ranges, so R = 3 or 6 over 3 shards loads them alike."""
    one = plan(Workload(events_per_s=100_000, keys=10_000))
    assert one.redis_commands_per_s_per_shard == [pytest.approx(one.redis_commands_per_s)]
    for roots in (3, 6):
        p = plan(Workload(events_per_s=100_000, keys=10_000, partials_partitions=roots, redis_shards=3))
        shards = p.redis_commands_per_s_per_shard
        assert len(shards) == 3 and sum(shards) == pytest.approx(p.redis_commands_per_s)
        assert max(shards) == pytest.approx(min(shards))
    uneven = plan(Workload(events_per_s=100_000, keys=10_000, partials_partitions=4, redis_shards=3))
    assert max(uneven.redis_commands_per_s_per_shard) == pytest.approx(uneven.redis_commands_per_s / 2)
    with pytest.raises(ValueError):
        Workload(events_per_s=1, keys=1, redis_shards=0)


def test_plan_command_prints_commands_per_shard(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["plan", "--rate", "100000", "--redis-shards", "3"]) == 0
    out = capsys.readouterr().out
    assert "Redis commands/s/shard" in out and "busiest 1.00x the mean" in out
