"""The shared circuit breaker of an endpoint (Redis), as two workers' sinks see it."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aredis

from streamsink.sinks.http.breaker import Breaker, State
from streamsink.streams import Keys
from streamsink.streams.endpoints import EndpointGates


def breaker(gates: EndpointGates, changes: list[State], cooldown_s: float = 0.3) -> Breaker:
    return Breaker(gates, "https://a.example:443", "a", 3, cooldown_s, 1.0, changes.append)


async def test_failures_of_two_workers_open_the_breaker_for_both_and_a_probe_closes_it(
    ar: aredis.Redis, keys: Keys
) -> None:
    one_changes: list[State] = []
    two_changes: list[State] = []
    one = breaker(EndpointGates(ar, keys, "hooks"), one_changes)
    two = breaker(EndpointGates(ar, keys, "hooks"), two_changes)
    assert await one.enter() is False and await two.enter() is False
    assert await one.failed("e1", probe=False) is False
    await two.succeeded(probe=False)  # not in a row any more
    assert await one.failed("e2", probe=False) is False
    assert await two.failed("e3", probe=False) is False
    assert await one.failed("HTTP 500", probe=False) is True  # the third in a row, of both
    assert one_changes == ["open"]

    # The other worker learns it from Redis: its calls wait, the first one probes.
    await asyncio.sleep(0.11)  # its clear view of the gate is over
    started = time.monotonic()
    assert await two.enter() is True
    assert time.monotonic() - started >= 0.15  # the rest of the cool-down
    assert two_changes == ["open", "half-open"]

    # While the probe is out, every other call waits, in both workers.
    waiting = [asyncio.create_task(one.enter()), asyncio.create_task(two.enter())]
    await asyncio.sleep(0.3)
    assert not any(task.done() for task in waiting)
    assert (one.waiting, two.waiting) == (1, 1)
    await two.succeeded(probe=True)
    assert await asyncio.wait_for(asyncio.gather(*waiting), 2) == [False, False]
    assert one.state is State.CLOSED and two.state is State.CLOSED
    assert two_changes == ["open", "half-open", "closed"]


async def test_a_failed_probe_opens_it_again_and_a_lost_probe_lets_another_go(
    ar: aredis.Redis, keys: Keys
) -> None:
    changes: list[State] = []
    gates = EndpointGates(ar, keys, "hooks")
    one = Breaker(gates, "e", "a", 1, 0.2, probe_s=0.4, on_change=changes.append)
    assert await one.failed("boom", probe=False) is True
    assert await one.enter() is True  # after the cool-down: the probe
    assert await one.failed("boom again", probe=True) is True
    assert changes == ["open", "half-open", "open"]
    assert await one.enter() is True  # a probe that is never heard of (cancelled) ...
    started = time.monotonic()
    assert await one.enter() is True  # ... lets another go once its time is over
    assert time.monotonic() - started >= 0.3


async def test_a_retry_after_hold_stops_every_worker(ar: aredis.Redis, keys: Keys) -> None:
    one = breaker(EndpointGates(ar, keys, "hooks"), [])
    two = breaker(EndpointGates(ar, keys, "hooks"), [])
    assert await two.enter() is False
    await one.hold(0.5)
    await asyncio.sleep(0.11)  # the other worker trusts its clear view this long at most
    started = time.monotonic()
    assert await two.enter() is False
    assert time.monotonic() - started >= 0.3
    assert one.state is State.CLOSED  # a hold is not the breaker
