"""Wait until applied with a real worker writing to PostgreSQL: once `publish(wait=True)`
returns, a query sees the row. Needs the worker to set `Keys.applied` in its fenced
acknowledgement (the watermark `wait_applied` reads)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import redis
import redis.asyncio as aredis
from psycopg2.extensions import connection as Connection

from streamsink.errors import NotYetApplied
from streamsink.schemas import Config, Event, GroupSpec, SinkSpec, StreamSpec
from streamsink.sinks.postgres import PostgresSink
from streamsink.streams import AsyncProducer, Keys, Producer, create_stream
from tests.consumers.test_worker import FAST, ITEMS, running
from tests.sinks.conftest import create, schema_of

SHARDS = 4


def setup(r: redis.Redis, keys: Keys, pg: Connection) -> Config:
    table = dataclasses.replace(ITEMS, schema=schema_of(pg))
    create(pg, table)
    create_stream(r, keys, "items", SHARDS)
    return Config(
        prefix=keys.prefix,
        streams={"items": StreamSpec("items", SHARDS, table="items")},
        tables={"items": table},
        groups={"g": GroupSpec("g", "items", ("pg",), FAST)},
        sinks={"pg": SinkSpec("pg", "postgres")},
    )


def seq_of(pg: Connection, config: Config, key: str) -> int | None:
    with pg.cursor() as cur:
        cur.execute(f'SELECT seq FROM "{schema_of(pg)}".items WHERE id = %s', (key,))
        row = cur.fetchone()
    return None if row is None else int(row[0])


async def test_a_row_is_in_postgresql_when_publish_wait_returns(
    r: redis.Redis, ar: aredis.Redis, keys: Keys, pg: Connection, sink: PostgresSink, redis_url: str
) -> None:
    config = setup(r, keys, pg)
    latencies: list[float] = []
    async with running(redis_url, config, {"pg": sink}), AsyncProducer(ar, config) as producer:
        for n in range(100):
            key = f"k{n % 7}"
            started = time.perf_counter()
            event = Event.make(key, "set", {"id": key, "seq": n})
            await producer.publish("items", event, wait=True, timeout=10)
            latencies.append(time.perf_counter() - started)
            assert seq_of(pg, config, key) == n, f"publish {n} returned before its commit"
        sync = Producer(r, config)  # the sync producer, from a thread beside the worker
        event = Event.make("sync", "set", {"id": "sync", "seq": 1})
        await asyncio.to_thread(sync.publish, "items", event, wait=True, timeout=10)
        assert seq_of(pg, config, "sync") == 1
    latencies.sort()
    print(f"\nwait=True: p50 {1000 * latencies[50]:.1f} ms, p99 {1000 * latencies[98]:.1f} ms")


async def test_with_the_workers_stopped_the_wait_times_out_published(
    r: redis.Redis, keys: Keys, pg: Connection
) -> None:
    config = setup(r, keys, pg)
    r.xgroup_create(keys.shard("items", 0), "g", id="0", mkstream=True)
    producer = Producer(r, config)
    started = time.monotonic()
    with pytest.raises(NotYetApplied, match="published but not yet applied"):
        producer.publish(
            "items", Event.make("x", "set", {"id": "x", "seq": 1}), wait=True, timeout=0.3
        )
    assert 0.3 <= time.monotonic() - started < 3.0
    assert sum(r.xlen(keys.shard("items", s)) for s in range(SHARDS)) == 1
