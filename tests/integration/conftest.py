"""Fixtures of the integration tests beyond the session's servers (tests/conftest.py)."""

from tests.integration.redis_cluster import redis_cluster  # noqa: F401  (the session's Redis Cluster)
