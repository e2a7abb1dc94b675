"""Table declarations, and the check of an event against its table."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from string import Formatter
from typing import Any

from streamsink.errors import ConfigError, ValidationError
from streamsink.schemas.event import Event, Op
from streamsink.schemas.numeric import Numeric, check_numeric

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
"""Table and column names: PostgreSQL identifiers that never need quoting tricks."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

UUID_TEXT = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
"""Canonical UUID text (uuid.UUID also takes `urn:uuid:`, `{…}`, `_`: PostgreSQL does not)."""


class ColumnType(StrEnum):
    """Column types and the PostgreSQL type each maps to."""

    INT = "int"  # bigint
    FLOAT = "float"  # double precision
    TEXT = "text"  # text
    BOOL = "bool"  # boolean
    JSON = "json"  # jsonb
    TIMESTAMP = "timestamp"  # timestamptz, ISO 8601 text on the wire
    UUID = "uuid"  # uuid, canonical text on the wire
    NUMERIC = "numeric"  # numeric(precision, scale): exact decimal, number or text on the wire


class Policy(StrEnum):
    """How a new value combines with the stored one."""

    LWW = "lww"  # last write wins
    SUM = "sum"  # values add up
    MAX = "max"  # the greatest is kept
    MIN = "min"  # the least is kept


class Mode(StrEnum):
    """Whether a write may create rows."""

    UPSERT = "upsert"  # insert missing rows, update existing ones
    UPDATE = "update"  # touch only existing rows; misses are counted


NUMBERS = frozenset({ColumnType.INT, ColumnType.FLOAT, ColumnType.NUMERIC})
ORDERED = NUMBERS | {ColumnType.TIMESTAMP, ColumnType.TEXT}


@dataclass(frozen=True, slots=True)
class Column:
    """One declared column."""

    type: ColumnType
    policy: Policy = Policy.LWW
    nullable: bool = True
    precision: int | None = None  # numeric only: digits in all
    scale: int | None = None  # numeric only: digits after the point

    @property
    def numeric(self) -> Numeric | None:
        """The exact values of a numeric column (None for other types)."""
        if self.type is not ColumnType.NUMERIC:
            return None
        return Numeric(self.precision or 0, self.scale or 0)


@dataclass(frozen=True, slots=True)
class Table:
    """A sink table: its key columns, its columns and how writes apply."""

    name: str
    key: tuple[str, ...]
    columns: Mapping[str, Column]
    mode: Mode = Mode.UPSERT
    schema: str | None = None
    key_format: str | None = None  # e.g. "task:{id}": the key string of each row
    value_columns: tuple[str, ...] = field(init=False)
    numerics: Mapping[str, Numeric] = field(init=False, repr=False, compare=False)
    checks: Mapping[str, Callable[[Any], str | None]] = field(init=False, repr=False, compare=False)
    plain: Mapping[str, frozenset[type]] = field(init=False, repr=False, compare=False)
    plain_deltas: Mapping[str, frozenset[type]] = field(init=False, repr=False, compare=False)
    key_forms: Mapping[str, Callable[[str], str]] = field(init=False, repr=False, compare=False)
    key_of: Callable[[Mapping[str, Any]], str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in (self.name, *self.columns, *([self.schema] if self.schema else [])):
            if not IDENTIFIER.match(name):
                raise ConfigError(f"table {self.name!r}: {name!r} is not a valid identifier")
        if not self.columns:
            raise ConfigError(f"table {self.name!r}: declares no columns")
        for name in self.key:
            if name not in self.columns:
                raise ConfigError(f"table {self.name!r}: key column {name!r} is not declared")
            column = self.columns[name]
            if column.policy is not Policy.LWW:
                raise ConfigError(f"table {self.name!r}: key column {name!r} must be lww")
            if column.type is ColumnType.JSON or column.type is ColumnType.NUMERIC:
                raise ConfigError(
                    f"table {self.name!r}: key column {name!r} cannot be {column.type}; "
                    "use int, text, uuid, timestamp, bool or float"
                )
        if len(set(self.key)) != len(self.key):
            raise ConfigError(f"table {self.name!r}: key columns repeat")
        for name, column in self.columns.items():
            _check_policy(self.name, name, column)
            _check_digits(self.name, name, column)
        object.__setattr__(
            self, "value_columns", tuple(c for c in self.columns if c not in self.key)
        )
        numerics = {
            name: numeric for name, column in self.columns.items() if (numeric := column.numeric)
        }
        object.__setattr__(self, "numerics", numerics)
        checks = {name: _TYPE_CHECKS[column.type] for name, column in self.columns.items()}
        checks |= {name: numeric.reason for name, numeric in numerics.items()}
        object.__setattr__(self, "checks", checks)
        plain = {name: _PLAIN_TYPES[column.type] for name, column in self.columns.items()}
        object.__setattr__(self, "plain", plain)
        deltas = {  # what an incr takes as is: key values, and deltas of lww or sum numbers
            name: types
            for name, types in plain.items()
            if name in self.key
            or (
                self.columns[name].type in NUMBERS
                and self.columns[name].policy in (Policy.LWW, Policy.SUM)
            )
        }
        object.__setattr__(self, "plain_deltas", deltas)
        forms = {n: _KEY_FORMS[self.columns[n].type] for n in self.key}
        object.__setattr__(self, "key_forms", {n: f for n, f in forms.items() if f is not None})
        key_of = None if self.key_format is None else _key_maker(self)
        object.__setattr__(self, "key_of", key_of)

    def row_key(self, data: Mapping[str, Any]) -> tuple[Any, ...]:
        """The identity of the row an event touches: its key values, as PostgreSQL tells
        them apart (a uuid in lower case, a timestamp as its instant in UTC)."""
        forms = self.key_forms
        if not forms:
            return tuple(data[name] for name in self.key)
        return tuple(forms[n](data[n]) if n in forms else data[n] for n in self.key)


def _key_maker(table: Table) -> Callable[[Mapping[str, Any]], str]:
    """The function that spells a row's key string by `table.key_format` (checked here)."""
    where = f"table {table.name!r}: key_format {table.key_format!r}"
    if not table.key:
        raise ConfigError(f"{where}: a table without key columns has no key string to check")
    literals: list[str] = []
    names: list[str] = []
    try:
        parts = list(Formatter().parse(table.key_format or ""))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for literal, name, spec, conversion in parts:
        literals.append(literal)
        if name is None:
            continue
        if name not in table.key or spec or conversion:
            raise ConfigError(f"{where}: {{{name}}} must name a key column, as {{column}}")
        if name in names:
            raise ConfigError(f"{where}: {{{name}}} appears twice")
        if table.columns[name].type not in _KEY_TEXTS:
            raise ConfigError(f"{where}: {name!r} must be an int, text, uuid or bool column")
        names.append(name)
    if sorted(names) != sorted(table.key):
        raise ConfigError(f"{where}: must name every key column: {', '.join(table.key)}")
    if len(literals) == len(names):
        literals.append("")
    spell = [_KEY_TEXTS[table.columns[name].type] for name in names]
    if len(names) == 1:  # the usual "task:{id}": one f-string
        (name,), (head, tail), (text,) = names, literals, spell
        if text is str:  # an int (not a bool: validated) or a str writes itself
            return lambda data: f"{head}{data[name]}{tail}"
        return lambda data: f"{head}{text(data[name])}{tail}"

    def key_of(data: Mapping[str, Any]) -> str:
        out = [literals[0]]
        for name, text, literal in zip(names, spell, literals[1:], strict=True):
            out += (text(data[name]), literal)
        return "".join(out)

    return key_of


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


_KEY_TEXTS: dict[ColumnType, Callable[[Any], str]] = {
    ColumnType.INT: str,  # decimal digits (values are validated first: no bools)
    ColumnType.TEXT: str,
    ColumnType.UUID: str.lower,  # PostgreSQL's spelling, as in row_key
    ColumnType.BOOL: _bool_text,  # JSON's spelling
}
"""How a key value of each column type is written in a key string (`key_format`)."""


def _check_policy(table: str, name: str, column: Column) -> None:
    if column.policy is Policy.SUM and column.type not in NUMBERS:
        raise ConfigError(f"table {table!r}: column {name!r}: sum needs int, float or numeric")
    if column.policy in (Policy.MAX, Policy.MIN) and column.type not in ORDERED:
        raise ConfigError(
            f"table {table!r}: column {name!r}: {column.policy} needs int, float, numeric, "
            "text or timestamp"
        )


def _check_digits(table: str, name: str, column: Column) -> None:
    """A numeric column declares its precision and scale; no other column does."""
    where = f"table {table!r}: column {name!r}"
    if column.type is ColumnType.NUMERIC:
        reason = check_numeric(column.precision, column.scale)
        if reason:
            raise ConfigError(
                f'{where}: {reason} (e.g. {{ type = "numeric", precision = 12, scale = 2 }})'
            )
    elif column.precision is not None or column.scale is not None:
        raise ConfigError(
            f"{where}: precision and scale belong to numeric columns, not {column.type}"
        )


def validate(event: Event, table: Table) -> None:
    """Check that `event` fits `table`; raise ValidationError naming the field if not."""
    op = event.op
    if op is Op.CALL:
        raise ValidationError("op", f"call events go to an endpoint, not to table {table.name!r}")
    if not table.key and op is not Op.APPEND:
        raise ValidationError("op", f"table {table.name!r} has no key columns: only append")
    if table.key and op is Op.APPEND:
        raise ValidationError(
            "op",
            f"table {table.name!r} has key columns: append adds rows to tables without a key; "
            "write a row by its key with set",
        )
    data = event.data
    for name in table.key:
        if name not in data:
            raise ValidationError(f"data.{name}", f"key column of {table.name!r} is missing")
        if data[name] is None:
            raise ValidationError(f"data.{name}", "key column must not be null")
    if op is Op.SET or op is Op.APPEND:  # the hot path: one dict lookup and one call a field
        checks = table.checks
        for name, value in data.items():
            check = checks.get(name)
            if check is None:
                raise ValidationError(f"data.{name}", f"table {table.name!r} has no such column")
            reason = check(value) if value is not None else None
            if reason or value is None:
                _check_value(name, value, table.columns[name])
        if table.key_of is not None:
            _check_key(event, table, table.key_of)
        return
    for name, value in data.items():
        column = table.columns.get(name)
        if column is None:
            raise ValidationError(f"data.{name}", f"table {table.name!r} has no such column")
        if op is Op.DEL and name not in table.key:
            raise ValidationError(f"data.{name}", "del takes only the key columns")
        if op is Op.INCR and name not in table.key:
            _check_delta(name, value, column)
        else:
            _check_value(name, value, column)
    if op is Op.INCR and len(data) == len(table.key):
        raise ValidationError("data", "incr names no column to add to")
    if table.key_of is not None:
        _check_key(event, table, table.key_of)


def _check_key(event: Event, table: Table, key_of: Callable[[Mapping[str, Any]], str]) -> None:
    expected = key_of(event.data)
    if event.key != expected:
        raise ValidationError(
            "key",
            f"{event.key!r} disagrees with the key columns in data: table {table.name!r} "
            f"spells their key {expected!r} (key_format {table.key_format!r})",
        )


def _check_delta(name: str, value: Any, column: Column) -> None:
    if column.type not in NUMBERS or column.policy not in (Policy.LWW, Policy.SUM):
        raise ValidationError(
            f"data.{name}",
            f"incr needs an int, float or numeric column with lww or sum, not {column.type}",
        )
    _check_value(name, value, column)
    if value is None:
        raise ValidationError(f"data.{name}", "an incr delta must not be null")


def _check_value(name: str, value: Any, column: Column) -> None:
    if value is None:
        if not column.nullable:
            raise ValidationError(f"data.{name}", "must not be null")
        if column.policy is not Policy.LWW:
            raise ValidationError(
                f"data.{name}", f"a {column.policy} column takes a value, not null"
            )
        return
    numeric = column.numeric
    reason = numeric.reason(value) if numeric else _TYPE_CHECKS[column.type](value)
    if reason:
        raise ValidationError(f"data.{name}", reason)


def _int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return _whole_float(value)
        return f"expected an integer, got {_kind(value)}"
    if not INT64_MIN <= value <= INT64_MAX:
        return f"{value} does not fit in a 64-bit integer"
    return None


def _whole_float(value: float) -> str:
    # JSON readers give a float for an integer literal beyond the 64-bit range (orjson:
    # above 2**64-1 or below -2**63; -2**63-1 rounds to -2**63) as for one written with
    # a fraction or an exponent.
    if abs(value) >= 2**63:
        return f"{value:.17g} does not fit in a 64-bit integer (-2**63..2**63-1)"
    return (
        f"expected an integer, got float {value!r}: "
        f"write it as {int(value)}, without a fraction or an exponent"
    )


def _float(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, got {_kind(value)}"
    return None


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {_kind(value)}"
    if "\x00" in value:
        return "text must not contain NUL characters (PostgreSQL refuses them)"
    return None


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_kind(value)}"


def _json(value: Any) -> str | None:
    if _has_nul(value):
        return "JSON strings must not contain NUL characters (jsonb refuses \\u0000)"
    return None


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(name) or _has_nul(item) for name, item in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(item) for item in value)
    return False


def _timestamp(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected an ISO 8601 timestamp string, got {_kind(value)}"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return f"{value!r} is not an ISO 8601 timestamp"
    if parsed.tzinfo is None:
        return f"{value!r} has no time zone offset"
    if parsed.year == 1 or parsed.year == 9999:  # its instant may fall outside years 1..9999
        try:
            parsed.astimezone(UTC)
        except OverflowError:
            return f"{value!r} is outside years 1..9999 in UTC"
    return None


def _uuid(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a UUID string, got {_kind(value)}"
    if not UUID_TEXT.match(value):
        return f"{value!r} is not a UUID in canonical 8-4-4-4-12 hex form"
    return None


def _never(value: Any) -> str | None:
    return "a numeric column checks its values against its precision and scale"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


_TYPE_CHECKS = {
    ColumnType.INT: _int,
    ColumnType.FLOAT: _float,
    ColumnType.TEXT: _text,
    ColumnType.BOOL: _bool,
    ColumnType.JSON: _json,
    ColumnType.TIMESTAMP: _timestamp,
    ColumnType.UUID: _uuid,
    ColumnType.NUMERIC: _never,  # replaced per column by its Numeric's check
}


def _instant(value: str) -> str:
    """A valid timestamp text (it has an offset) as its instant, in one spelling (UTC)."""
    return datetime.fromisoformat(value).astimezone(UTC).isoformat()


_KEY_FORMS: dict[ColumnType, Callable[[str], str] | None] = {
    ColumnType.INT: None,
    ColumnType.FLOAT: None,  # 1 and 1.0 are one key already
    ColumnType.TEXT: None,
    ColumnType.BOOL: None,
    ColumnType.JSON: None,  # never a key column
    ColumnType.TIMESTAMP: _instant,  # 12:00Z and 14:00+02:00 are one row in PostgreSQL
    ColumnType.UUID: str.lower,  # so are A0EE… and a0ee…
    ColumnType.NUMERIC: None,  # workers hold it as one Decimal (12.3 and "12.30" are one key)
}
"""How a key value of each column type is spelled in a row key (None: as it is)."""

PLAIN_INT = frozenset({int})
"""The plain type of int columns: an int passes once within INT64_MIN..INT64_MAX."""

_PLAIN_TYPES: dict[ColumnType, frozenset[type]] = {
    ColumnType.INT: PLAIN_INT,
    ColumnType.FLOAT: frozenset({int, float}),
    ColumnType.TEXT: frozenset({str}),
    ColumnType.BOOL: frozenset({bool}),
    ColumnType.JSON: frozenset({dict, list, str, int, float, bool}),
    ColumnType.TIMESTAMP: frozenset(),  # must be parsed: never plain
    ColumnType.UUID: frozenset(),  # must be matched: never plain
    ColumnType.NUMERIC: frozenset(),  # must be made a Decimal: never plain
}
"""Per column type, the exact value types (not subclasses, not None) its check passes as
they are, given the JSON they encode to holds no NUL (`\\u0000`); int columns also need
the 64-bit range. `wire.packer` skips the full check for values of these types."""
