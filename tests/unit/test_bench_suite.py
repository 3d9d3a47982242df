"""The benchmark suite's aggregation and plots, from canned benchmark results (no servers)."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path
from typing import Any

import pytest

from pipeline.bench import suite
from pipeline.harness.local_servers import free_port


def _coalesce(tier1: float, faust: float | None) -> dict[str, Any]:
    return {
        "events": 300_000,
        "ceiling_eps": tier1 * 1.3,
        "tier1_eps": tier1,
        "faust_eps": faust,
        "tier1_vs_ceiling": 0.77,
        "targets_met": {"tier1_vs_ceiling": True},
        "tier1_runs_eps": [tier1],  # a list: no median of it
        "params": {"events": 300_000, "keys": 10_000},
    }


def _e2e(scale: float) -> dict[str, Any]:
    per_s = {"events": 10_000 * scale, "partials": 24.0, "redis_commands": 900.0, "pushes": 4_000.0}
    return {
        "send_to_redis_ms": {"p50": 300.0 * scale, "p99": 900.0 * scale},
        "send_to_viewer_ms": {"p50": 450.0 * scale, "p99": 1_300.0 * scale},
        "rate": {"asked": 10_000.0, "achieved": 9_900.0 * scale},
        "per_s": per_s,
        "plan": {"partials_per_s": 24.0},
        "plan_error_pct": {"partials_per_s": -1.5, "redis_commands_per_s": 3.0},
        "ratios": suite.chain_ratios(per_s),
        "params": {"rate": 10_000.0, "duration": 15.0},
    }


def _canned_doc() -> dict[str, Any]:
    per_bench = {
        "coalesce": [_coalesce(180_000, 600), _coalesce(150_000, None), _coalesce(170_000, 650)],
        "redis_baseline": [
            {
                "modes": {
                    "hincrby_roundtrip": {"events_per_s": eps},
                    "hincrby_pipelined": {"events_per_s": 30_000},
                }
            }
            for eps in (2_000, 2_500, 1_800)
        ],
        "ingest": [
            {"gateway": {"events_per_s": 20_000, "p50_ms": 60.0, "p99_ms": 150.0}},
            {"gateway": {"events_per_s": 22_000, "p50_ms": 55.0, "p99_ms": 140.0}},
        ],
        "fanout": [{"pushes_per_s": 8_000, "p50_staleness_ms": 120.0, "p99_staleness_ms": 400.0}],
        "e2e": [_e2e(1.0), _e2e(0.9), _e2e(1.1)],
    }
    return suite.document(
        per_bench,
        [{"benchmark": "hotkey", "run": 1, "error": "RuntimeError: boom"}],
        runs=3,
        mode="quick",
        sizes={"coalesce": {"events": 300_000}},
        command="python -m pipeline bench all --quick",
        servers="local",
        started=dt.datetime(2026, 11, 22, 13, 0, tzinfo=dt.UTC),
        wall_s=123.4,
        load={"start": 1.0, "end": 2.0},
    )


def test_stats_are_median_min_max_and_keep_every_run() -> None:
    assert suite.stats([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "runs": [3, 1, 2]}
    # a failed run's None stays visible in runs but is not a number
    assert suite.stats([4.0, None, 2.0]) == {"median": 3.0, "min": 2.0, "max": 4.0, "runs": [4.0, None, 2.0]}
    assert suite.stats([True, False]) == {"runs": [True, False]}


def test_aggregate_keeps_the_shape_and_reduces_numbers() -> None:
    doc = _canned_doc()
    co = doc["results"]["coalesce"]
    assert co["tier1_eps"] == {
        "median": 170_000,
        "min": 150_000,
        "max": 180_000,
        "runs": [180_000, 150_000, 170_000],
    }
    assert co["faust_eps"]["median"] == pytest.approx(625)
    assert co["faust_eps"]["runs"] == [600, None, 650]
    assert co["targets_met"]["tier1_vs_ceiling"] == {"runs": [True, True, True]}
    assert "tier1_runs_eps" not in co  # series are dropped, not averaged
    assert co["params"] == {"events": 300_000, "keys": 10_000}  # sizes kept as they are
    e2e = doc["results"]["e2e"]
    assert e2e["send_to_redis_ms"]["p99"]["min"] == pytest.approx(810.0)
    assert e2e["send_to_redis_ms"]["p99"]["max"] == pytest.approx(990.0)
    assert e2e["ratios"]["events_per_partial"]["median"] == pytest.approx(10_000 / 24, abs=0.01)


def test_headline_lists_the_figures_present() -> None:
    rows = {(r["benchmark"], r["figure"]): r for r in _canned_doc()["headline"]}
    tier1 = rows[("coalesce", "tier 1: CoalesceWorker, committed")]
    assert (tier1["median"], tier1["min"], tier1["max"], tier1["n"]) == (170_000, 150_000, 180_000, 3)
    assert rows[("coalesce", "naive Faust agent, windowed table")]["n"] == 2
    assert rows[("e2e", "send -> viewer, p99")]["unit"] == "ms"
    assert rows[("e2e", "pushes/s")]["median"] == 4_000.0
    # hotkey failed in every run: no row, and the error is in the document
    assert not any(b == "hotkey" for b, _ in rows)
    assert "FAILED hotkey run 1" in suite.table(_canned_doc())


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    written = suite.plot(_canned_doc(), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["coalescing.png", "latency.png", "throughput.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 10_000


def test_plots_skip_what_did_not_run(tmp_path: Path) -> None:
    doc = _canned_doc()
    del doc["results"]["e2e"]
    written = suite.plot(doc, tmp_path)
    assert sorted(p.name for p in written) == ["latency.png", "throughput.png"]


def test_servers_gone_names_the_server_that_does_not_answer() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        closed = free_port()
        assert suite.servers_gone(f"127.0.0.1:{port}", f"redis://127.0.0.1:{port}/0") is None
        gone = suite.servers_gone(f"127.0.0.1:{port}", f"redis://127.0.0.1:{closed}/0")
        assert gone is not None and gone.startswith("Redis at")
        gone = suite.servers_gone(f"127.0.0.1:{closed}", f"redis://127.0.0.1:{port}/0")
        assert gone is not None and gone.startswith("the broker at")


def test_the_cardinality_backlog_keeps_each_keys_events_together() -> None:
    from pipeline.bench.cardinality_bench import backlog

    events = list(backlog(5, 3))
    assert len(events) == 15
    assert [k for k, _ in events] == [f"comment-{k}" for k in range(5) for _ in range(3)]
    assert {c for _, c in events} == {f"video-{k}" for k in range(5)}
