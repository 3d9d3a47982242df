"""`pipeline bench e2e` measures a real pipeline end to end and keeps the contract the suite relies on."""

from __future__ import annotations

import argparse

import pytest

from pipeline.bench import e2e_bench
from pipeline.harness.local_servers import Endpoints

pytestmark = pytest.mark.integration


def test_small_run_reports_latencies_rates_reductions_and_the_plan(servers: Endpoints) -> None:
    args = e2e_bench.defaults()
    args.rate, args.duration, args.viewers = 2000.0, 6.0, 10
    r = e2e_bench.run(servers.kafka_bootstrap, servers.redis_url, args)

    for name in ("send_to_redis_ms", "send_to_viewer_ms"):
        latency = r[name]
        assert latency["probes"] > 0
        assert latency["lost"] == 0, f"{name}: a probe never arrived"
        assert 0 < latency["p50"] <= latency["p99"]
    # a viewer learns of a like only after Redis has it (the root publishes after its apply)
    assert r["send_to_viewer_ms"]["p50"] >= r["send_to_redis_ms"]["p50"] * 0.5

    assert r["rate"]["asked"] == 2000.0
    assert r["rate"]["achieved"] > 0
    per_s = r["per_s"]
    assert set(per_s) >= {"events", "partials", "redis_commands", "pushes"}
    # tier 1 takes in what the writers send (probes add 10/s); the interval's edges cost a window or so
    assert per_s["events"] == pytest.approx(r["rate"]["achieved"], rel=0.25)
    # the chain reduces: events -> fewer partials; every viewer is pushed to
    assert 0 < per_s["partials"] < per_s["events"]
    assert per_s["redis_commands"] > 0 and per_s["pushes"] > 0
    assert r["viewers"]["connected"] == 10
    assert r["ratios"]["events_per_partial"] > 1

    plan = r["plan"]
    assert plan["events_per_s"] == pytest.approx(per_s["events"], rel=1e-3)
    for measured, predicted, error in (
        (per_s["partials"], plan["partials_per_s"], r["plan_error_pct"]["partials_per_s"]),
        (per_s["redis_commands"], plan["redis_commands_per_s"], r["plan_error_pct"]["redis_commands_per_s"]),
    ):
        # the report rounds the rates to 0.1/s and the error to 0.1 %; the error is of the unrounded rates
        slack = 0.1 + 0.05 / measured * 100 * (1 + predicted / measured)
        assert error == pytest.approx((predicted - measured) / measured * 100, abs=slack)


def test_defaults_are_the_documented_command_line_defaults() -> None:
    from pipeline.cli import build_parser

    parsed = build_parser().parse_args(["bench", "e2e"])
    expected = vars(e2e_bench.defaults())
    assert {k: v for k, v in vars(parsed).items() if k in expected} == expected
    assert isinstance(e2e_bench.defaults(), argparse.Namespace)
