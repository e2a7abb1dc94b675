"""PostgreSQL fixtures for the sink tests: a schema of each test's own, a sink, a reader."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.schemas.table import Table
from streamsink.sinks.postgres import Pool, PostgresSettings, PostgresSink
from streamsink.sinks.postgres.schema import table_ddl
from streamsink.sinks.postgres.statements import target
from tests.sinks.pgsetup import ensure_offsets


class TestConnection(Connection):
    """A connection that knows the schema of its test."""

    schema = ""


@pytest.fixture
def pg(database_url: str) -> Iterator[Connection]:
    """An autocommit connection, with a fresh schema of this test's own (`schema_of`)."""
    conn = psycopg2.connect(database_url, connection_factory=TestConnection)
    conn.autocommit = True
    ensure_offsets(conn)
    schema = f"t_{uuid.uuid4().hex[:10]}"
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.schema = schema
    try:
        yield conn
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.close()


def schema_of(conn: Connection) -> str:
    assert isinstance(conn, TestConnection)
    return conn.schema


def create(conn: Connection, table: Table) -> None:
    """Create `table` as `streamsink tables create` would (drop it first if it exists)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target(table)))
        cur.execute(table_ddl(table))


def rows(conn: Connection, table: Table) -> list[dict[str, Any]]:
    """Every row of `table`, as dicts, in key order."""
    names = list(table.columns)
    order = table.key or names
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
                sql.SQL(", ").join(map(sql.Identifier, names)),
                target(table),
                sql.SQL(", ").join(map(sql.Identifier, order)),
            )
        )
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@pytest.fixture
def sink_settings(database_url: str) -> PostgresSettings:
    return PostgresSettings(dsn=database_url, pool_size=2, statement_timeout_ms=10_000)


@pytest.fixture
def sink(sink_settings: PostgresSettings) -> Iterator[PostgresSink]:
    """A PostgreSQL sink named after the test (its offsets are its own)."""
    made = PostgresSink(Pool(sink_settings), f"pg-{uuid.uuid4().hex[:8]}", sink_settings)
    yield made
    asyncio.run(made.close())
