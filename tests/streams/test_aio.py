"""The asyncio AsyncProducer against a real Redis: batching, errors, backpressure, close."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import traceback

import pytest
import redis
import redis.asyncio as aredis

from streamsink.errors import ProducerClosed, PublishError, ValidationError
from streamsink.schemas import Config, Event, encode, shard_of
from streamsink.streams import AsyncProducer, Keys, ProducerSettings
from tests.conftest import RedisServer
from tests.streams.conftest import (
    SHARDS,
    command_calls,
    data_of,
    entries,
    eval_calls,
    flat,
    lengths,
    make_config,
    task,
)


def pause(client: redis.Redis, seconds: float) -> None:
    """Hold every client's commands on the server for `seconds` (the server stays up)."""
    client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")


async def test_thousand_concurrent_publishes(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys))
    evals, hgets = eval_calls(own), own.info("commandstats").get("cmdstat_hget", {})
    events = [task(n) for n in range(1000)]
    ids = await asyncio.gather(*(producer.publish("tasks", e) for e in events))
    await producer.close()
    placed = {(shard_of(e.key, SHARDS), i): e for e, i in zip(events, ids, strict=True)}
    assert len(placed) == 1000
    stored = {
        (shard, entry): flat(fields)
        for shard in range(SHARDS)
        for entry, fields in entries(own, keys, "tasks", shard)
    }
    assert stored == {where: encode(event) for where, event in placed.items()}
    round_trips = eval_calls(own) - evals
    assert SHARDS <= round_trips <= 40, f"{round_trips} EVALs for 1000 events"
    # One shard-count lookup for all of them, not one per cold publisher.
    lookups = own.info("commandstats")["cmdstat_hget"]["calls"] - hgets.get("calls", 0)
    assert lookups == 1


async def test_publish_many_keeps_order_and_returns_ids_in_order(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    events = [Event.make(f"task-{n % 3}", "set", {"id": n % 3, "progress": n}) for n in range(30)]
    async with AsyncProducer(ar, config) as producer:
        ids = await producer.publish_many("tasks", events)
    for event, entry in zip(events, ids, strict=True):
        stored = dict(entries(r, keys, "tasks", shard_of(event.key, SHARDS)))
        assert flat(stored[entry]) == encode(event)
    for key in ("task-0", "task-1", "task-2"):
        shard = shard_of(key, SHARDS)
        stored_data = [
            f[b"data"] for _, f in entries(r, keys, "tasks", shard) if f[b"key"] == key.encode()
        ]
        assert stored_data == [encode(e)[5] for e in events if e.key == key]


async def test_errors_reach_only_their_callers(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    bad_shard = shard_of("task-0", SHARDS)
    r.set(keys.shard("tasks", bad_shard), "not a stream")
    events = [task(n) for n in range(200)]
    async with AsyncProducer(ar, config) as producer:
        results = await asyncio.gather(
            *(producer.publish("tasks", e) for e in events), return_exceptions=True
        )
        later = await producer.publish("tasks", task(1000))  # still works afterwards
    ok = [0] * SHARDS
    for event, result in zip(events, results, strict=True):
        shard = shard_of(event.key, SHARDS)
        if shard == bad_shard:
            assert isinstance(result, PublishError) and "WRONGTYPE" in str(result)
        else:
            assert isinstance(result, str), result
            ok[shard] += 1
    assert ok[bad_shard] == 0 and sum(ok) > 100
    ok[shard_of("task-1000", SHARDS)] += 1
    assert r.get(keys.shard("tasks", bad_shard)) == b"not a stream"
    for shard in range(SHARDS):
        if shard != bad_shard:
            assert r.xlen(keys.shard("tasks", shard)) == ok[shard]
    assert later


async def test_invalid_events_raise_before_anything_is_queued(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys))
    await producer.publish("tasks", task(1))
    pause(own, 0.5)
    queued = asyncio.create_task(producer.publish("tasks", task(2)))
    await asyncio.sleep(0.02)
    bad = Event.make("task-3", "set", {"id": 3, "status": 3})
    started = time.monotonic()
    with pytest.raises(ValidationError, match=r"data\.status"):
        await asyncio.wait_for(producer.publish("tasks", bad), 0.4)
    with pytest.raises(ValidationError):
        await asyncio.wait_for(producer.publish_many("tasks", [task(4), bad, task(5)]), 0.4)
    assert time.monotonic() - started < 0.4  # refused at once, not behind the paused send
    assert not queued.done()
    await queued
    await producer.close()
    assert sum(lengths(own, keys, "tasks")) == 2


async def test_close_flushes_pending_publishes(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    producer = AsyncProducer(ar, config)
    await producer.publish("tasks", task(0))
    publishes = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 301)]
    await asyncio.sleep(0)  # every publisher is now waiting for its entry ID
    await producer.close()
    assert all(p.done() for p in publishes)
    assert all(isinstance(p.result(), str) for p in publishes)
    assert sum(lengths(r, keys, "tasks")) == 301
    with pytest.raises(ProducerClosed):
        await producer.publish("tasks", task(302))
    assert sum(lengths(r, keys, "tasks")) == 301


async def test_close_flushes_publishers_waiting_for_room(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    producer = AsyncProducer(ar, config, ProducerSettings(queue_size=10))
    await producer.publish("tasks", task(0))
    publishes = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 101)]
    await asyncio.sleep(0)
    await asyncio.wait_for(producer.close(), 5)
    results = await asyncio.gather(*publishes, return_exceptions=True)
    assert [type(x) for x in results if not isinstance(x, str)] == []
    assert sum(lengths(r, keys, "tasks")) == 101


async def test_redis_killed_then_restarted(
    redis_server: RedisServer, own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys))
    await producer.publish("tasks", task(1))
    redis_server.kill()
    results = await asyncio.wait_for(
        asyncio.gather(
            *(producer.publish("tasks", task(n)) for n in range(2, 12)), return_exceptions=True
        ),
        3,
    )
    assert all(isinstance(x, PublishError) for x in results), results
    redis_server.start()
    entry = await asyncio.wait_for(producer.publish("tasks", task(2)), 3)  # same producer
    await producer.close()
    assert entries(own, keys, "tasks", shard_of("task-2", SHARDS))[-1][0] == entry
    assert sum(lengths(own, keys, "tasks")) == 2


async def test_redis_down_before_the_first_publish(
    redis_server: RedisServer, own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    redis_server.kill()
    producer = AsyncProducer(aown, make_config(keys))
    with pytest.raises(PublishError):
        await asyncio.wait_for(producer.publish("tasks", task(1)), 3)
    redis_server.start()
    entry = await asyncio.wait_for(producer.publish("tasks", task(1)), 3)
    await producer.close()
    stored = entries(own, keys, "tasks", shard_of("task-1", SHARDS))
    assert [(i, flat(fields)) for i, fields in stored] == [(entry, encode(task(1)))]


async def test_publishes_queued_behind_a_batch_lost_in_flight_fail_too(
    redis_server: RedisServer, own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    settings = ProducerSettings(max_batch=1, max_in_flight=1, max_wait=0.001)
    producer = AsyncProducer(aown, make_config(keys), settings)
    await producer.publish("tasks", task(0))
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    publishes = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 5)]
    await asyncio.sleep(0.05)  # the first is in flight, the others queued behind it
    redis_server.kill()
    done, stuck = await asyncio.wait(publishes, timeout=2)
    for publish in stuck:
        publish.cancel()
    assert not stuck, f"{len(stuck)} publishes wait for a Redis that is gone"
    assert all(isinstance(p.exception(), PublishError) for p in done)
    await producer.close(grace=0.5)


async def test_close_when_redis_was_killed_fails_every_publish(
    redis_server: RedisServer, own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys))
    await producer.publish("tasks", task(0))
    redis_server.kill()
    publishes = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 51)]
    await asyncio.sleep(0)
    await asyncio.wait_for(producer.close(grace=0.5), 3)
    results = await asyncio.wait_for(asyncio.gather(*publishes, return_exceptions=True), 1)
    assert all(isinstance(x, PublishError | ProducerClosed) for x in results), results
    with pytest.raises(ProducerClosed):
        await producer.publish("tasks", task(99))


async def test_close_when_redis_hangs_gives_up_after_grace(
    redis_server: RedisServer, own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys))
    await producer.publish("tasks", task(0))
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        publishes = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 51)]
        await asyncio.sleep(0.05)  # the first batch is sent and waits for its replies
        publishes += [
            asyncio.create_task(producer.publish("tasks", task(n))) for n in range(51, 61)
        ]
        await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.wait_for(producer.close(grace=0.3), 3)
        took = time.monotonic() - started
        results = await asyncio.wait_for(asyncio.gather(*publishes, return_exceptions=True), 1)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert 0.25 <= took < 3
    assert all(isinstance(x, PublishError | ProducerClosed) for x in results), results
    assert any(isinstance(x, PublishError) for x in results[:50])  # in flight: unknown outcome
    assert all(isinstance(x, ProducerClosed) for x in results[50:])  # never sent
    with pytest.raises(ProducerClosed):
        await producer.publish("tasks", task(99))


async def test_close_when_redis_hangs_fails_publishers_waiting_for_room(
    redis_server: RedisServer, own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys), ProducerSettings(queue_size=10))
    await producer.publish("tasks", task(0))
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        publishes = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 101)]
        await asyncio.sleep(0.05)  # one in flight, ten queued, the rest waiting for room
        await asyncio.wait_for(producer.close(grace=0.2), 3)
        done, stuck = await asyncio.wait(publishes, timeout=1)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    for publish in stuck:
        publish.cancel()
    assert len(stuck) == 0, f"{len(stuck)} publishes hang after close()"
    assert all(isinstance(p.exception(), PublishError | ProducerClosed) for p in done)


async def test_bounded_queue_makes_publishers_wait(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys), ProducerSettings(queue_size=10))
    await producer.publish("tasks", task(0))
    pause(own, 0.3)
    started = time.monotonic()
    publishes = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 101)]
    most = 0
    while not all(p.done() for p in publishes):
        most = max(most, len(producer._pending))
        await asyncio.sleep(0.005)
    took = time.monotonic() - started
    await producer.close()
    assert most == 10  # filled up to the bound, never beyond it
    assert all(isinstance(p.result(), str) for p in publishes)
    assert took >= 0.2  # they really were held by the paused server
    assert sum(lengths(own, keys, "tasks")) == 101


async def test_max_wait_gathers_staggered_publishes(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys), ProducerSettings(max_wait=0.05))
    await producer.publish("tasks", task(0))
    evals = eval_calls(own)

    async def later(n: int) -> tuple[str, float]:
        await asyncio.sleep(n * 0.003)
        started = time.monotonic()
        entry = await producer.publish(
            "tasks", Event.make("task-1", "incr", {"id": 1, "progress": n})
        )
        return entry, time.monotonic() - started

    results = await asyncio.gather(*(later(n) for n in range(10)))
    await producer.close()
    assert eval_calls(own) - evals <= 2  # one key, one shard: one EVAL per round trip
    assert results[0][1] >= 0.04  # the first waited for company
    stored = entries(own, keys, "tasks", shard_of("task-1", SHARDS))
    assert [e for e, fields in stored if fields[b"op"] == b"incr"] == [e for e, _ in results]


async def test_without_max_wait_a_publish_is_sent_at_once(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys), ProducerSettings(max_wait=0))
    await producer.publish("tasks", task(0))
    evals, xadds = eval_calls(own), command_calls(own, "xadd")
    started = time.monotonic()
    for n in range(20):
        await producer.publish("tasks", task(n))
    took = time.monotonic() - started
    await producer.close()
    # One round trip each, none held back: a lone event without id goes as a plain XADD.
    assert (eval_calls(own) - evals, command_calls(own, "xadd") - xadds) == (0, 20)
    assert took < 1.0  # loose: 20 x 50 ms would already be 1 s


async def test_cancelling_one_publisher_leaves_the_others(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    # max_wait > 0: every publish goes through the sender task's batches.
    producer = AsyncProducer(aown, make_config(keys), ProducerSettings(max_wait=0.01))
    await producer.publish("tasks", task(0))
    pause(own, 0.2)
    in_flight = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 11)]
    await asyncio.sleep(0.05)  # sent as one batch, waiting for the paused server
    queued = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(11, 16)]
    await asyncio.sleep(0)
    for publish in (in_flight[3], queued[1]):
        publish.cancel()
    results = await asyncio.wait_for(asyncio.gather(*in_flight, *queued, return_exceptions=True), 3)
    cancelled = [isinstance(x, asyncio.CancelledError) for x in results]
    assert cancelled == [n in (3, 11) for n in range(15)]
    assert all(isinstance(x, str) for x, c in zip(results, cancelled, strict=True) if not c)
    await asyncio.wait_for(producer.publish("tasks", task(99)), 3)
    await producer.close()
    # Everything not cancelled, and the cancelled publish already sent (not withdrawn).
    assert sum(lengths(own, keys, "tasks")) >= 1 + 10 + 4 + 1


async def test_cancelling_the_publisher_that_sends_leaves_the_others(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    producer = AsyncProducer(aown, make_config(keys))
    await producer.publish("tasks", task(0))
    pause(own, 0.2)
    first = asyncio.create_task(producer.publish("tasks", task(1)))  # sent at once (idle)
    await asyncio.sleep(0.05)
    others = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(2, 12)]
    await asyncio.sleep(0)
    first.cancel()
    results = await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 3)
    assert first.cancelled()
    assert all(isinstance(x, str) for x in results), results
    await asyncio.wait_for(producer.publish("tasks", task(99)), 3)
    await producer.close()
    assert 12 <= sum(lengths(own, keys, "tasks")) <= 13


async def test_same_id_lands_once(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    async with AsyncProducer(ar, config) as producer:
        together = await asyncio.gather(
            *(producer.publish("tasks", task(5, id="pay-5")) for _ in range(5))
        )
        again = await producer.publish("tasks", task(5, id="pay-5"))
    async with AsyncProducer(ar, config) as other:
        elsewhere = await other.publish("tasks", task(5, id="pay-5"))
    assert len(set(together)) == 1
    assert again == elsewhere == together[0]
    assert sum(lengths(r, keys, "tasks")) == 1


async def test_publish_after_close_is_refused(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    producer = AsyncProducer(ar, config)
    await producer.close()
    with pytest.raises(ProducerClosed):
        await producer.publish("tasks", task(1))
    assert sum(lengths(r, keys, "tasks")) == 0


async def test_each_failed_publish_gets_an_exception_of_its_own(
    redis_server: RedisServer, own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    """One failure settles many publishes; a single instance raised in all their tasks
    would gather every task's traceback and be shared (and changeable) by every caller."""
    producer = AsyncProducer(aown, make_config(keys))
    await producer.publish("tasks", task(0))
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        publishes = [asyncio.create_task(producer.publish("tasks", task(n))) for n in range(1, 21)]
        await asyncio.sleep(0.05)  # sent, waiting for replies
        publishes += [
            asyncio.create_task(producer.publish("tasks", task(n))) for n in range(21, 31)
        ]
        await asyncio.sleep(0)
        await asyncio.wait_for(producer.close(grace=0.2), 3)
        results = await asyncio.wait_for(asyncio.gather(*publishes, return_exceptions=True), 1)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    stopped = [x for x in results if isinstance(x, PublishError)]
    closed = [x for x in results if isinstance(x, ProducerClosed)]
    assert stopped and closed and len(stopped) + len(closed) == len(results), results
    assert len({id(x) for x in results}) == len(results), "one exception shared by callers"
    depths = {len(traceback.extract_tb(x.__traceback__)) for x in stopped}  # type: ignore[union-attr]
    assert max(depths) < 10, depths


async def test_a_publish_cancelled_while_sent_inline_leaves_no_lost_exception(
    redis_server: RedisServer, own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    """A caller cancelled while its publish waits for Redis' reply (sent from the caller's
    task, the producer idle): it gets CancelledError, and asyncio reports no "Future
    exception was never retrieved" for the publish's settled future."""
    import gc

    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    producer = AsyncProducer(aown, make_config(keys), ProducerSettings(max_wait=0))
    await producer.publish("tasks", task(0))  # the shard count is known: the next is inline
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)  # the reply never comes
    try:
        publishing = asyncio.create_task(producer.publish("tasks", task(1)))
        await asyncio.sleep(0.05)
        publishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing
        del publishing
        gc.collect()
        await asyncio.sleep(0)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
        loop.set_exception_handler(None)
    await producer.close(grace=0.5)
    lost = [c for c in reported if "never retrieved" in str(c.get("message"))]
    assert lost == [], lost


async def test_lone_publishes_go_by_sha_and_survive_a_flushed_script_cache(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    # A publish sent from the caller (nothing else in flight) names the script by SHA1 and
    # sends it again as text after NOSCRIPT; concurrent batches send the text (several of a
    # shard may be in flight). Every key's events land once each, in order.
    producer = AsyncProducer(aown, make_config(keys))
    sent: list[Event] = []

    async def lone(round_: int) -> None:
        for n in range(6):
            event = Event.make(
                f"task-{n}", "set", {"id": n, "status": f"r{round_}"}, id=f"{round_}.{n}"
            )
            await producer.publish("tasks", event)
            sent.append(event)

    def calls() -> tuple[int, int]:
        return command_calls(own, "eval"), command_calls(own, "evalsha")

    for round_ in range(3):
        own.script_flush()
        own.config_resetstat()
        await lone(round_)
        assert calls() == (1, 6)  # the first refused and sent as text, then known by SHA1
        batch = [
            Event.make(f"task-{n}", "set", {"id": n, "status": f"b{round_}"}) for n in range(6)
        ]
        own.config_resetstat()
        await asyncio.gather(*(producer.publish("tasks", e) for e in batch))
        sent.extend(batch)
        evals, shas = calls()
        assert shas <= 1 and evals >= 1  # the first may go from the caller, the rest as text
    await producer.close()
    for key in {e.key for e in sent}:
        assert data_of(own, keys, "tasks", key) == [encode(e)[5] for e in sent if e.key == key]
