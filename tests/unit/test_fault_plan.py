"""Chaos fault schedules and the exact-count verdict: reproducible, bounded, and strict."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.model import check_event
from pipeline.harness.chaos import Workload, compare_counts
from pipeline.harness.fault_plan import (
    CLUSTER_REQUIRED,
    CLUSTER_WEIGHTS,
    DEFAULT_WEIGHTS,
    REDIS_CLUSTER_REQUIRED,
    REDIS_CLUSTER_WEIGHTS,
    SINK_REQUIRED,
    SINK_WEIGHTS,
    FaultKind,
    breakdown,
    plan_faults,
)


@given(st.integers(0, 2**32), st.integers(0, 60), st.floats(1, 600))
def test_a_plan_is_a_function_of_its_seed_and_stays_in_the_window(
    seed: int, count: int, duration: float
) -> None:
    plan = plan_faults(seed, count, duration)
    assert plan == plan_faults(seed, count, duration)
    assert len(plan) == count
    assert [f.at_s for f in plan] == sorted(f.at_s for f in plan)
    assert all(0.1 * duration - 0.01 <= f.at_s <= 0.85 * duration + 0.01 for f in plan)
    assert all(0 <= f.pause_s <= 2.0 for f in plan)
    assert sum(f.kind is FaultKind.ADD_COALESCE for f in plan) <= 1
    assert sum(f.kind is FaultKind.ADD_MERGE for f in plan) <= 1
    assert sum(breakdown(plan).values()) == count


@given(st.integers(0, 2**32), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2))
def test_removals_never_empty_a_tier(seed: int, coalesce: int, merge: int, max_added: int) -> None:
    weights = {**DEFAULT_WEIGHTS, FaultKind.REMOVE_COALESCE: 5, FaultKind.REMOVE_MERGE: 5}
    plan = plan_faults(
        seed, 40, 60, weights=weights, max_added=max_added, workers={"coalesce": coalesce, "merge": merge}
    )
    for tier, add, remove, start in [
        ("coalesce", FaultKind.ADD_COALESCE, FaultKind.REMOVE_COALESCE, coalesce),
        ("merge", FaultKind.ADD_MERGE, FaultKind.REMOVE_MERGE, merge),
    ]:
        running = start
        for f in plan:
            running += (f.kind is add) - (f.kind is remove)
            assert running >= 1, (tier, plan)
        assert sum(f.kind is add for f in plan) <= max_added


def test_the_default_plan_scales_both_groups_out_and_in() -> None:
    kinds = {f.kind for seed in (1, 2, 3) for f in plan_faults(seed, 20, 60)}
    scaling = {FaultKind.ADD_COALESCE, FaultKind.REMOVE_COALESCE, FaultKind.ADD_MERGE, FaultKind.REMOVE_MERGE}
    assert scaling <= kinds


def test_kinds_with_zero_weight_never_appear() -> None:
    weights = {**DEFAULT_WEIGHTS, FaultKind.RESTART_BROKER: 0, FaultKind.RESTART_REDIS: 0}
    plan = plan_faults(7, 200, 60, weights=weights)
    kinds = {f.kind for f in plan}
    assert FaultKind.RESTART_BROKER not in kinds and FaultKind.RESTART_REDIS not in kinds
    assert FaultKind.KILL_COALESCE in kinds and FaultKind.KILL_MERGE in kinds


def test_different_seeds_give_different_plans() -> None:
    assert plan_faults(1, 20, 60) != plan_faults(2, 20, 60)


def test_compare_counts_names_lost_and_duplicated_separately() -> None:
    ledger = Counter({("v", "a"): 3, ("v", "b"): 2, ("w", "c"): 1})
    got = {("v", "a"): 3.0, ("v", "b"): 4.0, ("x", "d"): 1.0}
    check = compare_counts(ledger, got)
    assert check.keys_checked == 4
    assert check.keys_wrong == 3
    assert check.lost == 1  # ("w", "c") missing
    assert check.duplicated == 3  # 2 too many on b, 1 on a key nobody sent
    assert compare_counts(ledger, {k: float(v) for k, v in ledger.items()}).keys_wrong == 0


def test_the_workload_is_deterministic_valid_and_has_a_viral_key() -> None:
    events = Workload(5, 0, keys=200, channels=5, viral_share=0.3).batch(2000)
    assert events == Workload(5, 0, keys=200, channels=5, viral_share=0.3).batch(2000)
    for e in events:
        check_event(e, frozenset({"like"}))  # raises if the schema refuses an unusual key
    assert len({e["id"] for e in events}) == len(events)
    top, n = Counter(e["key"] for e in events).most_common(1)[0]
    assert ":" in top and n > 400
    assert any(":" in e["key"] or "{" in e["key"] or "\xff" in e["key"] for e in events[:200])


@given(st.integers(0, 2**32), st.integers(5, 40), st.integers(2, 4), st.integers(2, 3))
def test_a_cluster_plan_has_its_required_broker_kills_and_kills_for_good(
    seed: int, count: int, coalesce: int, merge: int
) -> None:
    plan = plan_faults(
        seed,
        count,
        90,
        weights=CLUSTER_WEIGHTS,
        workers={"coalesce": coalesce, "merge": merge},
        required=CLUSTER_REQUIRED,
    )
    kinds = breakdown(plan)
    assert kinds["kill_broker"] >= 3
    assert kinds["kill_for_good"] >= 2
    for_good = [f for f in plan if f.kind is FaultKind.KILL_FOR_GOOD]
    assert [f.tier for f in for_good[:2]] == ["coalesce", "merge"]  # a tier-1 worker and a root
    assert all(f.pause_s == 0 for f in for_good)
    running = {"coalesce": coalesce, "merge": merge}
    for f in plan:  # never a tier without a worker, whatever leaves it and however
        if f.kind in (FaultKind.ADD_COALESCE, FaultKind.ADD_MERGE):
            running["coalesce" if f.kind is FaultKind.ADD_COALESCE else "merge"] += 1
        if f.kind in (FaultKind.REMOVE_COALESCE, FaultKind.REMOVE_MERGE):
            running["coalesce" if f.kind is FaultKind.REMOVE_COALESCE else "merge"] -= 1
        if f.kind is FaultKind.KILL_FOR_GOOD:
            running[f.tier] -= 1
        assert min(running.values()) >= 1, plan


def test_required_faults_that_do_not_fit_are_refused() -> None:
    try:
        plan_faults(1, 4, 60, weights=CLUSTER_WEIGHTS, required=CLUSTER_REQUIRED)
    except ValueError as exc:
        assert "do not fit" in str(exc)
    else:
        raise AssertionError("5 required faults fitted in 4")


def test_a_sink_run_plans_its_kills_and_postgres_restarts() -> None:
    weights = {**DEFAULT_WEIGHTS, **SINK_WEIGHTS}
    for seed in range(1, 6):
        plan = plan_faults(seed, 20, 60.0, weights=weights, required=SINK_REQUIRED)
        kinds = breakdown(plan)
        assert kinds["kill_sink"] >= 3 and kinds["restart_postgres"] >= 1, kinds
    # without the sink weights, a plan never holds them (old seeds plan what they planned)
    plan = plan_faults(1, 20, 60.0)
    assert breakdown(plan)["kill_sink"] == breakdown(plan)["restart_postgres"] == 0
    assert plan == plan_faults(1, 20, 60.0, weights=DEFAULT_WEIGHTS)


def test_a_redis_cluster_run_kills_masters_at_least_twice() -> None:
    """`pipeline chaos --redis cluster`: kill_redis_master in every plan, 2 or more of 20 faults; no
    restart_redis (the single server is not there)."""
    weights = {**DEFAULT_WEIGHTS, FaultKind.RESTART_REDIS: 0, **REDIS_CLUSTER_WEIGHTS}
    for seed in range(1, 8):
        plan = plan_faults(seed, 20, 60.0, weights=weights, required=REDIS_CLUSTER_REQUIRED)
        kinds = breakdown(plan)
        assert kinds["kill_redis_master"] >= 2 and kinds["restart_redis"] == 0, kinds
        assert all(f.pause_s > 0 for f in plan if f.kind is FaultKind.KILL_REDIS_MASTER)
    assert breakdown(plan_faults(1, 20, 60.0))["kill_redis_master"] == 0
