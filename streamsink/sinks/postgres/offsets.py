"""Exactly-once offsets: per (sink, group, stream, shard), the last entry ID applied.

A new owner first *fences* the shard's row: it writes its lease epoch there unless a
greater one is already written, and reads the offset back. From then on every flush
moves the offset by compare-and-set on the (offset, epoch) this owner last saw, inside
the transaction that writes the data. An owner whose lease was taken over while it
was paused finds the row fenced by the newer epoch, and cannot commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from streamsink.sinks.postgres.pool import PostgresSettings
from streamsink.sinks.postgres.schema import OFFSETS, REJECTED

START = "0-0"
"""The offset of a shard nothing has been applied from."""


@dataclass(frozen=True, slots=True)
class Slot:
    """Whose offset: one sink's, for one shard of a group's stream."""

    sink: str
    group: str
    stream: str
    shard: int

    def values(self) -> tuple[str, str, str, int]:
        return (self.sink, self.group, self.stream, self.shard)


@dataclass(frozen=True, slots=True)
class Position:
    """An offset row as this owner last saw it."""

    last_id: str
    epoch: int


class Offsets:
    """The statements on the offsets tables, in one schema."""

    def __init__(self, schema: str = "public") -> None:
        self.schema = schema
        offsets, rejected = sql.Identifier(schema, OFFSETS), sql.Identifier(schema, REJECTED)
        where = sql.SQL("sink = %s AND group_name = %s AND stream = %s AND shard = %s")
        self._fence = sql.SQL(
            "INSERT INTO {0} AS o (sink, group_name, stream, shard, last_id, epoch)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (sink, group_name, stream, shard) DO UPDATE"
            " SET epoch = excluded.epoch, updated_at = now() WHERE o.epoch <= excluded.epoch"
            " RETURNING last_id, epoch"
        ).format(offsets)
        self._read = sql.SQL("SELECT last_id, epoch FROM {} WHERE {}").format(offsets, where)
        self._probe = sql.SQL("SELECT 1 FROM {} LIMIT 0").format(offsets)
        self._of_stream = sql.SQL(
            "SELECT sink, group_name, stream, shard, last_id, epoch FROM {} WHERE stream = %s"
        ).format(offsets)
        self._set = sql.SQL(
            "UPDATE {} SET last_id = %s, epoch = %s, updated_at = now()"
            " WHERE {} AND last_id = %s AND epoch = %s"
        ).format(offsets, where)
        self._forget = sql.SQL("DELETE FROM {} WHERE {}").format(rejected, where)
        self._advance = sql.SQL(
            "UPDATE {} SET last_id = %s, updated_at = now()"
            " WHERE {} AND last_id = %s AND epoch = %s"
        ).format(offsets, where)
        self._reject = sql.SQL(
            "INSERT INTO {} (sink, group_name, stream, shard, entry_id, reason)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        ).format(rejected)
        self._rejected = sql.SQL(
            "SELECT entry_id, reason FROM {} WHERE {} AND entry_id = ANY(%s)"
        ).format(rejected, where)

    def fence(self, cur: Cursor, slot: Slot, epoch: int) -> Position | None:
        """Claim the slot for `epoch`; its position, or None if a newer epoch holds it."""
        cur.execute(self._fence, (*slot.values(), START, epoch))
        row = cur.fetchone()
        return None if row is None else Position(row[0], int(row[1]))

    def read(self, cur: Cursor, slot: Slot) -> Position | None:
        """The slot's position, None if it has none."""
        cur.execute(self._read, slot.values())
        row = cur.fetchone()
        return None if row is None else Position(row[0], int(row[1]))

    def advance(self, cur: Cursor, slot: Slot, seen: Position, last_id: str) -> str:
        """The statement moving the offset to `last_id` if it still is `seen`.

        Run it last in the window's transaction: it updates one row, or none if someone
        moved the offset (then roll back). Its values are bound here (mogrify), so it can
        travel in one round trip with the statements that write the window.
        """
        values = (last_id, *slot.values(), seen.last_id, seen.epoch)
        return cur.mogrify(self._advance, values).decode()

    def reject(self, cur: Cursor, slot: Slot, rejected: Sequence[tuple[str, str]]) -> None:
        """Remember refused entries, so an owner that skips them can dead-letter them again."""
        if rejected:
            cur.executemany(self._reject, [(*slot.values(), i, r) for i, r in rejected])

    def rejected(self, cur: Cursor, slot: Slot, ids: Sequence[str]) -> dict[str, str]:
        """Which of `ids` were refused, with their reasons."""
        cur.execute(self._rejected, (*slot.values(), list(ids)))
        return {entry_id: reason for entry_id, reason in cur.fetchall()}

    def of_stream(self, cur: Cursor, stream: str) -> dict[Slot, Position]:
        """Every sink's and group's offset on the shards of `stream`."""
        cur.execute(self._of_stream, (stream,))
        return {Slot(*row[:4]): Position(row[4], int(row[5])) for row in cur.fetchall()}

    def reset(self, cur: Cursor, slot: Slot, seen: Position, now: Position) -> bool:
        """Set the slot's position to `now` if it still is `seen` (False if it moved), for
        `streamsink offsets reset`. Back to START, the slot's remembered refusals go too:
        they name entries of a stream Redis lost."""
        cur.execute(self._set, (now.last_id, now.epoch, *slot.values(), seen.last_id, seen.epoch))
        if cur.rowcount != 1:
            return False
        if now.last_id == START:
            cur.execute(self._forget, slot.values())
        return True

    def probe(self, cur: Cursor) -> None:
        """Look the offsets table up (raises if it is missing or out of reach)."""
        cur.execute(self._probe)


def stream_offsets(sinks: Iterable[PostgresSettings], stream: str) -> dict[Slot, Position]:
    """Every offset of `stream` in the offsets tables these sinks use, each read once."""
    found: dict[Slot, Position] = {}
    for dsn, schema in sorted({(s.dsn, s.offsets_schema) for s in sinks}):
        with closing(psycopg2.connect(dsn, connect_timeout=10)) as conn, conn.cursor() as cur:
            found.update(Offsets(schema).of_stream(cur, stream))
    return found


def reset_offset(sink: PostgresSettings, slot: Slot, seen: Position, now: Position) -> bool:
    """`Offsets.reset` in a transaction of its own: False if the offset moved meanwhile."""
    with closing(psycopg2.connect(sink.dsn, connect_timeout=10)) as conn:
        with conn.cursor() as cur:
            done = Offsets(sink.offsets_schema).reset(cur, slot, seen, now)
        conn.commit()
    return done
