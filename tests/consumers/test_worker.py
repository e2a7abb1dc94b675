"""The worker in this process, on the real Redis: delivery, order, batches, dead letters, retries.

Each test runs `Worker.run` as a task with a stop event, publishes with the real producer
(or with raw XADDs for entries a producer would refuse) and looks at what the sinks got
and at the streams, consumer groups and dead-letter streams in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aredis

from streamsink.consumers.shard import SUSPECT_TRIES
from streamsink.consumers.worker import Worker, worker_client
from streamsink.schemas import (
    Column,
    ColumnType,
    Config,
    Event,
    GroupSpec,
    SinkSpec,
    StreamSpec,
    Table,
    encode,
    shard_of,
)
from streamsink.sinks import Batch, FunctionSink, Rejected, Sink, TestingSink
from streamsink.streams import Keys, Producer, create_stream, dead

SHARDS = 6
STREAM = "items"
GROUP = "g"
FAST = {
    "lease_ttl_ms": 1500,
    "linger_ms": 20,
    "max_age_ms": 100,
    "block_ms": 100,
    "maintenance_ms": 500,
}

ITEMS = Table(
    name="items",
    key=("id",),
    columns={
        "id": Column(ColumnType.TEXT, nullable=False),
        "seq": Column(ColumnType.INT),
        "poison": Column(ColumnType.BOOL),
    },
)


def make_config(keys: Keys, sinks: Sequence[str], **options: int) -> Config:
    """`items` with SHARDS shards into table items, read by group `g` feeding `sinks`."""
    return Config(
        prefix=keys.prefix,
        streams={STREAM: StreamSpec(STREAM, SHARDS, table="items")},
        tables={"items": ITEMS},
        groups={GROUP: GroupSpec(GROUP, STREAM, tuple(sinks), {**FAST, **options})},
        sinks={name: SinkSpec(name, "function") for name in sinks},
    )


def item(key: str, seq: int, **data: Any) -> Event:
    return Event.make(key, "set", {"id": key, "seq": seq, **data})


def keys_on(shard: int, count: int, tag: str = "k") -> list[str]:
    """`count` routing keys that land on `shard`."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        key = f"{tag}-{n}"
        if shard_of(key, SHARDS) == shard:
            found.append(key)
        n += 1
    return found


def pending(client: redis.Redis, keys: Keys) -> list[int]:
    """XPENDING count of the group on every shard."""
    return [
        int(client.xpending(keys.shard(STREAM, shard), GROUP)["pending"]) for shard in range(SHARDS)
    ]


def dead_letters(client: redis.Redis, keys: Keys, shard: int) -> dict[str, dict[bytes, bytes]]:
    """Dead letters of (group, shard) by the ID of the entry they hold."""
    return {
        fields[b"entry"].decode(): fields
        for _, fields in client.xrange(keys.dead(STREAM, shard, GROUP))
    }


def delivered_ids(sink: TestingSink) -> list[str]:
    """IDs of the entries the sink got, in order (IDs are unique within a shard only)."""
    return [entry.id for batch in sink.batches for entry in batch.entries]


def delivered_positions(sink: TestingSink) -> list[tuple[int, str]]:
    """(shard, entry ID) of every entry the sink got, in order."""
    return [(batch.shard, entry.id) for batch in sink.batches for entry in batch.entries]


async def eventually(
    check: Callable[[], bool], task: asyncio.Task[None], what: str, within: float = 10
) -> None:
    """Poll `check` until true; fail with `what` after `within` s, or at once if the worker died."""
    deadline = time.monotonic() + within
    while not check():
        if task.done():
            task.result()  # raises the worker's crash
            raise AssertionError(f"the worker stopped before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(
    redis_url: str, config: Config, sinks: Mapping[str, Sink], name: str = "w1"
) -> AsyncIterator[asyncio.Task[None]]:
    """A worker running as a task; stopped (drained) and awaited on the way out."""
    client = worker_client(redis_url)
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(client, config, sinks, worker=name).run(stop))
    try:
        yield task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 15)
        finally:
            await client.aclose()


async def test_every_event_once_in_order_per_key_with_batch_positions(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["mem"])
    producer = Producer(r, config)
    names = [f"key-{n}" for n in range(30)]
    published: dict[str, list[str]] = defaultdict(list)  # key -> entry IDs in publish order
    shard = {key: shard_of(key, SHARDS) for key in names}
    seq: Counter[str] = Counter()

    def publish(rounds: int) -> None:
        events = []
        for _ in range(rounds):
            for key in names:
                events.append(item(key, seq[key]))
                seq[key] += 1
        for event, entry_id in zip(events, producer.publish_many(STREAM, events), strict=True):
            published[event.key].append(entry_id)

    publish(5)  # a backlog before the worker starts...
    sink = TestingSink()
    async with running(redis_url, config, {"mem": sink}) as task:
        await eventually(lambda: len(delivered_ids(sink)) == 150, task, "the backlog")
        for _ in range(5):  # ... and more while it runs, so windows close on age and quiet
            publish(2)
            await asyncio.sleep(0.05)
        total = sum(len(ids) for ids in published.values())
        await eventually(lambda: len(delivered_ids(sink)) >= total, task, "all delivered")
    assert total == 30 * 15

    counts = Counter(delivered_positions(sink))
    assert set(counts) == {(shard[key], i) for key, ids in published.items() for i in ids}
    assert max(counts.values()) == 1, "an entry was delivered twice"
    by_key: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for batch in sink.batches:
        for entry in batch.entries:
            by_key[entry.event.key].append((entry.event.data["seq"], entry.id))
    for key in names:
        assert by_key[key] == list(enumerate(published[key])), f"order of {key}"

    last_of_shard: dict[int, tuple[int, int]] = {}
    for batch in sink.batches:
        ids = [entry.id for entry in batch.entries]
        assert batch.group == GROUP
        assert batch.stream == STREAM
        assert batch.epoch == 1  # the first lease of every shard
        assert {shard_of(entry.event.key, SHARDS) for entry in batch.entries} == {batch.shard}
        assert (batch.first_id, batch.last_id) == (ids[0], ids[-1])
        assert sorted(ids, key=_id) == ids
        assert _id(batch.first_id) > last_of_shard.get(batch.shard, (0, 0))
        last_of_shard[batch.shard] = _id(batch.last_id)
    assert len(sink.batches) > SHARDS, "the later publishes should have made more windows"
    assert pending(r, keys) == [0] * SHARDS
    assert all(not r.exists(keys.lease(STREAM, s, GROUP)) for s in range(SHARDS))
    assert not r.zcard(keys.workers(STREAM, GROUP)), "a stopped worker leaves the group"


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


async def test_poison_entries_go_to_dead_letters_and_the_rest_of_the_window_goes_on(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["mem", "picky"])
    producer = Producer(r, config)
    shard = 2
    key = keys_on(shard, 1)[0]
    stream_key = keys.shard(STREAM, shard)
    before = producer.publish_many(STREAM, [item(key, n) for n in range(3)])
    undecodable = r.xadd(stream_key, {"key": key, "op": "set", "data": b'{"id": "x", "seq'})
    wrong_type = r.xadd(
        stream_key, dict(_pairs(encode(Event.make(key, "set", {"id": key, "seq": "three"}))))
    )
    spaced = f'{{"id": "{key}",  "seq": 3, "poison": true}}'.encode()  # not as orjson writes
    rejected = r.xadd(stream_key, {"key": key, "op": "set", "data": spaced}).decode()
    after = producer.publish_many(STREAM, [item(key, n) for n in range(4, 7)])
    bad = {undecodable.decode(), wrong_type.decode()}

    async def picky(batch: Batch) -> list[Rejected]:
        return [
            Rejected(entry.id, "no poison here")
            for entry in batch.entries
            if entry.event.data.get("poison")
        ]

    sink = TestingSink()
    good = [*before, rejected, *after]
    async with running(redis_url, config, {"mem": sink, "picky": FunctionSink(picky)}) as task:
        await eventually(lambda: set(delivered_ids(sink)) >= set(good), task, "the good ones")
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "nothing pending")

    assert delivered_ids(sink) == good, "every other entry, in order, once"
    assert not bad & set(delivered_ids(sink))
    window = next(b for b in sink.batches if rejected in [e.id for e in b.entries])
    assert [e.id for e in window.entries] == good, "one window: the bad ones did not split it"
    letters = dead_letters(r, keys, shard)
    assert set(letters) == {*bad, rejected}
    assert letters[undecodable.decode()][b"reason"].startswith(b"DecodeError: data")
    assert letters[undecodable.decode()][b"f:data"] == b'{"id": "x", "seq'
    assert letters[wrong_type.decode()][b"reason"].startswith(b"ValidationError: data.seq")
    assert letters[rejected][b"reason"] == b"sink 'picky': no poison here"
    assert letters[rejected][b"f:data"] == spaced, "the stored bytes, read back from the stream"
    for entry_id, letter in letters.items():
        assert letter[b"group"] == GROUP.encode()
        assert letter[b"source"] == stream_key.encode()
        assert letter[b"f:key"] == key.encode(), entry_id
    assert pending(r, keys) == [0] * SHARDS
    others = [s for s in range(SHARDS) if s != shard]
    assert all(not r.exists(keys.dead(STREAM, s, GROUP)) for s in others)


def _pairs(flat: list[bytes]) -> list[tuple[bytes, bytes]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


async def _worn_and_fine(r: redis.Redis, keys: Keys, producer: Producer) -> tuple[str, str, str]:
    """Entries of shard 4: `worn` claimed back and forth 3 times, `fine` twice (the
    worker's own claim makes them 4 and 3: over and at max_deliveries=3), then `fresh`."""
    stream_key = keys.shard(STREAM, 4)
    one, two, three = keys_on(4, 3)
    r.xgroup_create(stream_key, GROUP, id="0", mkstream=True)
    worn = producer.publish(STREAM, item(one, 0))
    fine = producer.publish(STREAM, item(two, 0))
    r.xreadgroup(GROUP, "gone-consumer", {stream_key: ">"})
    r.xclaim(stream_key, GROUP, "gone-consumer", 0, [worn, fine])
    r.xclaim(stream_key, GROUP, "gone-consumer", 0, [worn])
    fresh = producer.publish(STREAM, item(three, 0))
    counts = {
        p["message_id"].decode(): p["times_delivered"]
        for p in r.xpending_range(stream_key, GROUP, "-", "+", 10)
    }
    assert counts == {worn: 3, fine: 2}
    return worn, fine, fresh


async def test_an_entry_delivered_too_often_is_tried_alone_and_applied_if_it_can_be(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """Its owners died (or lost the lease) while it was in flight: maybe because of it,
    maybe not. Alone in its window, only it is blamed if that happens again."""
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["mem"], max_deliveries=3)
    worn, fine, fresh = await _worn_and_fine(r, keys, Producer(r, config))
    sink = TestingSink()
    async with running(redis_url, config, {"mem": sink}) as task:
        await eventually(lambda: {fine, fresh} <= set(delivered_ids(sink)), task, "delivered")
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "nothing pending")

    assert delivered_ids(sink) == [worn, fine, fresh]
    assert [e.id for e in sink.batches[0].entries] == [worn], "a window of its own"
    assert dead_letters(r, keys, 4) == {}
    assert not r.exists(keys.suspects(STREAM, 4, GROUP)), "its tries forgotten once applied"


async def test_an_entry_that_stopped_its_worker_whenever_tried_alone_goes_to_dead_letters(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["mem"], max_deliveries=3)
    worn, fine, fresh = await _worn_and_fine(r, keys, Producer(r, config))
    r.hset(keys.suspects(STREAM, 4, GROUP), worn, SUSPECT_TRIES)  # as its last owners left it
    sink = TestingSink()
    async with running(redis_url, config, {"mem": sink}) as task:
        await eventually(lambda: {fine, fresh} <= set(delivered_ids(sink)), task, "delivered")
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "nothing pending")

    assert delivered_ids(sink) == [fine, fresh], "its neighbours applied, never dead-lettered"
    letters = dead_letters(r, keys, 4)
    assert set(letters) == {worn}
    assert letters[worn][b"reason"] == (
        b"delivered 4 times (max_deliveries=3); its worker stopped or lost the shard "
        b"2 times while applying it alone"
    )
    assert letters[worn][b"deliveries"] == b"4"
    assert not r.exists(keys.suspects(STREAM, 4, GROUP))


class FlakySink:
    """Raises on its first write, then records; notes what was pending during each write."""

    def __init__(self, client: aredis.Redis, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self.calls: list[tuple[str, str, int]] = []  # (first_id, last_id, pending then)
        self.batches: list[Batch] = []

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        summary: Any = await self.client.xpending(self.keys.shard(STREAM, batch.shard), GROUP)
        self.calls.append((batch.first_id, batch.last_id, int(summary["pending"])))
        if len(self.calls) == 1:
            raise ConnectionRefusedError("the database is restarting")
        self.batches.append(batch)
        return ()

    async def close(self) -> None:
        pass


async def test_a_failing_sink_gets_the_window_again_and_nothing_is_acked_before(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, redis_url: str
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["flaky"])
    shard = 1
    key = keys_on(shard, 1)[0]
    ids = Producer(r, config).publish_many(STREAM, [item(key, n) for n in range(5)])
    sink = FlakySink(ar, keys)
    async with running(redis_url, config, {"flaky": sink}) as task:
        await eventually(lambda: len(sink.batches) == 1, task, "the retry", within=5)
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "acknowledged")

    assert sink.calls == [(ids[0], ids[-1], 5), (ids[0], ids[-1], 5)]
    assert [e.id for e in sink.batches[0].entries] == ids
    assert not r.exists(keys.dead(STREAM, shard, GROUP))


class GatedSink:
    """Holds each write until `gate` is set; notes whether a write was cancelled."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = False
        self.cancelled = False
        self.batches: list[Batch] = []

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        self.started = True
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.batches.append(batch)
        return ()

    async def close(self) -> None:
        pass


async def test_a_lost_lease_stops_the_write_in_flight_and_acknowledges_nothing(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["gated"])
    shard = 3
    key = keys_on(shard, 1)[0]
    Producer(r, config).publish_many(STREAM, [item(key, n) for n in range(5)])
    sink = GatedSink()
    async with running(redis_url, config, {"gated": sink}) as task:
        await eventually(lambda: sink.started, task, "the write started")
        r.set(keys.lease(STREAM, shard, GROUP), "thief", px=60_000)  # as if it had expired
        await eventually(lambda: sink.cancelled, task, "the write cancelled", within=3)
        sink.gate.set()
        await asyncio.sleep(0.2)
        assert sink.batches == [], "a worker that lost the lease still wrote"
        assert pending(r, keys)[shard] == 5, "a worker that lost the lease acknowledged"
    assert r.get(keys.lease(STREAM, shard, GROUP)) == b"thief"
    assert pending(r, keys)[shard] == 5


async def test_windows_close_early_by_the_flush_time_so_commits_land_by_the_max_age(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """A window closes its flush time before `max_age_ms`: its oldest entry is written by
    then, not only handed to a sink that takes 250 ms (the lag would be about 0.85 s)."""
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["slow"], max_age_ms=600, linger_ms=10_000)
    producer = Producer(r, config)
    key = keys_on(0, 1)[0]
    lags: list[float] = []  # written minus the XADD time of the window's first entry

    async def slow(batch: Batch) -> Sequence[Rejected]:
        await asyncio.sleep(0.25)
        lags.append(time.time() - int(batch.first_id.partition("-")[0]) / 1000)
        return ()

    async with running(redis_url, config, {"slow": FunctionSink(slow)}) as task:
        for n in range(200):  # an entry every 20 ms for 4 s: windows close on age alone
            producer.publish(STREAM, item(key, n))
            await asyncio.sleep(0.02)
        await eventually(lambda: len(lags) >= 6, task, "six windows written")
    later = lags[2:]  # the first flushes teach the worker how long a flush takes
    assert 0.45 <= statistics.median(later) <= 0.72, f"lags {lags}"


async def test_a_refused_entry_deleted_meanwhile_is_dead_lettered_from_its_event(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """Windows keep decoded events only: a refused entry's fields are read back from the
    stream, or, if someone deleted it meanwhile, its event is encoded again."""
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["picky"])
    shard = 1
    key = keys_on(shard, 1)[0]
    stream_key = keys.shard(STREAM, shard)
    producer = Producer(r, config)
    gone, kept = producer.publish_many(STREAM, [item(key, 1, poison=True), item(key, 2)])

    async def picky(batch: Batch) -> list[Rejected]:
        r.xdel(stream_key, gone)  # an operator's XDEL while the window is written
        return [Rejected(gone, "no poison here")]

    dead = keys.dead(STREAM, shard, GROUP)
    async with running(redis_url, config, {"picky": FunctionSink(picky)}) as task:
        await eventually(lambda: bool(r.exists(dead)), task, "a dead letter")
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "nothing pending")
    letter = dead_letters(r, keys, shard)[gone]
    assert letter[b"reason"] == b"sink 'picky': no poison here"
    original = dict(_pairs(encode(item(key, 1, poison=True))))
    assert {k[2:]: v for k, v in letter.items() if k.startswith(b"f:")} == original
    assert [i.decode() for i, _ in r.xrange(stream_key)] == [kept]


async def test_replayed_entries_reach_only_their_group_and_sinks_with_their_first_id(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """Entries as `dead replay` publishes them (`for`, `origin`, `sinks` fields): the named
    group's named sinks apply them, with Batch.origin giving the first entry ID; every
    other group, and a group's other sinks, never see them; all are acknowledged."""
    create_stream(r, keys, STREAM, SHARDS)
    config = Config(
        prefix=keys.prefix,
        streams={STREAM: StreamSpec(STREAM, SHARDS, table="items")},
        tables={"items": ITEMS},
        groups={
            GROUP: GroupSpec(GROUP, STREAM, ("a", "b"), FAST),
            "h": GroupSpec("h", STREAM, ("c",), FAST),
        },
        sinks={name: SinkSpec(name, "function") for name in "abc"},
    )
    shard = 2
    key = keys_on(shard, 1)[0]
    stream = keys.shard(STREAM, shard)

    def xadd(seq: int, *routing: bytes) -> str:
        fields = [*encode(item(key, seq)), *routing]
        reply: Any = r.xadd(stream, dict(zip(fields[::2], fields[1::2], strict=True)))
        return str(reply.decode())

    plain = xadd(0)
    for_b = xadd(1, b"for", GROUP.encode(), b"origin", b"1-1", b"sinks", b"b")
    for_h = xadd(2, b"for", b"h", b"origin", b"1-2")
    for_nobody = xadd(3, b"for", b"gone", b"origin", b"1-3")
    last = xadd(4)
    sinks = {name: TestingSink() for name in "abc"}

    def acknowledged() -> bool:
        groups: Any = r.xinfo_groups(stream)
        return len(groups) == 2 and all(
            group["pending"] == 0 and group["last-delivered-id"].decode() == last
            for group in groups
        )

    async with running(redis_url, config, sinks) as task:
        await eventually(acknowledged, task, "every group read and acknowledged everything")

    def got(name: str) -> dict[str, str]:
        """Entry ID -> its identity (Batch.origin), of what the sink got."""
        return {e.id: b.origin(e.id) for b in sinks[name].batches for e in b.entries}

    assert got("a") == {plain: plain, last: last}
    assert got("b") == {plain: plain, for_b: "1-1", last: last}
    assert got("c") == {plain: plain, for_h: "1-2", last: last}
    assert for_nobody not in {**got("a"), **got("b"), **got("c")}
    assert not r.exists(keys.dead(STREAM, shard, GROUP)) and not r.exists(
        keys.dead(STREAM, shard, "h")
    )


@pytest.mark.parametrize("why", ["invalid", "delivered too often"])
async def test_a_replay_dead_lettered_again_still_names_its_sinks_and_first_id(
    r: redis.Redis, keys: Keys, redis_url: str, why: str
) -> None:
    """A replay for sink b only (sink a applied the event the first time) is dead-lettered
    again, before any sink sees it: the new letter must still say `sinks=b` and keep the
    first entry ID, or its next replay reaches sink a too, which then applies it twice."""
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["a", "b"], max_deliveries=3)
    shard = 5
    key = keys_on(shard, 1)[0]
    stream = keys.shard(STREAM, shard)
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    data = {"id": key, "seq": "not a number" if why == "invalid" else 1}
    fields = {b"key": key.encode(), b"op": b"set", b"data": orjson.dumps(data)}
    routing = {b"for": GROUP.encode(), b"origin": b"1-1", b"sinks": b"b"}
    replayed: Any = r.xadd(stream, {**fields, **routing})
    entry = replayed.decode()
    if why == "delivered too often":  # its owners died while applying it alone, as often
        r.xreadgroup(GROUP, "gone-consumer", {stream: ">"})  # as allowed
        r.xclaim(stream, GROUP, "gone-consumer", 0, [entry])
        r.xclaim(stream, GROUP, "gone-consumer", 0, [entry])
        r.hset(keys.suspects(STREAM, shard, GROUP), entry, SUSPECT_TRIES)
    sinks = {"a": TestingSink(), "b": TestingSink()}
    async with running(redis_url, config, sinks) as task:
        await eventually(lambda: r.exists(keys.dead(STREAM, shard, GROUP)) == 1, task, "letter")
        await eventually(lambda: pending(r, keys) == [0] * SHARDS, task, "acknowledged")

    assert delivered_ids(sinks["a"]) == delivered_ids(sinks["b"]) == []
    (letter,) = dead.dead_letters(r, keys, STREAM, GROUP)
    assert letter.entry == entry
    again = dead.replay(r, keys, STREAM, GROUP, letter)  # the operator replays it once more
    assert again is not None
    ((_, published),) = r.xrange(stream, again, again)
    routed = {name: published.get(name) for name in (b"for", b"origin", b"sinks")}
    assert routed == {b"for": b"g", b"origin": b"1-1", b"sinks": b"b"}, (
        f"the replay of the letter reaches sink a too, which applied the event already; "
        f"the letter: sinks={letter.sinks}, origin={letter.origin!r}"
    )


async def test_a_suspect_whose_write_went_through_is_not_blamed_when_its_ack_is_lost(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    """Its lone write committed, then the worker lost the shard before acknowledging it:
    the entry did not stop its worker, so its tries are forgotten (a later owner finds it
    applied, never dead-letters it, and a replay can never apply it twice)."""
    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["mem"], max_deliveries=3)
    worn, fine, _ = await _worn_and_fine(r, keys, Producer(r, config))
    r.hset(keys.suspects(STREAM, 4, GROUP), worn, SUSPECT_TRIES - 1)  # one more try allowed
    lease = keys.lease(STREAM, 4, GROUP)
    applied: list[str] = []

    def steal_after_writing(batch: Batch) -> None:
        applied.extend(entry.id for entry in batch.entries)
        if [entry.id for entry in batch.entries] == [worn]:
            r.set(lease, "thief", px=60_000)  # the shard is lost before the ack

    async with running(redis_url, config, {"mem": FunctionSink(steal_after_writing)}) as task:
        await eventually(lambda: worn in applied, task, "the lone write")
        await asyncio.sleep(0.5)
    assert applied[0] == worn
    assert not r.hexists(keys.suspects(STREAM, 4, GROUP), worn), "blamed though it was written"
    assert dead_letters(r, keys, 4) == {}
    # `fresh` may or may not have been read before the lease was lost; what was read stays
    # pending: the fenced worker acknowledged nothing.
    still = {
        p["message_id"].decode()
        for p in r.xpending_range(keys.shard(STREAM, 4), GROUP, "-", "+", 10)
    }
    assert {worn, fine} <= still, "fenced: no ack"
    assert applied == [worn], "nothing written after the shard was lost"


async def test_a_clean_stop_logs_no_warning_even_when_a_renewal_meets_a_released_lease(
    r: redis.Redis,
    keys: Keys,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The renewal that runs while a drained shard gives its lease back finds the lease
    gone: that is a release, not a lost lease (an alert on warnings fired on every stop).
    The renewal after the stop is held until the worker's releases are in Redis, so the
    two always meet."""
    from streamsink.streams.leases import Leases

    create_stream(r, keys, STREAM, SHARDS)
    config = make_config(keys, ["sink"], lease_ttl_ms=6000)
    Producer(r, config).publish_many(STREAM, [item(f"k{n}", n) for n in range(60)])
    sink = TestingSink()
    stop = asyncio.Event()
    renew = Leases.heartbeat_and_renew
    met: list[list[bool]] = []

    async def held(self: Leases, shards: Sequence[int]) -> tuple[int, list[bool]]:
        if stop.is_set() and shards:
            deadline = time.monotonic() + 5
            lease_keys = [keys.lease(STREAM, shard, GROUP) for shard in shards]
            while r.exists(*lease_keys) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # Redis, not an event of this loop, says when
            live, renewed = await renew(self, shards)
            met.append(renewed)
            return live, renewed
        return await renew(self, shards)

    monkeypatch.setattr(Leases, "heartbeat_and_renew", held)
    client = worker_client(redis_url)
    caplog.set_level("INFO", logger="streamsink")
    try:
        worker = Worker(client, config, {"sink": sink}, worker="w1")
        task = asyncio.create_task(worker.run(stop))
        await eventually(lambda: len(delivered_ids(sink)) == 60, task, "every entry")
        stop.set()
        await asyncio.wait_for(task, 15)
    finally:
        await client.aclose()
    assert met and not any(any(renewed) for renewed in met), "the renewal met the releases"
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("shard released") == SHARDS
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= 30]
    assert warnings == [], warnings
