"""Wait until applied: block until every group has committed a published entry.

Each group's worker keeps, per shard, the newest entry ID it has committed to every sink and
acknowledged (`Keys.applied`, set by the fenced acknowledgement after each window, only
forward). An entry is applied by a group once that watermark is at or past its ID; waiting
reads the watermarks of the receipts' shards (one MGET per shard, pipelined) and polls with
a short backoff (1 ms, doubling to 20 ms): a wait costs at most 20 ms over the commit, and a
waiter one small read every 20 ms. No per-event acknowledgement stream is kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from zlib import crc32

from streamsink.errors import ConfigError, NotYetApplied
from streamsink.schemas.config import Config
from streamsink.streams.connection import AsyncClient, SyncClient
from streamsink.streams.keys import Keys

FIRST_POLL = 0.001
LAST_POLL = 0.02
DEFAULT_TIMEOUT = 30.0
"""Seconds `publish(wait=True)` waits when given no timeout."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where a published event went: its stream, shard and entry ID."""

    stream: str
    shard: int
    entry_id: str

    @classmethod
    def of(cls, stream: str, shards: int, key: str | bytes, entry_id: str) -> Receipt:
        """The receipt of an event of `key` published as `entry_id` (shard: CRC32 mod N)."""
        raw = key.encode() if isinstance(key, str) else key
        return cls(stream, crc32(raw) % shards, entry_id)


def newest_per_shard(receipts: Iterable[Receipt]) -> list[Receipt]:
    """One receipt per (stream, shard), the newest: a shard's watermark covers the older."""
    newest: dict[tuple[str, int], Receipt] = {}
    for receipt in receipts:
        place = (receipt.stream, receipt.shard)
        known = newest.get(place)
        if known is None or _position(receipt.entry_id) > _position(known.entry_id):
            newest[place] = receipt
    return list(newest.values())


def configured_groups(config: Config, stream: str) -> list[str]:
    """The groups of the config that read `stream` (empty: ask Redis)."""
    return [group.name for group in config.groups.values() if group.stream == stream]


class _Waiter:
    """What the sync and asyncio waits share: the keys to read and when they are done."""

    def __init__(self, keys: Keys, receipts: Sequence[Receipt], groups: Sequence[str]) -> None:
        self.receipts = newest_per_shard(receipts)
        self.groups = list(groups)
        self.reads = [
            [keys.applied(r.stream, r.shard, group) for group in self.groups] for r in self.receipts
        ]

    def behind(self, replies: Sequence[Sequence[Any]]) -> list[str]:
        """The groups (as `group@stream/shard`) that have not applied their receipt yet."""
        late = []
        for receipt, marks in zip(self.receipts, replies, strict=True):
            target = _position(receipt.entry_id)
            for group, mark in zip(self.groups, marks, strict=True):
                if mark is None or _position(mark) < target:
                    late.append(f"{group}@{receipt.stream}/{receipt.shard}")
        return late

    def timed_out(self, late: list[str], timeout: float) -> NotYetApplied:
        entries = ", ".join(f"{r.stream}/{r.shard} {r.entry_id}" for r in self.receipts)
        return NotYetApplied(
            f"published but not yet applied after {timeout:g} s ({entries}); still waiting "
            f"for {', '.join(late)}: the event will be applied, do not publish it again"
        )


def _position(entry_id: str | bytes) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _group_names(reply: Any) -> list[str]:
    names = []
    for group in reply:
        name = group["name"]
        names.append(name.decode() if isinstance(name, bytes) else name)
    return names


def wait_applied(
    client: SyncClient,
    keys: Keys,
    receipts: Sequence[Receipt],
    groups: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Return once every group (or the named ones) applied every receipt's entry, else
    raise NotYetApplied after `timeout` seconds."""
    if not receipts:
        return
    if not groups:
        first = receipts[0]
        groups = _group_names(client.xinfo_groups(keys.shard(first.stream, first.shard)))
        if not groups:
            raise ConfigError(f"no group reads stream {first.stream!r}: nothing will apply it")
    waiter = _Waiter(keys, receipts, groups)
    deadline, pause = time.monotonic() + timeout, FIRST_POLL
    while True:
        pipe = client.pipeline(transaction=False)
        for read in waiter.reads:  # (a cluster pipeline blocks mget(); each is one slot)
            pipe.execute_command("MGET", *read)
        late = waiter.behind(pipe.execute())
        if not late:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise waiter.timed_out(late, timeout)
        time.sleep(min(pause, left))
        pause = min(pause * 2, LAST_POLL)


async def wait_applied_async(
    client: AsyncClient,
    keys: Keys,
    receipts: Sequence[Receipt],
    groups: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (the API of the sync wait)
) -> None:
    """`wait_applied` for asyncio."""
    if not receipts:
        return
    if not groups:
        first = receipts[0]
        reply = await client.xinfo_groups(keys.shard(first.stream, first.shard))
        groups = _group_names(reply)
        if not groups:
            raise ConfigError(f"no group reads stream {first.stream!r}: nothing will apply it")
    waiter = _Waiter(keys, receipts, groups)
    loop = asyncio.get_running_loop()
    deadline, pause = loop.time() + timeout, FIRST_POLL
    while True:
        pipe = client.pipeline(transaction=False)
        for read in waiter.reads:  # (a cluster pipeline blocks mget(); each is one slot)
            pipe.execute_command("MGET", *read)
        late = waiter.behind(await pipe.execute())
        if not late:
            return
        left = deadline - loop.time()
        if left <= 0:
            raise waiter.timed_out(late, timeout)
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, LAST_POLL)
