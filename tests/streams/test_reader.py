"""The one read path of a shard on a real Redis: claim, then read; ack, dead letters, trim."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aredis

from streamsink.errors import Fenced
from streamsink.schemas.layout import D_FIELD as DEAD_PREFIX
from streamsink.schemas.wire import parse_id
from streamsink.streams.keys import Keys
from streamsink.streams.leases import Leases
from streamsink.streams.reader import (
    Raw,
    Read,
    ShardReader,
    create_group,
    trim_floor,
)

STREAM, GROUP = "tasks", "pg-writer"


async def reader(
    client: aredis.Redis, keys: Keys, consumer: str = "w1", group: str = GROUP
) -> ShardReader:
    """A reader of `consumer`, which takes the shard's lease of `group` from whoever held it.

    Every read and claim is fenced by the lease; the fence has tests of its own, at the end.
    """
    await client.set(keys.lease(STREAM, 0, group), consumer)
    return ShardReader(client, keys, STREAM, 0, group, consumer)


def shard(keys: Keys) -> str:
    return keys.shard(STREAM, 0)


def add(r: redis.Redis, keys: Keys, n: int, start: int = 0) -> list[str]:
    """XADD `n` entries with a field `n` counting from `start`; their IDs."""
    pipe = r.pipeline(transaction=False)
    for i in range(start, start + n):
        pipe.xadd(shard(keys), {b"n": str(i).encode()})
    return [entry_id.decode() for entry_id in pipe.execute()]


def ids_in(r: redis.Redis, keys: Keys) -> list[str]:
    """IDs left in the shard, oldest first."""
    return [entry_id.decode() for entry_id, _ in xrange(r, shard(keys))]


def xadd(r: redis.Redis, key: str, fields: dict[bytes, bytes], entry_id: str = "*") -> str:
    """XADD one entry with binary fields; its ID."""
    reply: Any = r.xadd(key, cast(Any, fields), id=entry_id)
    return str(reply.decode())


def xrange(r: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of the stream `key`, as bytes."""
    reply: Any = r.xrange(key)
    return [(entry_id, dict(fields)) for entry_id, fields in reply]


def steal(r: redis.Redis, keys: Keys, consumer: str, count: int, group: str = GROUP) -> list[str]:
    """Read new entries as `consumer` with a plain XREADGROUP and never acknowledge them."""
    reply: Any = r.xreadgroup(group, consumer, {shard(keys): ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in reply[0][1]] if reply else []


def encoded(ids: Iterable[str]) -> list[bytes]:
    """Entry IDs as `ack` takes them: bytes, as Redis sent them."""
    return [entry_id.encode() for entry_id in ids]


def pending(r: redis.Redis, keys: Keys, group: str = GROUP) -> dict[str, str]:
    """Pending entry ID -> consumer holding it."""
    rows: Any = r.xpending_range(shard(keys), group, min="-", max="+", count=100_000)
    return {row["message_id"].decode(): row["consumer"].decode() for row in rows}


async def raws(rd: ShardReader, count: int, block_ms: int = 0) -> list[Raw]:
    """One `next`, its entries as `Raw`s."""
    return as_raws(await rd.next(count, block_ms))


def as_raws(read: Read) -> list[Raw]:
    """A read's entries as Raws: IDs as text, each with its delivery count."""
    return [
        Raw(entry_id.decode(), fields, read.deliveries.get(entry_id, 1))
        for entry_id, fields in read.entries
    ]


async def drain(rd: ShardReader, count: int = 1000) -> list[Raw]:
    """Everything the reader has to give right now, call after call."""
    got: list[Raw] = []
    while batch := await raws(rd, count):
        got += batch
    return got


# -- groups and reading ----------------------------------------------------------------------


async def test_ensure_group_is_idempotent_and_starts_at_the_first_entry(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    ids = add(r, keys, 3)
    rd = await reader(ar, keys)
    await rd.ensure_group()
    await rd.ensure_group()
    assert [g["name"] for g in r.xinfo_groups(shard(keys))] == [GROUP.encode()]
    assert await create_group(ar, shard(keys), GROUP) is False
    assert [raw.id for raw in await raws(rd, 10)] == ids  # entries older than the group


async def test_ensure_group_creates_a_missing_stream(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    rd = await reader(ar, keys)
    await rd.ensure_group()
    assert r.xlen(shard(keys)) == 0
    assert await raws(rd, 10) == []
    assert await create_group(ar, shard(keys), "other") is True


async def test_next_reads_new_entries_once(ar: aredis.Redis, r: redis.Redis, keys: Keys) -> None:
    rd = await reader(ar, keys)
    await rd.ensure_group()
    ids = add(r, keys, 5)
    read = await rd.next(3, 0)
    expected = [[i.encode(), [b"n", str(n).encode()]] for n, i in enumerate(ids[:3])]
    assert read == Read(expected, {}, ids[-1].encode())  # the newest entry when read
    assert as_raws(read) == [Raw(i, [b"n", str(n).encode()], 1) for n, i in enumerate(ids[:3])]
    assert [raw.id for raw in await raws(rd, 3)] == ids[3:]
    assert await raws(rd, 3) == []
    assert pending(r, keys) == dict.fromkeys(ids, "w1")


async def test_next_blocks_until_an_entry_comes(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    rd = await reader(ar, keys)
    await rd.ensure_group()
    started = time.monotonic()
    assert await asyncio.wait_for(raws(rd, 10, 200), 2) == []
    assert time.monotonic() - started >= 0.15
    started = time.monotonic()
    assert await asyncio.wait_for(raws(rd, 10, 0), 2) == []  # 0: no wait (not BLOCK 0 forever)
    assert time.monotonic() - started < 0.1

    async def publish_soon() -> list[str]:
        await asyncio.sleep(0.1)
        return add(r, keys, 1)

    got, ids = await asyncio.gather(raws(rd, 10, 1500), publish_soon())
    assert [raw.id for raw in got] == ids


# -- claiming what was left pending ----------------------------------------------------------


async def test_entries_of_a_dead_consumer_are_claimed_first(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    await create_group(ar, shard(keys), GROUP)
    ids = add(r, keys, 6)
    assert steal(r, keys, "dead", 4) == ids[:4]
    r.xack(shard(keys), GROUP, ids[1])  # the dead one had applied this one
    rd = await reader(ar, keys, "w2")
    claimed = await raws(rd, 10)
    assert [(raw.id, raw.deliveries) for raw in claimed] == [(i, 2) for i in ids[:4] if i != ids[1]]
    assert claimed[0].fields == [b"n", b"0"]
    fresh = await raws(rd, 10)
    assert [(raw.id, raw.deliveries) for raw in fresh] == [(i, 1) for i in ids[4:]]
    assert await raws(rd, 10) == []
    assert pending(r, keys) == {i: "w2" for i in ids if i != ids[1]}


async def test_deliveries_count_every_owner(ar: aredis.Redis, r: redis.Redis, keys: Keys) -> None:
    await create_group(ar, shard(keys), GROUP)
    ids = add(r, keys, 2)
    steal(r, keys, "dead", 2)
    for owner, deliveries in (("w1", 2), ("w2", 3), ("w3", 4)):  # each owner dies in turn
        claimed = await raws(await reader(ar, keys, owner), 10)
        assert [(raw.id, raw.deliveries) for raw in claimed] == [(i, deliveries) for i in ids]


async def test_read_deliveries_count_the_deliveries_of_claimed_entries(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    """`Read.deliveries` has a count for each claimed entry; entries read new are absent (1)."""
    await create_group(ar, shard(keys), GROUP)
    ids = encoded(add(r, keys, 3))
    steal(r, keys, "dead", 2)
    steal(r, keys, "dead", 1)  # delivered to it once more
    r.xclaim(shard(keys), GROUP, "dead", 0, [ids[1]])  # XCLAIM counts a delivery too
    w1 = await reader(ar, keys, "w1")
    claimed = await w1.next(10, 0)
    assert [entry_id for entry_id, _ in claimed.entries] == ids
    assert claimed.deliveries == {ids[0]: 2, ids[1]: 3, ids[2]: 2}
    new = encoded(add(r, keys, 1, start=3))
    fresh = await w1.next(10, 0)
    assert [entry_id for entry_id, _ in fresh.entries] == new
    assert fresh.deliveries == {}  # read new: delivered once
    assert [raw.deliveries for raw in as_raws(fresh)] == [1]
    w2 = await reader(ar, keys, "w2")  # w1 died holding all four; w2 takes the lease
    again = await w2.next(10, 0)
    assert again.deliveries == {ids[0]: 3, ids[1]: 4, ids[2]: 3, new[0]: 2}
    assert [raw.deliveries for raw in as_raws(again)] == [3, 4, 3, 2]


async def test_claim_pages_through_many_pending_entries(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    await create_group(ar, shard(keys), GROUP)
    ids = add(r, keys, 2500)
    assert len(steal(r, keys, "dead", 2500)) == 2500
    rd = await reader(ar, keys, "w2")
    batches = [await raws(rd, 1000) for _ in range(3)]
    assert [len(batch) for batch in batches] == [1000, 1000, 500]
    claimed = [raw for batch in batches for raw in batch]
    assert [raw.id for raw in claimed] == ids  # in order, each once
    assert {raw.deliveries for raw in claimed} == {2}
    assert await raws(rd, 1000) == []
    new = add(r, keys, 2, start=2500)
    assert [(raw.id, raw.deliveries) for raw in await raws(rd, 1000)] == [(i, 1) for i in new]


async def test_claim_skips_entries_deleted_while_pending(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    await create_group(ar, shard(keys), GROUP)
    ids = add(r, keys, 5)
    steal(r, keys, "dead", 5)
    r.xdel(shard(keys), ids[1], ids[3])
    rd = await reader(ar, keys, "w2")
    assert [raw.id for raw in await drain(rd, 2)] == [ids[0], ids[2], ids[4]]
    await rd.ack(encoded([ids[0], ids[2], ids[4]]))
    assert pending(r, keys) == {}  # nothing stranded behind the holes


async def _xautoclaim_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_xautoclaim", {})
    return int(stats.get("calls", 0))


async def test_claim_runs_once_per_reader_not_per_read(
    own: redis.Redis, aown: aredis.Redis, keys: Keys
) -> None:
    """On a throwaway server (conftest's `own`/`aown`): its command stats are this test's."""
    rd = await reader(aown, keys)
    await rd.ensure_group()
    before = await _xautoclaim_calls(own)
    for _ in range(5):
        assert await raws(rd, 10) == []
    assert await raws(rd, 10, 50) == []
    assert await _xautoclaim_calls(own) - before == 1  # empty claim ends, no spin

    ids = add(own, keys, 5)
    steal(own, keys, "dead", 5)
    before = await _xautoclaim_calls(own)
    rd2 = await reader(aown, keys, "w2")
    assert [raw.id for raw in await drain(rd2, 2)] == ids
    for _ in range(3):
        assert await raws(rd2, 2) == []
    assert await _xautoclaim_calls(own) - before == 3  # pages of 2, 2, 1, then reads only

    rd2.recover()
    before = await _xautoclaim_calls(own)
    for _ in range(3):
        assert await raws(rd2, 2) == []
    assert await _xautoclaim_calls(own) - before == 1


# -- recovering a reply lost with the connection ---------------------------------------------


async def test_recover_claims_entries_delivered_in_a_lost_reply(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    rd = await reader(ar, keys)
    await rd.ensure_group()
    ids = add(r, keys, 6)
    assert [raw.id for raw in await raws(rd, 3)] == ids[:3]  # in a window, not yet acked
    assert steal(r, keys, "w1", 10) == ids[3:]  # delivered to us, reply never seen
    assert await raws(rd, 10) == []  # XREADGROUP > never gives them again
    rd.recover()
    recovered = await raws(rd, 10)
    assert [(raw.id, raw.deliveries) for raw in recovered] == [(i, 2) for i in ids[3:]]
    assert await raws(rd, 10) == []  # and the window's entries are not delivered twice
    assert await rd.ack(encoded(ids)) == 6
    assert pending(r, keys) == {}


async def test_recover_with_nothing_lost_reads_on(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    rd = await reader(ar, keys)
    await rd.ensure_group()
    rd.recover()  # before any read
    ids = add(r, keys, 4)
    assert [raw.id for raw in await raws(rd, 2)] == ids[:2]
    rd.recover()
    assert [(raw.id, raw.deliveries) for raw in await raws(rd, 10)] == [(i, 1) for i in ids[2:]]
    rd.recover()
    assert await raws(rd, 10) == []


async def test_recover_while_claiming_does_not_repeat_claimed_entries(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    await create_group(ar, shard(keys), GROUP)
    ids = add(r, keys, 5)
    steal(r, keys, "dead", 5)
    rd = await reader(ar, keys, "w2")
    assert [raw.id for raw in await raws(rd, 2)] == ids[:2]
    rd.recover()
    assert [raw.id for raw in await drain(rd, 2)] == ids[2:]


# -- acknowledging and dead letters ----------------------------------------------------------


async def test_ack(ar: aredis.Redis, r: redis.Redis, keys: Keys) -> None:
    rd = await reader(ar, keys)
    await rd.ensure_group()
    ids = add(r, keys, 3)
    await raws(rd, 10)
    assert await rd.ack([]) == 0
    assert await rd.ack(encoded(ids[:2])) == 2
    assert await rd.ack(encoded(ids[:2])) == 0  # already acknowledged
    assert pending(r, keys) == {ids[2]: "w1"}


async def test_ack_takes_bytes_ids_and_acknowledges_thousands_in_one_call(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    """The script acknowledges in chunks of 1,000: full chunks, a last partial one, repeats."""
    rd = await reader(ar, keys)
    await rd.ensure_group()
    add(r, keys, 2500)
    read = await rd.next(5000, 0)
    ids: list[bytes] = [entry_id for entry_id, _ in read.entries]  # bytes, as Redis sent them
    assert len(ids) == 2500 and all(isinstance(entry_id, bytes) for entry_id in ids)
    assert len(pending(r, keys)) == 2500
    assert await rd.ack(ids[:2000]) == 2000  # two full chunks, nothing left over
    assert len(pending(r, keys)) == 500
    assert await rd.ack(ids) == 500  # 2,500 in one call; the acknowledged ones count 0
    assert pending(r, keys) == {}
    assert r.xpending(shard(keys), GROUP)["pending"] == 0
    assert await rd.ack(ids) == 0


async def test_dead_letter_keeps_the_entry_byte_for_byte_and_acknowledges_it(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    rd = await reader(ar, keys)
    await rd.ensure_group()
    fields = {b"key": b"task-1", b"data": b"\xff\xfe\x00not utf-8\x80", b"\xc3(": b"odd name"}
    entry_id = xadd(r, shard(keys), fields)
    other = add(r, keys, 1)[0]
    raw, _ = await raws(rd, 10)
    before = int(time.time() * 1000)
    await rd.dead_letter(raw, "DecodeError: data: not JSON ✗")
    after = int(time.time() * 1000)

    dead = xrange(r, keys.dead(STREAM, 0, GROUP))
    assert len(dead) == 1
    letter = dead[0][1]
    assert before <= int(letter.pop(b"at_ms")) <= after
    assert letter == {
        b"reason": "DecodeError: data: not JSON ✗".encode(),
        b"entry": entry_id.encode(),
        b"group": GROUP.encode(),
        b"deliveries": b"1",
        b"source": shard(keys).encode(),
        b"f:key": b"task-1",
        b"f:data": b"\xff\xfe\x00not utf-8\x80",
        b"f:\xc3(": b"odd name",
    }
    originals = {k[len(DEAD_PREFIX) :]: v for k, v in letter.items() if k.startswith(DEAD_PREFIX)}
    assert originals == fields
    assert pending(r, keys) == {other: "w1"}  # acknowledged; the other one untouched
    assert r.xlen(shard(keys)) == 2  # the entry itself goes with trimming


async def test_dead_letter_records_the_deliveries_of_a_claimed_entry(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    await create_group(ar, shard(keys), GROUP)
    add(r, keys, 1)
    steal(r, keys, "dead", 1)
    rd = await reader(ar, keys, "w2")
    (raw,) = await raws(rd, 10)
    await rd.dead_letter(raw, "too many deliveries")
    (_, letter), *_ = xrange(r, keys.dead(STREAM, 0, GROUP))
    assert letter[b"deliveries"] == b"2"
    assert letter[b"reason"] == b"too many deliveries"
    assert r.xpending(shard(keys), GROUP)["pending"] == 0


async def test_dead_letters_of_groups_are_apart(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    a, b = await reader(ar, keys, group="a"), await reader(ar, keys, group="b")
    await a.ensure_group()
    await b.ensure_group()
    add(r, keys, 1)
    (raw,) = await raws(a, 10)
    await a.dead_letter(raw, "bad")
    assert r.xlen(keys.dead(STREAM, 0, "a")) == 1
    assert r.exists(keys.dead(STREAM, 0, "b")) == 0
    assert [x.id for x in await raws(b, 10)] == [raw.id]  # group b still gets it


# -- consumers of gone workers ---------------------------------------------------------------


async def test_remove_gone_consumers_keeps_live_ones_and_pending_entries(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    rd = await reader(ar, keys, "me")
    await rd.ensure_group()
    key = shard(keys)
    for name in ("me", "live-idle", "gone-idle", "gone-2"):
        r.xgroup_createconsumer(key, GROUP, name)
    add(r, keys, 2)
    steal(r, keys, "gone-busy", 1)
    steal(r, keys, "live-busy", 1)
    removed = await rd.remove_gone_consumers(["live-idle", "live-busy"])
    assert sorted(removed) == ["gone-2", "gone-idle"]
    left = {c["name"].decode() for c in r.xinfo_consumers(key, GROUP)}
    assert left == {"me", "live-idle", "gone-busy", "live-busy"}
    assert len(pending(r, keys)) == 2
    assert await rd.remove_gone_consumers([]) == ["live-idle"]


# -- retention: trim only below what every group has acknowledged ----------------------------


async def two_groups(ar: aredis.Redis, keys: Keys) -> tuple[ShardReader, ShardReader]:
    a, b = await reader(ar, keys, "wa", group="a"), await reader(ar, keys, "wb", group="b")
    await a.ensure_group()
    await b.ensure_group()
    return a, b


async def test_trim_keeps_everything_from_the_lowest_pending_entry(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    a, b = await two_groups(ar, keys)
    ids = add(r, keys, 10)
    await a.ack(encoded(raw.id for raw in await drain(a)))  # group a has everything
    assert [raw.id for raw in await raws(b, 6)] == ids[:6]
    await b.ack(encoded([ids[0], ids[2], ids[3]]))  # b: 1, 4, 5 pending; 6..9 never delivered
    assert await a.trim() == 1
    assert ids_in(r, keys) == ids[1:]
    assert await b.trim() == 0  # the same floor from any group's reader
    assert await trim_floor(ar, shard(keys)) == parse_id(ids[1])


async def test_trim_floor_when_the_pending_entries_are_acknowledged_meanwhile(
    ar: aredis.Redis, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XINFO GROUPS says pending, XPENDING (a moment later) says none: no crash, a safe floor."""
    a, b = await two_groups(ar, keys)
    ids = add(r, keys, 4)
    await a.ack(encoded(raw.id for raw in await drain(a)))
    await raws(b, 2)  # b: 0 and 1 pending
    real = ar.xpending

    async def acknowledged_meanwhile(name: Any, group: Any) -> Any:
        await b.ack(encoded(ids[:2]))
        return await real(name, group)

    monkeypatch.setattr(ar, "xpending", acknowledged_meanwhile)
    ms, seq = parse_id(ids[1])
    assert await trim_floor(ar, shard(keys)) == (ms, seq + 1)


async def test_trim_keeps_what_a_group_has_not_been_delivered(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    a, b = await two_groups(ar, keys)
    ids = add(r, keys, 10)
    await a.ack(encoded(raw.id for raw in await drain(a)))
    await b.ack(encoded(raw.id for raw in await raws(b, 6)))  # nothing pending, 6..9 unread
    ms, seq = parse_id(ids[5])
    assert await trim_floor(ar, shard(keys)) == (ms, seq + 1)
    assert await b.trim() == 6
    assert ids_in(r, keys) == ids[6:]

    await b.ack(encoded(raw.id for raw in await drain(b)))  # b catches up
    assert await b.trim() == 4
    assert r.xlen(shard(keys)) == 0
    assert await b.trim() == 0
    more = add(r, keys, 2, start=10)
    assert await a.trim() == 0  # new entries nobody has read
    assert ids_in(r, keys) == more


async def test_trim_keeps_what_the_faster_group_still_holds(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    a, b = await two_groups(ar, keys)
    ids = add(r, keys, 10)
    await a.ack(encoded(raw.id for raw in await drain(a) if raw.id != ids[8]))
    await b.ack(encoded(raw.id for raw in await drain(b)))
    assert await a.trim() == 8
    assert ids_in(r, keys) == ids[8:]


async def test_a_shard_without_groups_is_never_trimmed(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    rd = await reader(ar, keys)
    assert await rd.trim() == 0  # no stream at all
    assert r.exists(shard(keys)) == 0
    ids = add(r, keys, 3)
    assert await trim_floor(ar, shard(keys)) is None
    assert await rd.trim() == 0
    assert await rd.trim(retention_ms=1) == 0
    assert ids_in(r, keys) == ids


async def test_a_group_that_never_read_keeps_everything(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    a, _ = await two_groups(ar, keys)
    ids = add(r, keys, 4)
    await a.ack(encoded(raw.id for raw in await drain(a)))
    assert await trim_floor(ar, shard(keys)) == (0, 1)
    assert await a.trim() == 0
    assert ids_in(r, keys) == ids


async def test_retention_keeps_young_entries_acknowledged_by_all(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    a, b = await two_groups(ar, keys)
    ids = add(r, keys, 3)
    for rd in (a, b):
        await rd.ack(encoded(raw.id for raw in await drain(rd)))
    assert await a.trim(retention_ms=3_600_000) == 0
    assert await a.trim(retention_ms=10**15) == 0  # longer than the epoch: keep everything
    assert ids_in(r, keys) == ids
    assert await a.trim(retention_ms=0) == 3
    assert r.xlen(shard(keys)) == 0


async def test_retention_trims_old_entries_and_keeps_young_ones(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    a, b = await two_groups(ar, keys)
    seconds, micros = r.time()
    old_ms = seconds * 1000 + micros // 1000 - 600_000  # ten minutes ago
    old = [xadd(r, shard(keys), {b"n": b"old"}, f"{old_ms}-{i}") for i in range(3)]
    young = add(r, keys, 2)
    await a.ack(encoded(raw.id for raw in await drain(a)))
    assert [raw.id for raw in await raws(b, 2)] == old[:2]
    await b.ack(encoded(old[:1]))  # b still holds old[1]: the group floor is below the retention
    assert await a.trim(retention_ms=60_000) == 1
    assert ids_in(r, keys) == old[1:] + young
    await b.ack(encoded([raw.id for raw in await drain(b)] + [old[1]]))
    assert await a.trim(retention_ms=60_000) == 2  # the young ones stay for a minute
    assert ids_in(r, keys) == young


# --- the lease fence ------------------------------------------------------------------------


async def fenced_reader(ar: aredis.Redis, keys: Keys, worker: str) -> ShardReader:
    fenced = ShardReader(ar, keys, STREAM, 0, GROUP, worker)
    await fenced.ensure_group()
    return fenced


async def test_a_fenced_reader_reads_and_claims_only_while_it_holds_the_lease(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    """A worker paused past its lease must not take entries meant for the next owner."""
    ids = add(r, keys, 6)
    lease = keys.lease(STREAM, 0, GROUP)
    r.set(lease, "w1")
    old = await fenced_reader(ar, keys, "w1")
    assert [raw.id for raw in await raws(old, 2)] == ids[:2]
    r.set(lease, "w2")  # w1's lease expired; w2 took the shard
    new = await fenced_reader(ar, keys, "w2")
    with pytest.raises(Fenced):
        await old.next(2, 0)
    assert [raw.id for raw in await raws(new, 10)] == ids[:2]  # claimed from w1
    assert [raw.id for raw in await raws(new, 10)] == ids[2:]  # and every new one
    old.recover()
    with pytest.raises(Fenced):  # nor may the old owner claim them back
        await old.next(2, 0)
    pending = r.xpending(shard(keys), GROUP)
    assert pending["consumers"] == [{"name": b"w2", "pending": 6}]


async def test_a_fenced_read_waits_for_new_entries_and_wakes_on_them(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    r.set(keys.lease(STREAM, 0, GROUP), "w1")
    add(r, keys, 1)
    fenced = await fenced_reader(ar, keys, "w1")
    await raws(fenced, 10)
    started = time.monotonic()
    assert await raws(fenced, 10, 200) == []
    assert time.monotonic() - started >= 0.15  # it blocked, it did not spin
    later = asyncio.get_running_loop().call_later(0.1, lambda: add(r, keys, 1))
    got = await raws(fenced, 10, 5000)
    later.cancel()
    assert len(got) == 1 and got[0].fields


@pytest.mark.parametrize("meanwhile", ["renewed", "taken"])
async def test_a_lease_changed_between_its_check_and_the_read_is_checked_again(
    ar: aredis.Redis, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """The read runs in MULTI/EXEC under WATCH of the lease: a change after the check
    voids it. Renewed by its owner: checked again and read; taken over: nothing read."""
    ids = add(r, keys, 3)
    lease = keys.lease(STREAM, 0, GROUP)
    r.set(lease, "w1", px=10_000)
    rd = await fenced_reader(ar, keys, "w1")
    multi: Any = aredis.client.Pipeline.multi
    changes: list[str] = []

    def changed_then_multi(pipe: Any) -> None:
        if not changes:  # once, between the check (GET) and MULTI ... EXEC
            changes.append(meanwhile)
            if meanwhile == "renewed":
                r.pexpire(lease, 10_000)
            else:
                r.set(lease, "w2", px=10_000)
        multi(pipe)

    monkeypatch.setattr(aredis.client.Pipeline, "multi", changed_then_multi)
    if meanwhile == "renewed":
        assert [raw.id for raw in await raws(rd, 10)] == ids
        assert pending(r, keys) == dict.fromkeys(ids, "w1")
    else:
        with pytest.raises(Fenced):
            await rd.next(10, 0)
        assert pending(r, keys) == {}, "read after the lease was taken over"
    assert changes == [meanwhile]


# --- the epoch fence: a new ownership by the same worker ------------------------------------


def pending_rows(r: redis.Redis, keys: Keys) -> list[tuple[str, str, int]]:
    """(entry ID, consumer, times delivered) of every pending entry: a claim would show."""
    rows: Any = r.xpending_range(shard(keys), GROUP, min="-", max="+", count=100_000)
    return [
        (row["message_id"].decode(), row["consumer"].decode(), int(row["times_delivered"]))
        for row in rows
    ]


async def test_a_reader_of_an_earlier_epoch_of_the_same_worker_is_fenced_everywhere(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    """The same worker takes the shard again (its task cancelled and restarted): the lease
    key still names it, but the epoch moved. Whatever the old task holds can neither
    acknowledge, dead-letter, read nor claim; nothing in Redis changes when it tries."""
    w1 = Leases(ar, keys, STREAM, GROUP, "w1", 10_000)
    first = await w1.acquire(0)
    assert first is not None and first.epoch == 1
    old = ShardReader(ar, keys, STREAM, 0, GROUP, "w1", first.epoch)
    await old.ensure_group()
    ids = add(r, keys, 4)
    held = await raws(old, 2)
    assert [raw.id for raw in held] == ids[:2]

    again = await w1.acquire(0)
    assert again is not None and again.epoch == 2
    assert r.get(keys.lease(STREAM, 0, GROUP)) == b"w1"  # the owner's name did not change
    before = pending_rows(r, keys)
    assert before == [(ids[0], "w1", 1), (ids[1], "w1", 1)]

    with pytest.raises(Fenced):
        await old.ack(encoded(ids[:2]), ids[1])
    with pytest.raises(Fenced):  # the watermark alone is fenced too
        await old.ack([], ids[1])
    with pytest.raises(Fenced):
        await old.dead_letter(held[0], "refused by a sink")
    with pytest.raises(Fenced):  # read path: new entries stay with the group
        await old.next(10, 0)
    old.recover()
    with pytest.raises(Fenced):  # claim path
        await old.next(10, 0)
    late = ShardReader(ar, keys, STREAM, 0, GROUP, "w1", first.epoch)  # a task made late
    with pytest.raises(Fenced):
        await late.next(10, 0)

    assert pending_rows(r, keys) == before, "a fenced call acknowledged or claimed entries"
    assert r.exists(keys.dead(STREAM, 0, GROUP)) == 0, "a fenced call dead-lettered"
    assert r.exists(keys.applied(STREAM, 0, GROUP)) == 0, "a fenced call moved the watermark"
    group = next(g for g in r.xinfo_groups(shard(keys)) if g["name"] == GROUP.encode())
    assert group["last-delivered-id"].decode() == ids[1], "a fenced read delivered entries"

    # The reader of the current epoch does all of it.
    new = ShardReader(ar, keys, STREAM, 0, GROUP, "w1", again.epoch)
    claimed = await raws(new, 10)
    assert [(raw.id, raw.deliveries) for raw in claimed] == [(ids[0], 2), (ids[1], 2)]
    assert [raw.id for raw in await raws(new, 10)] == ids[2:]
    await new.dead_letter(claimed[0], "refused by a sink")
    assert await new.ack(encoded(ids[1:]), ids[-1]) == 3
    assert pending_rows(r, keys) == []
    (_, letter), *_ = xrange(r, keys.dead(STREAM, 0, GROUP))
    assert letter[b"entry"] == ids[0].encode() and letter[b"deliveries"] == b"2"
    assert r.get(keys.applied(STREAM, 0, GROUP)) == ids[-1].encode()


async def test_a_reader_of_an_earlier_epoch_cannot_touch_what_another_worker_took_over(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    """Worker w1's lease expired while it was paused; w2 took the shard (epoch 2), and then
    w1's name is written back by no one: w1 is fenced by the owner check and the epoch."""
    w1 = Leases(ar, keys, STREAM, GROUP, "w1", 300)
    first = await w1.acquire(0)
    assert first is not None
    old = ShardReader(ar, keys, STREAM, 0, GROUP, "w1", first.epoch)
    await old.ensure_group()
    ids = add(r, keys, 3)
    held = await raws(old, 10)
    await asyncio.sleep(0.4)  # w1's lease expires
    taken = await Leases(ar, keys, STREAM, GROUP, "w2", 10_000).acquire(0)
    assert taken is not None and taken.epoch == 2
    before = pending_rows(r, keys)

    for attempt in (
        old.ack(encoded(ids)),
        old.dead_letter(held[-1], "refused"),
        old.next(10, 0),
    ):
        with pytest.raises(Fenced):
            await attempt
    assert pending_rows(r, keys) == before
    assert r.exists(keys.dead(STREAM, 0, GROUP)) == 0

    # Even with the owner's name put back (a stale SET), the epoch still fences w1.
    r.set(keys.lease(STREAM, 0, GROUP), "w1")
    with pytest.raises(Fenced):
        await old.ack(encoded(ids))
    with pytest.raises(Fenced):
        await old.dead_letter(held[-1], "refused")
    assert pending_rows(r, keys) == before
    assert r.exists(keys.dead(STREAM, 0, GROUP)) == 0


async def test_a_connection_lost_under_watch_is_transient_not_a_crash(
    ar: aredis.Redis, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py turns a connection lost after WATCH into a WatchError; the read must raise a
    ConnectionError (the shard retries it) instead, and read everything afterwards."""
    ids = add(r, keys, 3)
    rd = await reader(ar, keys)
    await rd.ensure_group()
    watch: Any = aredis.client.Pipeline.watch
    killed: list[str] = []

    async def watch_then_lose_the_connection(pipe: Any, *names: Any) -> Any:
        result = await watch(pipe, *names)
        if not killed:  # once: the server drops this connection before the GET
            host, port = pipe.connection._writer.get_extra_info("sockname")[:2]
            killed.append(f"{host}:{port}")
            r.client_kill_filter(addr=killed[0])
        return result

    monkeypatch.setattr(aredis.client.Pipeline, "watch", watch_then_lose_the_connection)
    with pytest.raises(redis.ConnectionError):
        await rd.next(10, 0)
    rd.recover()
    assert [raw.id for raw in await raws(rd, 10)] == ids


async def test_a_read_whose_exec_reply_was_lost_is_claimed_back(
    ar: aredis.Redis, r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EXEC ran (the entries are delivered to us) but its reply was lost: redis-py says
    WatchError; retrying the read would pass those entries for good, so it must raise a
    ConnectionError, after which `recover` claims them back."""
    ids = add(r, keys, 3)
    rd = await reader(ar, keys)
    await rd.ensure_group()
    transaction: Any = aredis.client.Pipeline._execute_transaction
    lost: list[bool] = []

    async def reply_lost(pipe: Any, *args: Any, **options: Any) -> Any:
        result = await transaction(pipe, *args, **options)
        if not lost:  # once: EXEC ran, then its reply was lost (still WATCHing, as then)
            lost.append(True)
            pipe.watching = True
            raise redis.ConnectionError("Connection closed by server.")
        return result

    monkeypatch.setattr(aredis.client.Pipeline, "_execute_transaction", reply_lost)
    with pytest.raises(redis.ConnectionError):
        await rd.next(10, 0)
    assert pending(r, keys) == dict.fromkeys(ids, "w1"), "delivered, reply lost"
    rd.recover()
    assert [raw.id for raw in await raws(rd, 10)] == ids
