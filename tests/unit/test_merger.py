"""Tier 2: merging partials from many partitions into one batch per apply."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.aggregates import Kind, aggregate
from pipeline.core.merger import NOTHING_APPLIED, UNKNOWN, MergedBatch, Merger
from pipeline.core.model import Partial
from pipeline.core.redis_layout import plan_apply
from pipeline.topology import count, distinct_users, maximum, minimum, sum_of, topology

TOPO = topology(
    "merge",
    metrics=[
        count("n", "a"),
        sum_of("s", "a"),
        minimum("lo", "a"),
        maximum("hi", "a"),
        distinct_users("u", "a"),
    ],
    priorities={"a": 0},
)


def partial(
    src: int,
    cells: dict[Any, Any],
    *,
    events: int = 0,
    late: int = 0,
    dead: int = 0,
    first: int = 0,
    last: int = 0,
) -> Partial:
    return Partial(src, 0, 1, first, last, cells, events, late, dead)


def test_merges_partials_from_several_partitions() -> None:
    m = Merger(TOPO)
    a = partial(
        0,
        {
            (0, "c", "k", "total"): 2,
            (1, "c", "k", "total"): 1.5,
            (2, "c", "k", "total"): 4,
            (3, "c", "k", "total"): 4,
            (4, "c", "k", "total"): {"u1", "u2"},
        },
        events=2,
        late=1,
        dead=3,
    )
    b = partial(
        1,
        {
            (0, "c", "k", "total"): 3,
            (1, "c", "k", "total"): -0.5,
            (2, "c", "k", "total"): -7,
            (3, "c", "k", "total"): 9,
            (4, "c", "k", "total"): {"u2", "u3"},
            (0, "c", "other", "total"): 1,
        },
        events=4,
    )
    assert m.add(0, 10, a.to_json()) == a
    assert m.add(1, 20, b.to_json()) == b
    batch = m.take()
    assert batch.cells == {
        (0, "c", "k", "total"): 5,
        (1, "c", "k", "total"): 1.0,
        (2, "c", "k", "total"): -7,
        (3, "c", "k", "total"): 9,
        (4, "c", "k", "total"): {"u1", "u2", "u3"},
        (0, "c", "other", "total"): 1,
    }
    assert (batch.partials, batch.events, batch.late_dropped, batch.dead, batch.bad_partials) == (
        2,
        6,
        1,
        3,
        0,
    )
    assert batch.ranges == {0: (10, 10), 1: (20, 20)}
    assert not batch.empty


def test_tracks_first_and_last_offset_per_partition() -> None:
    m = Merger(TOPO)
    one = partial(0, {(0, "", "k", "total"): 1}).to_json()
    for partition, offset in [(2, 5), (0, 100), (2, 6), (2, 9), (0, 101), (7, 0)]:
        m.add(partition, offset, one)
    batch = m.take()
    assert batch.ranges == {2: (5, 9), 0: (100, 101), 7: (0, 0)}
    assert batch.cells == {(0, "", "k", "total"): 6}
    assert batch.partials == 6


def test_each_batch_names_the_position_it_expects_redis_to_hold() -> None:
    """Unknown until resumed; then what Redis said; then the last offset the merger applied."""
    m = Merger(TOPO)
    one = partial(0, {(0, "", "k", "total"): 1}).to_json()
    m.add(0, 10, one)
    assert m.take().expected == {0: UNKNOWN}
    m.resume({0: 41, 1: None})
    m.add(0, 42, one)
    m.add(1, 0, one)
    m.add(1, 3, one)
    batch = m.take()
    assert batch.expected == {0: 41, 1: NOTHING_APPLIED}
    m.applied(batch)  # Redis took it
    m.add(0, 44, one)
    m.add(1, 5, one)
    assert m.take().expected == {0: 42, 1: 3}
    m.add(0, 45, one)  # refused, then the merger re-reads Redis and resumes from there
    m.take()
    m.resume({0: 30})
    m.add(0, 31, one)
    assert m.take().expected == {0: 30}
    # what the root compares with Redis while idle: None where it knows nothing applied
    assert (m.position(0), m.position(1), m.position(7)) == (30, 3, None)
    m.resume({1: None})
    assert m.position(1) is None


def test_add_partial_does_not_touch_ranges_or_mutate_inputs() -> None:
    m = Merger(TOPO)
    a = partial(0, {(4, "", "k", "total"): {"u1"}, (0, "", "k", "total"): 1})
    b = partial(1, {(4, "", "k", "total"): {"u2"}, (0, "", "k", "total"): 2})
    before = copy.deepcopy((a, b))
    m.add_partial(a)
    m.add_partial(b)
    m.add_partial(a)
    batch = m.take()
    assert (a, b) == before
    assert batch.cells[(4, "", "k", "total")] == {"u1", "u2"}
    assert batch.cells[(0, "", "k", "total")] == 4
    assert batch.ranges == {} and batch.empty
    assert batch.partials == 3


V1 = orjson.loads(partial(0, {}).to_json(version=1))
V2 = orjson.loads(partial(0, {}).to_json())


MALFORMED: list[Any] = [
    None,
    b"",
    b"not json",
    b"{",
    b"[]",
    b"1",
    b"null",
    b'"partial"',
    b"{}",
    b'{"v": 1}',
    orjson.dumps({**V1, "v": 3}),
    orjson.dumps({**V1, "v": 2}),  # a v1 body under v2: no groups
    orjson.dumps({**V1, "cells": 5}),
    orjson.dumps({**V1, "cells": [[0, "c", "k"]]}),
    orjson.dumps({**V1, "cells": [[[0], "c", "k", "total", 1]]}),
    # a metric this topology does not have (e.g. a tier 1 running a newer topology)
    orjson.dumps({**V1, "cells": [[99, "c", "k", "total", 1]]}),
    orjson.dumps({**V1, "cells": [[-1, "c", "k", "total", 1]]}),
    orjson.dumps({**V1, "cells": [["0", "c", "k", "total", 1]]}),
    orjson.dumps({**V1, "cells": [[True, "c", "k", "total", 1]]}),
    # values the metric's kind cannot hold
    orjson.dumps({**V1, "cells": [[0, "c", "k", "total", "1"]]}),
    orjson.dumps({**V1, "cells": [[0, "c", "k", "total", ["u1"]]]}),
    orjson.dumps({**V1, "cells": [[0, "c", "k", "total", None]]}),
    orjson.dumps({**V1, "cells": [[1, "c", "k", "total", True]]}),
    orjson.dumps({**V1, "cells": [[4, "c", "k", "total", 3]]}),
    orjson.dumps({**V1, "cells": [[4, "c", "k", "total", [1, 2]]]}),
    orjson.dumps({**V1, "cells": [[4, "c", "k", "total", [["u"]]]]}),
    # names that are not strings, and a bucket size this metric does not have
    orjson.dumps({**V1, "cells": [[0, 5, "k", "total", 1]]}),
    orjson.dumps({**V1, "cells": [[0, "c", None, "total", 1]]}),
    orjson.dumps({**V1, "cells": [[0, "c", "k", 60, 1]]}),
    orjson.dumps({**V1, "cells": [[0, "c", "k", "60:0", 1]]}),
    # counters that are not integers
    orjson.dumps({**V1, "events": "3"}),
    orjson.dumps({**V1, "dead": None}),
    orjson.dumps({**V1, "dup": [1]}),
    # the same in format v2 (cells grouped by metric, channel and bucket)
    orjson.dumps({**V2, "v": 1}),  # a v2 body under v1: no cells
    orjson.dumps({**V2, "groups": 5}),
    orjson.dumps({**V2, "groups": {"a": 1}}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k"]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k"], [1, 2]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", "k", [1]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k"], 1]]}),
    orjson.dumps({**V2, "groups": [[[0], "c", "total", ["k"], [1]]]}),
    orjson.dumps({**V2, "groups": [[99, "c", "total", ["k"], [1]]]}),
    orjson.dumps({**V2, "groups": [[-1, "c", "total", ["k"], [1]]]}),
    orjson.dumps({**V2, "groups": [["0", "c", "total", ["k"], [1]]]}),
    orjson.dumps({**V2, "groups": [[True, "c", "total", ["k"], [1]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k"], ["1"]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k"], [["u1"]]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k"], [None]]]}),
    orjson.dumps({**V2, "groups": [[1, "c", "total", ["k"], [True]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k", "l"], [1, True]]]}),
    orjson.dumps({**V2, "groups": [[4, "c", "total", ["k"], [3]]]}),
    orjson.dumps({**V2, "groups": [[4, "c", "total", ["k"], [[1, 2]]]]}),
    orjson.dumps({**V2, "groups": [[4, "c", "total", ["k"], [[["u"]]]]]}),
    orjson.dumps({**V2, "groups": [[0, 5, "total", ["k"], [1]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", [None], [1]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k", 7], [1, 1]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", 60, ["k"], [1]]]}),
    orjson.dumps({**V2, "groups": [[0, "c", "60:0", ["k"], [1]]]}),
    # a good group first, then a bad one: nothing of the partial is merged
    orjson.dumps({**V2, "groups": [[0, "c", "total", ["k"], [5]], [0, "c", "total", ["k"], ["x"]]]}),
    orjson.dumps({**V2, "events": "3"}),
    orjson.dumps({**V2, "dead": None}),
    orjson.dumps({**V2, "dup": [1]}),
    orjson.dumps({key: v for key, v in V2.items() if key != "win"}),
]


@pytest.mark.parametrize("raw", MALFORMED, ids=[repr(r)[:40] for r in MALFORMED])
def test_malformed_partial_is_counted_not_raised(raw: Any) -> None:
    m = Merger(TOPO)
    good = partial(0, {(0, "c", "k", "total"): 2}, events=2).to_json()
    m.add(3, 10, good)
    assert m.add(3, 11, raw) is None
    m.add(3, 12, good)
    # a malformed partial on a partition of its own still moves that partition's range
    assert m.add(4, 7, raw) is None
    batch = m.take()
    assert batch.bad_partials == 2
    assert batch.partials == 2
    assert batch.events == 4
    assert batch.cells == {(0, "c", "k", "total"): 4}
    assert batch.ranges == {3: (10, 12), 4: (7, 7)}


def test_take_resets() -> None:
    m = Merger(TOPO)
    m.add(0, 1, partial(0, {(0, "", "k", "total"): 1}, events=1, late=2, dead=3).to_json())
    m.add(0, 2, b"garbage")
    first = m.take()
    assert first.cells and first.ranges and first.bad_partials == 1
    second = m.take()
    assert second == MergedBatch()
    assert second.empty
    m.add(5, 40, partial(0, {(0, "", "k", "total"): 7}).to_json())
    third = m.take()
    assert third.cells == {(0, "", "k", "total"): 7}
    assert third.ranges == {5: (40, 40)}
    assert (third.partials, third.events, third.late_dropped, third.dead) == (1, 0, 0, 0)
    # the first batch is not affected by later merges
    assert first.cells == {(0, "", "k", "total"): 1}


cell_values = {
    Kind.COUNT: st.integers(1, 1000),
    Kind.SUM: st.integers(-1000, 1000),
    Kind.MIN: st.integers(-1000, 1000),
    Kind.MAX: st.integers(-1000, 1000),
    Kind.DISTINCT: st.sets(st.sampled_from(["u1", "u2", "u3", "u4"]), max_size=3),
}


@st.composite
def partials(draw: st.DrawFn) -> Partial:
    cells: dict[Any, Any] = {}
    for _ in range(draw(st.integers(0, 6))):
        index = draw(st.integers(0, len(TOPO.metrics) - 1))
        cell = (index, draw(st.sampled_from(["", "c"])), draw(st.sampled_from(["k", "j"])), "total")
        cells[cell] = draw(cell_values[TOPO.metrics[index].kind])
    return partial(draw(st.integers(0, 3)), cells, events=draw(st.integers(0, 5)))


@settings(max_examples=100)
@given(ps=st.lists(partials(), max_size=8), data=st.data())
def test_merge_is_order_independent_and_equals_the_fold(ps: list[Partial], data: st.DataObject) -> None:
    expected: dict[Any, Any] = {}
    for cell in {c for p in ps for c in p.cells}:
        kind = TOPO.metrics[cell[0]].kind
        values = [p.cells[cell] for p in ps if cell in p.cells]
        if kind is Kind.COUNT:
            expected[cell] = sum(values)
        elif kind is Kind.DISTINCT:
            expected[cell] = set().union(*values)
        else:
            expected[cell] = aggregate(kind, [(v, None) for v in values])
    order = data.draw(st.permutations(ps))
    versions = data.draw(st.lists(st.sampled_from([1, 2]), min_size=len(ps), max_size=len(ps)))
    m = Merger(TOPO)
    for offset, (p, version) in enumerate(zip(order, versions, strict=True)):
        assert m.add(p.source_partition, offset, p.to_json(version=version)) == p
    batch = m.take()
    assert batch.cells == expected
    if 1 not in versions:  # all v2: the batch knows its groups, each cell once
        assert batch.groups is not None
        listed = [(i, ch, k, b) for (i, ch, b), keys in batch.groups.items() for k in keys]
        assert sorted(listed) == sorted(expected)
    # the apply planned from the groups the merger kept is the one planned from the cells alone
    one = copy.copy(batch)
    one.ranges, one.expected = {0: (0, 0)}, {0: -1}
    regrouped = copy.copy(one)
    regrouped.groups = None
    assert plan_apply(TOPO, one) == plan_apply(TOPO, regrouped)
    assert batch.events == sum(p.events for p in ps)
    assert batch.partials == len(ps)
