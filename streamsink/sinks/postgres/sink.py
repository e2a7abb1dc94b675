"""The PostgreSQL sink: one transaction per window, data and offset together.

Each window becomes one transaction on a pooled connection, run in a thread (psycopg2
blocks): stage the merged rows with COPY, delete, upsert per column shape, COPY the
appended rows, move the shard's offset by compare-and-set, commit. Entries at or below
the stored offset were applied by an earlier owner and are only acknowledged. A row
the database refuses, or whose values cannot be encoded, is isolated by bisection
(savepoints) and handed back as Rejected with the reason, while the rest of the window
commits. Any other error rolls back and is raised as errors.py classifies it:
SinkUnavailable (the worker retries, keeping its lease), SinkMisconfigured (the group
stops), or as it is (a bug). How a window is written inside its transaction is
writer.py; connections, pool.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import psycopg2
from psycopg2.extensions import connection as Connection

from streamsink.errors import Fenced, SinkUnavailable
from streamsink.schemas.merge import Entry, Merged, merge
from streamsink.schemas.wire import parse_id
from streamsink.sinks.base import Batch, Committed, Rejected
from streamsink.sinks.postgres.errors import classify
from streamsink.sinks.postgres.offsets import Offsets, Position, Slot
from streamsink.sinks.postgres.pool import Pool, PostgresSettings
from streamsink.sinks.postgres.schema import OFFSETS
from streamsink.sinks.postgres.writer import (
    PostgresStats,
    RowError,
    Writer,
    as_merged,
    bisectable,
    entry_ids,
    table_names,
)

T = TypeVar("T")

log = logging.getLogger("streamsink.postgres")


class PostgresSink:
    """Writes merged windows to PostgreSQL tables with exactly-once offsets."""

    def __init__(self, pool: Pool, name: str, settings: PostgresSettings) -> None:
        self.pool, self.name, self.settings = pool, name, settings
        self.stats = PostgresStats()
        self._offsets = Offsets(settings.offsets_schema)
        self._positions: dict[Slot, Position] = {}
        self._executor = ThreadPoolExecutor(settings.pool_size, thread_name_prefix=f"pg-{name}")
        self._timeout = f"SET LOCAL statement_timeout = {int(settings.statement_timeout_ms)}"

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, Any], dsn: str) -> PostgresSink:
        """A sink with its own pool, from `[sinks.<name>]` options."""
        settings = PostgresSettings.from_options(name, options, dsn)
        return cls(Pool(settings), name, settings)

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        """Apply the window in one transaction (in a thread); return the refused entries."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._write, batch)

    async def check(self) -> None:
        """Connect and look the offsets table up, so that a database that does not exist,
        bad credentials or tables never created stop the group at start-up, not at its
        first window (SinkMisconfigured; SinkUnavailable while the server is away)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._check)

    async def committed(self, group: str, stream: str) -> dict[int, Committed]:
        """This sink's offsets of `group` on the shards of `stream`, by shard (a shard
        nothing was applied from may be missing)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._committed, group, stream)

    def _committed(self, group: str, stream: str) -> dict[int, Committed]:
        rows = self._read_offsets(lambda cur: self._offsets.of_stream(cur, stream))
        return {
            slot.shard: Committed(position.last_id, position.epoch)
            for slot, position in rows.items()
            if slot.sink == self.name and slot.group == group
        }

    def _check(self) -> None:
        self._read_offsets(self._offsets.probe)

    def _read_offsets(self, read: Callable[[Any], T]) -> T:
        """`read(cursor)` on the offsets table in a transaction rolled back after; a
        PostgreSQL error as the sink's error class (SinkMisconfigured, SinkUnavailable)."""
        offsets = f"{self._offsets.schema}.{OFFSETS}"
        try:
            with self.pool.connection() as conn:
                with conn.cursor() as cur:
                    result = read(cur)
                conn.rollback()
        except psycopg2.Error as error:
            known = classify(error, self.name, offsets)
            if known is None:
                raise
            raise known from error
        return result

    async def close(self) -> None:
        """Wait for writes in flight, then close the connections."""
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        self.pool.close()

    def _write(self, batch: Batch) -> list[Rejected]:
        slot = Slot(self.name, batch.group, batch.stream, batch.shard)
        counts = PostgresStats()  # this window's: added to the sink's once, at the end
        try:
            with self.pool.connection() as conn:
                rejected = self._apply_window(conn, slot, batch, counts)
        except psycopg2.Error as error:
            self._positions.pop(slot, None)  # unknown outcome: read the offset again
            known = classify(error, self.name, table_names(batch.merged.tables))
            if known is None:
                raise
            raise known from error
        except BaseException:
            self._positions.pop(slot, None)
            raise
        self.stats.add(counts)
        return rejected

    def _apply_window(
        self, conn: Connection, slot: Slot, batch: Batch, counts: PostgresStats
    ) -> list[Rejected]:
        seen = self._positions.get(slot)
        if seen is None or seen.epoch != batch.epoch:
            seen = self._fence(conn, slot, batch.epoch)
        entries, merged = batch.entries, batch.merged
        rejected: list[Rejected] = []
        offset = parse_id(seen.last_id)
        if parse_id(batch.first_id) <= offset:
            entries, rejected = self._skip_applied(conn, slot, entries, offset)
            counts.skipped_entries += len(batch.entries) - len(entries)
            if not entries:
                self._positions[slot] = seen
                return rejected
            merged = merge(entries)
        try:
            refused = self._transaction(conn, slot, seen, entries, merged, False, counts)
        except RowError as error:
            conn.rollback()
            log.warning(
                "rows refused, isolating them",
                extra={**_where(slot), "error": str(error)},
            )
            refused = self._transaction(conn, slot, seen, entries, merged, True, counts)
        self._positions[slot] = Position(entries[-1].id, seen.epoch)
        rejected.extend(Rejected(i, reason) for i, reason in refused)
        counts.windows += 1
        counts.rejected += len(refused)
        return rejected

    def _fence(self, conn: Connection, slot: Slot, epoch: int) -> Position:
        """Claim the shard's offset row for this lease epoch (own transaction)."""
        with conn.cursor() as cur:
            position = self._offsets.fence(cur, slot, epoch)
        conn.commit()
        if position is None:
            raise Fenced(
                f"{slot.group}/{slot.stream} shard {slot.shard}: a newer lease than epoch "
                f"{epoch} has claimed the offset; this worker no longer owns the shard"
            )
        log.info(
            "offset read",
            extra={**_where(slot), "offset": position.last_id, "epoch": epoch},
        )
        return position

    def _moved(self, conn: Connection, slot: Slot, seen: Position) -> NoReturn:
        """The compare-and-set failed: Fenced if a newer owner did it, else retry."""
        with conn.cursor() as cur:
            now = self._offsets.read(cur, slot)
        conn.commit()
        if now is not None and now.epoch > seen.epoch:
            raise Fenced(
                f"{slot.group}/{slot.stream} shard {slot.shard}: lease epoch {now.epoch} has "
                f"committed since epoch {seen.epoch} read the offset; this worker lost the shard"
            )
        raise SinkUnavailable(
            f"shard {slot.shard}: the offset moved since it was read; reading it again"
        )

    def _skip_applied(
        self, conn: Connection, slot: Slot, entries: Sequence[Entry], offset: tuple[int, int]
    ) -> tuple[list[Entry], list[Rejected]]:
        """Drop the entries an earlier owner applied; those it refused are refused again."""
        applied = [e.id for e in entries if parse_id(e.id) <= offset]
        with conn.cursor() as cur:
            refused = self._offsets.rejected(cur, slot, applied)
        conn.commit()
        log.info(
            "skipping entries applied before",
            extra={**_where(slot), "entries": len(applied)},
        )
        rest = [e for e in entries if parse_id(e.id) > offset]
        return rest, [Rejected(i, reason) for i, reason in refused.items()]

    def _transaction(
        self,
        conn: Connection,
        slot: Slot,
        seen: Position,
        entries: Sequence[Entry],
        merged: Merged,
        bisect: bool,
        counts: PostgresStats,
    ) -> list[tuple[str, str]]:
        """Offset compare-and-set, the writes, the refused entries; commit.

        Returns the refused entries with the database's reason. Only bisection splits
        the window into units; the first attempt writes it as merged.
        """
        with conn.cursor() as cur:
            writer = Writer(cur, self._timeout, self.name)
            advance = self._offsets.advance(cur, slot, seen, entries[-1].id)
            if bisect:
                moved = writer.run(advance) != 1
                bad = [] if moved else writer.isolate(bisectable(merged))
            else:
                moved = writer.apply(as_merged(merged), advance) != 1
                bad = []
            if moved:  # an owner that read the offset after us (or a newer lease) moved it
                conn.rollback()
                self._moved(conn, slot, seen)
            # Entries the merge left out (a sum their column cannot hold) are refused with
            # the rows the database refused, and remembered the same way.
            merge_refused = {i: f"merge: {reason}" for i, reason in merged.refused.items()}
            refused = list(merge_refused.items()) + [
                (i, reason)
                for unit, reason in bad
                for i in entry_ids(unit, entries)
                if i not in merge_refused
            ]
            self._offsets.reject(cur, slot, refused)
        conn.commit()
        writer.counted(counts, merged, [unit for unit, _ in bad])
        return refused


def _where(slot: Slot) -> dict[str, object]:
    """A log line's fields naming the sink, group, stream and shard."""
    return {"sink": slot.sink, "group": slot.group, "stream": slot.stream, "shard": slot.shard}
