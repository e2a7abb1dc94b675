"""Idempotency ids in their time buckets (`Keys.ids`): a repeat gets the first entry ID in
one call and across calls, buckets and producers of different TTLs; an id is remembered at
least the TTL and less than twice it; ids of the old one-key layout are still found."""

from __future__ import annotations

import time

import redis

from streamsink.schemas import Config, Event, shard_of
from streamsink.streams import Keys, Producer, ProducerSettings, publish
from tests.streams.conftest import SHARDS, lengths, task


def now_ms(r: redis.Redis) -> int:
    """Redis' clock, the one buckets follow."""
    seconds, micros = r.time()
    return seconds * 1000 + micros // 1000


def buckets(r: redis.Redis, keys: Keys, shard: int) -> dict[str, int]:
    """The shard's live buckets, `width:number` -> the expiry its index gives it (ms)."""
    index = keys.ids("tasks", shard)
    return {m.decode(): int(s) for m, s in r.zrange(index, 0, -1, withscores=True)}


def settings(ttl_ms: int) -> ProducerSettings:
    return ProducerSettings(dedup_ttl_ms=ttl_ms)


def test_a_repeat_in_one_call_gets_the_first_entry_id_in_every_layout(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    mixed = [task(1, id="a"), task(1, id="a", ts=5), task(1), task(2, id="b"), task(1, id="a")]
    ids = Producer(r, config).publish_many("tasks", mixed)  # '!', '+' and plain in one call
    assert ids[0] == ids[1] == ids[4]
    assert len({(shard_of(e.key, SHARDS), i) for e, i in zip(mixed, ids, strict=True)}) == 3
    assert sum(lengths(r, keys, "tasks")) == 3
    alike = [task(3, id="c"), task(3, id="d"), task(3, id="c"), task(3, id="d")]
    producer = Producer(r, config)
    ids = producer.publish_many("tasks", alike)
    assert ids[0] == ids[2] != ids[1] == ids[3]
    [one] = producer._prep.commands([("tasks", producer._prep.encode("tasks", alike), None)])
    assert one.args[publish.FIRST_EVENT + 1] == publish.IDENTIFIED_ALL  # one mark for all
    assert len(one.args) == publish.FIRST_EVENT + 1 + 4 * len(alike)
    assert sum(lengths(r, keys, "tasks")) == 5


def test_an_id_is_remembered_at_least_its_ttl_and_less_than_twice_it(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    shard = shard_of("task-3", SHARDS)
    before = now_ms(r)
    entry = Producer(r, config, settings(60_000)).publish("tasks", task(3, id="x"))
    after = now_ms(r)
    [(member, ends)] = buckets(r, keys, shard).items()
    width = int(member.split(":")[0])
    assert width == 32_768  # the power of two in [ttl / 2, ttl)
    bucket = f"{keys.ids('tasks', shard)}:{member}"
    assert r.hget(bucket, "x") == entry.encode()
    assert r.hlen(bucket) == 2 and r.object("encoding", bucket) == b"hashtable"  # '': see Lua
    assert r.pexpiretime(bucket) == ends
    assert before + 60_000 <= ends <= after + 60_000 + width
    assert r.pexpiretime(keys.ids("tasks", shard)) >= ends  # the index outlives its buckets


def test_an_id_is_found_after_its_bucket_ends(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    producer = Producer(r, config, settings(4_000))  # buckets of 2,048 ms
    shard = shard_of("task-1", SHARDS)
    first = producer.publish("tasks", task(1, id="early"))
    [member] = buckets(r, keys, shard)
    while now_ms(r) // 2_048 == int(member.split(":")[1]):
        time.sleep(0.05)  # into the next bucket (its id is remembered 4 s more at least)
    assert producer.publish("tasks", task(1, id="early")) == first
    late = producer.publish("tasks", task(1, id="late"))
    assert len(buckets(r, keys, shard)) == 2
    assert producer.publish_many("tasks", [task(1, id="late"), task(1, id="early")]) == [
        late,
        first,
    ]
    assert sum(lengths(r, keys, "tasks")) == 2


def test_producers_of_different_ttls_find_each_others_ids(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    # the short TTL long enough that its bucket outlives the test on a loaded machine
    long, short = Producer(r, config, settings(86_400_000)), Producer(r, config, settings(10_000))
    shard = shard_of("task-1", SHARDS)
    first = long.publish("tasks", task(1, id="from-long"))
    assert short.publish("tasks", task(1, id="from-long")) == first
    second = short.publish("tasks", task(1, id="from-short"))
    assert long.publish("tasks", task(1, id="from-short")) == second
    widths = sorted(int(member.split(":")[0]) for member in buckets(r, keys, shard))
    assert widths == [8_192, 67_108_864]
    assert sum(lengths(r, keys, "tasks")) == 2


def test_an_id_is_forgotten_after_its_ttl(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    producer = Producer(r, config, settings(1_000))  # buckets of 512 ms, kept 1,000 ms more
    shard = shard_of("task-1", SHARDS)
    first = producer.publish("tasks", task(1, id="brief"))
    [(early, ends)] = buckets(r, keys, shard).items()
    while now_ms(r) <= ends:
        time.sleep(0.05)
    assert producer.publish("tasks", task(1, id="brief")) != first
    assert sum(lengths(r, keys, "tasks")) == 2
    # the expired bucket left the index; the new one is there (for 1 s at least: room for
    # a loaded machine between the two calls)
    assert early not in buckets(r, keys, shard) and len(buckets(r, keys, shard)) == 1


def test_ids_of_the_old_one_key_layout_are_still_found(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    """A retry across the upgrade, or an id published by the old documented script."""
    shard = shard_of("task-1", SHARDS)
    r.set(keys.dedup_prefix("tasks", shard) + "old-1", "7-0", px=60_000)
    r.set(keys.dedup_prefix("tasks", shard) + "old-2", "7-1", px=60_000)
    producer = Producer(r, config)
    assert producer.publish("tasks", task(1, id="old-1")) == "7-0"
    ids = producer.publish_many("tasks", [task(1, id="old-2"), task(1, id="new"), task(1)])
    assert ids[0] == "7-1"
    assert sum(lengths(r, keys, "tasks")) == 2
    assert r.get(keys.dedup_prefix("tasks", shard) + "new") is None  # never written


def test_more_ids_in_one_call_than_lua_unpacks_at_once(
    r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    events = [Event.make("task-1", "set", {"id": 1}, id=f"n{n}") for n in range(9_000)]
    producer = Producer(r, config)
    first = producer.publish_many("tasks", events[::2])
    ids = producer.publish_many("tasks", events)
    assert ids[::2] == first and len(set(ids)) == 9_000
    assert sum(lengths(r, keys, "tasks")) == 9_000
