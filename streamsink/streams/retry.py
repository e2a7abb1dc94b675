"""Retrying transient failures with exponential backoff and jitter.

A leaf: it imports nothing of streamsink. It lives in streams/ because its TRANSIENT set is
Redis' errors (only streams/ imports redis); the worker and the sinks both use it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

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


def backoff_bound(attempt: int, base: float, cap: float) -> float:
    """`base * 2^attempt`, at most `cap` (attempt 0 is the first retry)."""
    return min(cap, base * 2.0 ** min(attempt, 32))  # 2^32 at most: no overflow, however long


class Backoff:
    """Delays under a doubling bound (`backoff_bound`), with "equal jitter": each is drawn
    uniformly between half the bound and the bound, so workers failing together spread out
    yet none hammers a restarting Redis with near-zero waits. (The HTTP sink's retries use
    full jitter instead: `sinks.http.deliver.backoff_delay`, uniform in [0, bound].)"""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        """The delay before the next attempt."""
        bound = backoff_bound(self.attempt, self.base, self.cap)
        self.attempt += 1
        return random.uniform(bound / 2, bound)

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0


def describe(exc: BaseException) -> str:
    """`Class: message` of an error, for log lines.

    Not `repr`: redis-py 8 gives its errors one without the message (`network:ConnectionError`),
    which names neither the node that failed nor why.
    """
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def server(client: Any) -> str:
    """`host:port` (or the socket path) a Redis client talks to, for log lines; for a Redis
    Cluster, `cluster:` and the nodes it knows to start from (at most three named; the node
    that failed is named in the error)."""
    nodes = getattr(getattr(client, "nodes_manager", None), "startup_nodes", None)
    if nodes is not None:
        names = list(nodes)
        more = f",+{len(names) - 3}" if len(names) > 3 else ""
        return f"cluster:{','.join(names[:3])}{more}"
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


class Spell:
    """The log lines of one operation's spell of failures: one warning when it starts
    failing, later attempts at debug level, and one line with how many attempts and how
    long it took when it succeeds again (`failed`/`recovered`: the two messages), on
    `logger` (the caller's, so its lines keep their logger name)."""

    def __init__(
        self,
        failed: str,
        recovered: str,
        where: Mapping[str, object],
        logger: logging.Logger = log,
    ) -> None:
        self._failed, self._recovered, self._where, self._log = failed, recovered, where, logger
        self._since: float | None = None

    def failed(self, exc: BaseException, delay: float, attempt: int) -> None:
        """An attempt failed; the next comes after `delay` seconds."""
        extra = {**self._where, "error": describe(exc), "in_s": round(delay, 3)}
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning(self._failed, extra=extra)
        else:
            self._log.debug(self._failed, extra={**extra, "attempt": attempt})

    def succeeded(self, attempts: int) -> None:
        """An attempt went through (`attempts` in all): the `recovered` line, if it failed."""
        if self._since is not None:
            after = round(time.monotonic() - self._since, 3)
            extra = {**self._where, "attempts": attempts, "after_s": after}
            self._log.info(self._recovered, extra=extra)
            self._since = None


async def retrying(
    operation: Callable[[], Awaitable[T]],
    what: str,
    transient: tuple[type[BaseException], ...] = TRANSIENT,
    where: Mapping[str, object] | None = None,
) -> T:
    """Run `operation` until it succeeds, sleeping with backoff after transient errors;
    `where` (group, shard, the server: `redis=host:port`) goes into its log lines: one
    warning when it starts failing, the later attempts at debug level, and one line when
    it succeeds again (with how many attempts and how long it took): `Spell`."""
    backoff = Backoff()
    spell = Spell("retrying", "recovered", {**(where or {}), "what": what})
    while True:
        try:
            result = await operation()
        except transient as exc:
            if cancelling():
                raise asyncio.CancelledError from exc
            delay = backoff.next()
            spell.failed(exc, delay, backoff.attempt)
            await asyncio.sleep(delay)
            continue
        spell.succeeded(backoff.attempt + 1)
        return result
