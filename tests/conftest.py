"""Shared fixtures: one broker + Redis per test session, and per-test name prefixes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from pipeline.harness.local_postgres import LocalPostgres, PostgresEndpoint
from pipeline.harness.local_servers import Endpoints, LocalServers


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    """Set PIPELINE_TEST_KAFKA and PIPELINE_TEST_REDIS to test against existing servers."""
    kafka = os.environ.get("PIPELINE_TEST_KAFKA")
    redis_url = os.environ.get("PIPELINE_TEST_REDIS")
    if kafka and redis_url:
        yield Endpoints(kafka_bootstrap=kafka, redis_url=redis_url)
        return
    # pytest keeps the last few tmp dirs, so the server logs survive a failed run.
    with LocalServers(tmp_path_factory.mktemp("servers")) as local:
        yield local.endpoints()


@pytest.fixture
def unique_name() -> str:
    """Prefix for topics, groups and Redis keys, so tests sharing the servers don't collide."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresEndpoint]:
    """A real PostgreSQL on 127.0.0.1, started on first use; PIPELINE_TEST_POSTGRES for an existing one."""
    url = os.environ.get("PIPELINE_TEST_POSTGRES")
    if url:
        yield PostgresEndpoint(url)
        return
    with LocalPostgres(tmp_path_factory.mktemp("postgres")) as server:
        yield PostgresEndpoint(server.url, server)
