"""A config of the ops tests (TOML, as an operator writes it), its tables, and a mix to publish."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import redis
from psycopg2 import sql

from streamsink.schemas import Config, Event, encode, load, shard_of
from streamsink.sinks.postgres.schema import create_tables
from streamsink.streams import Keys, Producer, create_stream

STREAM, GROUP, SHARDS = "tasks", "writer", 2
KEYS = 10  # rows the mix touches
PER_KEY = 30  # events per row: half set, half incr


@dataclass
class Setup:
    """One test's config file, its PostgreSQL schema and its Redis prefix."""

    path: Path
    config: Config
    keys: Keys
    schema: str


def toml(prefix: str, redis_url: str, dsn: str, schema: str, http: str = "") -> str:
    return f"""
[redis]
url = "{redis_url}"
prefix = "{prefix}"

[postgres]
dsn = "{dsn}"
{f'[worker]{chr(10)}http = "{http}"' if http else ""}

[tables.tasks]
schema = "{schema}"
key = ["id"]
columns = {{ id = "int", status = "text", views = {{ type = "int", policy = "sum" }} }}

[streams.{STREAM}]
shards = {SHARDS}
table = "tasks"

[sinks.db]
type = "postgres"
offsets_schema = "{schema}"
connect_timeout_s = 2

[groups.{GROUP}]
stream = "{STREAM}"
sinks = ["db"]
lease_ttl_ms = 1500
linger_ms = 200
max_age_ms = 1000
block_ms = 100
read_count = 1000
max_events = 1000
"""


@pytest.fixture
def setup(tmp_path: Path, keys: Keys, redis_url: str, database_url: str) -> Iterator[Setup]:
    """The config file, with its tables and offsets in a schema of the test's own."""
    schema = f"ops_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    path = tmp_path / "streamsink.toml"
    path.write_text(toml(keys.prefix, redis_url, database_url, schema))
    config = load(path)
    create_tables(conn, config, offsets_schema=schema)
    try:
        yield Setup(path, config, keys, schema)
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.close()


def publish_mix(client: redis.Redis, setup: Setup) -> int:
    """KEYS rows × PER_KEY events (set and incr), plus one entry the worker dead-letters
    (a column the table lacks). Returns the shard of the dead letter."""
    create_stream(client, setup.keys, STREAM, SHARDS)
    producer = Producer(client, setup.config)
    events = []
    for n in range(KEYS * PER_KEY):
        row = n % KEYS
        if n % 2:
            events.append(Event.make(f"task-{row}", "incr", {"id": row, "views": 1}))
        else:
            events.append(Event.make(f"task-{row}", "set", {"id": row, "status": f"s{n}"}))
    producer.publish_many(STREAM, events)
    bad = Event.make("task-bad", "set", {"id": 99, "colour": "red"})
    shard = shard_of("task-bad", SHARDS)
    fields = encode(bad)
    client.xadd(setup.keys.shard(STREAM, shard), dict(zip(fields[::2], fields[1::2], strict=True)))
    return shard


async def until(check: object, what: str, within: float = 20.0) -> None:
    """Poll the coroutine function `check` until it returns true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
