"""The SQL of one window's writes to one table, composed with psycopg2's `sql` module.

Merged row changes are staged with COPY into a temporary table (dropped at commit, so
no session state outlives the transaction: PgBouncer transaction pooling works), then
applied with one DELETE for the rows deleted in the window and one statement per column
shape: the set of columns a change writes and how each applies (assign, add, greatest,
least). Columns a shape does not name are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg2 import sql

from streamsink.schemas.merge import ADD, ASSIGN, MAX, Kind
from streamsink.schemas.table import ColumnType, Table
from streamsink.sinks.postgres.schema import pg_type

Shape = tuple[tuple[str, Kind], ...]
"""The columns one row change writes, sorted, each with how it applies."""

SHAPE, DELETED = "_ss_shape", "_ss_deleted"
"""Staging-only columns: the row's shape number (-1: delete only), and whether to delete."""


def target(table: Table) -> sql.Composable:
    """The table's qualified name (unqualified when it names no schema: the search path's)."""
    if table.schema:
        return sql.Identifier(table.schema, table.name)
    return sql.Identifier(table.name)


def _columns(names: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, names))


def create_staging(table: Table, staging: str) -> sql.Composed:
    """A temporary table with every declared column (typed as declared), dropped at commit."""
    columns = [
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(pg_type(column)))
        for name, column in table.columns.items()
    ]
    columns.append(sql.SQL("{} integer, {} boolean").format(*map(sql.Identifier, (SHAPE, DELETED))))
    return sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP").format(
        sql.Identifier(staging), sql.SQL(", ").join(columns)
    )


def copy_in(into: sql.Composable, names: Sequence[str]) -> sql.Composed:
    """COPY … FROM STDIN in text format, for `names` in this order."""
    return sql.SQL("COPY {} ({}) FROM STDIN").format(into, _columns(names))


def _key_match(table: Table, left: str, right: str) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(left, k), sql.Identifier(right, k))
        for k in table.key
    )


def delete(table: Table, staging: str) -> sql.Composed:
    """Delete every row the window deleted (re-created ones are written after)."""
    return sql.SQL("DELETE FROM {} AS t USING {} AS s WHERE s.{} AND {}").format(
        target(table), sql.Identifier(staging), sql.Identifier(DELETED), _key_match(table, "t", "s")
    )


def _text_collation(table: Table, name: str, expression: sql.Composable) -> sql.Composable:
    # greatest/least of texts by code point, as the merge compares them: UTF-8 bytes
    # order ("C") is code point order, whatever the database's collation.
    if table.columns[name].type is ColumnType.TEXT:
        return sql.SQL('{} COLLATE "C"').format(expression)
    return expression


def _apply(table: Table, name: str, kind: Kind, old: str, new: str) -> sql.Composable:
    """The new value of column `name`, from the stored row `old` and the staged row `new`."""
    stored, staged = sql.Identifier(old, name), sql.Identifier(new, name)
    if kind is ASSIGN:
        return staged
    if kind is ADD:
        return sql.SQL("COALESCE({}, 0) + {}").format(stored, staged)
    function = sql.SQL("GREATEST" if kind is MAX else "LEAST")
    return sql.SQL("{}({}, {})").format(
        function,
        _text_collation(table, name, stored),
        _text_collation(table, name, staged),
    )


def upsert(table: Table, staging: str, shape: Shape, number: int) -> sql.Composed:
    """Insert the shape's rows, or apply them to the rows that exist."""
    names = [name for name, _ in shape]
    values = [(name, kind) for name, kind in shape if name not in table.key]
    if values:
        updates = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(
                sql.Identifier(name), _apply(table, name, kind, "t", "excluded")
            )
            for name, kind in values
        )
        conflict: sql.Composable = sql.SQL("DO UPDATE SET {}").format(updates)
    else:
        conflict = sql.SQL("DO NOTHING")  # a set naming only the key: create, never change
    return sql.SQL(
        "INSERT INTO {} AS t ({}) SELECT {} FROM {} WHERE {} = {} ON CONFLICT ({}) {}"
    ).format(
        target(table),
        _columns(names),
        _columns(names),
        sql.Identifier(staging),
        sql.Identifier(SHAPE),
        sql.Literal(number),
        _columns(table.key),
        conflict,
    )


def update(table: Table, staging: str, shape: Shape, number: int) -> sql.Composed | None:
    """Apply the shape's rows to existing rows only (update mode); None if it writes nothing."""
    values = [(name, kind) for name, kind in shape if name not in table.key]
    if not values:
        return None
    updates = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(name), _apply(table, name, kind, "t", "s"))
        for name, kind in values
    )
    return sql.SQL("UPDATE {} AS t SET {} FROM {} AS s WHERE s.{} = {} AND {}").format(
        target(table),
        updates,
        sql.Identifier(staging),
        sql.Identifier(SHAPE),
        sql.Literal(number),
        _key_match(table, "t", "s"),
    )
