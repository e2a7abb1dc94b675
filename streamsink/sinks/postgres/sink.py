"""The PostgreSQL sink: one transaction per window, data and offset together.

Each window becomes one transaction on a pooled connection, run in a thread (psycopg2
blocks): move the shard's offset by compare-and-set, stage the merged rows with COPY,
delete, upsert per column shape, COPY the appended rows, commit. Entries at or below
the stored offset were applied by an earlier owner and are only acknowledged. A row
the database refuses is isolated by bisection (savepoints) and handed back as
Rejected with the database's message, while the rest of the window commits. Any other
error rolls back and is raised: the worker retries the window, keeping its lease.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NoReturn

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from streamsink.consumers.merge import Entry, Merged, RowChange, merge
from streamsink.errors import ConfigError, Fenced, SinkError
from streamsink.schemas.event import Op
from streamsink.schemas.table import ColumnType, Mode, Table
from streamsink.sinks.base import Batch, Rejected
from streamsink.sinks.postgres import copy, statements
from streamsink.sinks.postgres.offsets import Offsets, Position, Slot
from streamsink.streams.reader import parse_id

log = logging.getLogger("streamsink.postgres")

ROW_ERROR_CLASSES = ("22", "23", "P0")
"""SQLSTATE classes that blame the rows (data exception, constraint, raised by a trigger);
anything else (connection, timeout, deadlock, a missing table) is retried as a whole."""


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    """How the sink connects; every field can be set under `[sinks.<name>]`."""

    dsn: str
    pool_size: int = 4
    """Connections (and threads) at most: flushes of this many shards can run at once."""
    statement_timeout_ms: int = 30_000
    """A statement running longer is cancelled and its window retried."""
    connect_timeout_s: int = 5
    offsets_schema: str = "public"
    """Where the offsets tables are (`streamsink tables create` makes them)."""

    @classmethod
    def from_options(cls, sink: str, options: Mapping[str, Any], dsn: str) -> PostgresSettings:
        """Settings from a sink's config options (`dsn` defaults to the config's)."""
        values = dict(options)
        values.setdefault("dsn", dsn)
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ConfigError(
                f"sink {sink!r}: unknown options {sorted(unknown)}; known: {sorted(known)}"
            )
        for name, value in values.items():
            expected = str if name in ("dsn", "offsets_schema") else int
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ConfigError(f"sink {sink!r}: {name} must be a {expected.__name__}")
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"sink {sink!r}: {name} must be >= 1")
        return cls(**values)


class Pool:
    """Idle psycopg2 connections kept for reuse; broken ones are dropped, not returned.

    At most `pool_size` are in use at once: only the sink's threads take them.
    """

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def _connect(self) -> Connection:
        settings = self._settings
        conn: Connection = psycopg2.connect(
            settings.dsn,
            connect_timeout=settings.connect_timeout_s,
            application_name="streamsink",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        return conn

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection outside any transaction; closed instead of kept if broken."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            if not conn.closed:
                with suppress(psycopg2.Error):
                    conn.rollback()
            if not conn.closed:  # a broken one is dropped: the next use connects again
                with self._lock:
                    self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


@dataclass(slots=True)
class PostgresStats:
    """What the sink did, for status and the demo."""

    windows: int = 0
    rows: int = 0
    deletes: int = 0  # rows deleted by a window (whether or not they existed)
    appended: int = 0
    statements: int = 0
    update_misses: int = 0
    skipped_entries: int = 0
    rejected: int = 0
    by_table: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Unit:
    """What bisection splits: one row change, or one appended entry, of one table."""

    table: Table
    change: RowChange | None = None
    append: Entry | None = None


@dataclass(slots=True)
class _Stage:
    """One table's row changes staged: the statements around its COPY, and its data."""

    create: str  # the staging table
    copy: str  # COPY into it
    data: bytes  # the staged rows, COPY text
    statements: list[str] = field(default_factory=list)  # delete, upserts: run together
    updates: list[tuple[str, int]] = field(default_factory=list)  # update mode: with rows


_first = itemgetter(0)
_ABSENT = (None, None)
"""A column a change does not write: staged as null (its shape leaves it untouched)."""


class _RowError(Exception):
    """The database refused rows of a write (wraps the psycopg2 error)."""

    def __init__(self, error: psycopg2.Error) -> None:
        diag = error.diag
        message = diag.message_primary or str(error).strip()
        if diag.message_detail:
            message = f"{message} ({diag.message_detail})"
        super().__init__(f"postgres {error.pgcode}: {message}")


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

    async def close(self) -> None:
        """Wait for writes in flight, then close the connections."""
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        self.pool.close()

    def _write(self, batch: Batch) -> list[Rejected]:
        slot = Slot(self.name, batch.group, batch.stream, batch.shard)
        with self.pool.connection() as conn:
            try:
                return self._apply_window(conn, slot, batch)
            except BaseException:
                self._positions.pop(slot, None)  # unknown outcome: read the offset again
                raise

    def _apply_window(self, conn: Connection, slot: Slot, batch: Batch) -> list[Rejected]:
        seen = self._positions.get(slot)
        if seen is None or seen.epoch != batch.epoch:
            seen = self._fence(conn, slot, batch.epoch)
        entries, merged = batch.entries, batch.merged
        rejected: list[Rejected] = []
        offset = parse_id(seen.last_id)
        if parse_id(batch.first_id) <= offset:
            entries, rejected = self._skip_applied(conn, slot, entries, offset)
            if not entries:
                self._positions[slot] = seen
                return rejected
            merged = merge(entries)
        try:
            refused = self._transaction(conn, slot, seen, entries, merged, bisect=False)
        except _RowError as error:
            conn.rollback()
            log.warning(
                "rows refused, isolating them",
                extra={"sink": self.name, "shard": slot.shard, "error": str(error)},
            )
            refused = self._transaction(conn, slot, seen, entries, merged, bisect=True)
        self._positions[slot] = Position(entries[-1].id, seen.epoch)
        rejected.extend(Rejected(i, reason) for i, reason in refused)
        self.stats.windows += 1
        self.stats.rejected += len(refused)
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
            extra={
                "sink": self.name,
                "shard": slot.shard,
                "offset": position.last_id,
                "epoch": epoch,
            },
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
        raise SinkError(f"shard {slot.shard}: the offset moved since it was read; reading it again")

    def _skip_applied(
        self, conn: Connection, slot: Slot, entries: Sequence[Entry], offset: tuple[int, int]
    ) -> tuple[list[Entry], list[Rejected]]:
        """Drop the entries an earlier owner applied; those it refused are refused again."""
        applied = [e.id for e in entries if parse_id(e.id) <= offset]
        with conn.cursor() as cur:
            refused = self._offsets.rejected(cur, slot, applied)
        conn.commit()
        self.stats.skipped_entries += len(applied)
        log.info(
            "skipping entries applied before",
            extra={"sink": self.name, "shard": slot.shard, "entries": len(applied)},
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
    ) -> list[tuple[str, str]]:
        """Offset compare-and-set, the writes, the refused entries; commit.

        Returns the refused entries with the database's reason. Only bisection splits
        the window into units; the first attempt writes it as merged.
        """
        with conn.cursor() as cur:
            writer = _Writer(cur, self._timeout)
            advance = self._offsets.advance(cur, slot, seen, entries[-1].id)
            if bisect:
                moved = writer.run(advance) != 1
                bad = [] if moved else writer.isolate(_units(merged))
            else:
                moved = writer.apply(_writes(merged), advance) != 1
                bad = []
            if moved:  # an owner that read the offset after us (or a newer lease) moved it
                conn.rollback()
                self._moved(conn, slot, seen)
            refused = [(i, reason) for unit, reason in bad for i in _entry_ids(unit, entries)]
            self._offsets.reject(cur, slot, refused)
        conn.commit()
        writer.counted(self.stats, merged, [unit for unit, _ in bad])
        return refused


_Writes = tuple[
    Mapping[str, Table], Mapping[str, Sequence[RowChange]], Mapping[str, Sequence[Entry]]
]
"""A window's writes by table name: the tables, their row changes, their appended entries."""


def _writes(merged: Merged) -> _Writes:
    """A merged window's writes, as merging grouped them."""
    changes = {name: list(rows.values()) for name, rows in merged.rows.items()}
    return merged.tables, changes, merged.appends


def _grouped(units: Sequence[_Unit]) -> _Writes:
    """Some units' writes, grouped by table again (bisection)."""
    tables: dict[str, Table] = {}
    changes: dict[str, list[RowChange]] = {}
    appends: dict[str, list[Entry]] = {}
    for unit in units:
        tables[unit.table.name] = unit.table
        if unit.change is not None:
            changes.setdefault(unit.table.name, []).append(unit.change)
        elif unit.append is not None:
            appends.setdefault(unit.table.name, []).append(unit.append)
    return tables, changes, appends


def _units(merged: Merged) -> list[_Unit]:
    """The window's writes as bisectable units: row changes first, then appends."""
    units = [
        _Unit(merged.tables[name], change=change)
        for name, rows in merged.rows.items()
        for change in rows.values()
    ]
    for appended in merged.appends.values():
        table = appended[0].table
        assert table is not None
        units.extend(_Unit(table, append=entry) for entry in appended)
    return units


def _entry_ids(unit: _Unit, entries: Sequence[Entry]) -> list[str]:
    """The entries a unit came from (for a row change: every set, incr and del of its key)."""
    if unit.append is not None:
        return [unit.append.id]
    assert unit.change is not None
    table, key = unit.table, unit.change.key
    return [
        e.id
        for e in entries
        if e.table is not None
        and e.table.name == table.name
        and e.event.op in (Op.SET, Op.INCR, Op.DEL)
        and table.row_key(e.event.data) == key
    ] or [unit.change.last_id]


class _Writer:
    """Applies a window's writes inside the open transaction of a cursor.

    In as few round trips as it can (each also costs the thread a wait for the GIL
    while the worker's loop is busy): one creating the staging tables (after `begin`),
    one COPY a table, one running every statement that applies the staged rows with
    the offset's compare-and-set last, then the caller's COMMIT.
    """

    def __init__(self, cur: Cursor, begin: str) -> None:
        self.cur = cur
        self.stats = PostgresStats()  # merged into the sink's once committed
        self._staging = itertools.count()
        self._begin = begin  # run first, with the first round trip

    def run(self, statement: str) -> int:
        """Run `statement` (with `begin` if nothing ran yet); its row count."""
        return self._execute([statement])

    def _execute(self, statements: Sequence[str]) -> int:
        if self._begin:
            statements, self._begin = [self._begin, *statements], ""
        self.cur.execute("; ".join(statements))
        return int(self.cur.rowcount)

    def counted(self, into: PostgresStats, merged: Merged, bad: Sequence[_Unit]) -> None:
        """Add what this writer committed (the window less the refused units) to `into`."""
        into.statements += self.stats.statements
        into.deletes += self.stats.deletes
        into.update_misses += self.stats.update_misses
        by_table = into.by_table
        for name, rows in merged.rows.items():
            into.rows += len(rows)
            by_table[name] = by_table.get(name, 0) + len(rows)
        for name, appended in merged.appends.items():
            into.appended += len(appended)
            by_table[name] = by_table.get(name, 0) + len(appended)
        for unit in bad:
            if unit.change is not None:
                into.rows -= 1
            else:
                into.appended -= 1
            by_table[unit.table.name] -= 1

    def apply(self, writes: _Writes, last: str = "") -> int:
        """Write them all, then `last` in the same round trip; its row count (-1: none).

        A refusal raises _RowError (the caller bisects).
        """
        tables, changes, appends = writes
        try:
            staged = [self._stage(tables[name], rows) for name, rows in changes.items()]
            if staged or self._begin:
                self._execute([stage.create for stage in staged])
            for stage in staged:
                self.cur.copy_expert(stage.copy, io.BytesIO(stage.data))
            for name, entries in appends.items():
                self._append(tables[name], entries)
            together = [statement for stage in staged for statement in stage.statements]
            for stage in staged:
                for statement, rows in stage.updates:  # each alone: its row count says
                    self.cur.execute(statement)  # how many rows it missed
                    self.stats.update_misses += rows - self.cur.rowcount
            self.stats.statements += (
                len(staged) * 2 + len(together) + sum(len(stage.updates) for stage in staged)
            )
            if last:
                together.append(last)
            return self._execute(together) if together else -1
        except psycopg2.Error as error:
            if error.pgcode and error.pgcode[:2] in ROW_ERROR_CLASSES:
                raise _RowError(error) from error
            raise

    def isolate(self, units: Sequence[_Unit]) -> list[tuple[_Unit, str]]:
        """Write what the database accepts; the refused units, found by bisection."""
        cur = self.cur
        cur.execute("SAVEPOINT streamsink_bisect")
        try:
            self.apply(_grouped(units))
        except _RowError as error:
            cur.execute("ROLLBACK TO SAVEPOINT streamsink_bisect")
            cur.execute("RELEASE SAVEPOINT streamsink_bisect")
            if len(units) == 1:
                return [(units[0], str(error))]
            middle = len(units) // 2
            return self.isolate(units[:middle]) + self.isolate(units[middle:])
        cur.execute("RELEASE SAVEPOINT streamsink_bisect")
        return []

    def _stage(self, table: Table, changes: Sequence[RowChange]) -> _Stage:
        """The staging of one table's row changes, and the statements that apply them."""
        conn = self.cur.connection
        staging = f"streamsink_stage_{next(self._staging)}"
        names = list(table.columns)
        shapes: dict[tuple[Any, ...], int] = {}
        counts: dict[int, int] = {}
        update_mode = table.mode is Mode.UPDATE
        key_positions = [names.index(k) for k in table.key]
        deletes = 0

        # A change's fields hold its key values as written; the row key (change.key) spells
        # uuid and timestamp keys as PostgreSQL compares them, and a lone delete has no
        # fields: then the key goes in from the row key.
        spelled = bool(table.key_forms)

        def staged() -> Iterator[list[Any]]:  # runs per row, holding the GIL: kept lean
            nonlocal deletes
            for change in changes:
                fields = change.fields
                number = -1
                if fields and not (update_mode and change.deleted):
                    flat = (*fields, *map(_first, fields.values()))  # names, then kinds
                    number = shapes.setdefault(flat, len(shapes))
                    counts[number] = counts.get(number, 0) + 1
                deletes += change.deleted
                get = fields.get
                row = [get(name, _ABSENT)[1] for name in names]
                if spelled or not fields:
                    for position, value in zip(key_positions, change.key, strict=True):
                        row[position] = value
                row.append(number)
                row.append(change.deleted)
                yield row

        formatters: list[Callable[[Any], str]] = [
            copy.FORMATTERS[c.type] for c in table.columns.values()
        ]
        formatters += [str, copy.FORMATTERS[ColumnType.BOOL]]
        stage = _Stage(
            create=statements.create_staging(table, staging).as_string(conn),
            copy=statements.copy_in(
                sql.Identifier(staging), [*names, statements.SHAPE, statements.DELETED]
            ).as_string(conn),
            data=copy.rows(formatters, staged()),
        )
        if deletes:
            stage.statements.append(statements.delete(table, staging).as_string(conn))
            self.stats.deletes += deletes
        for flat, number in shapes.items():
            half = len(flat) // 2
            shape = tuple(sorted(zip(flat[:half], flat[half:], strict=True)))
            if not update_mode:
                upsert = statements.upsert(table, staging, shape, number)
                stage.statements.append(upsert.as_string(conn))
                continue
            update = statements.update(table, staging, shape, number)
            if update is not None:
                stage.updates.append((update.as_string(conn), counts[number]))
        return stage

    def _append(self, table: Table, entries: Sequence[Entry]) -> None:
        """COPY appended rows straight into their table."""
        names = list(table.columns)
        formatters = [copy.FORMATTERS[c.type] for c in table.columns.values()]
        rows = ([e.event.data.get(n) for n in names] for e in entries)
        self.cur.copy_expert(
            statements.copy_in(statements.target(table), names),
            io.BytesIO(copy.rows(formatters, rows)),
        )
        self.stats.statements += 1
