"""The session's Redis Cluster (3 masters, one replica each, from the bundled server), and a way for a
test module to run its tests on one Redis and on the cluster:

    from tests.integration.redis_cluster import STORES, on_store

    @pytest.fixture(params=STORES)
    def servers(request: pytest.FixtureRequest, servers: Endpoints) -> Endpoints:
        return on_store(request, servers)

Set PIPELINE_TEST_REDIS_CLUSTER to a `redis+cluster://` URL to use an existing cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import pytest

from pipeline.harness.local_servers import Endpoints, LocalRedisCluster

STORES = ["redis", "redis-cluster"]


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a 3-master Redis Cluster, started on first use."""
    url = os.environ.get("PIPELINE_TEST_REDIS_CLUSTER")
    if url:
        yield url
        return
    with LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3, replicas=1) as cluster:
        yield cluster.url


def on_store(request: pytest.FixtureRequest, servers: Endpoints) -> Endpoints:
    """The session's servers with Redis as `request.param` says: one server, or the cluster."""
    if request.param == "redis":
        return servers
    return replace(servers, redis_url=request.getfixturevalue("redis_cluster"), redis=None)
