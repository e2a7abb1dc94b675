"""The PostgreSQL sink: batched COPY upserts with exactly-once offsets (see sink.py)."""

from __future__ import annotations

from streamsink.sinks.postgres.pool import Pool, PostgresSettings
from streamsink.sinks.postgres.rows import PostgresRows
from streamsink.sinks.postgres.sink import PostgresSink
from streamsink.sinks.postgres.writer import PostgresStats

__all__ = ["Pool", "PostgresRows", "PostgresSettings", "PostgresSink", "PostgresStats"]
