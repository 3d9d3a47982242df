"""Riding out a Redis restart: retry while the connection is refused or times out.

Every operation wrapped with it is safe to repeat: the apply script refuses a
batch it already applied, and dedup claims are recognised by their own marker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import RetryCallState, retry, retry_if_exception_type, stop_after_delay, wait_exponential

RETRY_FOR_S = 120.0
T = TypeVar("T")


def _log(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    structlog.get_logger().warning(
        "redis unavailable; retrying", attempt=state.attempt_number, error=repr(error)
    )


redis_retry = retry(
    retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
    wait=wait_exponential(multiplier=0.05, max=2),
    stop=stop_after_delay(RETRY_FOR_S),
    before_sleep=_log,
    reraise=True,
)


@redis_retry
async def retrying(call: Callable[[], Awaitable[T]]) -> T:
    """Await `call()` with the retries above.

    For redis-py's command methods: they return awaitables but are not `async def`,
    so decorating them directly would retry only the creation of the awaitable.
    """
    return await call()
