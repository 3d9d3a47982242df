"""Riding out a Redis restart: retry while the connection is refused or times out.

Every operation wrapped with it is safe to repeat: the apply script refuses a
batch it already applied, and dedup claims are recognised by their own marker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import AuthenticationError, ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.io.server_wait import retry_while_unavailable

T = TypeVar("T")

# a refused password is a ConnectionError to redis-py, but no wait will cure it. On a Redis Cluster a
# master that fails makes its slots answer CLUSTERDOWN (or MASTERDOWN, TRYAGAIN) until its replica is
# promoted or it restarts: waited out like a restart
redis_retry = retry_while_unavailable(
    (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError),
    "redis",
    0.05,
    final=(AuthenticationError,),
)


@redis_retry
async def retrying(call: Callable[[], Awaitable[T]]) -> T:
    """Await `call()` with the retries above.

    For redis-py's command methods: they return awaitables but are not `async def`,
    so decorating them directly would retry only the creation of the awaitable.
    """
    return await call()
