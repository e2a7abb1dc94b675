"""A circuit breaker per endpoint, shared by every worker: while open, calls wait.

    closed ──N consecutive failures──▶ open ──cool-down over──▶ half-open (one probe)
      ▲                                  ▲                          │
      └────────── probe succeeds ────────┼──────── probe fails ─────┘

The state lives in Redis (streams/endpoints.py), so one worker's discovery spares the
others' requests. While it is open or half-open, or a Retry-After hold runs, calls to the
endpoint wait before their next attempt: nothing is sent, nothing acknowledged, nothing
dead-lettered, the shard's lease kept. Half-open lets one probe through (of any worker);
when it succeeds every waiting call goes on. A wait is bounded by the worker's shutdown
timeout (it is cancelled, its window left for the next owner) and is seen: one log line
when calls start waiting and one when they go on, the state in `status` and metrics.

Each worker asks Redis at most every REFRESH_S while the gate is clear (and tells it of a
success as often), and one waiting call per endpoint polls it while it is not: the
breaker costs no round trip per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from enum import StrEnum

from streamsink.streams.endpoints import EndpointGates, Passage
from streamsink.streams.retry import cancelling, retrying

log = logging.getLogger("streamsink.http")

REFRESH_S = 0.1
"""How long a worker trusts a clear gate before asking again: another worker's breaker or
Retry-After reaches it within this time."""

POLL_S = 0.25
"""Most time a waiting call sleeps before asking the gate again (a probe elsewhere may
have closed it)."""


class State(StrEnum):
    """Where a breaker is (see the module docstring)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Breaker:
    """One endpoint's gate as one worker's sink sees it; `on_change(state)` hears the
    transitions this worker made or saw."""

    def __init__(
        self,
        gates: EndpointGates,
        endpoint: str,
        gate: str,
        failures: int,
        cooldown_s: float,
        probe_s: float,
        on_change: Callable[[State], None] = lambda state: None,
    ) -> None:
        self._gates, self.endpoint, self._gate = gates, endpoint, gate
        self.failures, self.cooldown_s, self._probe_s = failures, cooldown_s, probe_s
        self._on_change = on_change
        self.state = State.CLOSED
        self.waiting = 0  # calls of this worker waiting at the gate now
        self._clear_until = 0.0  # time.monotonic() until which the gate is taken as clear
        self._dirty = False  # failures were counted: a success must reset them
        self._asking = asyncio.Lock()  # one waiting call per worker asks Redis
        self._changed = asyncio.Event()  # this worker learnt something: ask again now
        self._held_since: float | None = None
        self._told_success = -REFRESH_S  # time.monotonic() when Redis last heard of one

    def clear(self) -> bool:
        """Whether a request may go now without asking (the gate was seen clear lately)."""
        return time.monotonic() < self._clear_until

    async def enter(self) -> bool:
        """Wait until a request may go; True if it goes as the half-open breaker's probe."""
        if time.monotonic() < self._clear_until:
            return False
        self.waiting += 1
        try:
            async with self._asking:
                while True:
                    if time.monotonic() < self._clear_until:
                        return False
                    passage = await retrying(
                        lambda: self._gates.ask(self._gate, self._probe_s), "breaker"
                    )
                    if passage.goes:
                        return self._going(passage)
                    self._holding(passage)
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(passage.wait_s, POLL_S)):
                            await self._changed.wait()
                    if cancelling():  # a cancel landing as the timeout fired became its
                        raise asyncio.CancelledError  # TimeoutError: the call must stop
        finally:
            self.waiting -= 1

    def is_news(self, probe: bool) -> bool:
        """Whether a success must be told to Redis (`succeeded`); else it changes nothing."""
        if probe or self._dirty or self.state is not State.CLOSED:
            return True
        return time.monotonic() - self._told_success >= REFRESH_S  # another's failures may count

    async def succeeded(self, probe: bool) -> None:
        """A request got an answer that shows the endpoint works."""
        if self.is_news(probe):
            self._told_success = time.monotonic()
            closed = await retrying(lambda: self._gates.succeeded(self._gate), "breaker")
            self._dirty = False
            if closed or self.state is not State.CLOSED:
                self._see(State.CLOSED)
                self._changed.set()  # waiting calls ask again (a success is no clear view:
                # a Retry-After hold may run)

    async def failed(self, what: str, probe: bool) -> bool:
        """A request failed (error, timeout, 5xx); True while the breaker is open (its calls
        then wait rather than being given up)."""
        self._dirty = True
        opened, is_open = await retrying(
            lambda: self._gates.failed(self._gate, self.failures, self.cooldown_s, what, probe),
            "breaker",
        )
        if opened:
            log.warning(
                "circuit breaker opened: calls wait",
                extra={"endpoint": self.endpoint, "error": what, "cooldown_s": self.cooldown_s},
            )
            self._see(State.OPEN)
        if is_open:
            self._clear_until = 0.0
            self._changed.set()
        return is_open

    async def neutral(self, probe: bool) -> None:
        """A request ended in a way that tells nothing of the endpoint (a 429, a refusal)."""
        if probe:
            await retrying(lambda: self._gates.probe_over(self._gate), "breaker")
            self._changed.set()

    async def hold(self, seconds: float) -> None:
        """Send nothing to the endpoint for `seconds`, from any worker (a Retry-After)."""
        await retrying(lambda: self._gates.hold(self._gate, seconds), "hold")
        self._clear_until = 0.0

    def _going(self, passage: Passage) -> bool:
        probe = passage.what == "probe"
        self._dirty = passage.failures > 0
        if probe:
            self._see(State.HALF_OPEN)
        else:
            self._clear_until = time.monotonic() + REFRESH_S
            if self.state is not State.CLOSED:
                self._see(State.CLOSED)  # another worker's probe closed it
        if self._held_since is not None and not probe:
            log.info(
                "callbacks go on",
                extra={
                    "endpoint": self.endpoint,
                    "waited_s": round(time.monotonic() - self._held_since, 3),
                },
            )
            self._held_since = None
        return probe

    def _holding(self, passage: Passage) -> None:
        if passage.what in ("open", "half-open") and self.state is State.CLOSED:
            self._see(State(passage.what))
        if self._held_since is None:
            self._held_since = time.monotonic()
            log.warning(
                "callbacks wait",
                extra={
                    "endpoint": self.endpoint,
                    "why": self.why(passage),
                    "in_s": round(passage.wait_s, 3),
                    "waiting": self.waiting,
                },
            )

    def why(self, passage: Passage) -> str:
        """Why calls wait now."""
        if passage.what == "hold":
            return f"the endpoint asked to wait (Retry-After), {passage.wait_s:.1f} s more"
        return (
            f"circuit breaker {passage.what}: {passage.failures} failures in a row "
            f"(last: {passage.last})"
        )

    def _see(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self._on_change(state)
