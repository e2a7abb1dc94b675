"""The Redis read model of a table: its declaration, and how an event changes a key's hash.

Pure (no I/O). The publish script applies what `changes` lays out, in the same step as the
XADD; the rules are the merge's (`consumers/merge.py`, `apply_event`), field by field:

    set of an lww column    field = value                       '='
    set of a sum column,    field = (field or 0) + delta        'i' (int: HINCRBY, exact)
      or any incr                                               'f' (float: HINCRBYFLOAT)
    set of a max/min column the greater/lesser; a tie keeps     '>' / '<'
                            the older; nulls ignored
    del                     the hash is replaced by a tombstone (only `~del`: a hash
                            without the key column); a later set or incr re-creates the
                            row from nothing, as the sink does

Each field holds its value as JSON text. Max and min compare an order key held beside the
field (`~o:<field>`): a float as itself, an int as a fixed-width number, a text as its
UTF-8 bytes, a timestamp as its instant in UTC, so the script compares bytes (code point
order, as PostgreSQL's "C" collation) or numbers, never locale text.

TTL by status (`ttl_by`): a write that sets the status (re)starts the hash's expiry with
the TTL of that status (`ttl`, seconds per status value, `default` for one not listed); a
write that does not set it leaves the expiry running, and gives a new hash `default`. A
table without `ttl_by` restarts `default` at each write. Reserved fields start with `~`,
which no column name can.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from streamsink.errors import ConfigError, ValidationError
from streamsink.schemas.event import Event, Op
from streamsink.schemas.table import INT64_MIN, Column, ColumnType, Mode, Policy, Table

TOMBSTONE = b"~del"
"""Field of a hash whose row was deleted (the only field it then has: a live row's hash
always has its key column, which every set, incr and del carries)."""
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


def changer(table: Table, model: ReadModel) -> Callable[[Event], list[bytes]]:
    """`changes(event)` for events of `table`, with what it needs worked out once.

    What an event does to its key's hash: [TTL ms (negative: only if the hash has none),
    how many assignments (-1: a del), then (field, JSON value) per assignment, how many
    other changes, then (field, kind, JSON value, order key) per other change]. The event
    is valid for `table`; its routing key must be its row's key (ValidationError)."""
    key = table.key[0]
    as_text = str.lower if table.columns[key].type is ColumnType.UUID else str
    names = {name: name.encode() for name in table.columns}
    set_kinds = {name: _set_kind(column) for name, column in table.columns.items()}
    incr_kinds = {
        name: b"=" if name == key else (b"i" if c.type is ColumnType.INT else b"f")
        for name, c in table.columns.items()
    }
    types = {name: column.type for name, column in table.columns.items()}
    assign_only = all(kind == b"=" for kind in set_kinds.values())
    status, ttls, default = model.ttl_by, model.ttl_ms, str(model.ttl_ms(None)).encode()
    delete = [default, b"-1"]
    dumps = orjson.dumps

    def changes(event: Event) -> list[bytes]:
        op, data = event.op, event.data
        if key not in data or as_text(data[key]) != event.key:
            raise ValidationError(
                "key",
                f"table {table.name!r} has a read model: the routing key must be the row's "
                f"{key} ({event.key!r} is not {data.get(key)!r})",
            )
        if op is Op.DEL:
            return delete
        if status is None:
            ttl = default
        elif status in data:
            ttl = str(ttls(data[status])).encode()
        else:
            ttl = b"-" + default  # the status is not set here: keep the TTL it chose
        if op is Op.SET and assign_only:
            out = [ttl, str(len(data)).encode()]
            for name, value in data.items():
                out += (names[name], dumps(value))
            out.append(b"0")
            return out
        kinds = set_kinds if op is Op.SET else incr_kinds
        assigns: list[bytes] = []
        others: list[bytes] = []
        for name, value in data.items():
            kind = kinds[name]
            if kind == b"=" or value is None:
                assigns += (names[name], dumps(value))
            elif kind == b"i" or kind == b"f":
                others += (names[name], kind, dumps(value), b"")
            else:
                others += (names[name], kind, dumps(value), order_key(types[name], value))
        head = [ttl, str(len(assigns) // 2).encode()]
        return [*head, *assigns, str(len(others) // 4).encode(), *others]

    return changes


def _set_kind(column: Column) -> bytes:
    if column.policy is Policy.SUM:
        return b"i" if column.type is ColumnType.INT else b"f"
    if column.policy is Policy.MAX:
        return b">"
    if column.policy is Policy.MIN:
        return b"<"
    return b"="


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
    if not fields or table.key[0].encode() not in fields:
        return None  # absent, or a tombstone
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
