"""Writing one window inside an open transaction: staging, statements, bisection.

The rows a window changes are staged with COPY into a temporary table (dropped at commit,
so no session state outlives the transaction: PgBouncer transaction pooling works), then
applied by statements that run together in one round trip, the offset's compare-and-set
last. A refusal of rows raises RowError; `Writer.isolate` then finds the refused units by
bisection under savepoints.
"""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from streamsink.schemas.event import Op
from streamsink.schemas.merge import Entry, Merged, RowChange
from streamsink.schemas.table import ColumnType, Mode, Table
from streamsink.sinks.postgres import copy, errors, statements

ROW_ERROR_CLASSES = ("22", "23", "P0")
"""SQLSTATE classes that blame the rows (data exception, constraint, raised by a trigger);
what the others mean is errors.py's to say."""


@dataclass(slots=True)
class PostgresStats:
    """What the sink did, for status and the demo.

    The sink's threads each count a window in their own, then `add` it to the sink's.
    """

    windows: int = 0
    rows: int = 0
    deletes: int = 0  # rows deleted by a window (whether or not they existed)
    appended: int = 0
    statements: int = 0
    update_misses: int = 0
    skipped_entries: int = 0
    rejected: int = 0
    by_table: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def add(self, other: PostgresStats) -> None:
        """Add `other`'s counts (a window's) to these; safe from several threads at once."""
        with self._lock:
            self.windows += other.windows
            self.rows += other.rows
            self.deletes += other.deletes
            self.appended += other.appended
            self.statements += other.statements
            self.update_misses += other.update_misses
            self.skipped_entries += other.skipped_entries
            self.rejected += other.rejected
            by_table = self.by_table
            for name, count in other.by_table.items():
                by_table[name] = by_table.get(name, 0) + count


@dataclass(frozen=True, slots=True)
class Unit:
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


class RowError(Exception):
    """Rows of a write are at fault: the database refused them, or a value of theirs
    could not be encoded for COPY. Its text is the reason given with the rejected entries."""


Writes = tuple[
    Mapping[str, Table], Mapping[str, Sequence[RowChange]], Mapping[str, Sequence[Entry]]
]
"""A window's writes by table name: the tables, their row changes, their appended entries."""


def as_merged(merged: Merged) -> Writes:
    """A merged window's writes, as merging grouped them."""
    changes = {name: list(rows.values()) for name, rows in merged.rows.items()}
    return merged.tables, changes, merged.appends


def table_names(tables: Mapping[str, Table]) -> str:
    """The tables' qualified names, for a message."""
    return errors.describe([f"{t.schema or 'public'}.{t.name}" for t in tables.values()])


def grouped(units: Sequence[Unit]) -> Writes:
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


def bisectable(merged: Merged) -> list[Unit]:
    """The window's writes as bisectable units: row changes first, then appends."""
    units = [
        Unit(merged.tables[name], change=change)
        for name, rows in merged.rows.items()
        for change in rows.values()
    ]
    for appended in merged.appends.values():
        table = appended[0].table
        assert table is not None
        units.extend(Unit(table, append=entry) for entry in appended)
    return units


def entry_ids(unit: Unit, entries: Sequence[Entry]) -> list[str]:
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


class Writer:
    """Applies a window's writes inside the open transaction of a cursor.

    In as few round trips as it can (each also costs the thread a wait for the GIL
    while the worker's loop is busy): one creating the staging tables (after `begin`),
    one COPY a table, one running every statement that applies the staged rows with
    the offset's compare-and-set last, then the caller's COMMIT.
    """

    def __init__(self, cur: Cursor, begin: str, sink: str = "") -> None:
        self.cur, self.sink = cur, sink
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

    def counted(self, into: PostgresStats, merged: Merged, bad: Sequence[Unit]) -> None:
        """Add what this writer committed (the window less the refused units) to `into`
        (the window's own counts: only its thread writes them)."""
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

    def apply(self, writes: Writes, last: str = "") -> int:
        """Write them all, then `last` in the same round trip; its row count (-1: none).

        A refusal raises RowError (the caller bisects).
        """
        tables, changes, appends = writes
        try:
            staged = [self._stage(tables[name], rows) for name, rows in changes.items()]
            if staged or self._begin:
                self._execute([stage.create for stage in staged])
            for stage in staged:
                self._copy(stage.copy, stage.data)
            for name, entries in appends.items():
                self._append(tables[name], entries)
            together = [statement for stage in staged for statement in stage.statements]
            self.stats.statements += len(staged) * 2 + len(together)  # with create and COPY
            for stage in staged:
                for statement, rows in stage.updates:  # each alone: its row count says
                    self.cur.execute(statement)  # how many rows it missed
                    self.stats.update_misses += rows - self.cur.rowcount
                    self.stats.statements += 1
            if last:
                together.append(last)
            return self._execute(together) if together else -1
        except psycopg2.Error as error:
            if error.pgcode and error.pgcode[:2] in ROW_ERROR_CLASSES:
                table_fault = errors.undeclared_not_null(error, self.sink, tables)
                if table_fault is not None:
                    raise table_fault from error
                raise RowError(errors.message(error)) from error
            raise
        except copy.EncodeError as error:
            raise RowError(f"cannot be written to {table_names(tables)}: {error}") from error

    def isolate(self, units: Sequence[Unit]) -> list[tuple[Unit, str]]:
        """Write what the database accepts; the refused units, found by bisection."""
        cur = self.cur
        cur.execute("SAVEPOINT streamsink_bisect")
        try:
            self.apply(grouped(units))
        except RowError as error:
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
        update_mode = table.mode is Mode.UPDATE
        key_positions = [names.index(k) for k in table.key]

        # The changes grouped by shape (the columns they write, and how), numbered in the
        # order the shapes first come; the rest write no column (lone deletes, and in
        # update mode every delete). This loop runs per row, holding the GIL: kept lean.
        shapes: dict[tuple[Any, ...], list[RowChange]] = {}
        unshaped: list[RowChange] = []
        deletes = 0
        for change in changes:
            fields = change.fields
            deletes += change.deleted
            if fields and not (update_mode and change.deleted):
                flat = (*fields, *map(_first, fields.values()))  # names, then kinds
                group = shapes.get(flat)
                if group is None:
                    shapes[flat] = [change]
                else:
                    group.append(change)
            else:
                unshaped.append(change)

        # A change's fields hold its key values as written; the row key (change.key) spells
        # uuid and timestamp keys as PostgreSQL compares them, and a change without fields
        # has none: then the key goes in from the row key.
        spelled = bool(table.key_forms)
        blocks: list[list[list[Any]]] = []  # per group of rows, its columns
        for number, (flat, group) in enumerate(shapes.items()):
            written = frozenset(flat[: len(flat) // 2])
            block = [
                [change.fields[name][1] for change in group]
                if name in written
                else [None] * len(group)
                for name in names
            ]
            if spelled:
                for index, position in enumerate(key_positions):
                    block[position] = [change.key[index] for change in group]
            block.append([number] * len(group))
            block.append([change.deleted for change in group])
            blocks.append(block)
        if unshaped:
            rows = []
            for change in unshaped:
                get = change.fields.get
                row = [get(name, _ABSENT)[1] for name in names]
                if spelled or not change.fields:
                    for position, value in zip(key_positions, change.key, strict=True):
                        row[position] = value
                rows.append([*row, -1, change.deleted])
            blocks.append([list(column) for column in zip(*rows, strict=True)])

        formatters: list[Callable[[Any], str]] = [
            copy.FORMATTERS[c.type] for c in table.columns.values()
        ]
        formatters += [str, copy.FORMATTERS[ColumnType.BOOL]]
        stage = _Stage(
            create=statements.create_staging(table, staging).as_string(conn),
            copy=statements.copy_in(
                sql.Identifier(staging), [*names, statements.SHAPE, statements.DELETED]
            ).as_string(conn),
            data=b"".join(copy.columns(formatters, block, names) for block in blocks),
        )
        if deletes:
            stage.statements.append(statements.delete(table, staging).as_string(conn))
            self.stats.deletes += deletes
        for number, (flat, group) in enumerate(shapes.items()):
            half = len(flat) // 2
            shape = tuple(sorted(zip(flat[:half], flat[half:], strict=True)))
            if not update_mode:
                upsert = statements.upsert(table, staging, shape, number)
                stage.statements.append(upsert.as_string(conn))
                continue
            update = statements.update(table, staging, shape, number)
            if update is not None:
                stage.updates.append((update.as_string(conn), len(group)))
        return stage

    def _append(self, table: Table, entries: Sequence[Entry]) -> None:
        """COPY appended rows straight into their table."""
        names = list(table.columns)
        formatters = [copy.FORMATTERS[c.type] for c in table.columns.values()]
        rows = ([e.event.data.get(n) for n in names] for e in entries)
        self._copy(
            statements.copy_in(statements.target(table), names), copy.rows(formatters, rows, names)
        )
        self.stats.statements += 1

    def _copy(self, statement: str | sql.Composable, data: bytes) -> None:
        """COPY `data` in one piece: psycopg2 hands each piece it reads to libpq with the
        GIL released and must take it back after, which waits for the worker's busy loop
        (up to the interpreter's switch interval, longer on a loaded machine). Its 8 KB
        pieces made a window of 1,300 rows seven such waits."""
        self.cur.copy_expert(statement, io.BytesIO(data), size=len(data) + 1)
