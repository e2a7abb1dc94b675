"""`create_tables` and `check_tables` against the real PostgreSQL, and `streamsink tables`.

Each test declares its tables (and, for the Python API, its offsets tables) in a schema of
its own, so the tests can run in parallel on the run's database.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.cli import main
from streamsink.schemas.config import Config
from streamsink.schemas.table import Column, ColumnType, Mode, Policy, Table
from streamsink.sinks.postgres.schema import (
    OFFSETS,
    REJECTED,
    check_tables,
    create_tables,
)
from tests.sinks.pgsetup import ensure_offsets


@pytest.fixture
def schema() -> str:
    """A schema name of this test's own (created by `create_tables`)."""
    return f"t_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def conn(database_url: str, schema: str) -> Iterator[Connection]:
    """A connection to the run's database; the test's schema is dropped afterwards."""
    connection = psycopg2.connect(database_url)
    yield connection
    connection.rollback()
    with connection.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    connection.commit()
    connection.close()


def tables(schema: str) -> Config:
    """A keyed table of every type, a table with a composite key and an append-only log."""
    every_type = {
        "id": Column(ColumnType.INT),  # a key column, not marked non-nullable: NOT NULL anyway
        "order": Column(ColumnType.TEXT),  # a reserved word: only quoting makes it a column
        "score": Column(ColumnType.FLOAT, Policy.MAX, nullable=False),
        "done": Column(ColumnType.BOOL),
        "meta": Column(ColumnType.JSON),
        "at": Column(ColumnType.TIMESTAMP),
        "ref": Column(ColumnType.UUID),
    }
    return Config(
        tables={
            "items": Table("items", ("id",), every_type, schema=schema),
            "pairs": Table(
                "pairs",
                ("a", "b"),
                {"a": Column(ColumnType.TEXT), "b": Column(ColumnType.INT)},
                schema=schema,
            ),
            "log": Table("log", (), {"line": Column(ColumnType.TEXT)}, schema=schema),
        }
    )


def execute(conn: Connection, statement: str, schema: str) -> None:
    """Run DDL naming the test's schema as {} and commit."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL(statement).format(sql.Identifier(schema)))
    conn.commit()


def columns(conn: Connection, schema: str, table: str) -> list[tuple[str, str, str]]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (schema, table),
        )
        return list(cur.fetchall())


def primary_key(conn: Connection, schema: str, table: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT k.column_name FROM information_schema.table_constraints c"
            " JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name)"
            " WHERE c.table_schema = %s AND c.table_name = %s AND c.constraint_type = 'PRIMARY KEY'"
            " ORDER BY k.ordinal_position",
            (schema, table),
        )
        return [name for (name,) in cur.fetchall()]


def test_created_tables_have_the_declared_shape_and_check_clean(
    conn: Connection, schema: str
) -> None:
    config = tables(schema)
    lines = create_tables(conn, config, offsets_schema=schema)
    assert lines == [
        f"schema {schema}: created",
        f"{schema}.items: created",
        f"{schema}.pairs: created",
        f"{schema}.log: created",
        f"{schema}.{OFFSETS}: created",
        f"{schema}.{REJECTED}: created",
    ]
    assert columns(conn, schema, "items") == [
        ("id", "bigint", "NO"),
        ("order", "text", "YES"),
        ("score", "double precision", "NO"),
        ("done", "boolean", "YES"),
        ("meta", "jsonb", "YES"),
        ("at", "timestamp with time zone", "YES"),
        ("ref", "uuid", "YES"),
    ]
    assert primary_key(conn, schema, "items") == ["id"]
    assert primary_key(conn, schema, "pairs") == ["a", "b"]
    assert columns(conn, schema, "log") == [("line", "text", "YES")]
    assert primary_key(conn, schema, "log") == []
    assert check_tables(conn, config, offsets_schema=schema) == []


def test_create_is_idempotent(conn: Connection, schema: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(conn, "INSERT INTO {}.pairs VALUES ('x', 1)", schema)
    again = create_tables(conn, config, offsets_schema=schema)
    assert len(again) == 5
    assert all(line.endswith(": already exists, left as it is") for line in again)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT a, b FROM {}.pairs").format(sql.Identifier(schema)))
        assert cur.fetchall() == [("x", 1)]
    assert check_tables(conn, config, offsets_schema=schema) == []


def test_check_leaves_no_transaction_open(conn: Connection, schema: str) -> None:
    create_tables(conn, tables(schema), offsets_schema=schema)
    check_tables(conn, tables(schema), offsets_schema=schema)
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_missing_table(conn: Connection, schema: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(conn, "DROP TABLE {}.pairs", schema)
    assert check_tables(conn, config, offsets_schema=schema) == [
        f"{schema}.pairs: table missing; expected a table of 2 columns with key (a, b)"
        " (run `streamsink tables create`)"
    ]


def test_a_view_is_not_a_table(conn: Connection, schema: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(conn, "DROP TABLE {0}.log; CREATE VIEW {0}.log AS SELECT 'x'::text AS line", schema)
    assert check_tables(conn, config, offsets_schema=schema) == [
        f"{schema}.log: is a view; expected a table"
    ]


def test_missing_column(conn: Connection, schema: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(conn, 'ALTER TABLE {}.items DROP COLUMN "order", DROP COLUMN score', schema)
    assert check_tables(conn, config, offsets_schema=schema) == [
        f"{schema}.items.order: column missing; expected order text",
        f"{schema}.items.score: column missing; expected score double precision NOT NULL",
    ]


@pytest.mark.parametrize(
    ("column", "wrong", "expected"),
    [
        ("id", "integer", "bigint"),
        ("score", "real", "double precision"),
        ("meta", "json", "jsonb"),
        ("at", "timestamp without time zone", "timestamp with time zone"),
        ("ref", "text", "uuid"),
        ("done", "text", "boolean"),
        ("order", "character varying", "text"),
    ],
)
def test_wrong_type(conn: Connection, schema: str, column: str, wrong: str, expected: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING NULL").format(
                sql.Identifier(schema, "items"), sql.Identifier(column), sql.SQL(wrong)
            )
        )
    conn.commit()
    assert check_tables(conn, config, offsets_schema=schema) == [
        f"{schema}.items.{column}: type is {wrong}; expected {expected}"
    ]


def test_nullability_both_ways(conn: Connection, schema: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(conn, "ALTER TABLE {}.items ALTER score DROP NOT NULL, ALTER meta SET NOT NULL", schema)
    assert check_tables(conn, config, offsets_schema=schema) == [
        f"{schema}.items.score: nullable; expected NOT NULL (declared nullable = false)",
        f"{schema}.items.meta: NOT NULL; expected nullable (declared nullable, the sink may"
        " write null there)",
    ]


def test_a_table_made_by_hand_without_a_key(conn: Connection, schema: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(
        conn, "DROP TABLE {0}.pairs; CREATE TABLE {0}.pairs (a text, b bigint NOT NULL)", schema
    )
    assert check_tables(conn, config, offsets_schema=schema) == [
        f"{schema}.pairs.a: nullable; expected NOT NULL (a key column)",
        f"{schema}.pairs: no primary key or unique index on exactly (a, b); expected one"
        " (the sink's INSERT ... ON CONFLICT needs it)",
    ]


@pytest.mark.parametrize(
    ("index", "arbiter"),
    [
        ("CREATE UNIQUE INDEX ON {}.pairs (b, a)", True),  # the order does not matter
        ("ALTER TABLE {}.pairs ADD UNIQUE (a, b)", True),
        ("CREATE UNIQUE INDEX ON {}.pairs (a, b) INCLUDE (note)", True),
        ("CREATE UNIQUE INDEX ON {}.pairs (a)", False),  # ON CONFLICT (a, b) does not infer it
        ("CREATE UNIQUE INDEX ON {}.pairs (a, b, note)", False),
        ("CREATE UNIQUE INDEX ON {}.pairs (a, b) WHERE b > 0", False),  # partial
        ("CREATE UNIQUE INDEX ON {}.pairs (a, (b + 0))", False),  # an expression
        ("CREATE INDEX ON {}.pairs (a, b)", False),  # not unique
        ("ALTER TABLE {}.pairs ADD UNIQUE (a, b) DEFERRABLE", False),  # not an arbiter
    ],
)
def test_the_key_needs_a_unique_index_on_exactly_its_columns(
    conn: Connection, schema: str, index: str, arbiter: bool
) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(conn, "ALTER TABLE {0}.pairs DROP CONSTRAINT pairs_pkey, ADD note text", schema)
    execute(conn, index, schema)
    missing = (
        f"{schema}.pairs: no primary key or unique index on exactly (a, b); expected one"
        " (the sink's INSERT ... ON CONFLICT needs it)"
    )
    assert check_tables(conn, config, offsets_schema=schema) == ([] if arbiter else [missing])


def test_extra_columns(conn: Connection, schema: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(
        conn,
        "ALTER TABLE {0}.items ADD free text, ADD stamped timestamptz NOT NULL DEFAULT now(),"
        " ADD serial_no bigint GENERATED ALWAYS AS IDENTITY, ADD twice bigint NOT NULL"
        " GENERATED ALWAYS AS (id * 2) STORED, ADD owner text NOT NULL;"
        " ALTER TABLE {0}.log ADD tag text NOT NULL",
        schema,
    )
    assert check_tables(conn, config, offsets_schema=schema) == [
        f"{schema}.items.owner: NOT NULL without a default and not in the config; expected it"
        " nullable or with a default (the sink never writes it, so its inserts would fail)",
        f"{schema}.log.tag: NOT NULL without a default and not in the config; expected it"
        " nullable or with a default (the sink never writes it, so its inserts would fail)",
    ]


def test_an_update_table_may_have_columns_of_others(conn: Connection, schema: str) -> None:
    table = Table("accounts", ("id",), {"id": Column(ColumnType.INT)}, Mode.UPDATE, schema)
    config = Config(tables={"accounts": table})
    create_tables(conn, config, offsets_schema=schema)
    execute(conn, "ALTER TABLE {}.accounts ADD owner text NOT NULL", schema)
    assert check_tables(conn, config, offsets_schema=schema) == []
    execute(conn, "ALTER TABLE {}.accounts DROP CONSTRAINT accounts_pkey", schema)
    assert len(check_tables(conn, config, offsets_schema=schema)) == 1


def test_missing_offsets_tables(conn: Connection, schema: str) -> None:
    config = tables(schema)
    create_tables(conn, config, offsets_schema=schema)
    execute(conn, f"DROP TABLE {{0}}.{OFFSETS}, {{0}}.{REJECTED}", schema)
    assert check_tables(conn, config, offsets_schema=schema) == [
        f"{schema}.{OFFSETS}: table missing; expected the sink's offsets table"
        " (run `streamsink tables create`)",
        f"{schema}.{REJECTED}: table missing; expected the sink's rejected entries table"
        " (run `streamsink tables create`)",
    ]
    ensure_offsets(conn, schema)
    assert check_tables(conn, config, offsets_schema=schema) == []


CONFIG = """
[postgres]
dsn = "{dsn}"
[tables.tasks]
schema = "{schema}"
key = ["id"]
columns = {{ id = "int", status = "text", seen = {{ type = "timestamp", nullable = false }} }}
[tables.events]
schema = "{schema}"
columns = {{ body = "json" }}
"""


@pytest.fixture
def config_file(tmp_path: Path, database_url: str, schema: str) -> Path:
    path = tmp_path / "streamsink.toml"
    path.write_text(CONFIG.format(dsn=database_url, schema=schema))
    return path


def test_cli_create_then_check(
    conn: Connection, schema: str, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tables", "create", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        f"schema {schema}: created",
        f"{schema}.tasks: created",
        f"{schema}.events: created",
    ]
    assert out[3].startswith(f"public.{OFFSETS}: ")  # created, or made by an earlier test
    assert out[4].startswith(f"public.{REJECTED}: ")
    assert main(["--config", str(config_file), "tables", "check"]) == 0
    assert capsys.readouterr().out == "ok: 2 tables match\n"
    assert columns(conn, schema, "tasks") == [
        ("id", "bigint", "NO"),
        ("status", "text", "YES"),
        ("seen", "timestamp with time zone", "NO"),
    ]


def test_cli_check_reports_each_mismatch_and_exits_1(
    conn: Connection, schema: str, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tables", "check", "--config", str(config_file)]) == 1
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"{schema}.tasks: table missing; expected a table of 3 columns with key (id)"
        " (run `streamsink tables create`)",
        f"{schema}.events: table missing; expected a table of 1 column with no key"
        " (an append-only log) (run `streamsink tables create`)",
    ]
    assert main(["tables", "create", "--config", str(config_file)]) == 0
    execute(conn, "ALTER TABLE {}.tasks ALTER status TYPE integer USING NULL", schema)
    capsys.readouterr()
    assert main(["tables", "check", "--config", str(config_file)]) == 1
    assert capsys.readouterr().out == f"{schema}.tasks.status: type is integer; expected text\n"


def test_cli_database_url_overrides_the_config(
    conn: Connection,
    tmp_path: Path,
    database_url: str,
    schema: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(
        CONFIG.format(dsn="postgresql://postgres@127.0.0.1:1/test", schema=schema)
    )
    assert main(["tables", "check", "--config", str(unreachable)]) == 2
    assert "streamsink: error: PostgreSQL: " in capsys.readouterr().err
    args = ["--database-url", database_url, "tables", "create", "--config", str(unreachable)]
    assert main(args) == 0
    assert f"{schema}.tasks: created" in capsys.readouterr().out


def test_cli_needs_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["tables", "check", "--config", str(empty)]) == 2
    assert "declares no [tables]" in capsys.readouterr().err
