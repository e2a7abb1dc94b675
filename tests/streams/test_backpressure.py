"""Backpressure: a stream's `max_lag` (and memory ceiling) checked inside the publish script.

Lag is what the slowest group has not acknowledged (XINFO GROUPS' lag + pending); the
tests move it with XREADGROUP / XACK as a worker would, and with a real worker at the end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from streamsink.cli import main
from streamsink.errors import Backpressure, ConfigError
from streamsink.schemas import Config, Event, GroupSpec, SinkSpec, StreamSpec, shard_of
from streamsink.schemas.config import from_dict, load
from streamsink.sinks import TestingSink
from streamsink.streams import AsyncProducer, Keys, Producer, create_stream
from tests.conftest import RedisServer
from tests.consumers.test_worker import FAST, ITEMS, eventually, running
from tests.streams.conftest import SHARDS, TASKS, task

LIMIT = 5


def guarded(keys: Keys, **spec: float) -> Config:
    """`tasks` (SHARDS shards) with a lag limit, read by groups g1 and g2."""
    streams = {"tasks": StreamSpec("tasks", SHARDS, table="tasks", **spec)}  # type: ignore[arg-type]
    return Config(prefix=keys.prefix, streams=streams, tables={"tasks": TASKS})


def on_shard(shard: int, count: int) -> list[int]:
    """`count` task numbers whose key `task-<n>` lands on `shard`."""
    found, n = [], 0
    while len(found) < count:
        if shard_of(f"task-{n}", SHARDS) == shard:
            found.append(n)
        n += 1
    return found


@pytest.fixture
def grouped(r: redis.Redis, keys: Keys) -> Keys:
    """`tasks` created, with groups g1 and g2 on every shard (as workers create them)."""
    create_stream(r, keys, "tasks", SHARDS)
    for shard in range(SHARDS):
        for group in ("g1", "g2"):
            r.xgroup_create(keys.shard("tasks", shard), group, id="0", mkstream=True)
    return keys


def consume(r: redis.Redis, keys: Keys, group: str, shard: int, count: int, ack: bool) -> None:
    """Read `count` entries of `shard` as `group` and acknowledge them if `ack`."""
    got = r.xreadgroup(group, "c", {keys.shard("tasks", shard): ">"}, count=count)
    ids = [entry_id for _, entries in got for entry_id, _ in entries]
    if ack and ids:
        r.xack(keys.shard("tasks", shard), group, *ids)


def test_refused_at_max_lag_with_lag_and_limit_and_nothing_lost(
    r: redis.Redis, grouped: Keys
) -> None:
    producer = Producer(r, guarded(grouped, max_lag=LIMIT))
    numbers = on_shard(0, LIMIT + 1)
    published = [producer.publish("tasks", task(n)) for n in numbers[:LIMIT]]
    with pytest.raises(Backpressure) as refused:
        producer.publish("tasks", task(numbers[LIMIT]))
    assert (refused.value.what, refused.value.lag, refused.value.limit) == ("lag", LIMIT, LIMIT)
    assert refused.value.ids == [""]
    assert "slow down" in str(refused.value)
    shard = grouped.shard("tasks", 0)
    assert [i.decode() for i, _ in r.xrange(shard)] == published  # nothing lost, none added
    producer.publish("tasks", task(on_shard(1, 1)[0]))  # another shard has room

    consume(r, grouped, "g1", 0, LIMIT, ack=True)  # g1 caught up; g2 is the slowest
    with pytest.raises(Backpressure):
        producer.publish("tasks", task(numbers[LIMIT]))
    consume(r, grouped, "g2", 0, 2, ack=False)  # read, not committed: still lag
    with pytest.raises(Backpressure) as still:
        producer.publish("tasks", task(numbers[LIMIT]))
    assert still.value.lag == LIMIT
    r.xack(shard, "g2", *[i.encode() for i in published[:2]])
    producer.publish("tasks", task(numbers[LIMIT]))  # room for one... and the batch it is in


def test_a_timeout_waits_for_room_and_retries_only_the_refused_shards(
    r: redis.Redis, grouped: Keys
) -> None:
    producer = Producer(r, guarded(grouped, max_lag=LIMIT))
    for n in on_shard(0, LIMIT):
        producer.publish("tasks", task(n))
    full, free = on_shard(0, LIMIT + 1)[LIMIT], on_shard(1, 1)[0]
    with pytest.raises(Backpressure) as refused:
        producer.publish_many("tasks", [task(free), task(full)])
    assert refused.value.ids[0] and refused.value.ids[1] == ""  # shard 1 took its event
    assert r.xlen(grouped.shard("tasks", 1)) == 1

    def drain_later() -> None:
        time.sleep(0.3)
        for group in ("g1", "g2"):
            consume(r, grouped, group, 0, 2, ack=True)

    threading.Thread(target=drain_later).start()
    started = time.monotonic()
    ids = producer.publish_many("tasks", [task(full)], timeout=5.0)
    assert 0.25 < time.monotonic() - started < 2.0
    assert ids[0].encode() == r.xrange(grouped.shard("tasks", 0))[-1][0]
    producer.publish("tasks", task(full))  # the last room: lag 5 again
    started = time.monotonic()
    with pytest.raises(Backpressure):  # and a timeout that runs out still says why
        producer.publish("tasks", task(full), timeout=0.05)
    assert 0.05 <= time.monotonic() - started < 1.5


async def test_the_asyncio_producer_refuses_and_waits_too(
    r: redis.Redis, ar: aredis.Redis, grouped: Keys
) -> None:
    async with AsyncProducer(ar, guarded(grouped, max_lag=LIMIT)) as producer:
        await producer.publish_many("tasks", [task(n) for n in on_shard(2, LIMIT)])
        extra, free = on_shard(2, LIMIT + 1)[LIMIT], on_shard(3, 1)[0]
        with pytest.raises(Backpressure) as refused:
            await producer.publish_many("tasks", [task(free), task(extra)])
        assert refused.value.ids[0] and refused.value.ids[1] == ""
        with pytest.raises(Backpressure):
            await producer.publish("tasks", task(extra))

        async def drain_later() -> None:
            await asyncio.sleep(0.2)
            for group in ("g1", "g2"):
                consume(r, grouped, group, 2, LIMIT, ack=True)

        later = asyncio.create_task(drain_later())
        assert await producer.publish("tasks", task(extra), timeout=5.0)
        await later
    assert r.xlen(grouped.shard("tasks", 2)) == LIMIT + 1


def test_without_groups_the_length_is_the_lag(r: redis.Redis, keys: Keys) -> None:
    create_stream(r, keys, "tasks", SHARDS)
    producer = Producer(r, guarded(keys, max_lag=2))
    numbers = on_shard(0, 3)
    producer.publish_many("tasks", [task(n) for n in numbers[:2]])
    with pytest.raises(Backpressure):
        producer.publish("tasks", task(numbers[2]))


def test_memory_ceiling(redis_server: RedisServer, keys: Keys) -> None:
    client = redis.Redis.from_url(redis_server.url)
    create_stream(client, keys, "tasks", SHARDS)
    producer = Producer(client, guarded(keys, max_memory=0.5))
    producer.publish("tasks", task(1))  # maxmemory 0: no ceiling
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used * 10)
    producer.publish("tasks", task(2))
    client.config_set("maxmemory", int(used * 1.5))  # 0.5 of it is under what is used
    with pytest.raises(Backpressure) as refused:
        producer.publish("tasks", task(3))
    assert refused.value.what == "memory" and refused.value.lag >= refused.value.limit
    assert "bytes" in str(refused.value)
    client.close()


def test_config_reads_and_checks_the_limits() -> None:
    config = from_dict(
        {"streams": {"s": {"shards": 2, "max_lag": 10_000, "max_memory": 0.8}}, "tables": {}}
    )
    assert config.streams["s"].max_lag == 10_000 and config.streams["s"].max_memory == 0.8
    for bad in ({"max_lag": 0}, {"max_lag": "x"}, {"max_memory": 1.5}, {"max_memory": True}):
        with pytest.raises(ConfigError):
            from_dict({"streams": {"s": {"shards": 2, **bad}}})


async def test_a_stopped_worker_makes_publishing_refuse_until_it_drains(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """The done-when: refused at max_lag with the worker stopped, nothing lost, and
    publishing succeeds again once a worker has drained the shard."""
    create_stream(r, keys, "items", 6)
    config = Config(
        prefix=keys.prefix,
        streams={"items": StreamSpec("items", 6, table="items", max_lag=20)},
        tables={"items": ITEMS},
        groups={"g": GroupSpec("g", "items", ("mem",), FAST)},
        sinks={"mem": SinkSpec("mem", "function")},
    )
    sink = TestingSink()
    async with running(redis_url, config, {"mem": sink}) as worker:  # creates the group
        await eventually(lambda: bool(r.exists(keys.lease("items", 0, "g"))), worker, "a lease")
    producer = Producer(r, config)
    names = [f"k{n}" for n in range(200) if shard_of(f"k{n}", 6) == 0]
    sent = [producer.publish("items", _item(name)) for name in names[:20]]
    with pytest.raises(Backpressure) as refused:
        producer.publish("items", _item(names[20]))
    assert refused.value.lag == 20 and refused.value.limit == 20
    async with running(redis_url, config, {"mem": sink}) as worker:
        await eventually(lambda: len(sink.batches) > 0 and _got(sink) >= 20, worker, "drained")
        await asyncio.to_thread(producer.publish, "items", _item(names[20]), timeout=10.0)
        await eventually(lambda: _got(sink) >= 21, worker, "the new one applied")
    got = [entry.id for batch in sink.batches for entry in batch.entries]
    assert got[:20] == sent  # nothing published before was lost


def _item(key: str) -> Event:
    return Event.make(key, "set", {"id": key, "seq": 1})


def _got(sink: TestingSink) -> int:
    return sum(len(batch.entries) for batch in sink.batches)


def test_status_shows_the_most_lagging_shard_and_the_refusal(
    r: redis.Redis,
    grouped: Keys,
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "streamsink.toml"
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{grouped.prefix}"\n'
        f"[streams.tasks]\nshards = {SHARDS}\nmax_lag = {LIMIT}\n"
        '[sinks.noop]\ntype = "function"\nfunction = "json:dumps"\n'
        '[groups.g1]\nstream = "tasks"\nsinks = ["noop"]\n'
    )
    producer = Producer(r, load(path))
    producer.publish_many("tasks", [Event.make(f"task-{n}", "set", {}) for n in on_shard(1, 3)])
    assert main(["--config", str(path), "status"]) == 0
    out = capsys.readouterr().out
    assert f"backpressure tasks: max_lag {LIMIT}, most behind shard 1 with 3 uncommitted" in out
    assert out.rstrip().endswith("ok") or ": ok" in out
    producer.publish_many("tasks", [Event.make(f"task-{n}", "set", {}) for n in on_shard(1, 2)])
    assert main(["--config", str(path), "status"]) == 0
    assert "publishing refused (Backpressure)" in capsys.readouterr().out
