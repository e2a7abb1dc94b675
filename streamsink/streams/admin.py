"""Creating streams and reading their state in Redis."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from streamsink.errors import ShardCountMismatch
from streamsink.schemas.config import MAX_SHARDS, NAME
from streamsink.schemas.wire import parse_id
from streamsink.streams.connection import SyncClient
from streamsink.streams.connection import shard_count as shard_count  # where callers had it
from streamsink.streams.keys import META_CREATED, META_SHARDS, Keys
from streamsink.streams.state import ShardState, shown_state


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


def create_stream(client: SyncClient, keys: Keys, name: str, shards: int) -> bool:
    """Record `name` with `shards` shards; True if created, False if it already was.

    Re-creating with the same count is a no-op; with another count it is an error,
    because every key would move to another shard and lose its order.
    """
    if not NAME.match(name):
        raise ValueError(f"stream name {name!r} must match {NAME.pattern}")
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {shards}")
    pipe = client.pipeline(transaction=True)  # one key: one slot, in a cluster too
    pipe.hsetnx(keys.meta(name), META_SHARDS, shards)
    pipe.hsetnx(keys.meta(name), META_CREATED, int(time.time() * 1000))
    pipe.hget(keys.meta(name), META_SHARDS)
    created, _, recorded = pipe.execute()
    client.sadd(keys.index(), name)  # another slot; after the meta, so a listed stream exists
    if int(recorded) != shards:
        raise ShardCountMismatch(
            f"stream {name!r} already exists with {int(recorded)} shards, not {shards}"
        )
    return bool(created)


def list_streams(client: SyncClient, keys: Keys) -> list[str]:
    """Names of every stream created under the prefix, sorted."""
    return sorted(n.decode() if isinstance(n, bytes) else n for n in client.smembers(keys.index()))


def stream_info(client: SyncClient, keys: Keys, name: str) -> StreamInfo:
    """Shard count and per-shard lengths of `name`."""
    shards = shard_count(client, keys, name)
    pipe = client.pipeline(transaction=False)
    for shard in range(shards):
        pipe.xlen(keys.shard(name, shard))
    return StreamInfo(name, shards, tuple(int(n) for n in pipe.execute()))


LAG_COUNT_LIMIT = 1000
"""Status counts at most this many entries per shard to find a lag; beyond, it says "≥"."""


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One shard as one group sees it: backlog, pending, owner, epoch, dead letters, state.

    `lag` counts the entries not yet delivered to the group (None: the group does not
    exist on the shard yet); with `lag_capped` it is a lower bound, the count having
    stopped there. `pending` were delivered but not acknowledged, so a shard is done
    only when `outstanding` is 0. `state` is the owner's run state (see ShardState),
    since `since_ms` (epoch ms, None when unknown) with the last `error`.
    """

    shard: int
    length: int
    lag: int | None
    pending: int
    owner: str | None
    epoch: int
    dead: int
    state: ShardState = ShardState.UNKNOWN
    since_ms: int | None = None
    error: str = ""
    lag_capped: bool = False

    @property
    def outstanding(self) -> int | None:
        """Entries the group has not acknowledged yet: lag + pending (None like lag)."""
        return None if self.lag is None else self.lag + self.pending


def group_status(
    client: SyncClient,
    keys: Keys,
    stream: str,
    group: str,
    count_limit: int = LAG_COUNT_LIMIT,
) -> list[ShardStatus]:
    """Every shard of `stream` for `group`: one pipeline for them all (on a cluster, redis-py
    splits it into one per master), plus a bounded count where a shard has a backlog."""
    shards = shard_count(client, keys, stream)
    pipe = client.pipeline(transaction=False)
    for shard in range(shards):
        key = keys.shard(stream, shard)
        pipe.xlen(key)
        pipe.get(keys.lease(stream, shard, group))
        pipe.get(keys.epoch(stream, shard, group))
        pipe.xlen(keys.dead(stream, shard, group))
        pipe.hgetall(keys.state(stream, shard, group))
        pipe.xinfo_stream(key)
        pipe.xinfo_groups(key)
    replies = pipe.execute(raise_on_error=False)
    rows = []
    for shard in range(shards):
        key = keys.shard(stream, shard)
        length, owner, epoch, dead, stored, info, groups = replies[7 * shard : 7 * shard + 7]
        for reply in (length, owner, epoch, dead, stored):
            if isinstance(reply, Exception):
                raise reply
        for reply in (info, groups):
            if isinstance(reply, Exception) and "no such key" not in str(reply):
                raise reply
        lag, capped, pending = None, False, 0
        if not isinstance(info, ResponseError):  # else the shard does not exist (yet)
            mine = [g for g in groups if _text(g["name"]) == group]
            if mine:
                pending = int(mine[0]["pending"])
                delivered = parse_id(mine[0]["last-delivered-id"])
                lag, capped = _lag(client, key, info, delivered, count_limit)
        shown = shown_state(stored, _text(owner) if owner else None)
        rows.append(
            ShardStatus(
                shard,
                int(length),
                lag,
                pending,
                _text(owner) if owner else None,
                int(epoch or 0),
                int(dead),
                shown.state,
                shown.since_ms,
                shown.error,
                capped,
            )
        )
    return rows


def _lag(
    client: SyncClient, key: str, info: Any, delivered: tuple[int, int], limit: int
) -> tuple[int, bool]:
    """Entries after the group's last-delivered ID, counted (at most `limit` fetched).

    Not XINFO's `lag`: it rests on the group's `entries-read` counter, which Redis 7.0
    leaves behind after reloading an AOF whose tail has XREADGROUP replayed as XCLAIM
    (which moves the last-delivered ID but not the counter), so it stays too high for
    good. IDs cannot drift like that: nothing after last-delivered has been read.
    """
    length = int(info["length"])
    if length == 0 or delivered >= parse_id(info["last-generated-id"]):
        return 0, False
    first = info.get("first-entry")
    if first and parse_id(first[0]) > delivered:
        return length, False  # every entry held is after last-delivered
    bound = f"{delivered[0]}-{delivered[1]}"
    after = len(client.xrange(key, min=f"({bound}", max="+", count=limit) or ())
    if after < limit:
        return after, False
    # A big backlog: the entries up to last-delivered (pending, not yet trimmed) are few.
    before = len(client.xrange(key, min="-", max=bound, count=limit) or ())
    if before < limit:
        return length - before, False
    return limit, True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
