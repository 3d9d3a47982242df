"""Connecting to Redis as the settings say: URL, ACL user and password, TLS; secrets kept out of logs.

A URL whose scheme is `redis+cluster://` (or `rediss+cluster://` with TLS) names a Redis Cluster by
any of its nodes: the client is redis-py's `RedisCluster`, which learns the slots and sends each
command, script and transaction to the shard of its keys' slot (every key the pipeline writes in one
step shares a hash tag: docs/CONTRACT.md, key layout 2). Everything else is one Redis.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from pipeline.runtime.settings import Settings


def options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `Redis.from_url(settings.redis, ...)`: only what the settings set."""
    kwargs: dict[str, Any] = {}
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    password = settings.redis_password.get_secret_value()
    if password:
        kwargs["password"] = password
    if settings.redis_ssl_cafile:
        kwargs["ssl_ca_certs"] = settings.redis_ssl_cafile
    return kwargs


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster(url: str) -> bool:
    """Whether the URL names a Redis Cluster: `redis+cluster://host:port` (`rediss+cluster://` with
    TLS), or several nodes, `redis+cluster://host:port,host:port,...`, any of which may be down."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_url(nodes: list[tuple[str, int]]) -> str:
    """The URL of a cluster by its nodes (the client starts from the first that answers)."""
    return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in nodes)


def from_url(url: str, **kwargs: Any) -> aioredis.Redis:
    """A redis.asyncio client for one Redis, or a `RedisCluster` for a `redis+cluster://` URL.

    The cluster client is typed as a Redis client: it has the same commands, pipelines (a transaction
    only over keys of one slot) and scripts (sent to the slot of their first key)."""
    parts = urlsplit(url)
    plain = CLUSTER_SCHEMES.get(parts.scheme)
    if plain is None:
        return aioredis.Redis.from_url(url, **kwargs)
    # a cluster has database 0 only: drop a path, and the options a single server takes alone
    userinfo, at, hosts = parts.netloc.rpartition("@")
    first, *others = hosts.split(",")  # several nodes: the client starts from any that answers
    node_url = urlunsplit(parts._replace(scheme=plain, netloc=userinfo + at + first, path="", query=""))
    for single_only in ("db", "single_connection_client", "connection_pool"):
        kwargs.pop(single_only, None)
    if others:
        kwargs["startup_nodes"] = [ClusterNode(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in others]
    return cast(aioredis.Redis, RedisCluster.from_url(node_url, **kwargs))


def connect(settings: Settings, **kwargs: Any) -> aioredis.Redis:
    """An asyncio Redis client for the configured server or cluster (credentials in the URL win over
    settings)."""
    return from_url(settings.redis, **(kwargs | options(settings)))


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for log lines and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
