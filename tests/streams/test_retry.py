"""The shared retry loop: one warning when it starts failing, one line when it recovers."""

from __future__ import annotations

import logging

import pytest
import redis

from streamsink.streams import retry
from streamsink.streams.connection import connect_async


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


def test_an_error_is_described_by_its_class_and_message() -> None:
    refused = redis.ConnectionError("Error 111 connecting to 127.0.0.1:7000.")
    assert retry.describe(refused) == "ConnectionError: Error 111 connecting to 127.0.0.1:7000."
    assert retry.describe(redis.TimeoutError()) == "TimeoutError"


async def test_the_server_of_a_cluster_client_is_its_nodes() -> None:
    client = connect_async("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")  # connects on use
    assert retry.server(client) == "cluster:127.0.0.1:7000,127.0.0.1:7001"
    assert retry.server(connect_async("redis://127.0.0.1:6390/0")) == "127.0.0.1:6390"
    await client.aclose()
