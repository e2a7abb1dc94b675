"""Shared pieces of the producer tests: a `tasks` table and stream, and Redis probes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from streamsink.schemas import Column, ColumnType, Config, Event, StreamSpec, Table, shard_of
from streamsink.streams import Keys, create_stream
from tests.conftest import RedisServer

SHARDS = 4

TASKS = Table(
    name="tasks",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "status": Column(ColumnType.TEXT),
        "progress": Column(ColumnType.INT),
    },
)


def make_config(keys: Keys, shards: int = SHARDS, **streams: int) -> Config:
    """A config under the test's prefix: `tasks` (and any `name=shards`) into table tasks."""
    specs = {"tasks": StreamSpec("tasks", shards, table="tasks")}
    specs.update({name: StreamSpec(name, n, table="tasks") for name, n in streams.items()})
    return Config(prefix=keys.prefix, streams=specs, tables={"tasks": TASKS})


def task(n: int, key: str | None = None, **extra: Any) -> Event:
    """A valid `set` of task `n` (key `task-<n>` unless given)."""
    return Event.make(key or f"task-{n}", "set", {"id": n, "status": "running"}, **extra)


def lengths(client: redis.Redis, keys: Keys, stream: str, shards: int = SHARDS) -> list[int]:
    """XLEN of every shard of `stream` (0 for a shard that does not exist)."""
    return [int(client.xlen(keys.shard(stream, shard))) for shard in range(shards)]


def entries(client: redis.Redis, keys: Keys, stream: str, shard: int) -> list[tuple[str, Any]]:
    """(entry ID, fields) of one shard, oldest first."""
    return [(i.decode(), fields) for i, fields in client.xrange(keys.shard(stream, shard))]


def data_of(client: redis.Redis, keys: Keys, stream: str, key: str) -> list[bytes]:
    """The data of every entry of `key` on its shard of `stream`, oldest first."""
    on_shard = entries(client, keys, stream, shard_of(key, SHARDS))
    return [fields[b"data"] for _, fields in on_shard if fields[b"key"] == key.encode()]


def flat(fields: dict[bytes, bytes]) -> list[bytes]:
    """Entry fields as the flat [name, value, ...] list that `wire.encode` returns."""
    return [item for pair in fields.items() for item in pair]


def eval_calls(client: redis.Redis) -> int:
    """Script calls (EVAL or EVALSHA) the server has run: one per shard per producer round
    trip (and one more per shard whose EVALSHA Redis refused with NOSCRIPT)."""
    return command_calls(client, "eval") + command_calls(client, "evalsha")


def command_calls(client: redis.Redis, command: str) -> int:
    """How many times the server has run `command` (scripts' inner calls included)."""
    stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


@pytest.fixture
def config(keys: Keys) -> Config:
    return make_config(keys)


@pytest.fixture
def tasks_stream(r: redis.Redis, keys: Keys) -> str:
    """The `tasks` stream created in the shared Redis with SHARDS shards."""
    create_stream(r, keys, "tasks", SHARDS)
    return "tasks"


@pytest.fixture
def own(redis_server: RedisServer, keys: Keys) -> Iterator[redis.Redis]:
    """A sync client of a throwaway server (own command stats), `tasks` created on it."""
    client = redis.Redis.from_url(redis_server.url)
    create_stream(client, keys, "tasks", SHARDS)
    yield client
    client.close()


@pytest.fixture
async def aown(redis_server: RedisServer, own: redis.Redis) -> AsyncIterator[aredis.Redis]:
    """An asyncio client of the same throwaway server."""
    client = aredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()
