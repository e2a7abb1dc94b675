"""A shard runner's read loop on its own: how a window's age is counted (no server needed)."""

from __future__ import annotations

import logging
import time

import pytest
import redis
import redis.asyncio as aredis

from streamsink.consumers.settings import GroupSettings
from streamsink.consumers.shard import ShardRunner
from streamsink.consumers.window import Window
from streamsink.schemas import Column, ColumnType, Config, Event, StreamSpec, Table, encode
from streamsink.streams.keys import Keys
from streamsink.streams.leases import Lease
from streamsink.streams.reader import Read, ShardReader
from streamsink.streams.retry import Backoff

ITEMS = Table("items", ("id",), {"id": Column(ColumnType.INT), "n": Column(ColumnType.INT)})
CONFIG = Config(streams={"items": StreamSpec("items", 1, "items")}, tables={"items": ITEMS})


def runner(max_age_ms: int) -> ShardRunner:
    """A runner whose reader is never used: `_take` only decodes into the window."""
    reader = ShardReader(aredis.Redis(), Keys("t"), "items", 0, "g", "w1")
    settings = GroupSettings(max_age_ms=max_age_ms)
    return ShardRunner(reader, Lease(0, 1), CONFIG, "items", {}, settings)


def read(ms: list[int], newest: int | None) -> Read:
    """New entries with IDs at these milliseconds, read when the newest was `newest`."""
    entries = [
        [f"{at}-0".encode(), encode(Event.make("k", "set", {"id": n, "n": n}))]
        for n, at in enumerate(ms)
    ]
    return Read(entries, {}, f"{newest}-0".encode() if newest is not None else b"")


@pytest.mark.parametrize(
    ("first", "newest", "waited"),
    [
        (1_700_000_000_000, 1_700_000_000_030, 0.030),  # read 30 ms after it was added
        (1_700_000_000_000, 1_700_000_000_000, 0.0),  # the newest itself
        (1_700_000_000_000, 1_700_000_009_000, 0.250),  # a backlog: at most max_age / 4
        (1_700_000_000_000, 1_699_999_999_000, 0.0),  # explicit IDs out of order: never < 0
        (1_700_000_000_000, None, 0.0),  # claimed entries: no newest, counted from now
    ],
)
async def test_a_window_counts_its_age_from_when_its_first_entry_was_added(
    first: int, newest: int | None, waited: float
) -> None:
    shard, window = runner(max_age_ms=1000), Window()
    before = time.monotonic()
    await shard._take(window, read([first, first + 10], newest), asked=100)
    after = time.monotonic()
    assert len(window) == 2
    assert before - waited <= window.opened <= after - waited
    opened = window.opened
    await shard._take(window, read([first + 20], newest), asked=100)  # more of the window
    assert (len(window), window.opened) == (3, opened)


async def test_a_window_opened_on_a_backlog_counts_its_age_from_its_read() -> None:
    """A read that got all it asked for stopped short of the newest entry: the first
    entry's wait says how far behind the reader is, and windows should fill, not close."""
    shard, window = runner(max_age_ms=1000), Window()
    before = time.monotonic()
    await shard._take(window, read([1_700_000_000_000, 1_700_000_000_010], 1_700_000_009_000), 2)
    assert before <= window.opened <= time.monotonic()


def test_runner_refuses_entries_of_another_shard_and_calls_no_sink_sends() -> None:
    from streamsink.errors import ValidationError
    from streamsink.schemas import shard_of
    from streamsink.sinks.postgres import PostgresSink

    config = Config(streams={"items": StreamSpec("items", 4, "items")}, tables={"items": ITEMS})
    reader = ShardReader(aredis.Redis(), Keys("t"), "items", 1, "g", "w1")
    mine = next(f"k{n}" for n in range(100) if shard_of(f"k{n}", 4) == 1)
    other = next(f"k{n}" for n in range(100) if shard_of(f"k{n}", 4) == 2)
    call = encode(Event.make(mine, "call", {"url": "https://x/h", "payload": 1}))
    postgres = PostgresSink.__new__(PostgresSink)  # its type is all that counts here
    for sinks, sends in (
        ({}, False),
        ({"db": postgres}, False),
        ({"db": postgres, "f": object()}, True),
    ):
        run = ShardRunner(reader, Lease(1, 1), config, "items", sinks, GroupSettings())  # type: ignore[arg-type]
        assert run._unpack(encode(Event.make(mine, "set", {"id": 1})))[0].key == mine
        with pytest.raises(ValidationError, match="belongs to shard 2 of 4"):
            run._unpack(encode(Event.make(other, "set", {"id": 1})))
        if sends:
            assert run._unpack(call)[1] is None
        else:
            with pytest.raises(ValidationError, match="no sink of this group sends calls"):
                run._unpack(call)


async def test_failing_reads_give_way_to_a_due_window_and_log_one_warning_a_spell(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reads failing for good (issue 18: the node asked for XREAD's keys dead) must not hold
    the window already read back from its sinks: once it is due, the read gives up."""
    shard = runner(max_age_ms=1000)

    def no_wait(self: Backoff) -> float:
        self.attempt += 1
        return 0.0

    monkeypatch.setattr(Backoff, "next", no_wait)
    calls, refused = 0, redis.ConnectionError("Error 111 connecting to 127.0.0.1:7000.")

    async def failing(count: int, block_ms: int) -> Read:
        nonlocal calls
        calls += 1
        if calls > 20:
            raise AssertionError("reads retried past the window's due time")
        raise refused

    monkeypatch.setattr(shard.reader, "next", failing)
    with caplog.at_level(logging.DEBUG, logger="streamsink.shard"):
        due = time.monotonic()  # the window is due now
        assert await shard._read(100, 50, until=due) == Read([], {})
    assert calls == 1 and shard.reader._claiming, "what a lost reply delivered is claimed next"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == "read failed"
    assert warning.error == "ConnectionError: Error 111 connecting to 127.0.0.1:7000."  # type: ignore[attr-defined]

    replies = iter([refused, refused, Read([], {})])

    async def flaky(count: int, block_ms: int) -> Read:
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    caplog.clear()
    monkeypatch.setattr(shard.reader, "next", flaky)
    with caplog.at_level(logging.DEBUG, logger="streamsink.shard"):
        assert await shard._read(100, 50) == Read([], {})  # no window: until it reads
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.WARNING, "read failed"),
        (logging.DEBUG, "read failed"),
        (logging.INFO, "read recovered"),
    ]
    assert caplog.records[-1].attempts == 3  # type: ignore[attr-defined]
