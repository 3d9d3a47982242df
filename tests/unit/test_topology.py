"""Topology declarations: validation, naming, and the shipped topologies."""

from __future__ import annotations

import importlib

import pytest

from pipeline.core.topology import Metric
from pipeline.core.windows import TOTAL, Rollup
from pipeline.topology import (
    Kind,
    Partitions,
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


def simple(**options: object) -> Topology:
    return topology("t", [count("n", "a")], {"a": 0}, **options)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "Likes",
        "1likes",
        "_likes",
        "li-kes",
        "li kes",
        "li.kes",
        "li:kes",
        "likés",
        "a" * 64,
        "likes\n",
    ],
)
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        count(name, "a")
    with pytest.raises(ValueError, match="name"):
        topology(name, [count("n", "a")], {"a": 0})


@pytest.mark.parametrize("name", ["a", "likes", "page_views_2", "a" * 63])
def test_good_names_are_accepted(name: str) -> None:
    assert count(name, "a").name == name
    assert topology(name, [count("n", "a")], {"a": 0}).name == name


def test_duplicate_metric_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="same name"):
        topology("t", [count("n", "a"), sum_of("n", "a")], {"a": 0})


def test_metric_on_undeclared_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="'b'"):
        topology("t", [count("n", "a"), count("m", "b")], {"a": 0})


def test_leaderboard_on_distinct_is_rejected() -> None:
    with pytest.raises(ValueError, match="leaderboard"):
        Metric("u", Kind.DISTINCT, "a", (total(),), leaderboard=10)
    # numeric kinds may have one
    assert count("n", "a", leaderboard=5).leaderboard == 5
    assert sum_of("s", "a", leaderboard=5).leaderboard == 5


def test_rollup_validation() -> None:
    with pytest.raises(ValueError, match="rollup"):
        Metric("n", Kind.COUNT, "a", ())
    with pytest.raises(ValueError, match="same size"):
        count("n", "a", every(60, 3600), every(60, 7200))
    with pytest.raises(ValueError, match="same size"):
        count("n", "a", total(), total())
    for args in ((0, 3600), (-60, 3600), (60, 0), (60, -1), (60, 3600, -1)):
        with pytest.raises(ValueError):
            every(*args)


@pytest.mark.parametrize("options", [{"flush_interval_ms": 0}, {"flush_interval_ms": -1}, {"max_cells": 0}])
def test_non_positive_limits_are_rejected(options: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        simple(**options)


def test_default_rollup_is_total() -> None:
    for make in (count, sum_of, minimum, maximum, distinct_users):
        metric = make("n", "a")
        assert metric.rollups == (total(),)
        assert metric.rollups[0].name == TOTAL
        assert metric.on == "a"


def test_rollup_names_and_buckets() -> None:
    minute = every(60, 3600, grace_s=30)
    assert minute.name == "60s"
    assert minute.bucket(0) == "60:0"
    assert minute.bucket(59_999) == "60:0"
    assert minute.bucket(60_000) == "60:60"
    assert total().bucket(123) == TOTAL
    assert Rollup(3600, 1).bucket(7_200_000) == "3600:7200"


def test_derived_views() -> None:
    t = topology(
        "t",
        [count("n", "a"), distinct_users("u", "a"), count("m", "b"), distinct_users("v", "b")],
        {"a": 0, "b": 1, "c": 2},
    )
    assert t.types == frozenset({"a", "b", "c"})
    assert t.distinct_metrics == frozenset({1, 3})
    assert [i for i, _ in t.metrics_by_type["a"]] == [0, 1]
    assert [i for i, _ in t.metrics_by_type["b"]] == [2, 3]
    assert t.metrics_by_type["c"] == ()


def test_topic_and_group_names() -> None:
    t = simple()
    assert t.topic("events") == "t.events"
    assert t.topic("partials") == "t.partials"
    assert t.topic("updates") == "t.updates"
    assert t.topic("dead-letters") == "t.dead-letters"
    assert t.group("coalesce") == "t.coalesce"


def test_renamed_changes_topic_names_and_nothing_else() -> None:
    t = simple(flush_interval_ms=100, max_cells=10)
    r = t.renamed("other")
    assert r.name == "other" and t.name == "t"
    assert r.topic("events") == "other.events" != t.topic("events")
    assert r.group("merge") == "other.merge" != t.group("merge")
    assert (r.metrics, dict(r.priorities), r.flush_interval_ms, r.max_cells, r.partitions) == (
        t.metrics,
        dict(t.priorities),
        t.flush_interval_ms,
        t.max_cells,
        t.partitions,
    )
    with pytest.raises(ValueError, match="name"):
        t.renamed("Bad-Name")


def test_with_partitions() -> None:
    t = simple(partitions=Partitions(6, 3, 2))
    assert t.with_partitions(12, 4).partitions == Partitions(12, 4, 2)
    assert t.with_partitions(12, 4, 5).partitions == Partitions(12, 4, 5)
    assert t.partitions == Partitions(6, 3, 2)


@pytest.mark.parametrize("module", ["live_likes", "analytics"])
def test_shipped_topologies_load(module: str) -> None:
    t = importlib.import_module(f"topologies.{module}").TOPOLOGY
    assert isinstance(t, Topology)
    assert t.name == module
    assert t.metrics
    assert all(m.on in t.types for m in t.metrics)
    assert t.topic("events") == f"{module}.events"
    assert t.partitions.events > 0 and t.partitions.partials > 0


def test_shipped_topology_details() -> None:
    live = importlib.import_module("topologies.live_likes").TOPOLOGY
    assert [m.name for m in live.metrics] == ["likes", "comments"]
    assert live.metrics[0].leaderboard == 100
    assert live.types == frozenset({"like", "comment"})
    analytics = importlib.import_module("topologies.analytics").TOPOLOGY
    assert analytics.distinct_metrics == frozenset({2})
    assert [r.name for r in analytics.metrics[0].rollups] == ["total", "60s", "3600s"]
    assert analytics.metrics[0].rollups[1].grace_s == 30


def test_feed_types_must_be_declared() -> None:
    assert simple(feed_types=["a"]).feed_types == frozenset({"a"})
    with pytest.raises(ValueError, match="feed types"):
        simple(feed_types=["b"])


def test_dedup_horizon_cannot_be_negative() -> None:
    assert simple(dedup_horizon_s=0).dedup_horizon_s == 0
    with pytest.raises(ValueError):
        simple(dedup_horizon_s=-1)
