"""Dead letters of a group: list them, replay them into their shard, or drop them.

A replay reaches only the group whose dead letter it is (and, when other sinks of that
group applied the entry, only the sinks that refused it): the entry goes back into its
shard with `for`, `origin` and `sinks` fields (wire.py), so it is applied after the
entries that followed it, and every other group acknowledges it without applying it.
Taking the letter and publishing it again is one script: replaying twice, or from two
terminals at once, publishes once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from streamsink.errors import GroupNotFound
from streamsink.schemas.layout import (
    D_DELIVERIES,
    D_ENTRY,
    D_FIELD,
    D_ORIGIN,
    D_REASON,
    D_SINKS,
    F_DATA,
    F_FOR,
    F_ORIGIN,
    F_SINKS,
    ROUTING_FIELDS,
)
from streamsink.streams.admin import shard_count
from streamsink.streams.connection import SyncClient
from streamsink.streams.keys import Keys
from streamsink.streams.scripts import lua


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter: where it sits, why, and the original entry's fields."""

    shard: int
    id: str
    reason: str
    entry: str
    deliveries: int
    fields: dict[bytes, bytes]
    sinks: tuple[str, ...] = ()  # the group's sinks that refused it; () for all of them
    origin: str = ""  # the entry ID its event first had, if it was a replay already

    @property
    def address(self) -> str:
        """`SHARD/ID`: unique in the group (a dead-letter ID alone may repeat across shards)."""
        return f"{self.shard}/{self.id}"

    @property
    def identity(self) -> str:
        """The entry ID that identifies the event for good (a callback's idempotency key)."""
        return self.origin or self.entry


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def check_group(client: SyncClient, keys: Keys, stream: str, group: str) -> int:
    """The stream's shard count; StreamNotFound or GroupNotFound when either is unknown."""
    shards = shard_count(client, keys, stream)
    known: set[str] = set()
    for shard in range(shards):
        if client.exists(keys.dead(stream, shard, group)):
            return shards
        try:
            groups: Any = client.xinfo_groups(keys.shard(stream, shard))
        except redis.ResponseError:  # the shard's stream key does not exist yet
            continue
        known.update(
            _text(g["name"]) if isinstance(g["name"], bytes) else g["name"] for g in groups
        )
        if group in known:
            return shards
    raise GroupNotFound(
        f"stream {stream!r} has no group {group!r} "
        f"(its groups: {', '.join(sorted(known)) or 'none yet'})"
    )


def dead_letters(
    client: SyncClient, keys: Keys, stream: str, group: str, limit: int | None = 100
) -> Iterator[DeadLetter]:
    """The group's dead letters, shard by shard, oldest first (at most `limit` per shard,
    every one with None)."""
    for shard in range(shard_count(client, keys, stream)):
        entries: Any = client.xrange(keys.dead(stream, shard, group), count=limit)
        for dead_id, fields in entries:
            yield DeadLetter(
                shard=shard,
                id=_text(dead_id),
                reason=_text(fields.get(D_REASON)),
                entry=_text(fields.get(D_ENTRY)),
                deliveries=int(fields.get(D_DELIVERIES) or 0),
                fields={
                    name[len(D_FIELD) :]: value
                    for name, value in fields.items()
                    if name.startswith(D_FIELD)
                },
                sinks=tuple(n for n in _text(fields.get(D_SINKS)).split(",") if n),
                origin=_text(fields.get(D_ORIGIN)),
            )


def choose(letters: Iterable[DeadLetter], wanted: Sequence[str]) -> list[DeadLetter]:
    """The letters named `SHARD/ID`, or by a plain ID where only one shard has it.

    ValueError names an address that matches nothing, or a plain ID found on several
    shards with its candidates.
    """
    by_address = {letter.address: letter for letter in letters}
    by_id: dict[str, list[DeadLetter]] = {}
    for letter in by_address.values():
        by_id.setdefault(letter.id, []).append(letter)
    chosen: dict[str, DeadLetter] = {}
    for name in wanted:
        if "/" in name:
            found = [by_address[name]] if name in by_address else []
        else:
            found = by_id.get(name, [])
        if not found:
            raise ValueError(f"no such dead letter: {name}")
        if len(found) > 1:
            candidates = ", ".join(letter.address for letter in found)
            raise ValueError(
                f"dead letter ID {name} is on several shards: name one of {candidates}"
            )
        chosen[found[0].address] = found[0]
    return list(chosen.values())


def replay(
    client: SyncClient,
    keys: Keys,
    stream: str,
    group: str,
    letter: DeadLetter,
    data: bytes | None = None,
) -> str | None:
    """Publish the letter's entry again on its shard for `group` only, and take the letter.

    The entry gets a new ID (it is applied after the entries that followed it) and keeps
    its identity (`origin`). `data` replaces its JSON data (a fix). None if the letter
    was already replayed or dropped (by another terminal, say): nothing is published.
    """
    fields = {n: v for n, v in letter.fields.items() if n not in ROUTING_FIELDS}
    if data is not None:
        fields[F_DATA] = data
    fields[F_FOR] = group.encode()
    fields[F_ORIGIN] = letter.identity.encode()
    if letter.sinks:
        fields[F_SINKS] = ",".join(letter.sinks).encode()
    flat = [part for pair in fields.items() for part in pair]
    script = client.register_script(lua("dead.replay").text)
    keys_ = [keys.dead(stream, letter.shard, group), keys.shard(stream, letter.shard)]
    new_id = script(keys_, [letter.id, *flat])
    return _text(new_id) if new_id else None


def drop(client: SyncClient, keys: Keys, stream: str, group: str, letter: DeadLetter) -> None:
    """Delete one dead letter for good."""
    client.xdel(keys.dead(stream, letter.shard, group), letter.id)
