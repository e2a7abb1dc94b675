"""The shared retry loop: one warning when it starts failing, one line when it recovers."""

from __future__ import annotations

import logging

import pytest

from streamsink.streams import retry


async def test_a_retry_spell_logs_one_warning_and_one_recovered_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_wait(self: retry.Backoff) -> float:
        self.attempt += 1
        return 0.0

    monkeypatch.setattr(retry.Backoff, "next", no_wait)
    failures = iter([ConnectionError("down")] * 5)

    async def flaky() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "up"

    with caplog.at_level(logging.DEBUG, logger="streamsink.retry"):
        assert await retry.retrying(flaky, "probe", where={"group": "g"}) == "up"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["retrying"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 4, "later attempts"
    [recovered] = [r for r in caplog.records if r.getMessage() == "recovered"]
    assert (recovered.what, recovered.attempts, recovered.group) == ("probe", 6, "g")  # type: ignore[attr-defined]
