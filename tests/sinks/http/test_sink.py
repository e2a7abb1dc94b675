"""The HTTP sink against a real HTTP server on 127.0.0.1 (allow_private on, as for development).

Windows are built by hand (receiver.Window) and written to the sink as the worker would;
the receiver records every request and answers as each test scripts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import orjson
import pytest
import redis

from streamsink.sinks.http import signature
from streamsink.streams import Keys
from streamsink.streams.endpoints import endpoint_rows
from tests.sinks.http.receiver import SECRET, Answer, Built, Receiver, Record, Window, build_sink


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def http_sink(
    redis_url: str, keys: Keys, options: Mapping[str, Any] | None = None
) -> AsyncIterator[Built]:
    fast = {"backoff_ms": 20, "max_backoff_ms": 200}
    built = build_sink(redis_url, keys, {**fast, **(options or {})})
    try:
        yield built
    finally:
        await built.sink.close()


def signed_correctly(record: Record) -> bool:
    timestamp = int(record.headers["X-Streamsink-Timestamp"])
    expected = signature(SECRET.encode(), timestamp, record.body)
    return hmac.compare_digest(expected, record.headers["X-Streamsink-Signature"])


def counts(r: redis.Redis, keys: Keys) -> dict[str, tuple[int, int, int, int, str]]:
    """status's view: endpoint -> (sent, failed, retried, dead, breaker)."""
    return {
        row.endpoint: (row.sent, row.failed, row.retried, row.dead, row.breaker)
        for row in endpoint_rows(r, keys, "hooks")
    }


async def test_each_mode_one_signed_request_per_call_in_order_per_key(
    receiver: Receiver, redis_url: str, keys: Keys, r: redis.Redis
) -> None:
    window = Window()
    entries = [
        window.entry(f"task-{n % 3}", receiver.url(f"/t/{n % 3}"), {"n": n}, headers={"X-Tag": "t"})
        for n in range(30)
    ]
    async with http_sink(redis_url, keys, {"concurrency": 4}) as built:
        assert await built.sink.write(window.batch(entries)) == []

    records = receiver.records
    assert len(records) == 30
    assert sorted(record.json()["n"] for record in records) == list(range(30))
    for record in records:
        n = record.json()["n"]
        assert record.path == f"/t/{n % 3}"
        assert record.key == f"hooks:0:{entries[n].id}"
        assert record.headers["Content-Type"] == "application/json"
        assert record.headers["X-Tag"] == "t"
        assert signed_correctly(record)
    for key in range(3):  # one key's callbacks arrive in stream order
        arrived = [record.json()["n"] for record in records if record.path == f"/t/{key}"]
        assert arrived == sorted(arrived)
    endpoint = f"http://127.0.0.1:{receiver.port}"
    assert counts(r, keys) == {endpoint: (30, 0, 0, 0, "closed")}


async def test_batch_mode_one_request_per_window_with_a_key_per_item(
    receiver: Receiver, redis_url: str, keys: Keys
) -> None:
    window = Window()
    url = receiver.url("/batch")
    entries = [window.entry(f"task-{n % 4}", url, {"n": n}) for n in range(25)]
    # Coalescing: of three calls with one coalescing key, only the newest is sent.
    entries += [window.entry("task-x", url, {"n": 100 + n}, coalesce="x") for n in range(3)]
    options = {"endpoints": {url: {"mode": "batch", "max_batch_items": 10}}}
    async with http_sink(redis_url, keys, options) as built:
        assert await built.sink.write(window.batch(entries)) == []

    records = receiver.records
    assert [len(record.json()["items"]) for record in records] == [10, 10, 6]
    items = [item for record in records for item in record.json()["items"]]
    assert [item["payload"]["n"] for item in items] == [*range(25), 102]
    sent = [entries[n] for n in range(25)] + [entries[-1]]
    assert [item["idempotency_key"] for item in items] == [f"hooks:0:{e.id}" for e in sent]
    assert [item["key"] for item in items] == [e.event.key for e in sent]
    for record in records:
        body = record.json()
        first, last = body["items"][0], body["items"][-1]
        batch_key = f"{first['idempotency_key']}..{last['idempotency_key'].split(':')[-1]}"
        assert body["idempotency_key"] == record.key == batch_key
        assert signed_correctly(record)


async def test_batch_mode_splits_on_body_size(
    receiver: Receiver, redis_url: str, keys: Keys
) -> None:
    window = Window()
    url = receiver.url("/batch")
    entries = [window.entry("k", url, {"pad": "x" * 300, "n": n}) for n in range(20)]
    options = {"mode": "batch", "max_body_bytes": 1500}
    async with http_sink(redis_url, keys, options) as built:
        assert await built.sink.write(window.batch(entries)) == []
    assert all(len(record.body) <= 1500 for record in receiver.records)
    assert len(receiver.records) > 4
    items = [item["payload"]["n"] for rec in receiver.records for item in rec.json()["items"]]
    assert items == list(range(20))


async def test_500_then_200_gives_each_callback_exactly_once_to_a_deduplicating_receiver(
    receiver: Receiver, redis_url: str, keys: Keys, r: redis.Redis
) -> None:
    def flaky(record: Record, server: Receiver) -> Answer:
        # The first two tries of every callback fail; the second one after doing the work
        # (a receiver that crashed before answering), so a repeat reaches it.
        return Answer(500, body=b"oops") if server.tries[record.key] <= 2 else Answer(200)

    receiver.answer = flaky
    window = Window()
    entries = [window.entry(f"k{n % 7}", receiver.url(), {"n": n}) for n in range(40)]
    async with http_sink(redis_url, keys, {"breaker_failures": 1000}) as built:
        assert await built.sink.write(window.batch(entries)) == []

    applied: dict[str, Any] = {}  # what a receiver deduplicating on the key keeps
    for record in receiver.records:
        if record.status in (200, 500) and record.key not in applied and record.status == 200:
            applied[record.key] = record.json()
    assert set(applied) == {f"hooks:0:{e.id}" for e in entries}
    assert sorted(body["n"] for body in applied.values()) == list(range(40))
    assert receiver.tries == Counter({f"hooks:0:{e.id}": 3 for e in entries})
    endpoint = f"http://127.0.0.1:{receiver.port}"
    assert counts(r, keys) == {endpoint: (40, 80, 80, 0, "closed")}


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_429_retry_after_is_honoured(
    receiver: Receiver, redis_url: str, keys: Keys, form: str
) -> None:
    def busy(record: Record, server: Receiver) -> Answer:
        if server.tries[record.key] > 1:
            return Answer(200)
        if form == "seconds":
            return Answer(429, {"Retry-After": "1"})
        return Answer(429, {"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)})

    receiver.answer = busy
    window = Window()
    entries = [window.entry(f"k{n}", receiver.url(), {"n": n}) for n in range(3)]
    async with http_sink(redis_url, keys, {"rate": 100.0}) as built:
        started = time.monotonic()
        assert await built.sink.write(window.batch(entries)) == []
        took = time.monotonic() - started

    by_key: dict[str, list[Record]] = {}
    for record in receiver.records:
        by_key.setdefault(record.key, []).append(record)
    assert len(by_key) == 3
    first_429 = min(tries[0].at for tries in by_key.values())
    for tries in by_key.values():
        assert [t.status for t in tries] == [429, 200]
        # Backoff alone would retry within 20 ms; the receiver asked for (at least) 1 s.
        assert tries[1].at - tries[0].at >= 0.95
        # And every worker holds the endpoint: nothing goes before the first 429's wait.
        assert tries[1].at - first_429 >= 0.95
    print(f"\n429 ({form}): retried after >= 1 s, window took {took:.2f} s")


async def test_a_retry_after_over_the_cap_is_dead_lettered_not_awaited(
    receiver: Receiver, redis_url: str, keys: Keys
) -> None:
    receiver.answer = lambda record, server: Answer(429, {"Retry-After": "3600"}, b"slow down")
    window = Window()
    entries = [window.entry("k", receiver.url(), {"n": 1})]
    async with http_sink(redis_url, keys, {"max_retry_after_s": 5.0}) as built:
        rejected = await built.sink.write(window.batch(entries))
    assert len(receiver.records) == 1
    assert [x.entry_id for x in rejected] == [entries[0].id]
    assert "HTTP 429" in rejected[0].reason and "Retry-After 3600 s" in rejected[0].reason


async def test_other_4xx_is_not_retried_and_is_rejected_with_status_and_body(
    receiver: Receiver, redis_url: str, keys: Keys
) -> None:
    receiver.answer = lambda record, server: Answer(422, body=b'{"error":"no such task"}')
    window = Window()
    entries = [window.entry("k", receiver.url(), {"n": 1})]
    async with http_sink(redis_url, keys) as built:
        rejected = await built.sink.write(window.batch(entries))
    assert len(receiver.records) == 1
    (reject,) = rejected
    assert reject.entry_id == entries[0].id
    assert reject.reason == 'HTTP 422, body \'{"error":"no such task"}\'; not retried; 1 attempt'


async def test_after_the_last_attempt_entries_are_rejected_with_status_body_and_attempts(
    receiver: Receiver, redis_url: str, keys: Keys, r: redis.Redis
) -> None:
    receiver.answer = lambda record, server: Answer(503, body=b"down for maintenance")
    window = Window()
    entries = [window.entry("k", receiver.url(), {"n": n}) for n in range(2)]
    async with http_sink(redis_url, keys, {"max_attempts": 3, "breaker_failures": 100}) as built:
        rejected = await built.sink.write(window.batch(entries))
    assert [x.entry_id for x in rejected] == [e.id for e in entries]
    for reject in rejected:
        assert reject.reason == "HTTP 503, body 'down for maintenance'; 3 attempts"
    assert len(receiver.records) == 6
    endpoint = f"http://127.0.0.1:{receiver.port}"
    assert counts(r, keys) == {endpoint: (0, 6, 4, 2, "closed")}


async def test_a_dead_endpoint_holds_its_calls_and_does_not_delay_another_endpoints(
    redis_url: str, keys: Keys, r: redis.Redis
) -> None:
    """Calls to an endpoint whose breaker is open wait (nothing dead-lettered, the window
    not done); the other endpoint's calls of the same window are delivered meanwhile."""
    dead = Receiver(lambda record, server: Answer(delay=3)).start()  # answers too late
    alive = Receiver().start()
    options = {
        "timeout_s": 0.5,
        "max_attempts": 2,
        "breaker_failures": 3,
        "breaker_cooldown_s": 60.0,
        "concurrency": 2,
    }
    window = Window()
    entries = [
        window.entry(f"k{n}", url, {"n": n}) for n in range(6) for url in (dead.url(), alive.url())
    ]
    try:
        async with http_sink(redis_url, keys, options) as built:
            writing = asyncio.create_task(built.sink.write(window.batch(entries)))
            deadline = time.monotonic() + 10
            dead_name = f"http://127.0.0.1:{dead.port}"
            while len(alive.records) < 6 or counts(r, keys).get(dead_name, "")[4:] != ("open",):
                assert time.monotonic() < deadline, (len(alive.records), writing.done())
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # far more than max_attempts x timeout_s
            assert not writing.done(), "an open breaker holds its calls: the window waits"
            writing.cancel()
            await asyncio.wait([writing])
    finally:
        dead.stop()
        alive.stop()
    assert len(dead.records) <= 4  # the requests that were in flight when it opened
    assert counts(r, keys)[dead_name][3:] == (0, "open")  # none dead-lettered
    assert counts(r, keys)[f"http://127.0.0.1:{alive.port}"] == (6, 0, 0, 0, "closed")


async def test_the_global_rate_and_min_interval_space_requests(
    receiver: Receiver, redis_url: str, keys: Keys
) -> None:
    window = Window()
    entries = [window.entry(f"k{n}", receiver.url(), {"n": n}) for n in range(12)]
    async with http_sink(redis_url, keys, {"rate": 1000.0, "min_interval_ms": 50.0}) as built:
        started = time.monotonic()  # the receiver's clock
        assert await built.sink.write(window.batch(entries)) == []
    times = sorted(record.at for record in receiver.records)
    print(f"\nmin_interval 50 ms: 12 requests arrived over {(times[-1] - times[0]) * 1000:.0f} ms")
    # The n-th request's permit is 50 ms after the one before (tests/streams/test_ratelimit.py
    # checks them exactly on Redis' clock), so it never arrives before `started` + n * 50 ms
    # (a few ms either way for the clocks). A loaded machine only delays arrivals: a bound
    # from below on each holds where one on the spread (a late first arrival) did not.
    early = [
        (n, round(t - started, 3)) for n, t in enumerate(times) if t - started < 0.05 * n - 0.01
    ]
    assert early == [], "requests before their slot: (n, seconds after the start)"


async def test_every_request_carries_a_verifiable_signature_over_timestamp_and_body(
    receiver: Receiver, redis_url: str, keys: Keys
) -> None:
    window = Window()
    entries = [window.entry("k", receiver.url(), {"text": "h\u00e9llo", "n": 1})]
    async with http_sink(redis_url, keys) as built:
        assert await built.sink.write(window.batch(entries)) == []
    (record,) = receiver.records
    assert orjson.loads(record.body) == {"text": "h\u00e9llo", "n": 1}
    assert abs(int(record.headers["X-Streamsink-Timestamp"]) - time.time()) < 5
    assert signed_correctly(record)
    tampered = Record(record.at, record.path, record.headers, record.body + b" ")
    assert not signed_correctly(tampered)


async def test_a_request_carries_the_sinks_headers_the_calls_own_and_no_others(
    receiver: Receiver, redis_url: str, keys: Keys
) -> None:
    """What a receiver sees: no Accept-Encoding (only an excerpt of a reply is read, no
    compression is asked for), the sink's User-Agent, the call's own headers."""
    window = Window()
    entries = [window.entry("k", receiver.url(), {"n": 1}, headers={"X-Tag": "t"})]
    async with http_sink(redis_url, keys) as built:
        assert await built.sink.write(window.batch(entries)) == []
    (record,) = receiver.records
    assert sorted(record.headers) == [
        "Accept",
        "Content-Length",
        "Content-Type",
        "Host",
        "Idempotency-Key",
        "User-Agent",
        "X-Streamsink-Signature",
        "X-Streamsink-Timestamp",
        "X-Tag",
    ]
    assert record.headers["Accept"] == "*/*"
    assert record.headers["User-Agent"] == "streamsink-http-sink"


@pytest.mark.parametrize("mode", ["each", "batch"])
async def test_a_replayed_call_keeps_the_idempotency_key_of_its_first_entry(
    receiver: Receiver, redis_url: str, keys: Keys, mode: str
) -> None:
    """`dead replay` publishes the call again under a new entry ID, with `origin` naming
    the first one (Batch.origins): receivers see the first key, and drop the repeat."""
    window = Window()
    url = receiver.url("/replayed")
    first = window.entry("task-1", url, {"n": 1})
    plain = window.entry("task-2", url, {"n": 2})
    again = window.entry("task-1", url, {"n": 1})  # the replay of `first`, later in the shard
    batch = dataclasses.replace(window.batch([plain, again]), origins={again.id: first.id})
    assert batch.origin(again.id) == first.id and batch.origin(plain.id) == plain.id
    options = {"endpoints": {url: {"mode": mode}}}
    async with http_sink(redis_url, keys, options) as built:
        assert await built.sink.write(batch) == []

    if mode == "each":
        sent = {record.json()["n"]: record.key for record in receiver.records}
    else:
        (record,) = receiver.records
        sent = {item["payload"]["n"]: item["idempotency_key"] for item in record.json()["items"]}
    assert sent == {1: f"hooks:0:{first.id}", 2: f"hooks:0:{plain.id}"}


async def test_a_429_from_one_worker_pauses_all_four_without_a_rate(
    receiver: Receiver, redis_url: str, keys: Keys
) -> None:
    """Four workers' sinks (each its own Redis client, as four processes), no `rate`: one
    429 with Retry-After: 3 holds every one of them, for 3 s, then all go on."""
    told: list[float] = []

    def one_429(record: Record, server: Receiver) -> Answer:
        if not told and len(server.records) >= 20:  # once all four are sending
            told.append(record.at)
            return Answer(429, {"Retry-After": "3"}, b"slow down")
        return Answer(200, delay=0.02)

    receiver.answer = one_429
    windows = [Window(shard=n) for n in range(4)]
    batches = [
        w.batch([w.entry(f"k{n}-{i}", receiver.url(f"/w{n}"), {"n": i}) for i in range(60)])
        for n, w in enumerate(windows)
    ]
    async with contextlib.AsyncExitStack() as stack:
        sinks = [await stack.enter_async_context(http_sink(redis_url, keys)) for _ in range(4)]
        results = await asyncio.gather(
            *(built.sink.write(batch) for built, batch in zip(sinks, batches, strict=True))
        )
    assert results == [[], [], [], []]
    (at,) = told
    during = [record for record in receiver.records if at + 0.3 < record.at < at + 3.0]
    after = [record for record in receiver.records if record.at >= at + 3.0]
    before = {record.path for record in receiver.records if record.at < at}
    print(
        f"\n429 Retry-After 3: {len(during)} requests during the pause, the next "
        f"{min(r.at for r in after) - at:.2f} s after the 429"
    )
    assert before == {"/w0", "/w1", "/w2", "/w3"}, "all four were sending before it"
    assert during == []
    assert {record.path for record in after} == {"/w0", "/w1", "/w2", "/w3"}
    assert len(receiver.accepted()) == 240


async def test_endpoint_counts_show_while_a_window_is_in_flight(
    receiver: Receiver, redis_url: str, keys: Keys, r: redis.Redis
) -> None:
    receiver.answer = lambda record, server: Answer(delay=0.05)
    window = Window()
    entries = [window.entry("one-key", receiver.url(), {"n": n}) for n in range(60)]  # 3 s
    endpoint = f"http://127.0.0.1:{receiver.port}"
    async with http_sink(redis_url, keys) as built:
        writing = asyncio.create_task(built.sink.write(window.batch(entries)))
        deadline = time.monotonic() + 10
        while counts(r, keys).get(endpoint, (0,))[0] == 0:
            assert time.monotonic() < deadline and not writing.done(), "no counts while sending"
            await asyncio.sleep(0.05)
        assert not writing.done(), "the counts should show before the window is done"
        assert await writing == []
    assert counts(r, keys)[endpoint] == (60, 0, 0, 0, "closed")


async def test_a_new_owner_skips_the_callbacks_marked_delivered_until_the_next_window(
    receiver: Receiver, redis_url: str, keys: Keys, r: redis.Redis
) -> None:
    """A window written again before its acknowledgement (its owner died) sends nothing
    already delivered; the next window's start forgets the marks below it."""
    window = Window()
    first = [window.entry(f"k{n}", receiver.url(), {"n": n}) for n in range(10)]
    async with http_sink(redis_url, keys) as built:
        assert await built.sink.write(window.batch(first)) == []
    marked = keys.http_delivered("hooks", 0, "g", "hooks")
    assert r.scard(marked) == 10
    async with http_sink(redis_url, keys) as again:  # the next owner, same window
        assert await again.sink.write(window.batch(first)) == []
        assert again.transport.posts == 0
        second = [window.entry(f"k{n}", receiver.url(), {"n": 10 + n}) for n in range(5)]
        assert await again.sink.write(window.batch(second)) == []
    assert sorted(record.json()["n"] for record in receiver.records) == list(range(15))
    assert {m.decode() for m in r.smembers(marked)} == {e.id for e in second}


async def test_a_window_stopped_mid_request_marks_what_went_through_and_resends_nothing(
    receiver: Receiver, redis_url: str, keys: Keys, r: redis.Redis
) -> None:
    """A handover or a shutdown cancels the window while requests are on the wire: they are
    let end, those answered 2xx are marked, so the next owner sends only what never went."""
    receiver.answer = lambda record, server: Answer(200, delay=0.4)
    window = Window()
    calls = [window.entry(f"k{n}", receiver.url(), {"n": n}) for n in range(6)]
    options = {"concurrency": 2}
    async with http_sink(redis_url, keys, options) as built:
        writing = asyncio.create_task(built.sink.write(window.batch(calls)))
        deadline = time.monotonic() + 10
        while len(receiver.records) < 2:  # two requests are on the wire, not answered yet
            assert time.monotonic() < deadline, "no request arrived"
            await asyncio.sleep(0.01)
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
    assert endpoint_rows(r, keys, "hooks")[0].sent == 2, "counted as sent (saved at close)"
    marked = keys.http_delivered("hooks", 0, "g", "hooks")
    assert r.scard(marked) == 2, "the two requests in flight went through: marked"
    async with http_sink(redis_url, keys, options) as again:  # the next owner, same window
        assert await again.sink.write(window.batch(calls)) == []
    numbers = sorted(record.json()["n"] for record in receiver.records)
    assert numbers == list(range(6)), "each call once: none lost, none sent twice"
