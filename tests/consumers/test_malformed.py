"""Random malformed raw entries between valid ones, at a running worker (issue 11).

Hypothesis draws a workload: valid set / incr / del events of a few keys, and between them
raw XADDs of entries no producer would write (fields missing, unknown ops, JSON that is
not an object, values of the wrong type, unknown columns, bad UTF-8, NaN, numbers beyond
int64, nesting deeper than COPY can write...). A worker with a real PostgreSQL sink drains
it. Every valid event must be applied exactly as a model that applies them one by one
says, every bad entry must be in the dead-letter stream with a reason, and every shard
must end at lag 0 and pending 0.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.consumers.worker import Worker, worker_client
from streamsink.schemas import Column, ColumnType, Config, Event, GroupSpec, SinkSpec, StreamSpec
from streamsink.schemas.table import Policy, Table
from streamsink.schemas.wire import encode, shard_of
from streamsink.sinks.postgres import Pool, PostgresSettings, PostgresSink
from streamsink.sinks.postgres.schema import OFFSETS, table_ddl
from streamsink.streams import Keys, create_stream
from streamsink.streams.admin import group_status
from tests.conftest import fresh_keys
from tests.consumers.test_worker import FAST
from tests.sinks.pgsetup import ensure_offsets

SHARDS = 2
KEYS = [f"k{n}" for n in range(6)]


assert shard_of("k4", SHARDS) != shard_of("k0", SHARDS)


def valid(key_index: int, op: str, n: int, name: str) -> Event:
    key = KEYS[key_index]
    if op == "set":
        return Event.make(key, "set", {"id": key, "n": n, "name": name})
    if op == "incr":
        return Event.make(key, "incr", {"id": key, "n": n})
    return Event.make(key, "del", {"id": key})


def deep(levels: int) -> bytes:
    return b'{"id": "k0", "doc": ' + b"[" * levels + b"]" * levels + b"}"


BAD: dict[str, list[bytes]] = {
    "no key": [b"op", b"set", b"data", b'{"id": "k0"}'],
    "no op": [b"key", b"k0", b"data", b'{"id": "k0"}'],
    "no data": [b"key", b"k0", b"op", b"set"],
    "unknown op": [b"key", b"k0", b"op", b"upsert", b"data", b'{"id": "k0"}'],
    "not json": [b"key", b"k0", b"op", b"set", b"data", b'{"id": "k0", "n": '],
    "an array": [b"key", b"k0", b"op", b"set", b"data", b"[1, 2]"],
    "wrong type": [b"key", b"k0", b"op", b"set", b"data", b'{"id": "k0", "n": "three"}'],
    "unknown column": [b"key", b"k0", b"op", b"set", b"data", b'{"id": "k0", "zz": 1}'],
    "bad utf-8": [b"key", b"k0", b"op", b"set", b"data", b'{"id": "k0", "name": "\xff"}'],
    "nan": [b"key", b"k0", b"op", b"set", b"data", b'{"id": "k0", "n": NaN}'],
    "beyond int64": [
        b"key",
        b"k0",
        b"op",
        b"incr",
        b"data",
        b'{"id": "k0", "n": 99999999999999999999}',
    ],
    "no key column": [b"key", b"k0", b"op", b"set", b"data", b'{"n": 1}'],
    "incr of text": [b"key", b"k0", b"op", b"incr", b"data", b'{"id": "k0", "name": "x"}'],
    "bad ts": [b"key", b"k0", b"op", b"set", b"data", b'{"id": "k0"}', b"ts", b"yesterday"],
    "deep json": [b"key", b"k0", b"op", b"set", b"data", deep(300)],
    "append to keyed": [b"key", b"k0", b"op", b"append", b"data", b'{"id": "k0"}'],
    "wrong shard": [b"key", b"k4", b"op", b"set", b"data", b'{"id": "k4", "n": 5}'],
    "call, no http sink": [
        b"key",
        b"k0",
        b"op",
        b"call",
        b"data",
        b'{"url": "https://x/h", "payload": 1}',
    ],
    "repeated field": [b"key", b"k0", b"op", b"set", b"data", b'{"id": "k0"}', b"data", b"{}"],
}
"""Each is XADDed to the shard of k0 (k4 is on the other one)."""

workloads = st.lists(
    st.one_of(
        st.tuples(
            st.just("valid"),
            st.integers(0, len(KEYS) - 1),
            st.sampled_from(["set", "set", "incr", "incr", "del"]),
            st.integers(-1000, 1000),
            st.text(st.characters(blacklist_characters="\x00"), max_size=8),
        ),
        st.tuples(st.just("bad"), st.sampled_from(sorted(BAD))),
    ),
    min_size=1,
    max_size=60,
)


def model(events: list[Event]) -> dict[str, tuple[int | None, str | None]]:
    """The rows, applying every event one by one: `n` is a sum column (a set or an incr
    adds to it), `name` last-write-wins; a del removes the row."""
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.op.value == "del":
            rows.pop(event.key, None)
            continue
        row = rows.setdefault(event.key, {"n": None, "name": None})
        row["n"] = (row["n"] or 0) + event.data["n"]
        if "name" in event.data:
            row["name"] = event.data["name"]
    return {key: (row["n"], row["name"]) for key, row in rows.items()}


@pytest.fixture
def pg(database_url: str) -> Iterator[Connection]:
    """An autocommit connection to the run's database."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def schema(pg: Connection) -> Iterator[str]:
    """A schema of the test's own, dropped at the end."""
    name = f"m_{uuid.uuid4().hex[:10]}"
    with pg.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with pg.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(workload=workloads)
def test_malformed_entries_are_dead_lettered_and_every_valid_event_applies_as_the_model(
    workload: list[tuple[Any, ...]],
    r: redis.Redis,
    redis_url: str,
    database_url: str,
    pg: Connection,
    schema: str,
) -> None:
    name = f"t{uuid.uuid4().hex[:8]}"
    table = Table(
        name,
        ("id",),
        {
            "id": Column(ColumnType.TEXT, nullable=False),
            "n": Column(ColumnType.INT, policy=Policy.SUM),
            "name": Column(ColumnType.TEXT),
            "doc": Column(ColumnType.JSON),
        },
        schema=schema,
    )
    keys = fresh_keys("m")
    config = Config(
        prefix=keys.prefix,
        streams={"s": StreamSpec("s", SHARDS, table=name)},
        tables={name: table},
        groups={"g": GroupSpec("g", "s", ("pg",), dict(FAST))},
        sinks={"pg": SinkSpec("pg", "postgres")},
    )
    with pg.cursor() as cur:
        cur.execute(table_ddl(table))
    ensure_offsets(pg, schema)
    # Each example is a new deployment (a new Redis prefix): the last one's offsets would
    # read as Redis having lost what PostgreSQL committed, and the worker would stop.
    with pg.cursor() as cur:
        cur.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(schema, OFFSETS)))
    create_stream(r, keys, "s", SHARDS)

    events: list[Event] = []
    bad: list[tuple[int, str, str]] = []  # (shard, entry ID, family)
    for step in workload:
        if step[0] == "valid":
            event = valid(*step[1:])
            events.append(event)
            r.xadd(keys.shard("s", shard_of(event.key, SHARDS)), dict(_pairs(encode(event))))
        else:
            fields = BAD[step[1]]
            entry_id = r.xadd(keys.shard("s", shard_of("k0", SHARDS)), dict(_pairs(fields)))
            bad.append((shard_of("k0", SHARDS), entry_id.decode(), step[1]))

    settings_ = PostgresSettings(database_url, pool_size=2, offsets_schema=schema)
    sink = PostgresSink(Pool(settings_), "pg", settings_)
    asyncio.run(_drain(redis_url, config, sink, keys))

    letters = {
        (shard, fields[b"entry"].decode()): fields[b"reason"].decode()
        for shard in range(SHARDS)
        for _, fields in r.xrange(keys.dead("s", shard, "g"))
    }
    assert set(letters) == {(shard, entry_id) for shard, entry_id, _ in bad}, letters
    assert all(reason for reason in letters.values())
    with pg.cursor() as cur:
        cur.execute(sql.SQL("SELECT id, n, name FROM {}").format(sql.Identifier(schema, name)))
        stored = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
    assert stored == model(events)
    for row in group_status(r, keys, "s", "g"):
        assert (row.lag, row.pending) == (0, 0), row


async def _drain(redis_url: str, config: Config, sink: PostgresSink, keys: Keys) -> None:
    client = worker_client(redis_url)
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(client, config, {"pg": sink}, "w1").run(stop))
    check = redis.Redis.from_url(redis_url)
    try:
        for _ in range(600):
            await asyncio.sleep(0.05)
            if task.done():
                task.result()
            if _drained(check, keys):
                break
        else:
            raise AssertionError("the worker did not drain within 30 s")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await sink.close()
        await client.aclose()
        check.close()


def _drained(client: redis.Redis, keys: Keys) -> bool:
    for shard in range(SHARDS):
        key = keys.shard("s", shard)
        if not client.exists(key):
            continue
        groups = client.xinfo_groups(key)
        if not groups:
            return False
        group = groups[0]
        last = client.xrevrange(key, count=1)
        newest = last[0][0] if last else b"0-0"
        if int(group["pending"]) or group["last-delivered-id"] != newest:
            return False
    return True


def _pairs(flat: list[bytes]) -> list[tuple[bytes, bytes]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


def test_a_sum_its_column_cannot_hold_is_dead_lettered_by_a_running_worker(
    r: redis.Redis, redis_url: str, database_url: str, pg: Connection, schema: str
) -> None:
    # Two float incr of 1.7e308 in one window stored Infinity (issue 11): the second is
    # dead-lettered, the first applied, and the shard drains.
    name = f"t{uuid.uuid4().hex[:8]}"
    table = Table(
        name,
        ("id",),
        {"id": Column(ColumnType.TEXT, nullable=False), "f": Column(ColumnType.FLOAT)},
        schema=schema,
    )
    keys = fresh_keys("m")
    config = Config(
        prefix=keys.prefix,
        streams={"s": StreamSpec("s", SHARDS, table=name)},
        tables={name: table},
        groups={"g": GroupSpec("g", "s", ("pg",), dict(FAST))},
        sinks={"pg": SinkSpec("pg", "postgres")},
    )
    with pg.cursor() as cur:
        cur.execute(table_ddl(table))
    ensure_offsets(pg, schema)
    create_stream(r, keys, "s", SHARDS)
    shard = keys.shard("s", shard_of("k0", SHARDS))
    big = Event.make("k0", "incr", {"id": "k0", "f": 1.7e308})
    added = [r.xadd(shard, dict(_pairs(encode(big)))).decode() for _ in range(2)]
    settings_ = PostgresSettings(database_url, pool_size=1, offsets_schema=schema)
    sink = PostgresSink(Pool(settings_), "pg", settings_)
    asyncio.run(_drain(redis_url, config, sink, keys))
    [(_, letter)] = r.xrange(keys.dead("s", shard_of("k0", SHARDS), "g"))
    assert letter[b"entry"].decode() == added[1]
    assert b"the sum overflows a float (double precision) to inf" in letter[b"reason"]
    with pg.cursor() as cur:
        cur.execute(sql.SQL("SELECT id, f FROM {}").format(sql.Identifier(schema, name)))
        assert cur.fetchall() == [("k0", 1.7e308)]
    for row in group_status(r, keys, "s", "g"):
        assert (row.lag, row.pending) == (0, 0), row
