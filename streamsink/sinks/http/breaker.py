"""A circuit breaker per endpoint: after N failures in a row, fail fast for a while.

    closed ──N consecutive failures──▶ open ──cool-down over──▶ half-open (one probe)
      ▲                                  ▲                          │
      └────────── probe succeeds ────────┼──────── probe fails ─────┘

While open, requests to the endpoint are not sent (their callbacks are dead-lettered at
once), so a dead endpoint costs each window nothing and the other endpoints go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from enum import StrEnum


class State(StrEnum):
    """Where a breaker is (see the module docstring)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    """The breaker of one endpoint in one sink; `on_change(state)` hears every transition."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        on_change: Callable[[State], None] = lambda state: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures, self.cooldown_s = failures, cooldown_s
        self.state = State.CLOSED
        self.in_a_row = 0
        self.last_failure = ""
        self._on_change, self._clock = on_change, clock
        self._opened_at = 0.0
        self._probe_at: float | None = None
        self._opened = asyncio.Event()

    def allow(self) -> bool:
        """Whether a request may go now; in half-open, only one probe per cool-down."""
        if self.state is State.CLOSED:
            return True
        now = self._clock()
        if self.state is State.OPEN:
            if now - self._opened_at < self.cooldown_s:
                return False
            self._move(State.HALF_OPEN)
        if self._probe_at is not None and now - self._probe_at < self.cooldown_s:
            return False  # a probe is out (or was lost: after a cool-down, another may go)
        self._probe_at = now
        return True

    def succeeded(self) -> None:
        """A request got an answer that shows the endpoint works."""
        self.in_a_row = 0
        self._probe_at = None
        if self.state is not State.CLOSED:
            self._move(State.CLOSED)

    def neutral(self) -> None:
        """A request ended in a way that tells nothing of the endpoint (a 429, a refusal)."""
        self._probe_at = None

    def failed(self, what: str) -> None:
        """A request failed (error, timeout, 5xx)."""
        self.in_a_row += 1
        self.last_failure = what
        self._probe_at = None
        if self.state is State.HALF_OPEN or (
            self.state is State.CLOSED and self.in_a_row >= self.failures
        ):
            self._opened_at = self._clock()
            self._move(State.OPEN)

    def why(self) -> str:
        """Why requests fail fast now."""
        return (
            f"circuit breaker {self.state}: {self.in_a_row} failures in a row "
            f"(last: {self.last_failure})"
        )

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds`, or less if the breaker opens meanwhile (no point waiting then)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._opened.wait(), seconds)

    def _move(self, state: State) -> None:
        self.state = state
        if state is State.OPEN:
            self._opened.set()
        else:
            self._opened.clear()
        self._on_change(state)
