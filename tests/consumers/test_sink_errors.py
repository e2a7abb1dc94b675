"""What the worker does by the class of a sink's failure (issue 11), in this process.

- a bug (any exception): tried `max_attempts` times, then the window is split until the
  entries the sink fails on alone are found; only those are dead-lettered;
- `SinkUnavailable`: retried for as long as it takes, the shard *retrying* in status with
  the error, one log line when it starts and one when it ends, nothing dead-lettered;
- `SinkMisconfigured`: the group stops (status says so), nothing acknowledged or
  dead-lettered, and the other groups go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest
import redis

from streamsink.consumers.worker import Worker, worker_client
from streamsink.errors import SinkMisconfigured, SinkUnavailable
from streamsink.schemas import Config, Event, GroupSpec, SinkSpec
from streamsink.sinks import Batch, FunctionSink, Rejected, TestingSink
from streamsink.streams import Keys, Producer, create_stream
from streamsink.streams.admin import group_status
from streamsink.streams.state import ShardState
from tests.consumers.test_worker import (
    FAST,
    GROUP,
    SHARDS,
    STREAM,
    dead_letters,
    delivered_ids,
    eventually,
    item,
    keys_on,
    make_config,
    pending,
    running,
)


async def test_a_sink_bug_on_one_key_dead_letters_only_its_entries_and_the_rest_commit(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["buggy"], max_events=50, linger_ms=300, max_age_ms=2000)
    shard = 2
    good, bad = keys_on(shard, 2)
    events = [item(good if n % 5 else bad, n) for n in range(20)]
    ids = Producer(r, config).publish_many(STREAM, events)
    broken = {entry_id for entry_id, e in zip(ids, events, strict=True) if e.key == bad}
    applied: list[str] = []
    calls: list[int] = []

    def buggy(batch: Batch) -> None:
        calls.append(len(batch.entries))
        if any(entry.event.key == bad for entry in batch.entries):
            raise ValueError(f"cannot handle {bad}")
        applied.extend(entry.id for entry in batch.entries)

    async with running(redis_url, config, {"buggy": FunctionSink(buggy)}) as task:
        await eventually(lambda: len(applied) == 16, task, "the good entries")
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "the shard moved on")

    assert applied == [i for i in ids if i not in broken], "every good entry, once, in order"
    assert calls[:3] == [20, 20, 20], "max_attempts (3) tries of the whole window first"
    letters = dead_letters(r, keys, shard)
    assert set(letters) == broken
    for letter in letters.values():
        assert letter[b"reason"] == (
            f"sink 'buggy': raised ValueError: cannot handle {bad} (3 attempts)".encode()
        )
        assert b"sinks" not in letter, "the group's only sink refused it: a replay goes to all"
    assert [row.state for row in group_status(r, keys, STREAM, GROUP)][shard] in (
        ShardState.RUNNING,
        ShardState.IDLE,
    )


async def test_a_bug_in_one_of_two_sinks_dead_letters_for_that_sink_only(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """The other sink applied the entry: its letter names the sink that refused it, so a
    replay reaches that one only (an incr must not apply twice in the other)."""
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["mem", "buggy"], max_attempts=1)
    shard = 0
    key = keys_on(shard, 1)[0]
    ids = Producer(r, config).publish_many(STREAM, [item(key, n) for n in range(4)])

    def buggy(batch: Batch) -> None:
        if any(entry.event.data["seq"] == 2 for entry in batch.entries):
            raise KeyError("seq 2")

    sink = TestingSink()
    async with running(redis_url, config, {"mem": sink, "buggy": FunctionSink(buggy)}) as task:
        await eventually(lambda: len(delivered_ids(sink)) >= 4, task, "delivered")
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "the shard moved on")
    assert delivered_ids(sink) == ids
    letters = dead_letters(r, keys, shard)
    assert set(letters) == {ids[2]}
    assert letters[ids[2]][b"sinks"] == b"buggy"


class Outage:
    """A sink that raises SinkUnavailable until `up` is set, then records."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.attempts = 0
        self.batches: list[Batch] = []

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        self.attempts += 1
        if not self.up.is_set():
            raise SinkUnavailable("connection refused by 127.0.0.1:1")
        self.batches.append(batch)
        return ()

    async def close(self) -> None:
        pass


async def test_an_unavailable_sink_is_retried_visibly_until_it_is_back(
    r: redis.Redis, keys: Keys, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["db"])
    shard = 4
    key = keys_on(shard, 1)[0]
    ids = Producer(r, config).publish_many(STREAM, [item(key, n) for n in range(5)])
    sink = Outage()
    caplog.set_level(logging.DEBUG, logger="streamsink")
    async with running(redis_url, config, {"db": sink}) as task:
        await eventually(lambda: sink.attempts > 0, task, "a first attempt")

        def retrying() -> bool:
            return group_status(r, keys, STREAM, GROUP)[shard].state is ShardState.RETRYING

        await eventually(retrying, task, "status says retrying", within=5)
        row = group_status(r, keys, STREAM, GROUP)[shard]
        assert "connection refused by 127.0.0.1:1" in row.error and "db" in row.error
        assert row.pending == 5 and row.outstanding == 5, "nothing acknowledged meanwhile"
        await eventually(lambda: sink.attempts >= 6, task, "more attempts", within=10)
        assert pending(r, keys)[shard] == 5
        sink.up.set()
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "acknowledged")
        await eventually(lambda: not retrying(), task, "status back to running")
    assert [e.id for b in sink.batches for e in b.entries] == ids, "each once, in order"
    assert dead_letters(r, keys, shard) == {}
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert messages.count("sink write failed: retrying") == 1, "one line when it starts"
    assert messages.count("sink recovered") == 1, "one line when it ends"


async def test_a_misconfigured_sink_stops_its_group_and_the_other_group_goes_on(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    base = make_config(keys, ["missing"])
    config = Config(
        prefix=base.prefix,
        streams=base.streams,
        tables=base.tables,
        groups={
            GROUP: base.groups[GROUP],
            "other": GroupSpec("other", STREAM, ("mem",), dict(FAST)),
        },
        sinks={"missing": SinkSpec("missing", "function"), "mem": SinkSpec("mem", "function")},
    )
    ids = Producer(r, config).publish_many(
        STREAM, [item(keys_on(s, 1)[0], s) for s in range(SHARDS)]
    )

    def missing(batch: Batch) -> None:
        raise SinkMisconfigured('table public.items does not exist: run "streamsink tables create"')

    sink = TestingSink()
    client = worker_client(redis_url)
    stop = asyncio.Event()
    worker = Worker(client, config, {"missing": FunctionSink(missing), "mem": sink}, "w1")
    task = asyncio.create_task(worker.run(stop))
    try:
        await eventually(lambda: sorted(delivered_ids(sink)) == sorted(ids), task, "other group")
        await eventually(lambda: GROUP in worker.stopped, task, "the group stopped")
        assert "does not exist" in worker.stopped[GROUP]
        await asyncio.sleep(0.3)
        assert pending(r, keys) == [1] * SHARDS, "the stopped group acknowledged nothing"
        assert all(not r.exists(keys.dead(STREAM, s, GROUP)) for s in range(SHARDS))
        rows = group_status(r, keys, STREAM, GROUP)
        stopped = [row for row in rows if row.state is ShardState.STOPPED]
        assert stopped and all("does not exist" in row.error for row in stopped)
        assert not task.done(), "the other group still runs"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await client.aclose()
    assert worker.stopped.keys() == {GROUP}


async def test_a_sum_a_column_cannot_hold_is_dead_lettered_whatever_the_sink(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """Merging refuses the entry whose delta overflows the column: a function sink never
    sees it, and it is dead-lettered instead of acknowledged as applied."""
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["mem"], linger_ms=300, max_age_ms=2000)
    key = keys_on(3, 1)[0]
    big = 2**62
    events = [Event.make(key, "incr", {"id": key, "seq": big}) for _ in range(3)]
    ids = Producer(r, config).publish_many(STREAM, events)
    sink = TestingSink()
    async with running(redis_url, config, {"mem": sink}) as task:
        await eventually(lambda: bool(sink.batches), task, "the window")
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "acknowledged")
    row = next(iter(sink.batches[0].merged.rows["items"].values()))
    assert row.fields["seq"][1] == big, "the first delta folded; the others refused"
    letters = dead_letters(r, keys, 3)
    assert set(letters) == set(ids[1:])
    assert all(letter[b"reason"].startswith(b"sink 'mem': merge: ") for letter in letters.values())
