"""A window closes on count, bytes, quiet time or age, whichever first (times injected)."""

from __future__ import annotations

import math

import pytest

from streamsink.consumers.settings import GroupSettings
from streamsink.consumers.window import Window
from streamsink.schemas.event import Event
from streamsink.schemas.merge import Entry

T0 = 1000.0  # a monotonic clock reading, in seconds
EPS = 1e-6


def put(window: Window, n: int, now: float, size: int = 10) -> Entry:
    """Add entry `n` read at `now`, `size` bytes; its entry."""
    entry = Entry(f"1-{n}", Event.make(f"k{n}", "set", {"n": n}))
    window.entries.append(entry)  # as the shard's read loop does
    window.ids.append(entry.id.encode())
    window.grew(size, now)
    return entry


def test_an_empty_window_is_never_due() -> None:
    window, settings = Window(), GroupSettings(max_events=1, max_bytes=1, linger_ms=0)
    assert len(window) == 0
    assert not window
    assert window.due_at(settings) == math.inf
    assert not window.full(settings)
    assert not window.due(settings, T0 + 10**9)


def test_add_keeps_order_ids_size_and_times() -> None:
    window = Window()
    added = [put(window, n, T0 + n, size=n + 1) for n in range(3)]
    assert len(window) == 3
    assert window.entries == added
    assert window.ids == [b"1-0", b"1-1", b"1-2"]
    assert [window.delivered(n) for n in range(3)] == [1, 1, 1]
    window.deliveries[b"1-1"] = 4  # a claimed entry remembers how often it went out
    assert [window.delivered(n) for n in range(3)] == [1, 4, 1]
    assert window.size == 1 + 2 + 3
    assert (window.opened, window.last) == (T0, T0 + 2)


def test_closes_on_max_events() -> None:
    settings = GroupSettings(max_events=3, linger_ms=10_000, max_age_ms=10_000)
    window = Window()
    for n in range(2):
        put(window, n, T0)
        assert not window.full(settings)
        assert not window.due(settings, T0)
    put(window, 2, T0)
    assert window.full(settings)
    assert window.due(settings, T0)  # at once, not after a linger


def test_closes_on_max_bytes() -> None:
    settings = GroupSettings(max_bytes=100, linger_ms=10_000, max_age_ms=10_000)
    window = Window()
    put(window, 0, T0, size=60)
    put(window, 1, T0, size=39)
    assert not window.full(settings)
    assert not window.due(settings, T0)
    put(window, 2, T0, size=1)
    assert window.full(settings)
    assert window.due(settings, T0)


def test_one_entry_larger_than_max_bytes_fills_the_window() -> None:
    settings = GroupSettings(max_bytes=100)
    window = Window()
    put(window, 0, T0, size=1000)
    assert window.full(settings)
    assert window.due(settings, T0)


def test_closes_after_linger_without_entries() -> None:
    settings = GroupSettings(linger_ms=50, max_age_ms=10_000)
    window = Window()
    put(window, 0, T0)
    assert window.due_at(settings) == pytest.approx(T0 + 0.05)
    assert not window.due(settings, T0 + 0.05 - EPS)
    assert window.due(settings, T0 + 0.05 + EPS)
    put(window, 1, T0 + 0.04)  # an entry restarts the quiet time
    assert window.due_at(settings) == pytest.approx(T0 + 0.09)
    assert not window.due(settings, T0 + 0.09 - EPS)
    assert window.due(settings, T0 + 0.09 + EPS)


def test_max_age_bounds_a_window_that_keeps_receiving() -> None:
    settings = GroupSettings(linger_ms=50, max_age_ms=200)
    window = Window()
    for ms in range(0, 200, 40):  # one entry every 40 ms, never quiet for 50 ms
        put(window, len(window), T0 + ms / 1000)
        assert window.due_at(settings) <= T0 + 0.2 + EPS
        assert not window.due(settings, T0 + (ms + 40) / 1000 - EPS)
    assert window.last == T0 + 0.16  # linger alone would keep it open until T0 + 0.21
    assert window.due_at(settings) == pytest.approx(T0 + 0.2)
    assert not window.due(settings, T0 + 0.2 - EPS)
    assert window.due(settings, T0 + 0.2 + EPS)
    assert window.opened == T0


def test_zero_linger_closes_at_the_first_chance() -> None:
    settings = GroupSettings(linger_ms=0)
    window = Window()
    put(window, 0, T0)
    assert window.due(settings, T0)


def test_full_ignores_time() -> None:
    settings = GroupSettings(max_events=2, linger_ms=1, max_age_ms=1)
    window = Window()
    put(window, 0, T0)
    assert not window.full(settings)
    assert window.due(settings, T0 + 1)  # due by time, yet not full: reading may go on


def test_a_lead_closes_the_window_that_much_before_its_max_age() -> None:
    settings = GroupSettings(linger_ms=10_000, max_age_ms=1000)
    window = Window()
    put(window, 0, T0)
    assert window.due_at(settings, lead=0.2) == pytest.approx(T0 + 0.8)
    assert not window.due(settings, T0 + 0.8 - EPS, lead=0.2)
    assert window.due(settings, T0 + 0.8 + EPS, lead=0.2)
    assert not window.due(settings, T0 + 0.8 + EPS)  # without it, at the max age
    quiet = GroupSettings(linger_ms=50, max_age_ms=1000)
    assert window.due_at(quiet, lead=0.2) == pytest.approx(T0 + 0.05)  # linger untouched
