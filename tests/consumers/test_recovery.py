"""Redis behind what the sinks committed (consumers/recovery.py): told apart from a newer
owner, and a consumer group deleted under a running worker stops the group, no crash."""

from __future__ import annotations

import asyncio

import redis

from streamsink.consumers.recovery import lost
from streamsink.consumers.worker import Worker, worker_client
from streamsink.sinks import TestingSink
from streamsink.sinks.base import Committed
from streamsink.streams import Keys, Producer, create_stream
from streamsink.streams.recovery import ShardFacts
from tests.consumers.test_worker import GROUP, SHARDS, STREAM, eventually, item, make_config


def test_redis_behind_a_commit_is_told_apart_from_a_newer_owner() -> None:
    healthy = ShardFacts(True, True, "20-0", True, "20-0", 3)
    commits = {"pg": Committed("15-0", 3)}
    assert lost(healthy, commits, expected=True) is None
    assert lost(healthy, {"pg": Committed("20-0", 2)}, expected=True) is None
    for facts, why in (
        (ShardFacts(False, True, "20-0", True, "20-0", 3), "shard count is gone"),
        (ShardFacts(True, True, "20-0", True, "20-0", 1), "lease epoch counter is 1, below"),
        (ShardFacts(True, True, "9-0", True, "9-0", 3), "newest entry ID is 9-0, below"),
        (ShardFacts(True, True, "20-0", False, "0-0", 3), "consumer group is gone"),
        (ShardFacts(True, True, "20-0", True, "0-0", 3), "last delivered 0-0, below"),
    ):
        reason = lost(facts, commits, expected=False)
        assert reason is not None and why in reason, (facts, reason)
    fresh = ShardFacts(True, False, "0-0", False, "0-0", 1)
    assert lost(fresh, {}, expected=False) is None, "a new stream of a new group"
    assert lost(fresh, {}, expected=True) == "the consumer group is gone from the shard"


async def test_a_shard_stream_deleted_under_a_running_worker_stops_the_group_without_a_crash(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["mem"])
    sink = TestingSink()
    client = worker_client(redis_url)
    worker = Worker(client, config, {"mem": sink}, worker="w1")
    task = asyncio.create_task(worker.run(asyncio.Event()))
    try:
        Producer(r, config).publish_many(STREAM, [item(f"k{n}", 0) for n in range(30)])
        await eventually(lambda: sum(len(b.entries) for b in sink.batches) == 30, task, "applied")
        r.delete(keys.shard(STREAM, 0))  # what a Redis that lost data shows a reader
        await asyncio.wait_for(task, 15)  # the only group stopped: the worker ends, no crash
    finally:
        task.cancel()
        await client.aclose()
    reason = worker.stopped[GROUP]
    assert "Redis lost data of group 'g' on stream 'items' (shard 0:" in reason, reason
    assert f"offsets reset --config FILE --stream {STREAM} --group {GROUP}" in reason, reason
