"""The synchronous Producer against a real Redis."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis

from streamsink.errors import (
    ConfigError,
    PayloadTooLarge,
    ProducerClosed,
    PublishError,
    ShardCountMismatch,
    StreamNotFound,
    ValidationError,
)
from streamsink.schemas import Config, Event, encode, shard_of
from streamsink.streams import Keys, Producer, ProducerSettings, create_stream
from tests.conftest import RedisServer
from tests.streams.conftest import SHARDS, data_of, entries, flat, lengths, make_config, task

ENTRY_ID = re.compile(r"^\d+-\d+$")


def test_publish_returns_the_entry_id_on_the_key_shard(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    event = task(7, ts=1_700_000_000_000, version=2)
    entry = Producer(r, config).publish("tasks", event)
    assert ENTRY_ID.match(entry)
    shard = shard_of(event.key, SHARDS)
    assert [(entry, flat(fields)) for entry, fields in entries(r, keys, "tasks", shard)] == [
        (entry, encode(event))
    ]
    assert sum(lengths(r, keys, "tasks")) == 1


def test_publish_many_lands_every_event_on_its_shard_with_its_fields(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    events = [task(n, id=f"e{n}" if n % 2 else None) for n in range(40)]
    ids = Producer(r, config).publish_many("tasks", events)
    assert len(ids) == 40 and all(ENTRY_ID.match(i) for i in ids)
    # Entry IDs are unique per shard only: shards may reuse them in the same millisecond.
    stored = {
        (shard, entry): flat(fields)
        for shard in range(SHARDS)
        for entry, fields in entries(r, keys, "tasks", shard)
    }
    assert len(stored) == 40
    for entry, event in zip(ids, events, strict=True):
        assert stored[(shard_of(event.key, SHARDS), entry)] == encode(event)
    assert len({shard_of(e.key, SHARDS) for e in events}) == SHARDS  # really spread


def test_every_shape_of_event_lands_as_encode_lays_it_out(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    # One key: one shard, one script call mixing events sent as three values and as eight.
    shapes = [
        {},
        {"ts": 5},
        {"table": "tasks"},
        {"version": 0},
        {"id": "i"},
        {},
        {"ts": 1, "version": 2},
    ]
    events = [task(1, key="k", **extra) for extra in shapes]
    ids = Producer(r, config).publish_many("tasks", events)
    stored = dict(entries(r, keys, "tasks", shard_of("k", SHARDS)))
    assert [flat(stored[entry]) for entry in ids] == [encode(event) for event in events]
    assert len(stored) == len(events)


def test_order_per_key_is_kept(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    producer = Producer(r, config)
    sent = []
    for round_ in range(5):
        batch = [
            Event.make(key, "set", {"id": n, "progress": round_ * 10 + i})
            for i in range(10)
            for n, key in enumerate(("task-a", "task-b", "task-c"))
        ]
        producer.publish_many("tasks", batch)
        sent += batch
    for key in ("task-a", "task-b", "task-c"):
        stored = data_of(r, keys, "tasks", key)
        assert stored == [encode(e)[5] for e in sent if e.key == key]
        assert len(stored) == 50


def test_publish_to_a_stream_never_created(r: redis.Redis, keys: Keys, config: Config) -> None:
    with pytest.raises(StreamNotFound, match="streamsink streams create tasks"):
        Producer(r, config).publish("tasks", task(1))
    assert not list(r.scan_iter(match=f"{keys.prefix}:*"))


def test_config_shard_count_differs_from_redis(r: redis.Redis, keys: Keys) -> None:
    create_stream(r, keys, "tasks", 4)
    producer = Producer(r, make_config(keys, shards=8))
    with pytest.raises(ShardCountMismatch, match="4 shards in Redis but the config says 8"):
        producer.publish_many("tasks", [task(n) for n in range(20)])
    assert lengths(r, keys, "tasks", 8) == [0] * 8


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (Event.make("task-x", "set", {"id": 5, "status": 3}), ValidationError),
        (Event.make("task-x", "set", {"id": 5, "colour": "red"}), ValidationError),
        (Event.make("task-x", "incr", {"id": 5}), ValidationError),
        (Event.make("task-x", "set", {"id": 5, "status": "x" * 300_000}), PayloadTooLarge),
    ],
)
def test_one_invalid_event_in_the_middle_publishes_nothing(
    r: redis.Redis,
    keys: Keys,
    config: Config,
    tasks_stream: str,
    bad: Event,
    error: type[Exception],
) -> None:
    events = [task(n, id=f"e{n}") for n in range(20)]
    events.insert(10, bad)
    with pytest.raises(error):
        Producer(r, config).publish_many("tasks", events)
    assert lengths(r, keys, "tasks") == [0] * SHARDS
    assert not list(r.scan_iter(match=f"{keys.prefix}:*:ids*"))


def test_same_id_twice_lands_once_with_the_same_entry_id(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    settings = ProducerSettings(dedup_ttl_ms=60_000)
    producer = Producer(r, config, settings)
    first = producer.publish("tasks", task(3, id="order-3-paid"))
    again = Producer(r, config, settings).publish("tasks", task(3, id="order-3-paid"))
    assert again == first
    assert sum(lengths(r, keys, "tasks")) == 1
    index = keys.ids("tasks", shard_of("task-3", SHARDS))
    [bucket] = [b.decode() for b in r.zrange(index, 0, -1)]
    assert r.hget(f"{index}:{bucket}", "order-3-paid") == first.encode()


def test_same_id_within_one_batch_lands_once(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    events = [task(1, id="a"), task(2, id="b"), task(1, id="a"), task(1), task(1)]
    ids = Producer(r, config).publish_many("tasks", events)
    assert ids[0] == ids[2]
    assert len({(shard_of(e.key, SHARDS), i) for e, i in zip(events, ids, strict=True)}) == 4
    assert sum(lengths(r, keys, "tasks")) == 4


def test_wrongtype_shard_is_refused_without_writing_it(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    bad_shard = shard_of("task-1", SHARDS)
    r.set(keys.shard("tasks", bad_shard), "not a stream")
    events = [task(n, id=f"e{n}") for n in range(12)]
    bad = [e for e in events if shard_of(e.key, SHARDS) == bad_shard]
    assert bad and len(bad) < len(events)
    producer = Producer(r, config)
    with pytest.raises(PublishError, match="WRONGTYPE"):
        producer.publish_many("tasks", events)
    assert r.get(keys.shard("tasks", bad_shard)) == b"not a stream"
    assert not list(r.scan_iter(match=keys.ids("tasks", bad_shard) + "*"))
    # Every reply was read: the connection is still in step for the next publish.
    good = next(e for e in events if shard_of(e.key, SHARDS) != bad_shard)
    entry = producer.publish("tasks", Event.make(good.key, "set", {"id": 99}))
    shard = shard_of(good.key, SHARDS)
    assert entries(r, keys, "tasks", shard)[-1][0] == entry
    assert r.get(keys.shard("tasks", bad_shard)) == b"not a stream"


def test_publish_after_close(r: redis.Redis, keys: Keys, config: Config, tasks_stream: str) -> None:
    with Producer(r, config) as producer:
        producer.publish("tasks", task(1))
    with pytest.raises(ProducerClosed):
        producer.publish("tasks", task(2))
    assert sum(lengths(r, keys, "tasks")) == 1


def test_text_replies_give_the_same_entry_ids(
    redis_url: str, r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ids = Producer(client, config).publish_many("tasks", [task(1), task(2, id="x")])
    finally:
        client.close()
    assert all(isinstance(i, str) and ENTRY_ID.match(i) for i in ids)
    stored = {(s, e) for s in range(SHARDS) for e, _ in entries(r, keys, "tasks", s)}
    assert stored == {(shard_of("task-1", SHARDS), ids[0]), (shard_of("task-2", SHARDS), ids[1])}


def test_redis_killed_then_restarted(redis_server: RedisServer, keys: Keys) -> None:
    client = redis.Redis.from_url(redis_server.url)
    create_stream(client, keys, "tasks", SHARDS)
    producer = Producer(client, make_config(keys))
    before = producer.publish("tasks", task(1, id="one"))
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(PublishError):
        producer.publish("tasks", task(2, id="two"))
    with pytest.raises(PublishError):
        producer.publish_many("tasks", [task(3), task(4)])
    assert time.monotonic() - started < 5  # an error, not a hang
    redis_server.start()
    after = producer.publish("tasks", task(2, id="two"))
    assert producer.publish("tasks", task(1, id="one")) == before  # dedup survived (AOF)
    shard = shard_of("task-2", SHARDS)
    assert entries(client, keys, "tasks", shard)[-1][0] == after
    assert sum(lengths(client, keys, "tasks")) == 2
    client.close()


def test_a_flushed_script_cache_costs_one_eval_per_shard_and_keeps_order(
    redis_server: RedisServer, keys: Keys
) -> None:
    # The sync producer names the script by SHA1; a shard's call that Redis refuses with
    # NOSCRIPT ran nothing, and goes again as text, after the shards that ran.
    client = redis.Redis.from_url(redis_server.url)
    create_stream(client, keys, "tasks", SHARDS)
    producer = Producer(client, make_config(keys))
    sent: list[Event] = []

    def publish(round_: int) -> None:
        batch = [
            Event.make(
                f"task-{n}", "set", {"id": n, "progress": round_ * 10 + i}, id=f"{round_}.{n}.{i}"
            )
            for i in range(3)
            for n in range(8)
        ]
        producer.publish_many("tasks", batch)
        sent.extend(batch)

    def calls() -> dict[str, int]:
        stats = client.info("commandstats")
        return {
            name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha")
        }

    shards = len({shard_of(f"task-{n}", SHARDS) for n in range(8)})
    for round_ in range(3):
        client.script_flush()
        client.config_resetstat()
        publish(round_)
        assert calls() == {"eval": shards, "evalsha": shards}  # refused, then as text
        client.config_resetstat()
        publish(round_ + 10)
        assert calls() == {"eval": 0, "evalsha": shards}  # known by its SHA1 since
    for key in {e.key for e in sent}:  # once each, in order
        assert data_of(client, keys, "tasks", key) == [encode(e)[5] for e in sent if e.key == key]
    client.close()


def test_redis_down_before_the_first_publish(redis_server: RedisServer, keys: Keys) -> None:
    client = redis.Redis.from_url(redis_server.url)
    create_stream(client, keys, "tasks", SHARDS)
    redis_server.kill()
    producer = Producer(client, make_config(keys))
    with pytest.raises(PublishError):
        producer.publish("tasks", task(1))
    redis_server.start()
    entry = producer.publish("tasks", task(1))
    assert entries(client, keys, "tasks", shard_of("task-1", SHARDS))[0][0] == entry
    client.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"dedup_ttl_ms": 0},
        {"dedup_ttl_ms": -5},
        {"max_batch": 0},
        {"queue_size": 0},
        {"queue_size": True},
        {"max_wait": -0.1},
        {"max_wait": float("nan")},
    ],
)
def test_unusable_settings_are_refused(bad: dict[str, Any]) -> None:
    # A dedup TTL of 0 used to fail the script's SET after its XADD: a half-written shard.
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ProducerSettings(**bad)
