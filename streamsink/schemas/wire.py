"""The wire format: how an event is laid out in the fields of a stream entry.

This is the one place where events become bytes and bytes become events. An entry is
a few flat fields, readable with `redis-cli XRANGE` and writable with a plain `XADD`:

    key    the routing key (UTF-8); its shard is `shard_of(key, shards)`
    op     set | incr | del | append | call
    data   a JSON object (UTF-8), no NaN or Infinity
    table  optional: the table, when not the stream's default
    ts     optional: producer clock, integer milliseconds since the Unix epoch
    v      optional: schema version of `data`, a non-negative integer
    id     optional: idempotency id (producers de-duplicate on it)

Unknown fields are ignored, so newer producers can add fields without breaking workers.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import orjson

from streamsink.errors import DecodeError, EventError, PayloadTooLarge
from streamsink.schemas.event import Event, Op, check_shape

F_KEY = b"key"  # routing key of the event
F_OP = b"op"  # operation name
F_DATA = b"data"  # JSON object of fields
F_TABLE = b"table"  # target table, when not the stream's default
F_TS = b"ts"  # producer timestamp, ms
F_VERSION = b"v"  # schema version of data
F_ID = b"id"  # idempotency id

DEFAULT_MAX_DATA_BYTES = 256 * 1024
"""Largest encoded `data` accepted by default: events are changes, not documents."""

_OPS = {op.value.encode(): op for op in Op}


def shard_of(key: str, shards: int) -> int:
    """The shard of `key`: CRC-32 (IEEE, as zlib) of its UTF-8 bytes, modulo `shards`."""
    return zlib.crc32(key.encode("utf-8")) % shards


def encode(event: Event, max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> list[bytes]:
    """The entry fields of `event`, as a flat [name, value, name, value, ...] list."""
    check_shape(event)
    try:
        data = orjson.dumps(event.data)
    except TypeError as exc:
        raise EventError("data", f"cannot be encoded as JSON: {exc}") from None
    if len(data) > max_data_bytes:
        raise PayloadTooLarge("data", f"is {len(data)} bytes; the limit is {max_data_bytes}")
    fields = [F_KEY, event.key.encode(), F_OP, event.op.value.encode(), F_DATA, data]
    if event.table is not None:
        fields += (F_TABLE, event.table.encode())
    if event.ts is not None:
        fields += (F_TS, str(event.ts).encode())
    if event.version is not None:
        fields += (F_VERSION, str(event.version).encode())
    if event.id is not None:
        fields += (F_ID, event.id.encode())
    return fields


def decode(fields: Mapping[bytes, bytes], max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> Event:
    """The event held by the fields of a stream entry; DecodeError says what is wrong."""
    key = _text(fields, F_KEY)
    if key is None:
        raise DecodeError("key", "is missing")
    raw_op = fields.get(F_OP)
    if raw_op is None:
        raise DecodeError("op", "is missing")
    op = _OPS.get(raw_op)
    if op is None:
        raise DecodeError(
            "op", f"unknown op {raw_op!r}; expected one of {', '.join(o for o in Op)}"
        )
    raw_data = fields.get(F_DATA)
    if raw_data is None:
        raise DecodeError("data", "is missing")
    if len(raw_data) > max_data_bytes:
        raise DecodeError("data", f"is {len(raw_data)} bytes; the limit is {max_data_bytes}")
    try:
        data: Any = orjson.loads(raw_data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("data", f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError("data", f"must be a JSON object, got {type(data).__name__}")
    event = Event(
        key=key,
        op=op,
        data=data,
        table=_text(fields, F_TABLE),
        ts=_integer(fields, F_TS),
        version=_integer(fields, F_VERSION),
        id=_text(fields, F_ID),
    )
    try:
        check_shape(event)
    except EventError as exc:
        raise DecodeError(exc.field, exc.reason) from None
    return event


def _text(fields: Mapping[bytes, bytes], name: bytes) -> str | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(name.decode(), "is not valid UTF-8") from None


def _integer(fields: Mapping[bytes, bytes], name: bytes) -> int | None:
    raw = fields.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 19:
        raise DecodeError(name.decode(), f"must be a non-negative integer, got {raw!r}")
    return int(raw)
