"""The PostgreSQL sink: batched COPY upserts with exactly-once offsets (see sink.py)."""

from __future__ import annotations

from streamsink.sinks.postgres.sink import Pool, PostgresSettings, PostgresSink, PostgresStats

__all__ = ["Pool", "PostgresSettings", "PostgresSink", "PostgresStats"]
