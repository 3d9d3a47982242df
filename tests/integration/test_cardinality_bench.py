"""`pipeline bench cardinality` on small backlogs: both paths count every event, the cells and the
partials are read back, and the figures it reports are consistent with each other."""

from __future__ import annotations

import pytest

from pipeline.bench import cardinality_bench
from pipeline.harness.local_servers import Endpoints

pytestmark = pytest.mark.integration


def test_a_small_run_measures_both_paths_exactly(servers: Endpoints) -> None:
    points = cardinality_bench.run(servers.kafka_bootstrap, servers.redis_url, 3_000, 12_000, (1, 10))
    assert [(p.events_per_key, p.keys, p.events) for p in points] == [(1, 3_000, 3_000), (10, 1_200, 12_000)]
    for p in points:
        d = p.as_dict()
        assert p.pipeline_eps > 0 and p.baseline_eps > 0
        assert d["ratio"] == round(p.pipeline_eps / p.baseline_eps, 3)
        # every key is one cell of one window at least; repeats in a window fold into it
        assert p.keys <= p.cells <= p.events
        assert 0 < p.max_partial_bytes < 900_000 and p.partial_messages >= 1
        assert 0 < d["redis_commands_per_cell"] <= 1.2
        assert p.tier1_peak_rss_mb > 20
        assert d["plan_eps"] > 0 and d["plan_redis_commands_per_cell"] > 0  # the planner beside it
    ten = points[1]
    assert ten.cells < ten.events  # ten events of a key share a window: coalesced
