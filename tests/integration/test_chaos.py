"""A short chaos run: worker kills, Redis and broker restarts, a worker joining and one leaving,
under live load with 5% client retries; every key exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.harness.chaos import ChaosConfig, run_chaos
from pipeline.harness.fault_plan import Fault, FaultKind
from pipeline.harness.local_servers import Endpoints

pytestmark = pytest.mark.integration

FAULTS = [
    Fault(1.0, FaultKind.KILL_COALESCE, 0, 0.3),
    Fault(2.0, FaultKind.KILL_MERGE, 0, 0.3),
    Fault(3.0, FaultKind.RESTART_REDIS, 0, 0.5),
    Fault(4.0, FaultKind.ADD_COALESCE, 0, 0.0),
    Fault(5.5, FaultKind.RESTART_BROKER, 0, 0.5),
    Fault(6.5, FaultKind.KILL_BROADCAST, 0, 0.3),
    Fault(7.0, FaultKind.KILL_COALESCE, 1, 0.3),
    Fault(8.0, FaultKind.REMOVE_COALESCE, 0, 0.0),
]


async def test_faults_under_load_keep_every_count_exact(
    servers: Endpoints, unique_name: str, tmp_path: Path
) -> None:
    cfg = ChaosConfig(
        seed=11,
        duration_s=9.0,
        rate=600.0,
        batch=50,
        keys=300,
        channels=5,
        split_threshold_eps=100.0,  # the viral key (30% of 600/s per writer) gets split
        merge_workers=1,
        drain_timeout_s=40.0,
        retry_delay_s=2.0,  # 5% of the events sent again by another writer, faults in between
        plan=FAULTS,
    )
    report = await run_chaos(servers, cfg, tmp_path, name=unique_name)
    detail = f"{report.as_dict()}\nlogs in {tmp_path}"
    assert report.events_accepted > 5_000, detail
    assert report.keys_wrong == 0 and report.lost == 0 and report.duplicated == 0, detail
    assert report.events_counted == report.events_accepted, detail
    assert report.faults_injected + report.faults_skipped == len(FAULTS), detail
    assert report.events_on_subkeys > 0, detail  # hot-key splitting was exercised
    assert report.retries_sent > 100, detail  # and none of them counted
    assert report.events_rejected == 0, detail  # every unusual key passed the schema
    assert report.broadcast_ok, detail
