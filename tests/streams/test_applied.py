"""Wait until applied, against watermarks this test writes itself (`mark`), as the fenced
acknowledgement of each group's worker does after every window."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
import redis.asyncio as aredis

from streamsink.errors import ConfigError, NotYetApplied
from streamsink.schemas import Config, GroupSpec, SinkSpec
from streamsink.streams import AsyncProducer, Keys, Producer
from streamsink.streams.applied import Receipt, newest_per_shard
from tests.streams.conftest import SHARDS, make_config, task


def mark(r: redis.Redis, keys: Keys, receipt: Receipt, *groups: str) -> None:
    """Say that `groups` committed the shard of `receipt` up to its entry (the worker's SET)."""
    for group in groups:
        r.set(keys.applied(receipt.stream, receipt.shard, group), receipt.entry_id)


def with_groups(keys: Keys, *groups: str) -> Config:
    config = make_config(keys)
    return Config(
        prefix=config.prefix,
        streams=config.streams,
        tables=config.tables,
        groups={g: GroupSpec(g, "tasks", ("noop",)) for g in groups},
        sinks={"noop": SinkSpec("noop", "function")},
    )


def later(seconds: float, work: object) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        work()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_waits_until_every_group_of_the_config_applied(
    r: redis.Redis, keys: Keys, tasks_stream: str
) -> None:
    producer = Producer(r, with_groups(keys, "pg", "callbacks"))
    entry = producer.publish("tasks", task(1))
    receipt = producer.receipt("tasks", "task-1", entry)
    mark(r, keys, receipt, "pg")  # one group of two: not yet
    with pytest.raises(NotYetApplied) as early:
        producer.wait_applied(receipt, timeout=0.1)
    message = str(early.value)
    assert "published but not yet applied" in message and "callbacks@tasks" in message
    assert "do not publish it again" in message
    producer.wait_applied(receipt, groups=["pg"], timeout=0.1)  # the named one did

    started = time.monotonic()
    thread = later(0.2, lambda: mark(r, keys, receipt, "callbacks"))
    producer.wait_applied(receipt, timeout=5)
    assert 0.2 <= time.monotonic() - started < 1.0  # once marked (polls every 20 ms at most)
    thread.join()


def test_publish_wait_returns_once_applied_and_a_later_watermark_counts(
    r: redis.Redis, keys: Keys, tasks_stream: str
) -> None:
    producer = Producer(r, with_groups(keys, "g"))
    events = [task(n) for n in range(8)]  # over several shards
    first = producer.publish_many("tasks", events)

    def apply_all() -> None:
        for n in range(SHARDS):
            newest = r.xrevrange(keys.shard("tasks", n), count=1)
            if newest:  # past the waited entries: a later commit covers them
                mark(r, keys, Receipt("tasks", n, newest[0][0].decode()), "g")

    thread = later(0.1, apply_all)
    ids = producer.publish_many("tasks", [task(n) for n in range(8)], wait=True, timeout=5)
    thread.join()
    assert len(ids) == 8 and ids != first
    with pytest.raises(NotYetApplied):
        producer.publish("tasks", task(99), wait=True, timeout=0.05)
    assert r.xlen(keys.shard("tasks", Receipt.of("tasks", SHARDS, "task-99", "").shard)) >= 1


def test_groups_come_from_redis_without_a_config(
    r: redis.Redis, keys: Keys, tasks_stream: str
) -> None:
    producer = Producer(r, make_config(keys))
    entry = producer.publish("tasks", task(3))
    receipt = producer.receipt("tasks", "task-3", entry)
    with pytest.raises(ConfigError, match="no group reads"):
        producer.wait_applied(receipt, timeout=0.05)
    r.xgroup_create(keys.shard("tasks", receipt.shard), "workers-a", id="0")
    with pytest.raises(NotYetApplied):
        producer.wait_applied(receipt, timeout=0.05)
    mark(r, keys, receipt, "workers-a")
    producer.wait_applied(receipt, timeout=0.05)


async def test_asyncio_publish_wait(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, tasks_stream: str
) -> None:
    async with AsyncProducer(ar, with_groups(keys, "g")) as producer:
        waiting = asyncio.create_task(producer.publish("tasks", task(5), wait=True, timeout=5))
        shard = keys.shard("tasks", Receipt.of("tasks", SHARDS, "task-5", "").shard)
        for _ in range(1000):  # until the publish is in the stream (the wait goes on)
            if r.xlen(shard):
                break
            await asyncio.sleep(0.005)
        assert not waiting.done()
        entry = r.xrevrange(keys.shard("tasks", producer.receipt("tasks", "task-5", "").shard))
        receipt = producer.receipt("tasks", "task-5", entry[0][0].decode())
        mark(r, keys, receipt, "g")
        assert await waiting == receipt.entry_id
        with pytest.raises(NotYetApplied):
            await producer.publish("tasks", task(6), wait=True, timeout=0.05)


def test_the_newest_receipt_per_shard_stands_for_the_rest() -> None:
    receipts = [Receipt("s", 0, "5-1"), Receipt("s", 0, "10-0"), Receipt("s", 1, "2-0")]
    assert newest_per_shard(receipts) == [Receipt("s", 0, "10-0"), Receipt("s", 1, "2-0")]
    assert newest_per_shard([Receipt("s", 0, "9-0"), Receipt("s", 0, "10-0")])[0].entry_id == "10-0"
