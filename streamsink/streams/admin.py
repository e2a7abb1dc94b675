"""Creating streams and reading their state in Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from streamsink.errors import ShardCountMismatch, StreamNotFound
from streamsink.schemas.config import MAX_SHARDS, NAME
from streamsink.streams.keys import META_CREATED, META_SHARDS, Keys


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream as Redis holds it: shard count and the length of each shard."""

    name: str
    shards: int
    lengths: tuple[int, ...]

    @property
    def length(self) -> int:
        """Entries held in all shards."""
        return sum(self.lengths)


def create_stream(client: redis.Redis, keys: Keys, name: str, shards: int) -> bool:
    """Record `name` with `shards` shards; True if created, False if it already was.

    Re-creating with the same count is a no-op; with another count it is an error,
    because every key would move to another shard and lose its order.
    """
    if not NAME.match(name):
        raise ValueError(f"stream name {name!r} must match {NAME.pattern}")
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {shards}")
    pipe = client.pipeline(transaction=True)
    pipe.hsetnx(keys.meta(name), META_SHARDS, shards)
    pipe.hsetnx(keys.meta(name), META_CREATED, int(time.time() * 1000))
    pipe.hget(keys.meta(name), META_SHARDS)
    pipe.sadd(keys.index(), name)
    created, _, recorded, _ = pipe.execute()
    if int(recorded) != shards:
        raise ShardCountMismatch(
            f"stream {name!r} already exists with {int(recorded)} shards, not {shards}"
        )
    return bool(created)


def shard_count(client: redis.Redis, keys: Keys, name: str) -> int:
    """The shard count recorded for `name`; StreamNotFound if it was never created."""
    recorded = client.hget(keys.meta(name), META_SHARDS)
    if recorded is None:
        raise StreamNotFound(f"stream {name!r} does not exist under prefix {keys.prefix!r}")
    return int(recorded)


def list_streams(client: redis.Redis, keys: Keys) -> list[str]:
    """Names of every stream created under the prefix, sorted."""
    return sorted(n.decode() if isinstance(n, bytes) else n for n in client.smembers(keys.index()))


def stream_info(client: redis.Redis, keys: Keys, name: str) -> StreamInfo:
    """Shard count and per-shard lengths of `name`."""
    shards = shard_count(client, keys, name)
    pipe = client.pipeline(transaction=False)
    for shard in range(shards):
        pipe.xlen(keys.shard(name, shard))
    return StreamInfo(name, shards, tuple(int(n) for n in pipe.execute()))


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One shard as one group sees it: backlog, pending, owner, epoch, dead letters."""

    shard: int
    length: int
    lag: int | None
    pending: int
    owner: str | None
    epoch: int
    dead: int


def group_status(client: redis.Redis, keys: Keys, stream: str, group: str) -> list[ShardStatus]:
    """Every shard of `stream` for `group` (lag is None where Redis cannot tell it)."""
    rows = []
    for shard in range(shard_count(client, keys, stream)):
        key = keys.shard(stream, shard)
        pipe = client.pipeline(transaction=False)
        pipe.xlen(key)
        pipe.get(keys.lease(stream, shard, group))
        pipe.get(keys.epoch(stream, shard, group))
        pipe.xlen(keys.dead(stream, shard, group))
        length, owner, epoch, dead = pipe.execute()
        lag, pending = None, 0
        if length or client.exists(key):
            info: Any = client.xinfo_groups(key)
            for entry in info:
                if _text(entry["name"]) == group:
                    pending = int(entry["pending"])
                    lag = None if entry.get("lag") is None else int(entry["lag"])
        rows.append(
            ShardStatus(
                shard,
                int(length),
                lag,
                pending,
                _text(owner) if owner else None,
                int(epoch or 0),
                int(dead),
            )
        )
    return rows


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
