"""The shared GCRA rate limit on the real Redis, checked on Redis' own clock.

Several clients (separate connections, as separate workers would have) ask for permits
at once; the grant times the script reports (Redis `TIME`) are then checked against the
limit in every sliding window, not only in aligned seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Sequence

import pytest
import redis
import redis.asyncio as aredis

from streamsink.streams import Keys
from streamsink.streams.ratelimit import AsyncRateLimiter, Rate


def most_in_any_window(times: Sequence[float], window: float = 1.0) -> int:
    """The largest number of `times` inside any half-open window [t, t + window)."""
    ordered = sorted(times)
    best, first = 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


def test_most_in_any_window_slides() -> None:
    assert most_in_any_window([0.0, 0.5, 0.99, 1.0, 1.5]) == 3
    assert most_in_any_window([0.9, 0.95, 1.05, 1.1], 1.0) == 4  # across a second boundary
    assert most_in_any_window([]) == 0


class Start:
    """Lets clients connect first, then starts them together: the test's `seconds` begin
    once every client is connected, so a slow connect does not eat into them."""

    def __init__(self, clients: int) -> None:
        self.clients, self.ready, self.go = clients, 0, asyncio.Event()
        self.deadline = 0.0

    async def connected(self, seconds: float) -> float:
        """Wait until every client is connected; the deadline, `seconds` after that."""
        self.ready += 1
        if self.ready == self.clients:
            self.deadline = time.monotonic() + seconds
            self.go.set()
        await self.go.wait()
        return self.deadline


async def hammer(
    redis_url: str, keys: Keys, rate: Rate, clients: int, seconds: float
) -> list[float]:
    """Every client takes permits as fast as it can for `seconds`; the grant times."""
    granted: list[float] = []
    start = Start(clients)

    async def client() -> None:
        connection = aredis.Redis.from_url(redis_url)
        limiter = AsyncRateLimiter(connection, keys)
        try:
            await connection.ping()
            deadline = await start.connected(seconds)
            while time.monotonic() < deadline:
                granted.append((await limiter.acquire("endpoint", rate)).start)
        finally:
            await connection.aclose()

    await asyncio.gather(*(client() for _ in range(clients)))
    return granted


def redis_now(r: redis.Redis) -> float:
    """Redis' clock (TIME), in seconds: the clock the limiter's scripts read."""
    seconds, micros = r.time()
    return seconds + micros / 1_000_000


def hold_of(r: redis.Redis, keys: Keys, name: str) -> float:
    """The not-before time `defer` stored for `name`, on Redis' clock, in seconds."""
    return float(r.hget(keys.rate(name), "hold") or 0) / 1_000_000


async def test_no_sliding_second_holds_more_than_the_rate(redis_url: str, keys: Keys) -> None:
    granted = await hammer(redis_url, keys, Rate(20.0), clients=4, seconds=3.0)
    most = most_in_any_window(granted)
    gaps = [b - a for a, b in itertools.pairwise(sorted(granted))]
    print(f"\n20/s, 4 clients, 3 s: {len(granted)} permits, at most {most} in any second")
    assert most <= 20
    assert min(gaps) >= 0.05 - 1e-6  # T = 1 s / 20, on Redis' clock
    assert len(granted) >= 57  # booked starts: the rate is reached (61 at most in 3 s)


async def test_a_burst_then_the_rate_and_never_rate_plus_burst(redis_url: str, keys: Keys) -> None:
    granted = await hammer(redis_url, keys, Rate(10.0, burst=5), clients=3, seconds=2.5)
    ordered = sorted(granted)
    most = most_in_any_window(granted)
    print(
        f"\n10/s burst 5: first five within {1000 * (ordered[4] - ordered[0]):.1f} ms; max {most}"
    )
    assert ordered[4] - ordered[0] < 0.05  # the burst goes back to back
    assert ordered[5] - ordered[0] >= 0.1 - 1e-6  # then one per T
    assert most <= 10 + 5 - 1


async def test_no_receiver_sees_more_than_the_cap_whatever_the_delays(
    redis_url: str, keys: Keys
) -> None:
    """Each send reaches its receiver at a random instant between its start and its reply
    (up to 300 ms later); the arrivals, not only the starts, stay within the cap."""
    rate = Rate(20.0)
    arrivals: list[float] = []
    start = Start(6)
    rng = random.Random(5)

    async def sender() -> None:
        connection = aredis.Redis.from_url(redis_url)
        limiter = AsyncRateLimiter(connection, keys)
        try:
            await connection.ping()
            deadline = await start.connected(3.0)
            while time.monotonic() < deadline:
                permit = await limiter.acquire("endpoint", rate, busy_s=2.0)
                delay = rng.choice([0.0, 0.3, rng.uniform(0, 0.3)])
                await asyncio.sleep(delay)  # the request travels: it arrives at start + delay
                arrivals.append(permit.start + delay)
                await asyncio.sleep(rng.uniform(0, 0.05))  # then the reply comes back
                await limiter.done("endpoint", permit)
        finally:
            await connection.aclose()

    await asyncio.gather(*(sender() for _ in range(6)))
    most = most_in_any_window(arrivals)
    print(f"\n20/s, delays up to 300 ms: {len(arrivals)} sends, at most {most} arrivals a second")
    assert most <= 20
    assert len(arrivals) >= 35  # throughput: about 20 / (1 + latency) a second


async def test_a_send_never_reported_done_counts_until_its_busy_time(
    ar: aredis.Redis, keys: Keys
) -> None:
    limiter = AsyncRateLimiter(ar, keys)
    rate = Rate(2.0)  # cap 2
    first = await limiter.acquire("e", rate, busy_s=0.5)
    await limiter.acquire("e", rate, busy_s=0.5)  # neither is ever reported done (a crash)
    third = await limiter.acquire("e", rate, busy_s=0.5)
    # The first counts as in flight until start + 0.5 s, then as done then, for one second.
    assert third.start - first.start >= 1.5 - 1e-6


async def test_min_interval_on_its_own(redis_url: str, keys: Keys) -> None:
    granted = sorted(await hammer(redis_url, keys, Rate(min_interval_ms=30.0), 3, 0.6))
    gaps = [b - a for a, b in itertools.pairwise(granted)]
    assert min(gaps) >= 0.03 - 1e-6
    assert len(granted) >= 15


async def test_defer_holds_every_permit_until_then(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    """Checked on Redis' clock, read around each call: however slow the machine is, the
    hold ends 0.3 s after the defer ran, the wait reported is what is left of it, and the
    permit starts no earlier."""
    limiter = AsyncRateLimiter(ar, keys)
    rate = Rate(1000.0)
    assert (await limiter.try_acquire("e", rate))[0] == 0.0
    before = redis_now(r)
    await limiter.defer("e", 0.3)
    after = redis_now(r)
    assert before + 0.3 - 1e-6 <= hold_of(r, keys, "e") <= after + 0.3 + 1e-6
    wait, _ = await limiter.try_acquire("e", rate)
    assert before + 0.3 - redis_now(r) - 1e-6 <= wait <= 0.3  # what is left of the hold
    assert (await limiter.acquire("e", rate)).start >= before + 0.3 - 1e-6
    before = redis_now(r)
    await limiter.defer("e", 0.01)  # a shorter hold does not shorten a longer one
    await limiter.defer("e", 0.5)
    await limiter.defer("e", 0.1)
    assert hold_of(r, keys, "e") >= before + 0.5 - 1e-6
    wait, _ = await limiter.try_acquire("e", rate)
    assert before + 0.5 - redis_now(r) - 1e-6 <= wait <= 0.5


async def test_reset_forgets_its_own_limit_only(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    """Seed 003's limiter deleted the wrong key on reset; this one deletes its own."""
    limiter = AsyncRateLimiter(ar, keys)
    rate = Rate(1.0)
    for name in ("user:1", "user:12", "user:2"):
        assert (await limiter.try_acquire(name, rate))[0] == 0.0
        assert (await limiter.try_acquire(name, rate))[0] > 0.9
    await limiter.reset("user:1")
    assert not r.exists(keys.rate("user:1"))
    assert not r.exists(keys.rate_window("user:1"))
    assert (await limiter.try_acquire("user:1", rate))[0] == 0.0
    assert (await limiter.try_acquire("user:12", rate))[0] > 0.9
    assert (await limiter.try_acquire("user:2", rate))[0] > 0.9


async def test_state_expires_once_idle(ar: aredis.Redis, r: redis.Redis, keys: Keys) -> None:
    await AsyncRateLimiter(ar, keys).try_acquire("e", Rate(10.0, min_interval_ms=200.0))
    assert 0 < r.pttl(keys.rate("e")) <= 1000 + 100 + 200


def test_rate_refuses_nonsense() -> None:
    for bad in (
        lambda: Rate(-1.0),
        lambda: Rate(float("inf")),
        lambda: Rate(1.0, burst=0),
        lambda: Rate(1.0, min_interval_ms=-5),
    ):
        with pytest.raises(ValueError):
            bad()
    assert not Rate().limited
    assert Rate(min_interval_ms=1).limited
