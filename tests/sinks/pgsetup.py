"""Setting up PostgreSQL for tests: what `streamsink tables create` does for the offsets alone."""

from __future__ import annotations

from psycopg2.extensions import connection as Connection

from streamsink.sinks.postgres.schema import offsets_ddl


def ensure_offsets(conn: Connection, schema: str = "public") -> None:
    """Create the offsets tables if they are missing, and commit."""
    with conn.cursor() as cur:
        for statement in offsets_ddl(schema):
            cur.execute(statement)
    conn.commit()
