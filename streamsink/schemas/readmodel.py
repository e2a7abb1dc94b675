"""The Redis read model of a table: its declaration, and how an event changes a key's hash.

Pure (no I/O). The publish script applies what `changes` lays out, in the same step as the
XADD; the rules are the merge's (`consumers/merge.py`, `apply_event`), field by field:

    set of an lww column    field = value                       '='
    set of a sum column,    field = (field or 0) + delta        'i' (int: HINCRBY, exact)
      or any incr                                               'f' (float: HINCRBYFLOAT)
    set of a max/min column the greater/lesser; a tie keeps     '>' / '<'
                            the older; nulls ignored
    del                     the hash is replaced by a tombstone (`~del`); a later set or
                            incr re-creates the row from nothing, as the sink does

Each field holds its value as JSON text. Max and min compare an order key held beside the
field (`~o:<field>`): a float as itself, an int as a fixed-width number, a text as its
UTF-8 bytes, a timestamp as its instant in UTC, so the script compares bytes (code point
order, as PostgreSQL's "C" collation) or numbers, never locale text.

TTL by status (`ttl_by`): each write sets the hash's expiry to the TTL of the status it
holds (`ttl`, seconds per status value, `default` for a key without status or with one
not listed); the TTL chosen is kept in `~ttl`, so a write that does not set the status
keeps it. Reserved fields start with `~`, which no column name can.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from streamsink.errors import ConfigError, ValidationError
from streamsink.schemas.event import Event, Op
from streamsink.schemas.table import INT64_MIN, ColumnType, Mode, Policy, Table

TOMBSTONE = b"~del"
"""Field of a hash whose row was deleted (the only field it then has)."""
TTL_FIELD = b"~ttl"
"""Field holding the TTL (ms) chosen by the key's status."""
ORDER_PREFIX = b"~o:"
"""Prefix of the fields holding the order key of a max or min column."""

DEFAULT_TTL = 3600
KEY_TYPES = frozenset({ColumnType.INT, ColumnType.TEXT, ColumnType.UUID})
"""Key column types whose text is the routing key (a read needs the row from the key)."""

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ReadModel:
    """A table's read model: kept in Redis, with a TTL chosen by a status column."""

    ttl_by: str | None = None
    """The column whose value chooses the TTL (None: always `default`)."""
    ttl: Mapping[str, int] = field(default_factory=dict)
    """Seconds to keep a key, per value of `ttl_by`."""
    default: int = DEFAULT_TTL
    """Seconds to keep a key without status, with an unlisted one, or deleted."""

    def ttl_ms(self, status: Any) -> int:
        """The TTL (ms) of a key whose status is `status`."""
        seconds = self.ttl.get(status, self.default) if isinstance(status, str) else self.default
        return seconds * 1000

    def check(self, table: Table) -> None:
        """Raise ConfigError unless `table` can have this read model."""
        where = f"table {table.name!r}: read model"
        if len(table.key) != 1 or table.columns[table.key[0]].type not in KEY_TYPES:
            raise ConfigError(
                f"{where}: needs one key column of type int, text or uuid (the routing key "
                "is the row's key, so a read can find the row)"
            )
        if table.mode is not Mode.UPSERT:
            raise ConfigError(f"{where}: needs mode upsert (it cannot tell missed updates)")
        if self.ttl_by is not None and self.ttl_by not in table.columns:
            raise ConfigError(f"{where}: ttl_by column {self.ttl_by!r} is not declared")
        for status, seconds in {**self.ttl, "default": self.default}.items():
            if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
                raise ConfigError(f"{where}: ttl of {status!r} must be whole seconds >= 1")


def key_text(table: Table, value: Any) -> str:
    """The routing key of the row whose key value is `value`."""
    return value.lower() if table.columns[table.key[0]].type is ColumnType.UUID else str(value)


def key_value(table: Table, key: str) -> Any:
    """The key column's value of the row whose routing key is `key` (for PostgreSQL)."""
    kind = table.columns[table.key[0]].type
    if kind is ColumnType.INT:
        try:
            return int(key)
        except ValueError:
            raise ValidationError("key", f"{key!r} is not an int key of {table.name}") from None
    return key


def changes(event: Event, table: Table, model: ReadModel) -> list[bytes]:
    """What `event` does to its key's hash: [TTL ms (negative: keep the TTL the hash holds,
    this one if none), how many changes, then (field, kind, JSON value, order key) per
    change]; one change of kind '!' for a del. The event is valid for `table`; its routing
    key must be its row's key (ValidationError otherwise)."""
    op, data = event.op, event.data
    name = table.key[0]
    if name not in data or key_text(table, data[name]) != event.key:
        raise ValidationError(
            "key",
            f"table {table.name!r} has a read model: the routing key must be the row's "
            f"{name} ({event.key!r} is not {data.get(name)!r})",
        )
    if op is Op.DEL:
        return [str(model.ttl_ms(None)).encode(), b"1", b"", b"!", b"", b""]
    status = model.ttl_by
    if status is None:
        ttl = model.ttl_ms(None)
    elif status in data:
        ttl = model.ttl_ms(data[status])
    else:
        ttl = -model.ttl_ms(None)  # the status is not set here: keep the TTL it chose
    out = [str(ttl).encode(), str(len(data)).encode()]
    for column, value in data.items():
        out += _change(table, column, value, op is Op.INCR and column != name)
    return out


def _change(table: Table, name: str, value: Any, delta: bool) -> list[bytes]:
    column = table.columns[name]
    text = orjson.dumps(value)
    if delta or column.policy is Policy.SUM:
        kind = b"i" if column.type is ColumnType.INT else b"f"
        return [name.encode(), kind, text, b""]
    if column.policy is Policy.LWW or value is None:
        return [name.encode(), b"=", text, b""]
    kind = b">" if column.policy is Policy.MAX else b"<"
    return [name.encode(), kind, text, order_key(column.type, value)]


def order_key(kind: ColumnType, value: Any) -> bytes:
    """Bytes that order as the merge orders values of `kind` (floats: the number itself,
    compared as a number by the script, marked by a leading 'n')."""
    if kind is ColumnType.INT:
        return b"%020d" % (value - INT64_MIN)
    if kind is ColumnType.FLOAT:
        return b"n" + repr(float(value)).encode()
    if kind is ColumnType.TIMESTAMP:
        at = datetime.fromisoformat(value).astimezone(UTC)
        return b"%04d%s" % (at.year, at.strftime("-%m-%dT%H:%M:%S.%f").encode())
    return str(value).encode()


def to_hash(table: Table, row: Mapping[str, Any]) -> list[bytes]:
    """A row (as PostgreSQL holds it, values JSON-ready) as hash fields, for repopulating."""
    out: list[bytes] = []
    for name, value in row.items():
        if value is None:
            continue
        column = table.columns[name]
        out += [name.encode(), orjson.dumps(value)]
        if column.policy in (Policy.MAX, Policy.MIN):
            out += [ORDER_PREFIX + name.encode(), order_key(column.type, value)]
    return out


def from_hash(table: Table, fields: Mapping[bytes, bytes]) -> Row | None:
    """The row a hash holds (every column; None where unset), or None for a tombstone."""
    if not fields or TOMBSTONE in fields:
        return None
    row: Row = dict.fromkeys(table.columns)
    for name, column in table.columns.items():
        raw = fields.get(name.encode())
        if raw is None:
            continue
        value = orjson.loads(raw)
        if value is not None and column.type is ColumnType.FLOAT:
            value = float(value)
        elif value is not None and column.type is ColumnType.INT and isinstance(value, float):
            value = int(value) if math.isfinite(value) else value
        row[name] = value
    return row
