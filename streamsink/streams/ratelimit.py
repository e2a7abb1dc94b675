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

The same script keeps a minimum interval between two sends and a not-before time (a
receiver's Retry-After). All times are Redis' `TIME`, so workers on hosts with
different clocks agree; a script run is atomic, so however many workers ask at once,
permits are handed out one after the other.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import redis.asyncio as aredis

from streamsink.streams.keys import Keys

# KEYS: state hash. ARGV: T µs, tolerance µs ((burst-1)*T), min interval µs.
# Returns {0, now} when the send may start now (and records it), else {µs to wait, now}.
_ACQUIRE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local period, tolerance, gap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tat', 'last', 'hold')
local tat = math.max(tonumber(state[1]) or now, now)
local wait = tat - tolerance - now
local last, hold = tonumber(state[2]), tonumber(state[3])
if last then wait = math.max(wait, last + gap - now) end
if hold then wait = math.max(wait, hold - now) end
if wait > 0 then return {math.ceil(wait), now} end
redis.call('HSET', KEYS[1], 'tat', tat + period, 'last', now)
redis.call('HDEL', KEYS[1], 'hold')
redis.call('PEXPIRE', KEYS[1], math.ceil((tat + period + gap - now) / 1000) + 1000)
return {0, now}
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
        """Take a permit of `name` if one is free: `(seconds to wait first, or 0.0 if
        granted; Redis' time in seconds)`."""
        if not rate.limited:
            return 0.0, 0.0
        wait_us, now_us = await self._acquire([self._keys.rate(name)], rate.arguments())
        return int(wait_us) / 1_000_000, int(now_us) / 1_000_000

    async def acquire(self, name: str, rate: Rate) -> float:
        """Wait until a permit of `name` is ours; Redis' time (s) when it was granted."""
        while True:
            wait, now = await self.try_acquire(name, rate)
            if wait <= 0:
                return now
            await asyncio.sleep(wait)

    async def defer(self, name: str, seconds: float) -> None:
        """Hand out no permit of `name` for `seconds` (a receiver asked us to wait)."""
        if seconds > 0:
            await self._defer([self._keys.rate(name)], [math.ceil(seconds * 1_000_000)])

    async def reset(self, name: str) -> None:
        """Forget the state of `name` (its own key, and only that one)."""
        await self._client.delete(self._keys.rate(name))
