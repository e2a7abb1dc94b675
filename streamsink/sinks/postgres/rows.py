"""Rows by key from PostgreSQL: the read model's fallback on a miss (see streams/rows.py)."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from psycopg2 import sql

from streamsink.schemas.readmodel import Row, key_text
from streamsink.schemas.table import ColumnType, Table
from streamsink.sinks.postgres.pool import Pool
from streamsink.sinks.postgres.statements import target


class PostgresRows:
    """Fetches rows of a table by key values in one query, values as the read model holds
    them (timestamps as ISO text, uuids as text)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def __call__(self, table: Table, keys: Sequence[Any]) -> Mapping[str, Row]:
        """{routing key: row} of the rows of `table` whose key is one of `keys`."""
        names = list(table.columns)
        key = table.key[0]
        cast = "::uuid[]" if table.columns[key].type is ColumnType.UUID else ""
        query = sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s{})").format(
            sql.SQL(", ").join(map(sql.Identifier, names)),
            target(table),
            sql.Identifier(key),
            sql.SQL(cast),
        )
        with self._pool.connection() as conn, conn.cursor() as cur:
            cur.execute(query, (list(keys),))
            found = cur.fetchall()
            conn.rollback()
        rows = (dict(zip(names, map(_plain, values), strict=True)) for values in found)
        return {key_text(table, row[key]): row for row in rows}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
