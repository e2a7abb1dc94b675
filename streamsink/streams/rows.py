"""Reading the Redis read model: `read` and `read_many`, falling back to the database.

A key's hash is written by the publish script (see `schemas.readmodel`); a read takes it as
it is. On a miss (never written, or expired) the row comes from the fallback (PostgreSQL:
`sinks.postgres.PostgresRows`) and is written back, unless a publish wrote the hash in the
meantime (the script checks: a repopulation never overwrites newer changes). A row the
fallback does not have is None, and nothing is written.

Known limit: a key's hash starts from the first change published while it was absent, so
an `incr` of a key that expired from Redis (and was not read since) leaves a hash holding
only that delta until it expires; keep TTLs longer than a key's active life (a status TTL
does this naturally: final states are the long ones), or read a key before changing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from zlib import crc32

from streamsink.errors import ConfigError, StreamNotFound
from streamsink.schemas.config import Config
from streamsink.schemas.readmodel import Row, from_hash, key_text, key_value, to_hash
from streamsink.schemas.table import Table
from streamsink.streams.connection import SyncClient, shard_count
from streamsink.streams.keys import Keys
from streamsink.streams.scripts import lua, pipelined_sync

Fallback = Callable[[Table, Sequence[Any]], Mapping[str, Row]]
"""Rows of `table` by their key values, from the database: {routing key: row}, values
JSON-ready (timestamps as ISO text, uuids as text); missing rows are left out."""


class Rows:
    """Reads the current state of rows from the read model (sync), one round trip a call."""

    def __init__(
        self, client: SyncClient, config: Config, fallback: Fallback | None = None
    ) -> None:
        self._client = client
        self._config = config
        self._keys = Keys(config.prefix)
        self._fallback = fallback
        self._shards: dict[str, int] = {}

    def read(self, table: str, key: str | int) -> Row | None:
        """The row of `key` in `table` (every column), or None if it does not exist."""
        return self.read_many(table, [key])[0]

    def read_many(self, table: str, keys: Iterable[str | int]) -> list[Row | None]:
        """The rows of `keys`, in order: one round trip to Redis, one query for the misses."""
        spec, model = self._config.tables.get(table), self._config.read_models.get(table)
        if spec is None or model is None:
            raise ConfigError(f"table {table!r} has no read model (read_model = true)")
        stream = self._config.read_model_stream(table)
        shards = self._shard_count(stream)
        texts = [key_text(spec, key) for key in keys]
        names = [
            self._keys.row(stream, crc32(text.encode()) % shards, table, text) for text in texts
        ]
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        found: list[Row | None] = []
        missing: list[int] = []
        for at, fields in enumerate(pipe.execute()):
            found.append(from_hash(spec, fields))
            if not fields:
                missing.append(at)
        if missing and self._fallback is not None:
            rows = self._fallback(spec, [key_value(spec, texts[at]) for at in missing])
            repopulate = lua("rows.repopulate")

            def build(pipe: Any) -> None:  # a repopulation runs twice as it runs once
                for at in missing:
                    row = rows.get(texts[at])
                    if row is None:
                        continue
                    found[at] = {**dict.fromkeys(spec.columns), **row}
                    status = row.get(model.ttl_by) if model.ttl_by else None
                    ttl = model.ttl_ms(status)
                    # execute_command: a cluster pipeline blocks evalsha() (`pipelined` loads)
                    pipe.execute_command(
                        "EVALSHA", repopulate.sha, 1, names[at], ttl, *to_hash(spec, row)
                    )

            pipelined_sync(self._client, build, repopulate)
        return found

    def _shard_count(self, stream: str) -> int:
        shards = self._shards.get(stream)
        if shards is None:
            try:
                shards = self._shards[stream] = shard_count(self._client, self._keys, stream)
            except StreamNotFound as exc:  # the config names it: the config is wrong
                raise ConfigError(str(exc)) from exc
        return shards
