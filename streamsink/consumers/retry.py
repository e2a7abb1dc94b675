"""Retrying transient failures with exponential backoff and full jitter."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import BusyLoadingError, ClusterError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    OSError,
    ClusterError,
    TryAgainError,
    SlotNotCoveredError,
)
"""Errors that pass: Redis restarting or unreachable for a while, a cluster failing over."""

T = TypeVar("T")


def cancelling() -> bool:
    """Whether this task has been asked to stop.

    A cancellation can reach a coroutine as another error (a client library turning it
    into a timeout on the way out); a retry loop that caught that error must still stop,
    or the task lives on after its lease is gone and its TaskGroup never exits.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


log = logging.getLogger("streamsink.retry")


class Backoff:
    """Delays of 2^n * base seconds, capped, each drawn uniformly below the bound."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        """The delay before the next attempt."""
        bound = min(self.cap, self.base * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return random.uniform(bound / 2, bound)

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0


async def retrying(
    operation: Callable[[], Awaitable[T]],
    what: str,
    transient: tuple[type[BaseException], ...] = TRANSIENT,
) -> T:
    """Run `operation` until it succeeds, sleeping with backoff after transient errors."""
    backoff = Backoff()
    while True:
        try:
            return await operation()
        except transient as exc:
            if cancelling():
                raise asyncio.CancelledError from exc
            delay = backoff.next()
            log.warning(
                "retrying", extra={"what": what, "error": repr(exc), "in_s": round(delay, 3)}
            )
            await asyncio.sleep(delay)
