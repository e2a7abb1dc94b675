"""The read model against PostgreSQL: after a random workload of set / incr / del drains
through a real worker, every key's hash equals its row; TTLs follow the status rule; a
miss falls back to PostgreSQL and repopulates."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from datetime import datetime
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2.extensions import connection as Connection

from streamsink.errors import ConfigError, ValidationError
from streamsink.schemas import (
    Column,
    ColumnType,
    Config,
    Event,
    GroupSpec,
    Policy,
    SinkSpec,
    StreamSpec,
    Table,
    shard_of,
)
from streamsink.schemas.config import from_dict
from streamsink.schemas.readmodel import ReadModel
from streamsink.sinks.postgres import Pool, PostgresRows, PostgresSettings, PostgresSink
from streamsink.streams import Keys, Producer, Rows, create_stream
from tests.consumers.test_worker import FAST, running
from tests.sinks.conftest import create, schema_of

SHARDS = 3
JOBS = Table(
    name="jobs",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "status": Column(ColumnType.TEXT),
        "n": Column(ColumnType.INT, Policy.SUM),
        "hits": Column(ColumnType.INT),
        "ratio": Column(ColumnType.FLOAT),
        "hi": Column(ColumnType.INT, Policy.MAX),
        "lo": Column(ColumnType.TEXT, Policy.MIN),
        "at": Column(ColumnType.TIMESTAMP, Policy.MAX),
    },
)
MODEL = ReadModel(ttl_by="status", ttl={"processing": 300, "success": 86400}, default=3600)


def jobs_config(keys: Keys, pg: Connection) -> Config:
    table = dataclasses.replace(JOBS, schema=schema_of(pg))
    return Config(
        prefix=keys.prefix,
        streams={"jobs": StreamSpec("jobs", SHARDS, table="jobs")},
        tables={"jobs": table},
        groups={"g": GroupSpec("g", "jobs", ("pg",), FAST)},
        sinks={"pg": SinkSpec("pg", "postgres")},
        read_models={"jobs": MODEL},
    )


class WorkerThread:
    """A worker running in a thread of its own (hypothesis tests are synchronous)."""

    def __init__(self, redis_url: str, config: Config, sink: PostgresSink) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=asyncio.run, args=(self._run(redis_url, config, sink),)
        )

    async def _run(self, redis_url: str, config: Config, sink: PostgresSink) -> None:
        async with running(redis_url, config, {"pg": sink}):
            await asyncio.to_thread(self.stop.wait)

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def drained(r: redis.Redis, keys: Keys) -> bool:
    """Group g has acknowledged (so committed) every entry of every shard."""
    for shard in range(SHARDS):
        if not r.exists(keys.shard("jobs", shard)):
            continue  # nothing published to it
        groups = r.xinfo_groups(keys.shard("jobs", shard))
        if not groups or any(g["lag"] or g["pending"] for g in groups):
            return False
    return True


def wait_drained(r: redis.Redis, keys: Keys, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not drained(r, keys):
        assert time.monotonic() < deadline, "the worker did not drain the stream"
        time.sleep(0.02)


def pg_rows(pg: Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    names = list(JOBS.columns)
    with pg.cursor() as cur:
        cur.execute(
            f'SELECT {", ".join(names)} FROM "{schema_of(pg)}".jobs WHERE id = ANY(%s)', (ids,)
        )
        return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def same(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A row in one spelling: timestamps as instants, numbers as floats or ints."""
    if row is None:
        return None
    out = dict(row)
    if isinstance(out["at"], str):
        out["at"] = datetime.fromisoformat(out["at"])
    if out["ratio"] is not None:
        out["ratio"] = float(out["ratio"])
    return out


OFFSETS = ["+00:00", "+02:00", "-05:30"]
timestamps = st.builds(
    lambda day, hour, offset: f"2024-03-{day:02d}T{hour:02d}:00:00{offset}",
    st.integers(1, 28),
    st.integers(0, 23),
    st.sampled_from(OFFSETS),
)
set_fields = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["processing", "success", "failed", None]),
        "n": st.integers(-1000, 1000),
        "hits": st.one_of(st.none(), st.integers(-(2**40), 2**40)),
        "ratio": st.one_of(st.none(), st.integers(-100, 100).map(lambda i: i / 4)),
        "hi": st.integers(-(2**62), 2**62),
        "lo": st.text(alphabet="aAbZé中🎉 ", min_size=0, max_size=4),
        "at": timestamps,
    },
)
incr_fields = st.fixed_dictionaries(
    {},
    optional={
        "n": st.integers(-1000, 1000),
        "hits": st.integers(-1000, 1000),
        "ratio": st.integers(-100, 100).map(lambda i: i / 4),
    },
).filter(bool)  # an incr names a column
ops = st.one_of(
    st.tuples(st.just("set"), set_fields),
    st.tuples(st.just("incr"), incr_fields),
    st.tuples(st.just("del"), st.just({})),
)
workloads = st.lists(st.tuples(st.integers(0, 5), ops), min_size=1, max_size=40)

_examples = itertools.count()


@pytest.fixture
def setup(r: redis.Redis, keys: Keys, pg: Connection) -> Config:
    config = jobs_config(keys, pg)
    create(pg, config.tables["jobs"])
    create_stream(r, keys, "jobs", SHARDS)
    return config


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(workload=workloads)
def test_after_a_drain_every_hash_equals_its_row_and_ttls_follow_the_status(
    r: redis.Redis,
    keys: Keys,
    pg: Connection,
    sink: PostgresSink,
    redis_url: str,
    setup: Config,
    workload: list[tuple[int, tuple[str, dict[str, Any]]]],
) -> None:
    config = setup
    base = 100 * next(_examples)  # each example its own rows
    producer = Producer(r, config)
    events = [Event.make(str(base + k), op, {"id": base + k, **data}) for k, (op, data) in workload]
    with WorkerThread(redis_url, config, sink):
        producer.publish_many("jobs", events)
        wait_drained(r, keys)
    ids = sorted({base + k for k, _ in workload})
    stored = pg_rows(pg, ids)
    rows = Rows(r, config)  # no fallback: what the hashes hold
    for key, row in zip(ids, rows.read_many("jobs", ids), strict=True):
        assert same(row) == same(stored.get(key)), f"key {key}"
        name = Keys(config.prefix).row("jobs", _shard(key), "jobs", str(key))
        status = None if row is None else row["status"]
        ttl = int(r.pttl(name))
        assert MODEL.ttl_ms(status) - 60_000 < ttl <= MODEL.ttl_ms(status), (key, status, ttl)


def _shard(key: int) -> int:
    return shard_of(str(key), SHARDS)


def test_a_miss_falls_back_to_postgresql_and_repopulates(
    r: redis.Redis,
    keys: Keys,
    pg: Connection,
    sink: PostgresSink,
    redis_url: str,
    setup: Config,
    sink_settings: PostgresSettings,
) -> None:
    config = setup
    producer = Producer(r, config)
    producer.publish_many(
        "jobs",
        [
            Event.make("1", "set", {"id": 1, "status": "success", "n": 5, "lo": "b"}),
            Event.make("1", "incr", {"id": 1, "n": 2}),
            Event.make(
                "2", "set", {"id": 2, "status": "processing", "at": "2024-01-01T10:00:00+02:00"}
            ),
        ],
    )
    with WorkerThread(redis_url, config, sink):
        wait_drained(r, keys)
    names = {k: Keys(config.prefix).row("jobs", _shard(k), "jobs", str(k)) for k in (1, 2, 3)}
    before = Rows(r, config).read_many("jobs", [1, 2])
    r.delete(names[1], names[2])  # as if they expired
    pool = Pool(sink_settings)
    rows = Rows(r, config, fallback=PostgresRows(pool))
    after = rows.read_many("jobs", [1, 2, 3])
    assert [same(x) for x in after[:2]] == [same(x) for x in before]
    assert after[0] is not None and after[0]["n"] == 7 and after[0]["lo"] == "b"
    assert after[2] is None and not r.exists(names[3])  # not in PostgreSQL: nothing cached
    assert 86_300_000 < r.pttl(names[1]) <= 86_400_000  # success
    assert 200_000 < r.pttl(names[2]) <= 300_000  # processing
    assert same(Rows(r, config).read("jobs", 1)) == same(after[0])  # from Redis now
    producer.publish("jobs", Event.make("1", "incr", {"id": 1, "n": 1}))
    r.delete(names[2])
    r.hset(names[2], mapping={"id": "2", "status": "success"})  # a publish since the miss
    assert rows.read("jobs", 2)["status"] == "success"  # type: ignore[index]
    assert rows.read("jobs", 1)["n"] == 8  # type: ignore[index]
    pool.close()


def test_config_of_a_read_model() -> None:
    raw = {
        "streams": {"tasks": {"shards": 2, "table": "tasks"}},
        "tables": {
            "tasks": {
                "key": ["id"],
                "columns": {"id": "int", "status": "text"},
                "read_model": True,
                "ttl_by": "status",
                "ttl": {"processing": 300, "success": 86400, "default": 3600},
            }
        },
    }
    config = from_dict(raw)
    assert config.read_models["tasks"] == ReadModel(
        "status", {"processing": 300, "success": 86400}, 3600
    )
    assert config.read_models["tasks"].ttl_ms("nope") == 3_600_000
    for change in ({"ttl_by": "missing"}, {"read_model": "yes"}, {"ttl": {"x": 0}}):
        bad = {**raw, "tables": {"tasks": {**raw["tables"]["tasks"], **change}}}
        with pytest.raises(ConfigError):
            from_dict(bad)
    plain = {**raw, "tables": {"tasks": {"key": ["id"], "columns": {"id": "int"}, "ttl": {}}}}
    with pytest.raises(ConfigError, match="read_model = true"):
        from_dict(plain)


def test_the_routing_key_must_be_the_rows_key(
    r: redis.Redis, keys: Keys, pg: Connection, setup: Config
) -> None:
    producer = Producer(r, setup)
    with pytest.raises(ValidationError, match="routing key"):
        producer.publish("jobs", Event.make("job-1", "set", {"id": 1}))


def test_a_repeated_idempotent_publish_changes_the_hash_once(
    r: redis.Redis, keys: Keys, pg: Connection, setup: Config
) -> None:
    producer = Producer(r, setup)
    for _ in range(3):
        producer.publish("jobs", Event.make("4", "incr", {"id": 4, "n": 5}, id="once"))
    assert Rows(r, setup).read("jobs", 4)["n"] == 5  # type: ignore[index]


def test_a_lone_del_leaves_a_tombstone_and_a_set_re_creates(
    r: redis.Redis, keys: Keys, pg: Connection, setup: Config
) -> None:
    producer = Producer(r, setup)
    producer.publish("jobs", Event.make("5", "set", {"id": 5, "status": "success", "n": 3}))
    producer.publish("jobs", Event.make("5", "del", {"id": 5}))  # one event: its own command
    name = Keys(setup.prefix).row("jobs", _shard(5), "jobs", "5")
    assert r.hgetall(name) == {b"~del": b"1"} and 0 < r.pttl(name) <= 3_600_000
    assert Rows(r, setup).read("jobs", 5) is None
    producer.publish("jobs", Event.make("5", "incr", {"id": 5, "n": 2}))
    assert Rows(r, setup).read("jobs", 5) == {**dict.fromkeys(JOBS.columns), "id": 5, "n": 2}


def test_a_sum_the_hash_cannot_hold_drops_the_hash_and_publishes_every_event(
    r: redis.Redis, keys: Keys, pg: Connection, setup: Config
) -> None:
    """An incr past 64 bits (the sink refuses it too) or a float sum past the largest
    double: the script's HINCRBY fails; the whole call's events are still published, and
    that key's hash is dropped (a read falls back to PostgreSQL), not left half-changed."""
    producer = Producer(r, setup)
    shard = _shard(6)
    before = r.xlen(keys.shard("jobs", shard))
    events = [
        Event.make("6", "set", {"id": 6, "status": "processing", "n": 2**63 - 2}),
        Event.make("6", "incr", {"id": 6, "n": 5, "hits": 1}),  # past 2^63 - 1
        Event.make("6", "incr", {"id": 6, "ratio": 1.5e308}),
        Event.make("6", "incr", {"id": 6, "ratio": 1.5e308}),  # to infinity
    ]
    producer.publish_many("jobs", events[:2])
    assert r.xlen(keys.shard("jobs", shard)) == before + 2, "both published"
    name = Keys(setup.prefix).row("jobs", shard, "jobs", "6")
    assert not r.exists(name), "the hash is dropped, not left with the set but not the incr"
    producer.publish_many("jobs", events[2:])
    assert r.xlen(keys.shard("jobs", shard)) == before + 4
    assert not r.exists(name)
