"""A rate limit shared by every worker: GCRA in one Redis script, on Redis' clock.

GCRA (the generic cell rate algorithm) keeps one number per limit, the theoretical
arrival time `tat`: a send is allowed when `tat - now <= (burst - 1) * T` and then
moves `tat` on by `T`. It is a sliding window, not a fixed one: n permits in a row
span at least `(n - burst) * T`, wherever one looks, so a burst at the end of one
second and another at the start of the next cannot add up.

`T` is `(1 s + guard) / rate`: the permits of any `1 s + guard` hold at most
`rate + burst - 1`, so as long as the network delays no request by more than `guard`
relative to another, a receiver counting arrivals in any one-second window sees at
most `rate + burst - 1` (with `burst = 1`: `rate`). The guard costs `guard / 1 s` of
the throughput (50 ms: 5%).

Workers book the next conforming start and sleep until it (rather than asking again
until a permit is free), so starts are exactly one interval apart under load and the
rate is reached. The same script keeps a minimum interval between two sends and a
not-before time (a receiver's Retry-After; starts booked before it keep their time).

All times are Redis' `TIME`, so workers on hosts with different clocks agree; a script
run is atomic, so however many workers ask at once, permits are handed out one after
the other.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import redis.asyncio as aredis

from streamsink.streams.keys import Keys

# KEYS: state hash. ARGV: T µs, tolerance µs ((burst-1)*T), min interval µs, reserve (0/1).
# The earliest conforming start is max(now, tat - tolerance, last + gap, hold). With
# reserve=0 a permit is taken only if that is now; with reserve=1 that start is booked (the
# caller sends then). Returns {1 if taken, µs from now to the start, the start in µs}.
_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local period, tolerance, gap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tat', 'last', 'hold')
local tat = math.max(tonumber(state[1]) or now, now)
local start = math.max(now, tat - tolerance)
local last, hold = tonumber(state[2]), tonumber(state[3])
if last then start = math.max(start, last + gap) end
if hold then start = math.max(start, hold) end
if start > now and ARGV[4] ~= '1' then return {0, math.ceil(start - now), start} end
tat = math.max(tat, start) + period
redis.call('HSET', KEYS[1], 'tat', tat, 'last', start)
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(tat, start + gap) - now) / 1000) + 1000)
return {1, math.ceil(start - now), start}
"""

# KEYS: state hash. ARGV: µs from now. Nobody gets a permit before then.
_DEFER = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local hold = now + tonumber(ARGV[1])
local held = tonumber(redis.call('HGET', KEYS[1], 'hold'))
if held == nil or held < hold then
  redis.call('HSET', KEYS[1], 'hold', hold)
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], math.max(ttl, math.ceil(tonumber(ARGV[1]) / 1000) + 1000))
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Rate:
    """A limit: `per_second` sends (0: none), `burst` back to back, a minimum gap, and the
    guard against arrival jitter (see the module docstring)."""

    per_second: float = 0.0
    burst: int = 1
    min_interval_ms: float = 0.0
    guard_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_second) and self.per_second >= 0):
            raise ValueError("rate per second must be a finite number >= 0")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        for name in ("min_interval_ms", "guard_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")

    @property
    def limited(self) -> bool:
        """Whether sends need a permit at all."""
        return self.per_second > 0 or self.min_interval_ms > 0

    def arguments(self) -> list[int]:
        """The script's ARGV: emission interval, tolerance and minimum gap, in µs."""
        window_us = 1_000_000 + self.guard_ms * 1000
        period = math.ceil(window_us / self.per_second) if self.per_second > 0 else 0
        return [period, period * (self.burst - 1), math.ceil(self.min_interval_ms * 1000)]


class RateLimiter:
    """Permits of named shared limits (e.g. one per HTTP endpoint), kept in Redis."""

    def __init__(self, client: aredis.Redis, keys: Keys) -> None:
        self._keys = keys
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._defer = client.register_script(_DEFER)

    async def try_acquire(self, name: str, rate: Rate) -> tuple[float, float]:
        """Take a permit of `name` only if one is free now: `(0.0, Redis' time)` when taken,
        else `(seconds until one may be, 0.0)`. For admission: refuse rather than wait."""
        if not rate.limited:
            return 0.0, 0.0
        taken, wait, start = await self._call(name, rate, reserve=False)
        return (0.0, start) if taken else (wait, 0.0)

    async def acquire(self, name: str, rate: Rate) -> float:
        """Book the next free start of `name` and sleep until it; that start on Redis' clock.

        Booking (instead of asking again until a permit is free) keeps the starts exactly
        one interval apart however many workers wait, so the rate is reached, not only
        respected. A booking that is not used (the caller was cancelled) is lost, which
        only makes the limit stricter.
        """
        if not rate.limited:
            return 0.0
        _, wait, start = await self._call(name, rate, reserve=True)
        if wait > 0:
            await asyncio.sleep(wait)
        return start

    async def _call(self, name: str, rate: Rate, reserve: bool) -> tuple[bool, float, float]:
        args = [*rate.arguments(), 1 if reserve else 0]
        taken, wait_us, start_us = await self._acquire([self._keys.rate(name)], args)
        return bool(taken), int(wait_us) / 1_000_000, int(start_us) / 1_000_000

    async def defer(self, name: str, seconds: float) -> None:
        """Hand out no permit of `name` for `seconds` (a receiver asked us to wait)."""
        if seconds > 0:
            await self._defer([self._keys.rate(name)], [math.ceil(seconds * 1_000_000)])

    async def reset(self, name: str) -> None:
        """Forget the state of `name` (its own key, and only that one)."""
        await self._client.delete(self._keys.rate(name))
