"""The PostgreSQL side of a config: column types, the offsets tables, create and check.

`create_tables` makes what the config declares where it is missing and leaves existing tables
as they are; `check_tables` says how the database differs from the config in ways the sink
would trip on. Every identifier is composed with psycopg2's `sql` module, never by string
formatting; every name compared with the catalogs is a query parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from psycopg2 import sql
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from streamsink.schemas.config import Config
from streamsink.schemas.table import Column, ColumnType, Mode, Table

PG_TYPES = {
    ColumnType.INT: "bigint",
    ColumnType.FLOAT: "double precision",
    ColumnType.TEXT: "text",
    ColumnType.BOOL: "boolean",
    ColumnType.JSON: "jsonb",
    ColumnType.TIMESTAMP: "timestamp with time zone",
    ColumnType.UUID: "uuid",
    ColumnType.NUMERIC: "numeric",  # with the column's precision and scale: see pg_type
}
"""The PostgreSQL type of each column type (as information_schema spells it)."""


def pg_type(column: Column) -> str:
    """The PostgreSQL type of a declared column, as CREATE TABLE writes it."""
    numeric = column.numeric
    if numeric is not None:
        return f"numeric({numeric.precision},{numeric.scale})"
    return PG_TYPES[column.type]


OFFSETS = "streamsink_offsets"
"""(sink, group, stream, shard) -> the last entry ID applied and the lease epoch that did it."""

REJECTED = "streamsink_rejected"
"""Entries a sink refused for good, kept so a new owner can dead-letter them again."""

TABLE_KINDS = frozenset({"r", "p"})
"""pg_class.relkind of the relations the sink can write: tables and partitioned tables."""

OTHER_KINDS = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "i": "an index",
    "I": "a partitioned index",
    "S": "a sequence",
    "c": "a composite type",
}

CREATE_HINT = "run `streamsink tables create`"


class FoundColumn(NamedTuple):
    """A column as information_schema describes it."""

    type: str
    nullable: bool
    filled: bool  # a default, identity or generated column: inserts need not name it
    precision: int | None = None  # numeric: its digits (None: unconstrained numeric)
    scale: int | None = None


def offsets_ddl(schema: str) -> list[sql.Composed]:
    """CREATE statements of the offsets and rejected tables (idempotent)."""
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " sink text NOT NULL, group_name text NOT NULL, stream text NOT NULL,"
            " shard integer NOT NULL, last_id text NOT NULL, epoch bigint NOT NULL,"
            " updated_at timestamp with time zone NOT NULL DEFAULT now(),"
            " PRIMARY KEY (sink, group_name, stream, shard))"
        ).format(sql.Identifier(schema, OFFSETS)),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " sink text NOT NULL, group_name text NOT NULL, stream text NOT NULL,"
            " shard integer NOT NULL, entry_id text NOT NULL, reason text NOT NULL,"
            " at timestamp with time zone NOT NULL DEFAULT now(),"
            " PRIMARY KEY (sink, group_name, stream, shard, entry_id))"
        ).format(sql.Identifier(schema, REJECTED)),
    ]


def schema_of(table: Table) -> str:
    """The PostgreSQL schema of a declared table ("public" unless it names one)."""
    return table.schema or "public"


def not_null(table: Table, column: str) -> bool:
    """Whether `column` must be NOT NULL: a key column, or one declared nullable = false."""
    return column in table.key or not table.columns[column].nullable


def table_ddl(table: Table) -> sql.Composed:
    """CREATE TABLE IF NOT EXISTS of a declared table; a key becomes its primary key."""
    parts = [
        sql.SQL("{} {}{}").format(
            sql.Identifier(name),
            sql.SQL(pg_type(column)),
            sql.SQL(" NOT NULL" if not_null(table, name) else ""),
        )
        for name, column in table.columns.items()
    ]
    if table.key:  # an empty key is an append-only log: no primary key
        parts.append(sql.SQL("PRIMARY KEY ({})").format(_names(table.key)))
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
        sql.Identifier(schema_of(table), table.name), sql.SQL(", ").join(parts)
    )


def create_tables(conn: Connection, config: Config, offsets_schema: str = "public") -> list[str]:
    """Create the config's tables and the offsets tables where missing, commit, say what was done.

    Existing tables are left as they are: `check_tables` says whether they fit.
    """
    targets = [(schema_of(t), t.name, table_ddl(t)) for t in config.tables.values()]
    offsets = zip((OFFSETS, REJECTED), offsets_ddl(offsets_schema), strict=True)
    targets += [(offsets_schema, name, ddl) for name, ddl in offsets]
    lines = []
    try:
        with conn.cursor() as cur:
            for schema in dict.fromkeys(schema for schema, _, _ in targets):
                if _one(cur, "SELECT 1 FROM pg_namespace WHERE nspname = %s", schema) is None:
                    cur.execute(
                        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
                    )
                    lines.append(f"schema {schema}: created")
            for schema, name, ddl in targets:
                existed = _relkind(cur, schema, name) is not None
                cur.execute(ddl)
                done = "already exists, left as it is" if existed else "created"
                lines.append(f"{schema}.{name}: {done}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return lines


def reset_tables(
    conn: Connection, config: Config, sinks: Iterable[str], offsets_schema: str = "public"
) -> None:
    """Drop the config's tables and forget the offsets of `sinks` for its groups (the demo's
    fresh start: its Redis streams are re-created, so old offsets and epochs mean nothing)."""
    groups = [group.name for group in config.groups.values()]
    with conn.cursor() as cur:
        for table in config.tables.values():
            cur.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(
                    sql.Identifier(schema_of(table), table.name)
                )
            )
        for name in (OFFSETS, REJECTED):
            if _relkind(cur, offsets_schema, name) is not None:
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE sink = ANY(%s) AND group_name = ANY(%s)").format(
                        sql.Identifier(offsets_schema, name)
                    ),
                    (list(sinks), groups),
                )
    conn.commit()


def check_tables(conn: Connection, config: Config, offsets_schema: str = "public") -> list[str]:
    """How the database differs from the config's tables and the offsets tables; [] if it fits.

    Only reads the catalogs; a transaction it had to open is rolled back at the end.
    """
    opened = conn.info.transaction_status == TRANSACTION_STATUS_IDLE
    try:
        with conn.cursor() as cur:
            problems = [line for t in config.tables.values() for line in _check_table(cur, t)]
            for name, what in ((OFFSETS, "offsets"), (REJECTED, "rejected entries")):
                if _relkind(cur, offsets_schema, name) not in TABLE_KINDS:
                    problems.append(
                        f"{offsets_schema}.{name}: table missing; expected the sink's {what}"
                        f" table ({CREATE_HINT})"
                    )
    finally:
        if opened:
            conn.rollback()
    return problems


def _check_table(cur: Cursor, table: Table) -> list[str]:
    where = f"{schema_of(table)}.{table.name}"
    kind = _relkind(cur, schema_of(table), table.name)
    if kind is None:
        key = f"key ({', '.join(table.key)})" if table.key else "no key (an append-only log)"
        count = f"{len(table.columns)} column{'s' if len(table.columns) > 1 else ''}"
        return [f"{where}: table missing; expected a table of {count} with {key} ({CREATE_HINT})"]
    if kind not in TABLE_KINDS:
        return [f"{where}: is {OTHER_KINDS.get(kind, 'not a table')}; expected a table"]
    found = _columns(cur, schema_of(table), table.name)
    problems = [line for name in table.columns for line in _check_column(where, table, name, found)]
    if table.mode is not Mode.UPDATE:  # update mode never inserts: other columns are not its
        problems += [
            f"{where}.{name}: NOT NULL without a default and not in the config; expected it"
            " nullable or with a default (the sink never writes it, so its inserts would fail)"
            for name, column in found.items()
            if name not in table.columns and not column.nullable and not column.filled
        ]
    if table.key and set(table.key) not in _unique_keys(cur, schema_of(table), table.name):
        problems.append(
            f"{where}: no primary key or unique index on exactly ({', '.join(table.key)});"
            " expected one (the sink's INSERT ... ON CONFLICT needs it)"
        )
    return problems


def _check_column(where: str, table: Table, name: str, found: dict[str, FoundColumn]) -> list[str]:
    declared = table.columns[name]
    expected = PG_TYPES[declared.type]
    required = not_null(table, name)
    column = found.get(name)
    if column is None:
        wanted = f"{expected} NOT NULL" if required else expected
        return [f"{where}.{name}: column missing; expected {name} {wanted}"]
    problems = []
    if column.type != expected:
        problems.append(f"{where}.{name}: type is {column.type}; expected {pg_type(declared)}")
    elif declared.numeric is not None and not _holds(column, declared):
        problems.append(
            f"{where}.{name}: type is numeric({column.precision},{column.scale}); expected "
            f"{pg_type(declared)} or wider (it must hold every value the workers accept)"
        )
    if required and column.nullable:
        why = "a key column" if name in table.key else "declared nullable = false"
        problems.append(f"{where}.{name}: nullable; expected NOT NULL ({why})")
    if not required and not column.nullable:
        problems.append(
            f"{where}.{name}: NOT NULL; expected nullable (declared nullable, the sink may"
            " write null there)"
        )
    return problems


def _holds(column: FoundColumn, declared: Column) -> bool:
    """Whether a numeric column of the database holds every value of the declared one."""
    if column.precision is None or column.scale is None:  # numeric without digits: any
        return True
    precision, scale = declared.precision or 0, declared.scale or 0
    return column.scale >= scale and column.precision - column.scale >= precision - scale


def _columns(cur: Cursor, schema: str, table: str) -> dict[str, FoundColumn]:
    cur.execute(
        "SELECT column_name, data_type, is_nullable = 'YES',"
        " column_default IS NOT NULL OR is_identity = 'YES' OR is_generated = 'ALWAYS',"
        " CASE WHEN data_type = 'numeric' THEN numeric_precision END,"
        " CASE WHEN data_type = 'numeric' THEN numeric_scale END"
        " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
        " ORDER BY ordinal_position",
        (schema, table),
    )
    return {name: FoundColumn(*rest) for name, *rest in cur.fetchall()}


def _unique_keys(cur: Cursor, schema: str, table: str) -> list[set[str]]:
    """Column sets of the unique indexes ON CONFLICT can use as arbiters.

    That is valid, immediate (not deferrable), not partial and on plain columns; INCLUDE
    columns are not part of the key.
    """
    cur.execute(
        "SELECT ARRAY(SELECT a.attname::text"
        "  FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)"
        "  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        "  WHERE k.position <= i.indnkeyatts)"
        " FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND i.indisunique AND i.indisvalid"
        " AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL",
        (schema, table),
    )
    return [set(columns) for (columns,) in cur.fetchall()]


def _relkind(cur: Cursor, schema: str, name: str) -> str | None:
    """pg_class.relkind of `schema.name`, None when nothing has that name."""
    kind = _one(
        cur,
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        schema,
        name,
    )
    return None if kind is None else str(kind)


def _one(cur: Cursor, query: str, *params: str) -> Any:
    cur.execute(query, params)
    row = cur.fetchone()
    return None if row is None else row[0]


def _names(names: Iterable[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(name) for name in names)
