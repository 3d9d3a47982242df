"""Riding out a server that is away (restarting, not up yet): retry, logging each wait.

One recipe for Redis and the broker, so both wait the same bounded time and say so alike.
"""

from __future__ import annotations

from typing import Any

import structlog
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)

WAIT_FOR_S = 120.0


def retry_while_unavailable(
    errors: type[BaseException] | tuple[type[BaseException], ...],
    server: str,
    first_wait_s: float,
    final: tuple[type[BaseException], ...] = (),
) -> Any:
    """A tenacity decorator: retry on `errors` for up to WAIT_FOR_S, backing off from `first_wait_s`.

    `final` are errors among those that waiting cannot cure (a refused password): raised at once.
    """

    def log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        structlog.get_logger().warning(
            f"{server} unavailable; retrying", attempt=state.attempt_number, error=repr(error)
        )

    return retry(
        retry=retry_if_exception_type(errors) & retry_if_not_exception_type(final),
        wait=wait_exponential(multiplier=first_wait_s, max=2),
        stop=stop_after_delay(WAIT_FOR_S),
        before_sleep=log,
        reraise=True,
    )
