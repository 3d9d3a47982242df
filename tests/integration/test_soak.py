"""A 30-second `pipeline soak`, run as a user runs it: the report has what issue 5 asks for."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

pytestmark = pytest.mark.integration

WORKERS = {"coalesce/soak-c1", "coalesce/soak-c2", "merge/soak-m1", "broadcast/soak-b1"}


def test_short_soak_reports_rss_lag_and_exact_counts() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "soak", "--minutes", "0.5", "--capacity-seconds", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = orjson.loads(done.stdout.strip().splitlines()[-1])

    # capacity measured first, the soak at half of it
    capacity = report["capacity"]
    assert capacity["measured"] and capacity["events"] > 0 and capacity["events_per_s"] > 0
    assert report["rate_asked"] == max(1, capacity["events_per_s"] // 2)
    assert report["rate_achieved"] > 0

    # every accepted event counted once
    assert report["events_accepted"] > capacity["events"]
    assert report["events_counted"] == report["events_accepted"]
    assert report["exact"] is True

    # RSS of every worker at the end of the warm-up and at the end, and of both servers
    rss = report["rss"]
    assert WORKERS | {"server/broker", "server/redis"} <= set(rss)
    for name in WORKERS:
        assert rss[name]["worker"] is True
        assert rss[name]["start_kb"] > 0 and rss[name]["end_kb"] > 0
        assert rss[name]["start_at_s"] >= report["warmup_s"]  # the first sample after the warm-up
        assert rss[name]["end_at_s"] > rss[name]["start_at_s"]
    assert rss["server/broker"]["worker"] is False

    # lag over time, for tier 1 and the root, with a trend
    for key in ("tier1_lag", "root_lag"):
        lag = report[key]
        assert len(lag["samples"]) >= 5
        assert all(n >= 0 for _, n in lag["samples"])
        assert {"slope_eps", "max_first_quarter", "max_last_quarter", "growing"} <= set(lag["trend"])
    assert set(report["targets_met"]) == {"rss_growth_under_5pct", "lag_not_growing"}
    growing = report["tier1_lag"]["trend"]["growing"] or report["root_lag"]["trend"]["growing"]
    assert report["targets_met"]["lag_not_growing"] is not growing
    assert "events accepted" in done.stderr  # the readable table goes to stderr with --json
