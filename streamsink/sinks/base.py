"""The contract of a sink: write a closed window's merged batch, and close.

A sink is a small class (or anything with these two methods). The worker calls
`write` once per closed window of a shard, in order, never two at a time for one
shard, and acknowledges the window's entries only after every sink of the group has
returned. Entries a sink cannot apply come back as `Rejected` and go to the group's
dead-letter stream. Raising says why the window failed (errors.py): `SinkUnavailable`
is retried with backoff as long as it takes, keeping the lease; `SinkMisconfigured`
stops the group; anything else is taken for a bug, tried `max_attempts` times, then the
window is split until the entries the sink fails on are found and dead-lettered.

Optional attributes a sink may have: `check()` (async, run at start-up: raise
`SinkMisconfigured` for what waiting cannot fix), `committed(group, stream)` (see
`Committed`), and `interruptible = True`: the sink's `write` may be cancelled between
its own steps without harm (it remembers what it did, as the HTTP sink's delivered marks
do), so on a handover a window of a group whose sinks all are interruptible gets a
second to finish, then is cancelled and left to the next owner instead of holding the
shard until it ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from streamsink.schemas.merge import Entry, Merged


@dataclass(frozen=True, slots=True)
class Batch:
    """One closed window of one shard, merged, with where it comes from.

    `epoch` is the fencing epoch of the lease under which it was read; with `stream`,
    `shard` and `last_id` it is what a sink needs to store an exactly-once offset.
    `origins` maps the IDs of replayed entries to the ID their event first had: its
    identity for receivers (a callback's idempotency key), the same on every replay.
    """

    group: str
    stream: str
    shard: int
    epoch: int
    first_id: str
    last_id: str
    entries: Sequence[Entry]
    merged: Merged
    origins: Mapping[str, str] = field(default_factory=dict)

    def origin(self, entry_id: str) -> str:
        """The ID that identifies an entry's event: its first one if it was replayed."""
        return self.origins.get(entry_id, entry_id)


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry a sink refuses for good, and the reason (goes to the dead-letter stream)."""

    entry_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Committed:
    """What a sink with exactly-once offsets holds of a shard: the last entry ID applied,
    and the lease epoch of the owner that claimed the offset last. A sink may say it with
    `async def committed(group, stream) -> Mapping[int, Committed]` (by shard); the worker
    compares it with Redis when it takes a shard, to tell a Redis data loss (README,
    "Recovery")."""

    last_id: str
    epoch: int


class Sink(Protocol):
    """What the worker needs of a sink."""

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        """Apply `batch`; return the entries refused for good (empty when all applied)."""
        ...

    async def close(self) -> None:
        """Release what the sink holds; called once when the worker stops."""
        ...
