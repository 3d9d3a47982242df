"""The gateway's OpenAPI document against the gateway itself, by an outside tool: Schemathesis
generates requests from /openapi.json (valid ones, then invalid ones) and sends them to a live
gateway process; every check it has must pass. The document is generated from the table the
validator reads (pipeline.core.model.EVENT_FIELDS), so a failure here is a real disagreement."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from pipeline.harness.local_servers import Endpoints
from tests.integration.test_ingest_gateway import Gateway, start_gateway

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "k-contract"
EXAMPLES = 500  # per mode and phase: about 1,000 requests per mode, 15 s on the 2-core machine


@pytest.fixture(scope="module")
def gateway(servers: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway alone (no tier 1 behind it: what it answers is the subject, not what is counted).

    Overload thresholds are out of reach: a 429 is documented, but Schemathesis's check that valid
    data is accepted would count one against the document.
    """
    gw = start_gateway(
        servers,
        "t" + uuid.uuid4().hex[:10],
        tmp_path_factory.mktemp("contract"),
        ingest_api_keys=API_KEY,
        ingest_lag_shed=10**12,
        ingest_lag_high=10**12,
        ingest_latency_high_ms=0,
    )
    try:
        yield gw
    finally:
        gw.close()
        gw.worker.stop()


def schemathesis_run(gateway: Gateway, mode: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    st = Path(sys.executable).with_name("st")
    return subprocess.run(
        [
            str(st),
            "run",
            f"http://127.0.0.1:{gateway.port}/openapi.json",
            "--mode",
            mode,
            "--checks",
            "all",
            "--max-examples",
            str(EXAMPLES),
            "--header",
            f"X-API-Key: {API_KEY}",
            "--workers",
            "1",
            "--seed",
            "15",
            "--generation-database",
            "none",
            "--request-timeout",
            "15",
            "--report",
            "json",
            "--report-json-path",
            str(workdir / "report.json"),
            "--no-color",
        ],
        cwd=workdir,  # its .schemathesis folder goes there
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.contracts.schemathesis_hooks",
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_failure(gateway: Gateway, mode: str, tmp_path: Path) -> None:
    """Positive: every request the document calls valid is accepted (202) and answered as documented.
    Negative: every request it calls invalid is refused (4xx), never accepted and never a 5xx."""
    run = schemathesis_run(gateway, mode, tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["complete"] and report["exit_code"] == 0
    assert report["operations"]["tested"] == 1
    assert report["test_cases"]["generated"] >= 200, report["test_cases"]
    assert report["test_cases"]["with_failures"] == 0 and report["errors"] == []
    assert report["phases"]["fuzzing"]["status"] == "success"
