"""`pipeline bench sink` against a real PostgreSQL: both sinks end exact, and the report holds the
rates of each from the same run."""

from __future__ import annotations

import pytest

from pipeline.bench.sink_bench import run
from pipeline.harness.local_postgres import PostgresEndpoint

pytestmark = pytest.mark.integration


async def test_bench_sink_measures_both_sinks_exactly(postgres: PostgresEndpoint) -> None:
    report = await run(postgres.url, partials_n=40, cells=20, batch=10, rounds=2, pages=500)
    assert report["exact"]
    for mode in ("batched", "naive"):
        r = report[mode]
        assert r["exact"] and r["partials"] == 80 and r["rows"] > 0
        assert r["partials_per_s"] > 0 and r["rows_per_s"] > 0 and len(r["rows_per_s_rounds"]) == 2
    assert report["batched"]["rows"] == report["naive"]["rows"]  # the same partials, merged the same way
    assert report["naive"]["statements"] > report["batched"]["statements"]  # a statement per row
