"""Exact decimals of `numeric(precision, scale)` columns: which values fit, as one Decimal.

A value of a numeric column becomes a `Decimal` with exactly `scale` digits after the point
(`12.3` in a numeric(12,2) column is `Decimal("12.30")`, as PostgreSQL stores it). Nothing
is ever rounded: a value with more digits after the point than `scale`, or with more than
`precision - scale` before it, is refused, and so are NaN, infinities and anything that is
not a number. Values come as Decimals, ints, numeric text (`"12.30"`, `"-1e3"`: JSON's number
grammar, a leading `+` and bare `.5` or `5.` allowed, ASCII digits only) or floats, taken
as the shortest text that reads back as the same float (what JSON writers send for it).

A worker reads JSON with orjson, which makes a float of a number with a fraction or an
exponent: `decimals` and `literals` then read the entry's JSON text again for the Decimals
its numbers write, so that nothing is rounded through a float.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from streamsink.errors import DecodeError

MAX_PRECISION = 28
"""Most digits of a numeric column: Python's default decimal context holds 28, so every
sum the merge makes of values in range is exact, or out of range and refused."""

NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""Numeric text a numeric column takes (matched whole)."""

_EXACT = Context(prec=MAX_PRECISION, traps=[InvalidOperation])
"""Quantizing in range needs at most MAX_PRECISION digits; a caller's context cannot round."""

_SPECIAL = frozenset({"nan", "snan", "inf", "infinity"})


@dataclass(frozen=True, slots=True)
class Numeric:
    """The values of one numeric(precision, scale) column."""

    precision: int
    scale: int
    limit: Decimal = field(init=False, repr=False, compare=False)  # |value| < limit
    quantum: Decimal = field(init=False, repr=False, compare=False)  # 10**-scale
    zero: Decimal = field(init=False, repr=False, compare=False)  # 0 at the scale, unsigned

    def __post_init__(self) -> None:
        object.__setattr__(self, "limit", Decimal(10) ** (self.precision - self.scale))
        object.__setattr__(self, "quantum", Decimal(1).scaleb(-self.scale))
        object.__setattr__(self, "zero", Decimal(0).scaleb(-self.scale))

    def __str__(self) -> str:
        return f"numeric({self.precision},{self.scale})"

    def exact(self, value: Any) -> Decimal:
        """`value` as a Decimal with `scale` places; ValueError says why it does not fit."""
        if isinstance(value, str):
            if not NUMBER_TEXT.fullmatch(value):
                raise ValueError(_text_reason(value))
            number = Decimal(value)
        elif isinstance(value, Decimal):
            number = value
            if not number.is_finite():
                raise ValueError(f"{value} is not a number a {self} column holds")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number or numeric text for {self}, got {_kind(value)}")
        else:
            number = Decimal(repr(value) if isinstance(value, float) else value)
            if not number.is_finite():
                raise ValueError(f"{value} is not a number a {self} column holds")
        limit = self.limit
        if not -limit < number < limit:
            raise ValueError(
                f"{value} does not fit {self}: at most {self.precision - self.scale} digits "
                f"before the point"
            )
        fitted = number.quantize(self.quantum, context=_EXACT)
        if fitted != number:
            raise ValueError(
                f"{value} has more than {self.scale} digits after the point of {self}: "
                "round it before publishing (nothing is rounded for you)"
            )
        return fitted if fitted else self.zero

    def reason(self, value: Any) -> str | None:
        """Why `value` does not fit (a column check), or None."""
        try:
            self.exact(value)
        except ValueError as exc:
            return str(exc)
        return None


def check_numeric(precision: Any, scale: Any) -> str | None:
    """Why (precision, scale) cannot declare a column, or None."""
    if isinstance(precision, bool) or not isinstance(precision, int):
        return f"numeric needs precision, an integer 1..{MAX_PRECISION}, got {precision!r}"
    if not 1 <= precision <= MAX_PRECISION:
        return f"numeric precision must be 1..{MAX_PRECISION}, got {precision}"
    if isinstance(scale, bool) or not isinstance(scale, int) or not 0 <= scale <= precision:
        return f"numeric scale must be an integer 0..precision ({precision}), got {scale!r}"
    return None


def text(value: Decimal) -> str:
    """The plain decimal text of a numeric value (never an exponent): `12.30`."""
    return format(value, "f")


def _text_reason(value: str) -> str:
    if value.strip().lstrip("+-").lower() in _SPECIAL:
        return f"{value!r} is not a number a numeric column holds (NaN and infinities are not)"
    return f'{value[:40]!r} is not numeric text such as "12.30" or "-1e3"'


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


# --- reading them from JSON: orjson makes floats of numbers with a fraction ------------------


def decimals(data: dict[str, Any], numerics: Mapping[str, Numeric], raw: bytes) -> bool:
    """Make the values of `data`'s numeric columns exact Decimals; False (`data` then half
    done) if one does not fit, or is a float whose JSON text `raw` does not hold."""
    written: dict[str, Any] | None = None
    for name, numeric in numerics.items():
        value = data.get(name)
        if value is None:
            continue
        if type(value) is float:
            if written is None:
                try:
                    written = _as_written(raw)
                except ValueError:
                    return False
            value = written.get(name)
        try:
            data[name] = numeric.exact(value)
        except ValueError:
            return False
    return True


def literals(data: dict[str, Any], numerics: Mapping[str, Numeric], raw: bytes) -> None:
    """Replace each float of `data`'s numeric columns by the Decimal its JSON text writes."""
    if any(type(data.get(name)) is float for name in numerics):
        try:
            written = _as_written(raw)
        except ValueError as exc:  # orjson read it: never seen, but say so if it happens
            raise DecodeError("data", f"its numbers cannot be read exactly: {exc}") from None
        for name in numerics:
            if type(data.get(name)) is float:
                data[name] = written[name]


def exact_numbers(raw: str | bytes) -> Any:
    """Valid JSON `raw` with its numbers as the Decimals they write (for numeric columns)."""
    return _WRITTEN.decode(raw if isinstance(raw, str) else raw.decode("utf-8"))


def _as_written(raw: bytes) -> dict[str, Any]:
    """JSON `raw` (an object orjson read) with its numbers as the Decimals they write.

    The standard library's reader (1.4 µs for a small object against orjson's 0.25; 4.8 with
    `json.loads(raw, parse_float=...)`, which builds a reader each call): only for entries
    with a non-integer JSON number in a numeric column.
    """
    written: dict[str, Any] = _WRITTEN.decode(raw.decode("utf-8"))
    return written


_WRITTEN = json.JSONDecoder(parse_float=Decimal, parse_int=Decimal)
"""Reads JSON numbers as the Decimals they write (integers too: no digit limit, no float)."""
