"""Group settings from config options, and the backoff that paces retries."""

from __future__ import annotations

import random
from dataclasses import fields
from typing import Any

import pytest

from streamsink.consumers.settings import GroupSettings
from streamsink.errors import ConfigError
from streamsink.streams.retry import Backoff

DEFAULTS = {
    "max_events": 5000,
    "max_bytes": 4 * 1024 * 1024,
    "linger_ms": 50,
    "max_age_ms": 250,
    "read_count": 1000,
    "block_ms": 500,
    "lease_ttl_ms": 10_000,
    "max_deliveries": 5,
    "max_attempts": 3,
    "retention_ms": 0,
    "maintenance_ms": 5000,
}


def test_defaults_are_the_documented_ones() -> None:
    settings = GroupSettings()
    assert {f.name: getattr(settings, f.name) for f in fields(GroupSettings)} == DEFAULTS
    assert GroupSettings.from_options("g", {}) == settings


def test_from_options_takes_every_setting() -> None:
    options = {name: value + 1 for name, value in DEFAULTS.items()}
    settings = GroupSettings.from_options("pg-writer", options)
    assert {f.name: getattr(settings, f.name) for f in fields(settings)} == options


def test_from_options_keeps_defaults_of_unset_ones() -> None:
    settings = GroupSettings.from_options("g", {"max_events": 10, "retention_ms": 60_000})
    assert settings == GroupSettings(max_events=10, retention_ms=60_000)
    assert settings.linger_ms == DEFAULTS["linger_ms"]


def test_zero_is_fine_where_it_means_something() -> None:
    settings = GroupSettings.from_options(
        "g", {"linger_ms": 0, "max_age_ms": 0, "retention_ms": 0, "maintenance_ms": 0}
    )
    assert (settings.linger_ms, settings.max_age_ms, settings.retention_ms) == (0, 0, 0)


def test_an_unknown_setting_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        GroupSettings.from_options("pg-writer", {"max_events": 10, "linger": 5})
    message = str(caught.value)
    assert "'linger'" in message
    assert "'pg-writer'" in message
    assert "linger_ms" in message  # the known ones are listed, to spot the typo


@pytest.mark.parametrize("value", [-1, True, False, 1.5, 10.0, "10", None, [10]])
@pytest.mark.parametrize("name", ["max_events", "linger_ms", "retention_ms"])
def test_a_value_that_is_not_a_non_negative_integer_is_refused(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"'g'.*\b{name}\b.*non-negative integer"):
        GroupSettings.from_options("g", {name: value})


@pytest.mark.parametrize(
    "options",
    [
        {"lease_ttl_ms": 299},
        {"lease_ttl_ms": 0},
        {"max_events": 0},
        {"max_deliveries": 0},
        {"read_count": 0},  # Redis refuses XAUTOCLAIM/XREADGROUP COUNT 0
        {"block_ms": 0},  # would read without waiting: an idle shard polls in a busy loop
    ],
)
def test_bounds_are_checked(options: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match=f"'g'.*{next(iter(options))}"):
        GroupSettings.from_options("g", options)


def test_the_smallest_allowed_values() -> None:
    options = {"lease_ttl_ms": 300, "max_events": 1, "max_deliveries": 2, "read_count": 1}
    settings = GroupSettings.from_options("g", {**options, "block_ms": 1})
    assert (settings.lease_ttl_ms, settings.max_events, settings.block_ms) == (300, 1, 1)


def test_one_delivery_is_too_few_because_a_takeover_claim_counts() -> None:
    with pytest.raises(ConfigError, match="max_deliveries must be >= 2"):
        GroupSettings.from_options("g", {"max_deliveries": 1})


def test_backoff_survives_an_hour_of_retries() -> None:
    backoff = Backoff(base=0.05, cap=5.0)
    delays = [backoff.next() for _ in range(5000)]
    assert 2.5 <= delays[-1] <= 5.0


# -- retry.Backoff ---------------------------------------------------------------------------


def test_backoff_bounds_double_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    backoff = Backoff(base=0.1, cap=1.0)
    assert [backoff.next() for _ in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_backoff_draws_each_delay_between_half_the_bound_and_the_bound() -> None:
    for _ in range(50):
        backoff = Backoff(base=0.05, cap=5.0)
        for attempt in range(12):
            bound = min(5.0, 0.05 * 2**attempt)
            assert bound / 2 <= backoff.next() <= bound


def test_backoff_is_jittered() -> None:
    delays = {Backoff(base=1.0, cap=60.0).next() for _ in range(20)}
    assert len(delays) > 1  # two workers failing together do not retry in lockstep
    assert min(delays) >= 0.5


def test_backoff_reset_starts_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    backoff = Backoff(base=0.1, cap=10.0)
    for _ in range(5):
        backoff.next()
    assert backoff.attempt == 5
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next() == pytest.approx(0.1)
    assert backoff.next() == pytest.approx(0.2)
