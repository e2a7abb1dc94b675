"""The PostgreSQL sink's error classes against a real server (sinks/postgres/errors.py).

Transient faults raise SinkUnavailable (the worker retries, keeping its lease), what an
operator must fix raises SinkMisconfigured naming table and fix (the group stops), and a
row that cannot be written, by the database or by the encoder, comes back Rejected while
the rest of its window commits.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.errors import SinkMisconfigured, SinkUnavailable
from streamsink.schemas.event import Event, Op
from streamsink.schemas.table import Column, ColumnType, Policy, Table
from streamsink.sinks.base import Batch
from streamsink.sinks.postgres import Pool, PostgresSettings, PostgresSink
from streamsink.sinks.postgres.errors import classify
from streamsink.sinks.postgres.statements import target
from tests.conftest import free_port
from tests.sinks.conftest import create, rows, schema_of
from tests.sinks.postgres.test_sink import batch, entries, write

INT, TEXT, JSON = ColumnType.INT, ColumnType.TEXT, ColumnType.JSON


def items(pg: Connection, made: bool = True) -> Table:
    table = Table(
        "items",
        ("id",),
        {"id": Column(INT), "n": Column(INT, Policy.SUM), "name": Column(TEXT)},
        schema=schema_of(pg),
    )
    if made:
        create(pg, table)
    return table


def window(table: Table, count: int = 3) -> Batch:
    return batch(entries(table, [Event(str(i), Op.INCR, {"id": i, "n": 1}) for i in range(count)]))


def sink_for(dsn: str, **options: Any) -> PostgresSink:
    settings = PostgresSettings(dsn=dsn, pool_size=1, connect_timeout_s=2, **options)
    return PostgresSink(Pool(settings), f"pg-{uuid.uuid4().hex[:8]}", settings)


def dsn_with(database_url: str, **params: Any) -> str:
    parsed = psycopg2.extensions.parse_dsn(database_url)
    parsed.update(params)
    return psycopg2.extensions.make_dsn(**parsed)


# --- configuration: the group stops, the message names table and fix -----------------------


def test_a_declared_table_never_created_is_misconfigured(
    pg: Connection, sink: PostgresSink
) -> None:
    table = items(pg, made=False)
    with pytest.raises(SinkMisconfigured) as raised:
        write(sink, window(table))
    text = str(raised.value)
    assert f"{table.schema}.items" in text and "does not exist" in text
    assert "streamsink tables create --config FILE" in text
    assert isinstance(raised.value.__cause__, psycopg2.errors.UndefinedTable)


def test_a_dropped_column_is_misconfigured(pg: Connection, sink: PostgresSink) -> None:
    table = items(pg)
    with pg.cursor() as cur:
        cur.execute(sql.SQL("ALTER TABLE {} DROP COLUMN n").format(target(table)))
    with pytest.raises(SinkMisconfigured) as raised:
        write(sink, window(table))
    text = str(raised.value)
    assert '"n"' in text and "42703" in text and f"{table.schema}.items" in text
    assert "ADD COLUMN" in text and "streamsink tables check" in text


def test_a_column_of_another_type_than_declared_is_misconfigured(
    pg: Connection, sink: PostgresSink
) -> None:
    table = items(pg)
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN name TYPE jsonb USING NULL").format(target(table))
        )
    with pytest.raises(SinkMisconfigured) as raised:
        write(sink, batch(entries(table, [Event("1", Op.SET, {"id": 1, "name": "x"})])))
    assert "42804" in str(raised.value) and "streamsink tables check" in str(raised.value)


def test_a_not_null_column_the_declaration_does_not_name_is_misconfigured(
    pg: Connection, sink: PostgresSink
) -> None:
    """No event can fill a column it cannot name: the table's fault, not the rows'."""
    table = items(pg)
    with pg.cursor() as cur:
        cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN extra int NOT NULL").format(target(table)))
    with pytest.raises(SinkMisconfigured) as raised:
        write(sink, window(table))
    text = str(raised.value)
    assert "23502" in text and "column extra" in text and f"{table.schema}.items" in text
    assert sink.stats.rejected == 0


def test_a_null_in_a_declared_not_null_column_is_the_rows_fault(
    pg: Connection, sink: PostgresSink
) -> None:
    table = items(pg)
    with pg.cursor() as cur:
        cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN name SET NOT NULL").format(target(table)))
    events = [Event(str(i), Op.SET, {"id": i, "name": f"n{i}"}) for i in range(5)]
    events[2] = Event("2", Op.INCR, {"id": 2, "n": 1})  # a new row without a name
    made = entries(table, events)
    assert [r.entry_id for r in write(sink, batch(made))] == [made[2].id]


@pytest.fixture
def role(pg: Connection) -> Iterator[str]:
    """A login role without any right on the test's schema or tables (dropped at the end)."""
    name = f"streamsink_norights_{uuid.uuid4().hex[:8]}"
    with pg.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_a_role_without_rights_is_misconfigured(
    pg: Connection, database_url: str, role: str
) -> None:
    table = items(pg)
    sink = sink_for(dsn_with(database_url, user=role))
    try:
        with pytest.raises(SinkMisconfigured) as raised:
            write(sink, window(table))
    finally:
        sink.pool.close()
    text = str(raised.value)
    assert "42501" in text and "permission denied" in text and "GRANT" in text.upper()
    assert f"{table.schema}.items" in text


def test_a_database_that_does_not_exist_is_misconfigured(pg: Connection, database_url: str) -> None:
    sink = sink_for(dsn_with(database_url, dbname=f"nowhere_{uuid.uuid4().hex[:6]}"))
    with pytest.raises(SinkMisconfigured) as raised:
        write(sink, window(items(pg)))
    assert "does not exist" in str(raised.value) and "dsn" in str(raised.value)
    assert isinstance(raised.value.__cause__, psycopg2.OperationalError)


def test_a_role_that_does_not_exist_is_misconfigured(pg: Connection, database_url: str) -> None:
    sink = sink_for(dsn_with(database_url, user=f"nobody_{uuid.uuid4().hex[:6]}"))
    with pytest.raises(SinkMisconfigured) as raised:
        write(sink, window(items(pg)))
    assert "role" in str(raised.value) and "does not exist" in str(raised.value)


# --- transient: retried as long as it takes ------------------------------------------------


def test_a_host_that_refuses_connections_is_unavailable(pg: Connection, database_url: str) -> None:
    sink = sink_for(dsn_with(database_url, host="127.0.0.1", port=str(free_port())))
    with pytest.raises(SinkUnavailable) as raised:
        write(sink, window(items(pg)))
    assert isinstance(raised.value.__cause__, psycopg2.OperationalError)


def locked(pg: Connection, table: Table, key: int) -> Connection:
    """Another session holding row `key` of `table` locked (until it rolls back)."""
    other = psycopg2.connect(pg.dsn)
    with other.cursor() as cur:
        cur.execute(sql.SQL("INSERT INTO {} (id, n) VALUES (%s, 0)").format(target(table)), (key,))
    return other


def writing(sink: PostgresSink, item: Batch) -> tuple[threading.Thread, list[Any]]:
    """Write `item` from a thread; the list gets its result or exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(write(sink, item))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def blocked_backend(pg: Connection, seconds: float = 10) -> int:
    """The pid of the sink's backend once it waits for a lock."""
    deadline = time.monotonic() + seconds
    with pg.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'streamsink'"
                " AND datname = current_database() AND wait_event_type = 'Lock'"
            )
            found = cur.fetchone()
            if found is not None:
                return int(found[0])
            time.sleep(0.02)
    raise AssertionError("the sink never waited for the lock")


def test_a_connection_terminated_mid_transaction_is_unavailable_then_retried(
    pg: Connection, sink: PostgresSink
) -> None:
    table = items(pg)
    other = locked(pg, table, 1)
    item = window(table)
    try:
        thread, outcome = writing(sink, item)
        pid = blocked_backend(pg)
        with pg.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        thread.join(10)
    finally:
        other.rollback()
        other.close()
    [error] = outcome
    assert isinstance(error, SinkUnavailable), repr(error)
    assert isinstance(error.__cause__, psycopg2.OperationalError)
    assert write(sink, item) == []  # the retry: a new connection, the window applied once
    assert [row["n"] for row in rows(pg, table)] == [1, 1, 1]


def test_a_statement_timeout_is_unavailable_then_retried(pg: Connection, database_url: str) -> None:
    table = items(pg)
    sink = sink_for(database_url, statement_timeout_ms=300)
    other = locked(pg, table, 1)
    item = window(table)
    try:
        with pytest.raises(SinkUnavailable) as raised:
            write(sink, item)
        assert "57014" in str(raised.value)
        assert isinstance(raised.value.__cause__, psycopg2.errors.QueryCanceled)
        other.rollback()
        assert write(sink, item) == []
    finally:
        other.close()
        sink.pool.close()
    assert [row["n"] for row in rows(pg, table)] == [1, 1, 1]


# Every SQLSTATE the table in errors.py names, raised by the real server (so psycopg2 picks
# its own exception class for it): the class the sink makes of it.
CODES = {
    "08006": SinkUnavailable,  # connection failure
    "08000": SinkUnavailable,
    "40001": SinkUnavailable,  # serialization failure
    "40P01": SinkUnavailable,  # deadlock
    "57P01": SinkUnavailable,  # admin shutdown
    "57P02": SinkUnavailable,  # crash shutdown
    "57P03": SinkUnavailable,  # cannot connect now
    "57014": SinkUnavailable,  # query canceled, statement timeout
    "53100": SinkUnavailable,  # disk full
    "53300": SinkUnavailable,  # too many connections
    "55P03": SinkUnavailable,  # lock not available
    "25006": SinkUnavailable,  # read-only transaction (failover)
    "42P01": SinkMisconfigured,  # undefined table
    "3F000": SinkMisconfigured,  # invalid schema name
    "42703": SinkMisconfigured,  # undefined column
    "42501": SinkMisconfigured,  # insufficient privilege
    "42883": SinkMisconfigured,  # undefined function
    "3D000": SinkMisconfigured,  # invalid catalog name
    "28000": SinkMisconfigured,  # invalid authorization
    "28P01": SinkMisconfigured,  # invalid password
    "42804": SinkMisconfigured,  # datatype mismatch
    "42846": SinkMisconfigured,  # cannot coerce
    "42P10": SinkMisconfigured,  # no unique index for ON CONFLICT
    "XX000": None,  # internal error: no known class, raised as it is (a bug)
    "42601": None,  # syntax error: ours, a bug
}


@pytest.mark.parametrize(("code", "expected"), CODES.items())
def test_each_sqlstate_maps_to_its_class(pg: Connection, code: str, expected: Any) -> None:
    with pg.cursor() as cur, pytest.raises(psycopg2.Error) as raised:
        cur.execute(f"DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '{code}'; END $$")
    assert raised.value.pgcode == code
    made = classify(raised.value, "pg", "s.items")
    assert type(made) is expected if expected else made is None


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (psycopg2.InterfaceError("connection already closed"), SinkUnavailable),
        (psycopg2.OperationalError("SSL SYSCALL error: EOF detected"), SinkUnavailable),
        (
            psycopg2.DatabaseError("error with status PGRES_TUPLES_OK and no message"),
            SinkUnavailable,
        ),
        (
            psycopg2.OperationalError('FATAL:  password authentication failed for user "a"'),
            SinkMisconfigured,
        ),
        (psycopg2.OperationalError("FATAL:  no pg_hba.conf entry for host"), SinkMisconfigured),
        (psycopg2.ProgrammingError("can't execute an empty query"), None),
    ],
)
def test_errors_without_sqlstate_map_by_kind_and_message(
    error: psycopg2.Error, expected: Any
) -> None:
    made = classify(error, "pg", "s.items")
    assert type(made) is expected if expected else made is None


# --- data: only the entry at fault is rejected ---------------------------------------------


def nested(depth: int) -> Any:
    value: Any = {"leaf": 1}
    for _ in range(depth):
        value = [value]
    return value


def test_a_value_the_encoder_refuses_rejects_only_its_entry(
    pg: Connection, sink: PostgresSink
) -> None:
    table = Table("docs", ("id",), {"id": Column(INT), "doc": Column(JSON)}, schema=schema_of(pg))
    create(pg, table)
    events = [Event(str(i), Op.SET, {"id": i, "doc": {"n": i}}) for i in range(40)]
    events[23] = Event("23", Op.SET, {"id": 23, "doc": nested(300)})
    made = entries(table, events)
    rejected = write(sink, batch(made))
    assert [r.entry_id for r in rejected] == [made[23].id]
    [reason] = [r.reason for r in rejected]
    assert "column doc" in reason and "Recursion limit" in reason and "docs" in reason
    assert [row["id"] for row in rows(pg, table)] == [i for i in range(40) if i != 23]
    assert sink.stats.rejected == 1 and sink.stats.rows == 39


def test_an_appended_value_the_encoder_refuses_rejects_only_its_entry(
    pg: Connection, sink: PostgresSink
) -> None:
    table = Table("log", (), {"seq": Column(INT), "doc": Column(JSON)}, schema=schema_of(pg))
    create(pg, table)
    events = [Event("k", Op.APPEND, {"seq": i, "doc": [i]}) for i in range(10)]
    events[4] = Event("k", Op.APPEND, {"seq": 4, "doc": nested(400)})
    made = entries(table, events)
    rejected = write(sink, batch(made))
    assert [r.entry_id for r in rejected] == [made[4].id]
    assert "column doc" in rejected[0].reason and "Recursion limit" in rejected[0].reason
    with pg.cursor() as cur:
        cur.execute(sql.SQL("SELECT seq FROM {} ORDER BY seq").format(target(table)))
        assert [seq for (seq,) in cur.fetchall()] == [i for i in range(10) if i != 4]
