"""Operations on Redis are retried while it restarts, also through non-`async def` callables."""

from __future__ import annotations

from collections.abc import Awaitable

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pipeline.io.redis_retry import retrying


async def test_retrying_awaits_a_fresh_call_until_redis_answers() -> None:
    attempts = []

    async def answer() -> str:
        return "PONG"

    def command() -> Awaitable[str]:  # like redis-py: a plain method returning an awaitable
        attempts.append(1)
        if len(attempts) < 3:
            raise RedisConnectionError("Connection refused")
        return answer()

    assert await retrying(command) == "PONG"
    assert len(attempts) == 3


async def test_other_errors_are_not_retried() -> None:
    calls = []

    def command() -> Awaitable[str]:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        await retrying(command)
    assert len(calls) == 1
