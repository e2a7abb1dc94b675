"""The one read path of a shard for a group: claim what was left pending, then read new.

Nothing else in streamsink calls XAUTOCLAIM. A reader is made when its worker takes the
shard's lease: it first claims every entry the previous owner left pending (XAUTOCLAIM
looped with its cursor until the cursor comes back to 0-0, so an empty claim ends at
once instead of spinning), then reads new entries with XREADGROUP, blocking well under
the socket timeout. Acknowledging, dead-lettering and trimming the shard live here too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamsink.errors import Fenced, RedisDataLost
from streamsink.schemas.layout import (
    D_AT_MS,
    D_DELIVERIES,
    D_ENTRY,
    D_FIELD,
    D_GROUP,
    D_ORIGIN,
    D_REASON,
    D_SINKS,
    D_SOURCE,
)
from streamsink.schemas.wire import parse_id
from streamsink.streams.connection import AsyncClient
from streamsink.streams.keys import Keys
from streamsink.streams.scripts import lua

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
"""What redis-py hides behind a WatchError when the connection dies under WATCH."""

_AS_SENT: Any = {}
"""Response callbacks of the read's transaction: none, so entries come as Redis sent them
(redis-py would build a dict of each entry's fields)."""


class Read(NamedTuple):
    """What one `next` gave: entries as Redis sent them, and how often claimed ones went out.

    `entries` are `[ID, [name, value, name, value, ...]]` pairs, bytes, oldest first: they
    are handed on as they are, because the worker reads tens of thousands a second and an
    object made for each costs more than the reading. `deliveries` holds the delivery
    counts of claimed entries by ID; an entry missing from it was delivered once. `newest`
    (reads of new entries only) says how far the shard had grown when they were read.
    """

    entries: list[list[Any]]
    deliveries: dict[bytes, int]
    newest: bytes = b""  # the shard's newest entry ID when new entries were read


class Raw(NamedTuple):
    """One entry: its ID, its fields as Redis sent them, and how often it was delivered."""

    id: str
    fields: Sequence[bytes]  # [name, value, name, value, ...]
    deliveries: int = 1


def _entries(reply: Any) -> list[list[Any]]:
    """The entries of a one-stream XREADGROUP reply: a map in RESP3, a list in RESP2."""
    if not reply:
        return []
    entries: list[list[Any]] = (
        next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    )
    return entries


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _lost(exc: WatchError) -> RedisConnectionError:
    """redis-py reports a connection lost under WATCH as a WatchError; it is transient.

    Raised as such, the shard retries and claims back what a lost EXEC reply delivered
    (`recover`), instead of crashing the worker or reading past those entries.
    """
    return RedisConnectionError(f"connection lost under WATCH ({exc.__context__!r})")


def _gone(exc: ResponseError) -> bool:
    """Whether Redis said the shard's stream or the group does not exist."""
    text = str(exc)
    return "NOGROUP" in text or "no such key" in text


class ShardReader:
    """Reads one shard for one group as one consumer: the worker holding its lease.

    Everything it does for the shard happens only while `consumer` holds the shard's lease
    under `epoch` (a read checks both under WATCH and reads in MULTI/EXEC; claims,
    acknowledgements and dead letters check them in their scripts): a worker paused past
    its lease, or a task of its own earlier ownership, gets `Fenced` instead.
    """

    def __init__(
        self,
        client: AsyncClient,
        keys: Keys,
        stream: str,
        shard: int,
        group: str,
        consumer: str,
        epoch: int = 0,
    ) -> None:
        self._client = self.client = client
        self.key = keys.shard(stream, shard)
        self.lease_key = keys.lease(stream, shard, group)
        self.epoch_key = keys.epoch(stream, shard, group)
        self.dead_key = keys.dead(stream, shard, group)
        self.applied_key = keys.applied(stream, shard, group)
        self.group, self.consumer, self.epoch = group, consumer, epoch
        self._cursor = "0-0"
        self._claiming = True
        self._last = (0, 0)
        self._dead_letter = client.register_script(lua("reader.owned", "reader.dead_letter").text)
        self._owner = consumer.encode()
        self._held = str(epoch).encode()
        self._fence = [self.lease_key, self.epoch_key]
        self._fence_args = [self._owner, self._held]
        self._fenced_claim = client.register_script(lua("reader.owned", "reader.fenced_claim").text)
        self._fenced_read = client.register_script(lua("reader.owned", "reader.fenced_read").text)
        self._ack = client.register_script(lua("reader.owned", "reader.ack").text)
        self._fields = client.register_script(lua("reader.fields").text)

    def _fenced(self, what: str) -> Fenced:
        return Fenced(
            f"{self.key}: the lease is no longer ours (epoch {self.epoch}); stopped {what}"
        )

    async def ensure_group(self) -> None:
        """Create the group on this shard (from its first entry) unless it exists."""
        await create_group(self._client, self.key, self.group)

    async def next(self, count: int, block_ms: int) -> Read:
        """The next entries: first the ones left pending by earlier owners, then new ones.

        Waits up to `block_ms` for new entries (not at all when 0); no entries when none came.
        RedisDataLost if the stream or the group vanished under the reader.
        """
        try:
            return await self._next(count, block_ms)
        except ResponseError as exc:
            if not _gone(exc):
                raise
            raise RedisDataLost(
                f"{self.key}: the shard's stream or consumer group {self.group!r} is gone"
            ) from exc

    async def _next(self, count: int, block_ms: int) -> Read:
        while self._claiming:
            claimed = await self._claim(count)
            if claimed.entries:
                self._last = parse_id(claimed.entries[-1][0])
                return claimed
        read = await self._read(count, block_ms)
        if read.entries:
            self._last = parse_id(read.entries[-1][0])
        return read

    async def _read(self, count: int, block_ms: int) -> Read:
        """Read new entries under the lease; with none yet, wait with XREAD, and read again."""
        for attempt in range(2):
            entries, newest = await self._read_once(count)
            if entries:  # (an entry deleted after XADD cannot be new here)
                return Read(entries, {}, newest)
            if attempt or not block_ms:
                break
            # Returns as soon as an entry past the newest one exists (no entry is missed
            # between the read and this wait), or after block_ms.
            try:
                await self._client.xread({self.key: newest}, count=1, block=block_ms)
            except ResponseError as exc:  # its server became a replica (a failover): read
                if not str(exc).startswith("UNBLOCKED"):  # again, on the new master
                    raise
        return Read([], {})

    async def _read_once(self, count: int) -> tuple[list[list[Any]], bytes]:
        """XREADGROUP if the lease is ours, and the newest ID of the shard.

        The lease and epoch keys are WATCHed, checked, then the read runs in MULTI/EXEC: EXEC
        fails if a key changed in between (taken over, or renewed: then check again), so nothing
        is read unless the lease was ours when the read ran.
        """
        if isinstance(self._client, aredis.RedisCluster):
            return await self._read_by_script(count)
        while True:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.response_callbacks = _AS_SENT
                try:
                    await pipe.watch(self.lease_key, self.epoch_key)
                    owner, epoch = await pipe.mget(self._fence)
                except WatchError as exc:  # the connection died under WATCH
                    raise _lost(exc) from exc
                if owner != self._owner or (epoch or b"0") != self._held:
                    raise self._fenced("reading")
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.execute_command(
                    "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count,
                    "STREAMS", self.key, ">",
                )  # fmt: skip
                pipe.execute_command("XREVRANGE", self.key, "+", "-", "COUNT", 1)
                try:
                    read, newest = await pipe.execute()
                except WatchError as exc:
                    if isinstance(exc.__context__, _CONNECTION_ERRORS):
                        raise _lost(exc) from exc  # the read may have run: claim it back
                    continue  # the lease key changed: check it again
            return _entries(read), (newest[0][0] if newest else b"0-0")

    async def _read_by_script(self, count: int) -> tuple[list[list[Any]], bytes]:
        """`_read_once` on a cluster: redis-py's cluster transactions run each queued command
        on a thread of its own, so the fence and the read go in one script instead."""
        got: Any = await self._fenced_read(
            [*self._fence, self.key], [*self._fence_args, self.group, count]
        )
        if not int(got[0]):
            raise self._fenced("reading")
        newest = got[2]
        return _entries(got[1] or None), (newest[0][0] if newest else b"0-0")

    def recover(self) -> None:
        """After a failed read: claim again what was delivered to us past the last entry seen.

        A reply lost with the connection leaves its entries pending on this consumer, and
        XREADGROUP never delivers them again; the claim path picks them up.
        """
        self._claiming = True
        self._cursor = f"{self._last[0]}-{self._last[1] + 1}"

    async def _claim(self, count: int) -> Read:
        got: Any = await self._fenced_claim(
            [*self._fence, self.key], [*self._fence_args, self.group, self._cursor, count]
        )
        if not int(got[0]):
            raise self._fenced("claiming")
        self._cursor = _text(got[1])
        if self._cursor == "0-0":
            self._claiming = False
        entries = [entry for entry in got[2] if entry[1]]  # deleted since: no fields
        if not entries:
            return Read([], {})
        pending: Any = await self._client.xpending_range(
            self.key,
            self.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) * 2,
            consumername=self.consumer,
        )
        deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        return Read(entries, deliveries)

    async def ack(self, ids: Sequence[bytes], applied: str | bytes = b"") -> int:
        """Acknowledge entries (after every sink of the group has applied them), and move
        the group's watermark up to `applied` (a window's last entry ID) with them."""
        if not ids and not applied:
            return 0
        acked = int(
            await self._ack(
                [*self._fence, self.key, self.applied_key],
                [*self._fence_args, self.group, b" ".join(ids), applied],
            )
        )
        if acked < 0:
            raise self._fenced("acknowledging")
        return acked

    async def fields(self, ids: Sequence[bytes]) -> list[list[bytes]]:
        """The fields of entries as stored, byte for byte ([] for an entry deleted since).

        For dead-lettering an entry a sink refused: windows do not keep what they read
        once it is decoded (a third of a window's memory).
        """
        if not ids:
            return []
        return list(await self._fields([self.key], list(ids)))

    async def dead_letter(
        self, raw: Raw, reason: str, sinks: Sequence[str] = (), origin: str = ""
    ) -> None:
        """Move an entry to the group's dead-letter stream with `reason`, and acknowledge it.

        `sinks`: the group's sinks that refused it, when others applied it (a replay then
        reaches those only); `origin`: the first entry ID of a replayed event.
        """
        now = int(time.time() * 1000)
        args: list[bytes | str | int] = [*self._fence_args, self.group, raw.id]
        args += [D_REASON, reason, D_ENTRY, raw.id, D_GROUP, self.group]
        args += [D_DELIVERIES, raw.deliveries, D_AT_MS, now, D_SOURCE, self.key]
        if sinks:
            args += [D_SINKS, ",".join(sinks)]
        if origin:
            args += [D_ORIGIN, origin]
        names = raw.fields[0::2]
        for name, value in zip(names, raw.fields[1::2], strict=True):
            args += [D_FIELD + name, value]
        keys = [*self._fence, self.key, self.dead_key]
        if int(await self._dead_letter(keys, args)) < 0:
            raise self._fenced("dead-lettering")

    async def trim(self, retention_ms: int = 0) -> int:
        """Trim the shard below what every group has acknowledged; return entries removed.

        With `retention_ms`, entries younger than that are kept too (for replays).
        A shard with no group is never trimmed: nobody has said what it consumed.
        """
        floor = await trim_floor(self._client, self.key)
        if floor is None:
            return 0
        if retention_ms:
            kept_from = (max(0, int(time.time() * 1000) - retention_ms), 0)  # MINID >= 0
            floor = min(floor, kept_from)
        removed = await self._client.xtrim(
            self.key, minid=f"{floor[0]}-{floor[1]}", approximate=False
        )
        return int(removed)

    async def remove_gone_consumers(self, live: Iterable[str]) -> list[str]:
        """Delete this group's consumers of workers that are gone and hold nothing pending."""
        alive = set(live) | {self.consumer}
        removed = []
        try:
            consumers: Any = await self._client.xinfo_consumers(self.key, self.group)
        except ResponseError as exc:  # the stream or group is gone: the shard's reads say so
            if not _gone(exc):
                raise
            return []
        for consumer in consumers:
            name = _text(consumer["name"])
            if name not in alive and int(consumer["pending"]) == 0:
                await self._client.xgroup_delconsumer(self.key, self.group, name)
                removed.append(name)
        return removed


async def create_group(client: AsyncClient, key: str, group: str) -> bool:
    """Create `group` on the stream `key` from its first entry; False if it existed."""
    try:
        await client.xgroup_create(key, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


async def trim_floor(client: AsyncClient, key: str) -> tuple[int, int] | None:
    """The lowest entry ID some group of the stream `key` still needs (None: no group)."""
    try:
        groups: Any = await client.xinfo_groups(key)
    except ResponseError:  # no such key
        return None
    floor: tuple[int, int] | None = None
    for group in groups:
        oldest = None
        if int(group["pending"]):
            summary: Any = await client.xpending(key, group["name"])
            oldest = summary["min"]  # None if acknowledged since XINFO answered
        if oldest is not None:
            point = parse_id(_text(oldest))
        else:  # the delivered ID read above is at most the current one: a safe floor
            ms, seq = parse_id(_text(group["last-delivered-id"]))
            point = (ms, seq + 1)
        floor = point if floor is None else min(floor, point)
    return floor
