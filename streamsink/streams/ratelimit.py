"""A rate limit shared by every worker, in one Redis script, on Redis' clock.

Two rules, checked together when a send asks for a start time:

- **GCRA** (the generic cell rate algorithm) spaces the sends: one number per limit, the
  theoretical arrival time `tat`; a send may start when `tat - now <= (burst - 1) * T`,
  `T = 1 s / rate`, and moves `tat` on by `T`. It is a sliding window, not a fixed one:
  two bursts either side of a second boundary cannot add up.
- **A sliding one-second window over what a receiver can see.** A request reaches its
  receiver at some instant between its start and its reply, and the network decides
  where. So each send is recorded from its start until its reply (`done`), and a new
  one may start at `s` only while fewer than `cap = rate + burst - 1` sends are in flight
  or were done after `s - 1 s`. Then no receiver, whatever the delays, counts more than
  `cap` arrivals in any one-second window (if it did, the last of them to start would
  have found the others in flight or done within the second before it). The price is
  latency: an endpoint answering in `L` seconds gets at most `cap / (1 + L)` a second.
  A send never reported done counts as in flight until its `busy` time is over.

Callers book the earliest start that satisfies both rules and sleep until it (rather than
asking again until a permit is free), so starts are one interval apart under load. Admission
control (`allow`: a service refusing a user's request with a Retry-After) uses the same
script without booking: a permit now, or how long until one; admissions take no time, so
they use GCRA alone, and in any interval of `t` seconds at most `burst + rate * t` pass. The
same script keeps a minimum gap between two starts and a not-before time (a receiver's
Retry-After; starts booked before it keep their time). All times are Redis' `TIME`: workers
on hosts with different clocks agree, and a script run is atomic, so however many workers
ask at once, starts are handed out one after the other.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass

from streamsink.streams.connection import AsyncClient, SyncClient
from streamsink.streams.keys import Keys
from streamsink.streams.scripts import lua


@dataclass(frozen=True, slots=True)
class Rate:
    """A limit: `per_second` sends (0: none), `burst` back to back, and a minimum gap."""

    per_second: float = 0.0
    burst: int = 1
    min_interval_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_second) and self.per_second >= 0):
            raise ValueError("rate per second must be a finite number >= 0")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        if not (math.isfinite(self.min_interval_ms) and self.min_interval_ms >= 0):
            raise ValueError("min_interval_ms must be a finite number >= 0")

    @property
    def limited(self) -> bool:
        """Whether sends need a permit at all."""
        return self.per_second > 0 or self.min_interval_ms > 0

    @property
    def cap(self) -> int:
        """Most sends a receiver may see in any one-second window (0: no rate)."""
        if self.per_second <= 0:
            return 0
        return max(1, math.floor(self.per_second + self.burst - 1 + 1e-9))

    def arguments(self) -> list[int]:
        """The script's ARGV: emission interval, tolerance, minimum gap (µs)."""
        period = math.ceil(1_000_000 / self.per_second) if self.per_second > 0 else 0
        return [period, period * (self.burst - 1), math.ceil(self.min_interval_ms * 1000)]


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer of `allow`: admitted or not, and if not, seconds until a request may be."""

    allowed: bool
    retry_after: float
    at: float = 0.0
    """When admitted, on Redis' clock (seconds since the epoch); 0.0 when refused."""

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class LimitState:
    """A limit as Redis holds it; `exists` is False once it was idle long enough to expire."""

    exists: bool
    backlog: float
    """Seconds the theoretical arrival time is ahead of now (0: the full burst is free)."""
    hold: float
    """Seconds until the not-before time (a receiver's Retry-After) is over (0: none)."""
    in_window: int
    """Sends in flight or done in the last second (HTTP sends; admissions leave none)."""
    ttl: float
    """Seconds until the state expires (-1: it does not exist)."""

    @classmethod
    def of(cls, reply: list[int]) -> LimitState:
        """From the reply of the show script: µs and counts."""
        exists, backlog, hold, window, ttl_ms = (int(v) for v in reply)
        ttl = ttl_ms / 1000 if ttl_ms >= 0 else -1.0
        return cls(bool(exists), backlog / 1_000_000, hold / 1_000_000, window, ttl)


@dataclass(frozen=True, slots=True)
class Permit:
    """A start handed out: when (Redis' clock, seconds), and its entry in the window."""

    start: float
    member: str = ""


class AsyncRateLimiter:
    """Shared limits by name (one per HTTP endpoint, per user...), kept in Redis, for asyncio:
    admission (`allow`) and booked starts (`acquire`, as the HTTP sink sends)."""

    def __init__(self, client: AsyncClient, keys: Keys | None = None) -> None:
        keys = keys or Keys()
        self._keys = keys
        self._client = client
        self._acquire = client.register_script(lua("ratelimit.acquire").text)
        self._done = client.register_script(lua("ratelimit.done").text)
        self._defer = client.register_script(lua("ratelimit.defer").text)
        self._show = client.register_script(lua("ratelimit.show").text)

    async def allow(self, name: str, rate: float, burst: int = 1) -> Admission:
        """Admit one request of `name` now, or say how long until one may be (Retry-After)."""
        args = _admission_arguments(rate, burst)
        return _admission(
            await self._acquire([self._keys.rate(name), self._keys.rate_window(name)], args)
        )

    async def show(self, name: str) -> LimitState:
        """What Redis holds for `name` (for `streamsink limits show`)."""
        reply = await self._show([self._keys.rate(name), self._keys.rate_window(name)])
        return LimitState.of(reply)

    async def try_acquire(self, name: str, rate: Rate) -> tuple[float, float]:
        """Take a start of `name` only if one is free now (counted as done at once):
        `(0.0, Redis' time)` when taken, else `(seconds until one may be, 0.0)`. For
        admission control: refuse rather than wait."""
        if not rate.limited:
            return 0.0, 0.0
        taken, wait, start, _ = await self._call(name, rate, False, 0.0)
        return (0.0, start) if taken else (wait, 0.0)

    async def acquire(self, name: str, rate: Rate, busy_s: float = 0.0) -> Permit:
        """Book the earliest start of `name` and sleep until it.

        `busy_s` is how long the send may take at most (its timeout): it counts as in
        flight until `done` or until then. A booking not used (the caller was cancelled)
        is lost, which only makes the limit stricter.
        """
        if not rate.limited:
            return Permit(0.0)
        while True:
            taken, wait, start, member = await self._call(name, rate, True, busy_s)
            if wait > 0:
                await asyncio.sleep(wait)
            if taken:
                return Permit(start, member)

    async def done(self, name: str, permit: Permit) -> None:
        """The send of `permit` got its reply (or failed): it is no longer in flight."""
        if permit.member:
            await self._done([self._keys.rate_window(name)], [permit.member])

    async def _call(
        self, name: str, rate: Rate, reserve: bool, busy_s: float
    ) -> tuple[bool, float, float, str]:
        member = uuid.uuid4().hex if rate.cap else ""
        args: list[int | str] = [*rate.arguments(), int(reserve), rate.cap]
        args += [math.ceil(busy_s * 1_000_000), member]
        keys = [self._keys.rate(name), self._keys.rate_window(name)]
        taken, wait_us, start_us = await self._acquire(keys, args)
        return bool(taken), int(wait_us) / 1_000_000, int(start_us) / 1_000_000, member

    async def defer(self, name: str, seconds: float) -> None:
        """Hand out no start of `name` for `seconds` (a receiver asked us to wait)."""
        if seconds > 0:
            await self._defer([self._keys.rate(name)], [math.ceil(seconds * 1_000_000)])

    async def reset(self, name: str) -> None:
        """Forget the state of `name` (its own keys, and only those)."""
        await self._client.delete(self._keys.rate(name), self._keys.rate_window(name))


class RateLimiter:
    """Admission control for synchronous code: the same limits and script as
    `AsyncRateLimiter`, so a sync and an asyncio service may share one limit."""

    def __init__(self, client: SyncClient, keys: Keys | None = None) -> None:
        self._keys = keys or Keys()
        self._client = client
        self._acquire = client.register_script(lua("ratelimit.acquire").text)
        self._show = client.register_script(lua("ratelimit.show").text)

    def allow(self, name: str, rate: float, burst: int = 1) -> Admission:
        """Admit one request of `name` now, or say how long until one may be (Retry-After).

        At most `burst` at once, then `rate` a second; refused requests cost nothing."""
        args = _admission_arguments(rate, burst)
        return _admission(
            self._acquire([self._keys.rate(name), self._keys.rate_window(name)], args)
        )

    def reset(self, name: str) -> None:
        """Forget the state of `name` (its own keys, and only those)."""
        self._client.delete(self._keys.rate(name), self._keys.rate_window(name))

    def show(self, name: str) -> LimitState:
        """What Redis holds for `name` (for `streamsink limits show`)."""
        return LimitState.of(self._show([self._keys.rate(name), self._keys.rate_window(name)]))


def _admission_arguments(rate: float, burst: int) -> list[int | str]:
    """The acquire script's ARGV for an admission: take now or refuse, no sending window."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number of requests a second > 0, got {rate!r}")
    return [*Rate(rate, burst).arguments(), 0, 0, 0, ""]


def _admission(reply: list[int]) -> Admission:
    taken, wait_us, start_us = (int(v) for v in reply)
    if taken:
        return Admission(True, 0.0, start_us / 1_000_000)
    return Admission(False, wait_us / 1_000_000)
