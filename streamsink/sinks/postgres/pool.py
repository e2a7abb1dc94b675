"""The PostgreSQL sink's settings, and the connections it keeps for reuse."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from psycopg2.extensions import connection as Connection

from streamsink.errors import ConfigError


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
    """Idle psycopg2 connections kept for reuse; broken ones (closed, or whose rollback
    failed) are closed and dropped, never handed out again.

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
            if _reset(conn):
                with self._lock:
                    self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _reset(conn: Connection) -> bool:
    """Roll back what `conn` left open; False (and `conn` closed) if it cannot be reused.

    A connection whose rollback failed, or that is still not idle after it, may hold a
    transaction, locks or a half-read result: the next window must not inherit them.
    """
    if conn.closed:
        return False
    try:
        conn.rollback()
        if conn.info.transaction_status == TRANSACTION_STATUS_IDLE:
            return True
    except psycopg2.Error:
        pass
    with suppress(psycopg2.Error):
        conn.close()
    return False
