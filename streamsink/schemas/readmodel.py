"""The Redis read model of a table: its declaration, and how an event changes a key's hash.

Pure (no I/O). The publish script applies what `changes` lays out, in the same step as the
XADD; the rules are the merge's (`schemas/merge.py`, `apply_event`), field by field:

    set of an lww column    field = value                       '='
    set of a sum column,    field = (field or 0) + delta        'i' (int: HINCRBY, exact)
      or any incr                                               'f' (float: HINCRBYFLOAT)
                                                                'd' (numeric: exact, in the
                                                                script, digit by digit)
    set of a max/min column the greater/lesser; a tie keeps     '>' / '<'
                            the older; nulls ignored
    del                     the hash is replaced by a tombstone (only `~del`: a hash
                            without the key column); a later set or incr re-creates the
                            row from nothing, as the sink does

Each field holds its value as the client sends it (text as UTF-8, numbers in decimal; bools
and json encoded, see ENCODERS; a numeric as its exact text at the column's scale, `12.30`),
a null as no field. Max and min compare an order key held
beside the field (`~o:<field>`): a float as itself, an int as a fixed-width number, a text
as its UTF-8 bytes, a timestamp as its instant in UTC, so the script compares bytes (code
point order, as PostgreSQL's "C" collation) or numbers, never locale text.

TTL by status (`ttl_by`): a write that sets the status (re)starts the hash's expiry with
the TTL of that status (`ttl`, seconds per status value, `default` for one not listed); a
write that does not set it leaves the expiry running, and gives a new hash `default`. A
table without `ttl_by` restarts `default` at each write. Reserved fields start with `~`,
which no column name can.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

import orjson

from streamsink.errors import ConfigError, ValidationError
from streamsink.schemas.event import Event, Op
from streamsink.schemas.numeric import Numeric, text
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


class Changer:
    """What an event does to its key's hash, with what it needs worked out once per table.

    Calling it gives the general layout: [TTL ms (negative: only if the hash has none),
    how many assignments (-1: a del), then (field, value) per assignment, how many other
    changes, then (field, kind, value, order key) per other change]. Values go as the
    client sends them (text, int and float as they are: no encoding in Python), see
    `ENCODERS`. For the most common event, a set of a `plain` table without nulls, the
    changes are its data as it is, with `ttl` of its data (producers send those by shape:
    streams/publish.py). The event is valid for the table; its routing key must be its
    row's key (`check_key`)."""

    def __init__(self, table: Table, model: ReadModel) -> None:
        key = table.key[0]
        self._table = table.name
        self.key_text: Callable[[Any], str] = (
            str.lower if table.columns[key].type is ColumnType.UUID else str
        )
        """The routing key of a key column's value (the module's `key_text`, bound)."""
        self._set_kinds = {name: _set_kind(column) for name, column in table.columns.items()}
        self._incr_kinds = {
            name: "=" if name == key else _SUM_KINDS.get(c.type, "f")
            for name, c in table.columns.items()
        }
        self._types = {name: column.type for name, column in table.columns.items()}
        self._coded = {
            name: ENCODERS[kind] for name, kind in self._types.items() if kind in ENCODERS
        }
        self._coded |= {
            name: partial(_numeric_text, numeric) for name, numeric in table.numerics.items()
        }
        self.plain = all(kind == "=" for kind in self._set_kinds.values()) and not self._coded
        """Whether every column is plain (lww, neither bool, json nor numeric): a set of
        such a table without nulls changes its hash by its data's fields as they are."""
        self.key = key
        """The key column: its value's text (`key_text`) is the event's routing key."""
        self.status = model.ttl_by
        """The status column whose value chooses the TTL (None: the default TTL always)."""
        self._default = model.ttl_ms(None)
        self._ttls = {value: model.ttl_ms(value) for value in model.ttl}
        self._delete = [self._default, -1]

    def __call__(self, event: Event) -> list[Any]:
        """The event's changes in the general layout (see the class)."""
        self.check_key(event)
        op, data = event.op, event.data
        if op is Op.DEL:
            return self._delete
        ttl = self.ttl(data)
        if op is Op.SET and self.plain and None not in data.values():
            out: list[Any] = [ttl, len(data)]
            for pair in data.items():
                out += pair
            out.append(0)
            return out
        kinds = self._set_kinds if op is Op.SET else self._incr_kinds
        coded, types = self._coded, self._types
        assigns: list[Any] = []
        others: list[Any] = []
        for name, value in data.items():
            kind = kinds[name]
            if value is None:
                others += (name, "x", "", "")
                continue
            if name in coded:
                value = coded[name](value)
            if kind == "=":
                assigns += (name, value)
            elif kind == "i" or kind == "f" or kind == "d":
                others += (name, kind, value, "")
            else:
                others += (name, kind, value, order_key(types[name], value))
        return [ttl, len(assigns) // 2, *assigns, len(others) // 4, *others]

    def check_key(self, event: Event) -> None:
        """Raise ValidationError unless the event's routing key is its row's key."""
        data, key = event.data, self.key
        if key not in data or self.key_text(data[key]) != event.key:
            raise ValidationError(
                "key",
                f"table {self._table!r} has a read model: the routing key must be the row's "
                f"{key} ({event.key!r} is not {data.get(key)!r})",
            )

    def ttl(self, data: Mapping[str, Any]) -> int:
        """The TTL of a set or incr of `data` (negative: keep the one the status chose)."""
        status = self.status
        if status is None:
            return self._default
        if status in data:
            value = data[status]
            return self._ttls.get(value, self._default) if type(value) is str else self._default
        return -self._default  # the status is not set here: keep the TTL it chose


def changer(table: Table, model: ReadModel) -> Changer:
    """The `Changer` of events of `table` (see there for the layout of their changes)."""
    return Changer(table, model)


def _bool(value: Any) -> str:
    return "true" if value else "false"


def _numeric_text(numeric: Numeric, value: Any) -> str:
    # A valid value (a Decimal from a worker, any valid form from a producer) at its scale.
    return text(numeric.exact(value))


_SUM_KINDS = {ColumnType.INT: "i", ColumnType.NUMERIC: "d"}
"""How a sum adds up in the hash, by column type (others: 'f', a float)."""


ENCODERS: dict[ColumnType, Callable[[Any], Any]] = {
    ColumnType.BOOL: _bool,
    ColumnType.JSON: orjson.dumps,
}
"""How a value of these column types is held in a hash field; any other (text, int, float,
uuid, timestamp) is held as the client writes it: text as UTF-8, numbers in decimal. A
null is no field at all."""

DECODERS: dict[ColumnType, Callable[[bytes], Any]] = {
    ColumnType.INT: int,
    ColumnType.FLOAT: float,
    ColumnType.TEXT: bytes.decode,
    ColumnType.UUID: bytes.decode,
    ColumnType.TIMESTAMP: bytes.decode,
    ColumnType.BOOL: lambda raw: raw == b"true",
    ColumnType.JSON: orjson.loads,
    ColumnType.NUMERIC: lambda raw: Decimal(raw.decode()),
}


def _set_kind(column: Column) -> str:
    if column.policy is Policy.SUM:
        return _SUM_KINDS.get(column.type, "f")
    if column.policy is Policy.MAX:
        return ">"
    if column.policy is Policy.MIN:
        return "<"
    return "="


_NUMERIC_OFFSET = 10**28
"""Added to a numeric's digits (|digits| < 10**28: precision 28 at most) to make them >= 0."""


def order_key(kind: ColumnType, value: Any) -> bytes:
    """Bytes that order as the merge orders values of `kind` (floats: the number itself,
    compared as a number by the script, marked by a leading 'n')."""
    if kind is ColumnType.INT:
        return b"%020d" % (value - INT64_MIN)
    if kind is ColumnType.FLOAT:
        return b"n" + repr(float(value)).encode()
    if kind is ColumnType.NUMERIC:  # exact text at the column's scale: its digits, offset
        sign, digits, _ = Decimal(value).as_tuple()
        scaled = int("".join(map(str, digits))) * (-1 if sign else 1)
        return b"%029d" % (scaled + _NUMERIC_OFFSET)
    if kind is ColumnType.TIMESTAMP:
        at = datetime.fromisoformat(value).astimezone(UTC)
        return b"%04d%s" % (at.year, at.strftime("-%m-%dT%H:%M:%S.%f").encode())
    return str(value).encode()


def to_hash(table: Table, row: Mapping[str, Any]) -> list[Any]:
    """A row (as PostgreSQL holds it, values JSON-ready) as hash fields, for repopulating."""
    out: list[Any] = []
    for name, value in row.items():
        if value is None:
            continue
        column = table.columns[name]
        numeric = table.numerics.get(name)
        if numeric is not None:
            value = _numeric_text(numeric, value)
        encode = ENCODERS.get(column.type)
        out += (name, encode(value) if encode else value)
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
        if raw is not None:
            row[name] = DECODERS[column.type](raw)
    return row
