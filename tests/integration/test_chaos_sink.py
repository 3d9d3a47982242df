"""A short chaos run with the PostgreSQL sink: the sink SIGKILLed three times and PostgreSQL
restarted under live load (and a root killed, Redis restarted); every key's total in PostgreSQL
equals the ledger and Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.harness.chaos import ChaosConfig, run_chaos
from pipeline.harness.fault_plan import Fault, FaultKind
from pipeline.harness.local_postgres import PostgresEndpoint
from pipeline.harness.local_servers import Endpoints

pytestmark = pytest.mark.integration

FAULTS = [
    Fault(1.0, FaultKind.KILL_SINK, 0, 0.3),
    Fault(2.0, FaultKind.KILL_MERGE, 0, 0.3),
    Fault(3.0, FaultKind.RESTART_POSTGRES, 0, 0.5),
    Fault(4.5, FaultKind.KILL_SINK, 0, 0.3),
    Fault(5.5, FaultKind.RESTART_REDIS, 0, 0.5),
    Fault(7.0, FaultKind.KILL_SINK, 0, 0.3),
]


async def test_sink_kills_and_postgres_restarts_keep_postgres_exact(
    servers: Endpoints, postgres: PostgresEndpoint, unique_name: str, tmp_path: Path
) -> None:
    if postgres.server is None:
        pytest.skip("restart_postgres needs a PostgreSQL this session started")
    cfg = ChaosConfig(
        seed=12,
        duration_s=9.0,
        rate=600.0,
        batch=50,
        keys=300,
        channels=5,
        merge_workers=1,
        drain_timeout_s=40.0,
        retry_delay_s=2.0,
        plan=FAULTS,
        sink="postgres",
    )
    try:
        report = await run_chaos(servers, cfg, tmp_path, name=unique_name, postgres=postgres)
    finally:
        postgres.server.start()  # up for the tests after this one, whatever happened
    detail = f"{report.as_dict()}\nlogs in {tmp_path}"
    assert report.events_accepted > 5_000, detail
    assert report.keys_wrong == 0 and report.lost == 0 and report.duplicated == 0, detail
    assert report.faults_by_kind["kill_sink"] == 3 and report.faults_by_kind["restart_postgres"] == 1, detail
    assert report.sink == "postgres" and report.sink_keys_checked == report.keys_checked > 0, detail
    assert report.sink_keys_wrong == 0 and report.sink_lost == 0 and report.sink_duplicated == 0, detail
    assert report.sink_keys_unlike_redis == 0, detail
    assert report.ok, detail
