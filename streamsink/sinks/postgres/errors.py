"""Which errors of PostgreSQL are whose fault: the network's, the operator's, or a row's.

    transient     SinkUnavailable    retried with backoff as long as it takes, lease kept:
                                     the link lost (no SQLSTATE, or class 08), the server
                                     going down or starting (57P01-57P03), a statement timeout
                                     or cancel (57014), serialization failure or deadlock
                                     (40001, 40P01, 40003), insufficient resources (class 53),
                                     a lock not available (55P03), a read-only transaction
                                     (25006: a failover in progress), no connection to be had
    configuration SinkMisconfigured  the group stops until an operator fixes it: a table,
                                     schema or column missing (42P01, 3F000, 42703), no
                                     permission (42501), a function or operator missing for
                                     the declared types (42883), the table's types differ
                                     from the declaration (42804, 42846), no unique index on
                                     the key (42P10), no such database (3D000), bad
                                     credentials (28000, 28P01), a NOT NULL column the
                                     declaration does not name (23502 on that column)
    data          RowError           the database refuses rows (classes 22, 23, P0) or a value
                                     cannot be encoded for COPY: bisected, only those rows
                                     are rejected (writer.py)
    anything else (raised as it is)  a bug: the worker retries it a few times, then isolates

A connection that psycopg2.connect could not open has no SQLSTATE: a configuration
error is recognised there by libpq's message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import psycopg2

from streamsink.errors import SinkError, SinkMisconfigured, SinkUnavailable
from streamsink.schemas.table import Table

TRANSIENT_CLASSES = ("08", "53")
"""Connection exception; insufficient resources (disk full, out of memory, too many
connections)."""

TRANSIENT = frozenset(
    {
        "40001",  # serialization failure
        "40P01",  # deadlock detected
        "40003",  # statement completion unknown
        "57P01",  # admin shutdown (pg_terminate_backend, a restart)
        "57P02",  # crash shutdown
        "57P03",  # cannot connect now (starting up)
        "57014",  # query canceled: statement timeout
        "55P03",  # lock not available
        "25006",  # read-only transaction: connected to a standby while it is promoted
    }
)

CREATE = "run `streamsink tables create --config FILE`"
CHECK = "`streamsink tables check --config FILE` lists every difference"
GRANT = (
    "grant the sink's role USAGE on the schema, SELECT, INSERT, UPDATE and DELETE on the "
    "declared tables and on streamsink_offsets and streamsink_rejected, and TEMPORARY on "
    "the database (the window is staged in a temporary table)"
)

_FIXES: dict[str, str] = {
    "42P01": f"create the missing table: {CREATE}",
    "3F000": f"create the missing schema and its tables: {CREATE}",
    "42703": (
        "add the column to the table (ALTER TABLE … ADD COLUMN) or remove "
        f"it from the declaration; {CHECK}"
    ),
    "42501": GRANT,
    "42883": (
        "a function or operator is missing for the table's column types (the table's types "
        f"differ from the declaration?): {CHECK}"
    ),
    "42804": f"a column's type in the table differs from the declaration: {CHECK}",
    "42846": f"a column's type in the table differs from the declaration: {CHECK}",
    "42P10": f"the table has no primary key or unique index on exactly the declared key: {CHECK}",
    "3D000": "the database does not exist: create it, or fix the database name in the dsn",
    "28000": "the server refuses the role: fix the user in the dsn or allow it in pg_hba.conf",
    "28P01": "authentication failed: fix the user and password of the dsn",
}
"""The SQLSTATEs an operator must fix, with what to do."""

_LINK_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
"""Without a SQLSTATE: the link failed (connect refused or timed out, server closed the
connection, connection already closed). A bare DatabaseError without one is a link that
died oddly ("error with status PGRES_TUPLES_OK and no message from the libpq")."""

_CONNECT_FIXES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r'database "[^"]*" does not exist'), _FIXES["3D000"]),
    (re.compile(r'role "[^"]*" does not exist'), "create the role, or fix the user in the dsn"),
    (re.compile(r"password authentication failed"), _FIXES["28P01"]),
    (re.compile(r"no password supplied|password is required"), _FIXES["28P01"]),
    (
        re.compile(r"no pg_hba\.conf entry"),
        "the server does not let this host, user and database in: add a pg_hba.conf entry "
        "or use the user and database it allows",
    ),
    (re.compile(r"permission denied for database"), _FIXES["42501"]),
    (re.compile(r"invalid dsn|invalid connection option|missing \"=\""), "fix the dsn"),
    (re.compile(r"SSL was required|does not support SSL"), "fix sslmode in the dsn"),
)
"""libpq's messages (no SQLSTATE) for connections that waiting will never open."""


def message(error: psycopg2.Error) -> str:
    """The server's message, with its detail, and the SQLSTATE when there is one."""
    diag = error.diag
    text = diag.message_primary or str(error).strip()
    if diag.message_detail:
        text = f"{text} ({diag.message_detail})"
    return f"postgres {error.pgcode}: {text}" if error.pgcode else text


def classify(error: psycopg2.Error, sink: str, tables: str) -> SinkError | None:
    """What `error` means for the sink `sink` writing `tables` (qualified names, for the
    message); None for an error of no known class (a bug: raised as it is)."""
    code = error.pgcode
    what = message(error)
    if code is None:  # raised by libpq or psycopg2, not by the server
        for pattern, fix in _CONNECT_FIXES:  # a bad dsn is a ProgrammingError: check first
            if pattern.search(what):
                return SinkMisconfigured(f"postgres sink {sink!r}: cannot connect ({what}): {fix}")
        if not isinstance(error, _LINK_ERRORS) and type(error) is not psycopg2.DatabaseError:
            return None  # a ProgrammingError of ours, say: a bug
        first = next((line.strip() for line in what.splitlines() if line.strip()), what)
        return SinkUnavailable(f"postgres sink {sink!r}: {type(error).__name__}: {first}")
    if code in TRANSIENT or code[:2] in TRANSIENT_CLASSES:
        return SinkUnavailable(f"postgres sink {sink!r}: {what}")
    if code in _FIXES:
        return SinkMisconfigured(f"postgres sink {sink!r} writing {tables}: {what}: {_FIXES[code]}")
    return None


def undeclared_not_null(
    error: psycopg2.Error, sink: str, tables: Mapping[str, Table]
) -> SinkMisconfigured | None:
    """A NOT NULL violation (23502) on a column the declaration does not name: no event
    can ever fill it, so it is the table's fault, not the rows'."""
    diag = error.diag
    if error.pgcode != "23502" or not diag.column_name:
        return None
    for table in tables.values():
        if table.name == diag.table_name and (table.schema or "public") == diag.schema_name:
            if diag.column_name in table.columns:
                return None
            return SinkMisconfigured(
                f"postgres sink {sink!r} writing {diag.schema_name}.{table.name}: "
                f"{message(error)}: column {diag.column_name} is NOT NULL without a default but "
                "not declared: give it a default, drop NOT NULL, or declare it; "
                f"{CHECK}"
            )
    return None


def describe(names: list[str]) -> str:
    """Qualified table names for a message: "a.b", "a.b and c.d", "a.b, c.d and e.f"."""
    if len(names) < 2:
        return "".join(names) or "no table"
    return f"{', '.join(names[:-1])} and {names[-1]}"
