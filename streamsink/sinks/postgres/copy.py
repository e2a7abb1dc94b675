"""Values as PostgreSQL's COPY text format wants them: tab-separated, `\\N` for null.

In that format a backslash starts an escape, and tab, newline and carriage return end
fields and lines, so those four are escaped in every text value; everything else
(quotes, unicode, JSON) goes through as it is. Validation has already refused what
PostgreSQL cannot store (NUL characters, NaN, infinities, integers past 64 bits).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from streamsink.schemas.table import ColumnType

NULL = "\\N"

_SPECIAL = re.compile(r"[\\\t\n\r]")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def text(value: str) -> str:
    """A text value, escaped for COPY."""
    return value.translate(_ESCAPES) if _SPECIAL.search(value) else value


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _bool(value: Any) -> str:
    return "t" if value else "f"


def _json(value: Any) -> str:
    # orjson escapes control characters inside strings, so only its backslashes need care.
    return orjson.dumps(value).decode().replace("\\", "\\\\")


def _text(value: Any) -> str:
    return text(str(value))


FORMATTERS: dict[ColumnType, Callable[[Any], str]] = {
    ColumnType.INT: str,
    ColumnType.FLOAT: _number,
    ColumnType.TEXT: text,
    ColumnType.BOOL: _bool,
    ColumnType.JSON: _json,
    ColumnType.TIMESTAMP: _text,
    ColumnType.UUID: _text,
}
"""The COPY text of a non-null value of each column type."""


def rows(formatters: Sequence[Callable[[Any], str]], values: Iterable[Sequence[Any]]) -> bytes:
    """COPY text of rows: each a sequence of values in the order of `formatters`."""
    lines = [
        "\t".join([NULL if v is None else f(v) for f, v in zip(formatters, row, strict=True)])
        for row in values
    ]
    lines.append("")
    return "\n".join(lines).encode()
