"""Dead letters of a group: list them, replay them into their shard, or drop them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from streamsink.streams.admin import shard_count
from streamsink.streams.keys import Keys
from streamsink.streams.reader import DEAD_PREFIX


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter: where it sits, why, and the original entry's fields."""

    shard: int
    id: str
    reason: str
    entry: str
    deliveries: int
    fields: dict[bytes, bytes]


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def dead_letters(
    client: redis.Redis, keys: Keys, stream: str, group: str, limit: int = 100
) -> Iterator[DeadLetter]:
    """The group's dead letters, shard by shard, oldest first (at most `limit` per shard)."""
    for shard in range(shard_count(client, keys, stream)):
        entries: Any = client.xrange(keys.dead(stream, shard, group), count=limit)
        for dead_id, fields in entries:
            yield DeadLetter(
                shard=shard,
                id=_text(dead_id),
                reason=_text(fields.get(b"reason")),
                entry=_text(fields.get(b"entry")),
                deliveries=int(fields.get(b"deliveries") or 0),
                fields={
                    name[len(DEAD_PREFIX) :]: value
                    for name, value in fields.items()
                    if name.startswith(DEAD_PREFIX)
                },
            )


def replay(client: redis.Redis, keys: Keys, stream: str, group: str, letter: DeadLetter) -> str:
    """Publish the original entry again on its shard (a new entry ID), then drop the letter.

    Every group of the stream sees the replayed entry: replay after fixing what refused it.
    """
    pipe = client.pipeline(transaction=True)  # one slot: the shard and its dead letters
    pipe.xadd(keys.shard(stream, letter.shard), letter.fields)  # type: ignore[arg-type]
    pipe.xdel(keys.dead(stream, letter.shard, group), letter.id)
    new_id, _ = pipe.execute()
    return _text(new_id)


def drop(client: redis.Redis, keys: Keys, stream: str, group: str, letter: DeadLetter) -> None:
    """Delete one dead letter for good."""
    client.xdel(keys.dead(stream, letter.shard, group), letter.id)
