"""One assertion for every typed error: its exact class, its field and its reason."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from streamsink.errors import EventError


@contextmanager
def expect(cls: type[EventError], field: str, reason: str) -> Iterator[None]:
    """The block raises exactly `cls` (not a subclass) for `field`, its reason holding `reason`."""
    with pytest.raises(EventError) as caught:
        yield
    error = caught.value
    assert type(error) is cls, f"raised {type(error).__name__}: {error}"
    assert error.field == field, f"field {error.field!r}, wanted {field!r} ({error})"
    assert reason in error.reason, f"reason {error.reason!r} lacks {reason!r}"
    assert str(error) == f"{field}: {error.reason}"
