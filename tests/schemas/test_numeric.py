"""Numeric columns: which values fit numeric(p,s), exactly, and how the wire reads them."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsink.errors import ConfigError, ValidationError
from streamsink.schemas.config import from_dict
from streamsink.schemas.event import Event
from streamsink.schemas.numeric import Numeric
from streamsink.schemas.readmodel import from_hash, order_key, to_hash
from streamsink.schemas.table import Column, ColumnType, Policy, Table, validate
from streamsink.schemas.wire import encode, entry_fields, pack, unpacker
from tests.schemas.expect import expect

MONEY = Numeric(12, 2)
ORDERS = Table(
    "orders",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "total": Column(ColumnType.NUMERIC, Policy.SUM, precision=12, scale=2),
        "price": Column(ColumnType.NUMERIC, precision=12, scale=2),
        "wide": Column(ColumnType.NUMERIC, Policy.MAX, precision=28, scale=8),
        "ratio": Column(ColumnType.FLOAT),
    },
)


@pytest.mark.parametrize(
    ("value", "exact"),
    [
        ("12.3", "12.30"),
        ("12.30", "12.30"),
        ("12.300", "12.30"),  # trailing zeros past the scale change nothing
        ("+5", "5.00"),
        (".5", "0.50"),
        ("5.", "5.00"),
        ("-1e3", "-1000.00"),
        ("1.5E1", "15.00"),
        ("-0", "0.00"),
        ("9999999999.99", "9999999999.99"),
        ("-9999999999.99", "-9999999999.99"),
        (7, "7.00"),
        (-0.0, "0.00"),
        (0.1, "0.10"),  # a float as the text JSON writes for it
        (Decimal("3.1"), "3.10"),
    ],
)
def test_values_that_fit_become_one_decimal_at_the_scale(value: Any, exact: str) -> None:
    fitted = MONEY.exact(value)
    assert type(fitted) is Decimal
    assert str(fitted) == exact


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("12.345", "12.345 has more than 2 digits after the point of numeric(12,2)"),
        ("0.001", "more than 2 digits after the point"),
        (12.345, "more than 2 digits after the point"),
        ("10000000000", "does not fit numeric(12,2): at most 10 digits before the point"),
        ("-10000000000.00", "does not fit numeric(12,2)"),
        ("1e10", "does not fit numeric(12,2)"),
        (10**10, "does not fit numeric(12,2)"),
        ("1e999999999999999999", "does not fit numeric(12,2)"),
        ("1e-999999999999999999", "more than 2 digits after the point"),
        ("NaN", "'NaN' is not a number a numeric column holds (NaN and infinities are not)"),
        ("-Infinity", "NaN and infinities are not"),
        ("inf", "NaN and infinities are not"),
        (float("nan"), "nan is not a number a numeric(12,2) column holds"),
        (float("inf"), "inf is not a number"),
        (Decimal("NaN"), "NaN is not a number"),
        (Decimal("-Infinity"), "is not a number"),
        ("", "'' is not numeric text"),
        (" 12", "is not numeric text"),
        ("12 ", "is not numeric text"),
        ("1_000", "is not numeric text"),
        ("١٢", "is not numeric text"),  # digits, to Decimal; not to PostgreSQL
        ("0x10", "is not numeric text"),
        ("12.3\n", "is not numeric text"),
        ("$12", "is not numeric text"),
        (True, "expected a number or numeric text for numeric(12,2), got a boolean"),
        (None, "got NoneType"),
        ([1], "got an array"),
        ({"amount": 1}, "got an object"),
    ],
)
def test_values_that_do_not_fit_are_refused_with_the_reason(value: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        MONEY.exact(value)
    assert reason in str(caught.value)
    assert MONEY.reason(value) == str(caught.value)


@settings(max_examples=500, deadline=None)
@given(cents=st.integers(-(10**12) + 1, 10**12 - 1))
def test_every_value_in_range_fits_and_is_read_back_from_its_text(cents: int) -> None:
    value = Decimal(cents).scaleb(-2)
    assert MONEY.exact(value) == value
    assert MONEY.exact(str(value)) == value
    assert MONEY.exact(format(value, "f")) == value


def test_a_numeric_column_declares_its_digits_and_only_it() -> None:
    table = from_dict(
        {
            "tables": {
                "o": {
                    "key": ["id"],
                    "columns": {"id": "int", "t": {"type": "numeric", "precision": 12, "scale": 2}},
                }
            }
        }
    ).tables["o"]
    assert table.columns["t"] == Column(ColumnType.NUMERIC, precision=12, scale=2)
    assert table.numerics == {"t": Numeric(12, 2)}
    whole = from_dict({"tables": {"o": {"columns": {"t": {"type": "numeric", "precision": 9}}}}})
    assert whole.tables["o"].numerics == {"t": Numeric(9, 0)}  # scale 0 unless given


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ({"type": "numeric"}, 'numeric needs its digits, e.g. { type = "numeric", precision'),
        ({"type": "numeric", "precision": 0}, "numeric precision must be 1..28, got 0"),
        ({"type": "numeric", "precision": 29}, "numeric precision must be 1..28, got 29"),
        ({"type": "numeric", "precision": "12"}, "numeric needs precision, an integer 1..28"),
        ({"type": "numeric", "precision": 4, "scale": 5}, "scale must be an integer 0..precision"),
        ({"type": "numeric", "precision": 4, "scale": -1}, "scale must be an integer 0..precision"),
        ({"type": "float", "precision": 4}, "precision and scale belong to numeric columns"),
        ({"type": "int", "scale": 2}, "precision and scale belong to numeric columns, not int"),
        ({"type": "numeric", "precision": 4, "digits": 2}, "unknown setting 'digits'"),
    ],
)
def test_bad_numeric_declarations_are_refused(column: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"tables": {"o": {"columns": {"t": column}}}})
    assert message in str(caught.value)
    assert "column 't'" in str(caught.value)


def test_a_numeric_column_cannot_be_a_key() -> None:
    with pytest.raises(ConfigError, match="key column 't' cannot be numeric"):
        Table("o", ("t",), {"t": Column(ColumnType.NUMERIC, precision=4, scale=0)})


def test_validate_checks_numeric_values_of_every_op() -> None:
    validate(Event.make("1", "set", {"id": 1, "total": "1.10", "price": 2, "wide": 0.5}), ORDERS)
    validate(Event.make("1", "incr", {"id": 1, "total": -3.25}), ORDERS)
    with expect(ValidationError, "data.total", "12.345 has more than 2 digits"):
        validate(Event.make("1", "set", {"id": 1, "total": 12.345}), ORDERS)
    with expect(ValidationError, "data.total", "does not fit numeric(12,2)"):
        validate(Event.make("1", "incr", {"id": 1, "total": "1e10"}), ORDERS)
    with expect(ValidationError, "data.price", "NaN and infinities are not"):
        validate(Event.make("1", "set", {"id": 1, "price": "NaN"}), ORDERS)
    with expect(ValidationError, "data.wide", "incr needs an int, float or numeric column"):
        validate(Event.make("1", "incr", {"id": 1, "wide": 1}), ORDERS)
    with expect(ValidationError, "data.total", "a sum column takes a value, not null"):
        validate(Event.make("1", "set", {"id": 1, "total": None}), ORDERS)


# --- the wire: a Decimal goes as text; a worker reads JSON numbers exactly ------------------


def test_a_decimal_is_published_as_its_text() -> None:
    event = Event.make("1", "set", {"id": 1, "total": Decimal("12.30"), "wide": Decimal("1E+3")})
    assert pack(event)[2] == b'{"id":1,"total":"12.30","wide":"1E+3"}'


def unpack_of(config_tables: dict[str, Table] | None = None) -> Any:
    tables = config_tables or {"orders": ORDERS}

    def check(event: Event) -> Table:
        table = tables[event.table or "orders"]
        validate(event, table)
        return table

    return unpacker(ORDERS, check, tables=tables)


def flat(op: str, data: bytes, table: str | None = None) -> list[bytes]:
    out = [b"key", b"1", b"op", op.encode(), b"data", data]
    return [*out, b"table", table.encode()] if table else out


LITERALS = [
    (b'{"id":1,"total":12.3}', {"total": Decimal("12.30")}),
    (b'{"id":1,"total":"12.3","ratio":0.1}', {"total": Decimal("12.30"), "ratio": 0.1}),
    (b'{"id":1,"total":1E2}', {"total": Decimal("100.00")}),
    (b'{"id":1,"total":-0.0}', {"total": Decimal("0.00")}),
    (b'{"id":1,"total":12}', {"total": Decimal("12.00")}),
    # beyond a float's 17 digits: read from the text, never through a float
    (
        b'{"id":1,"wide":12345678901234567890.12345678}',
        {"wide": Decimal("12345678901234567890.12345678")},
    ),
    (b'{"id":1,"wide":0.30000000000000004441}', None),  # 20 places: refused, not rounded
    (b'{"id":1,"total":0.1000000000000000055511151231257827}', None),
    (b'{"id":1,"total":9999999999.999999999999}', None),  # a float would make it 1e10
    (b'{"id":1,"total":99999999999999999999999}', None),  # past 64 bits: orjson's float
]


@pytest.mark.parametrize(("raw", "expected"), LITERALS)
@pytest.mark.parametrize("op", ["set", "incr"])
@pytest.mark.parametrize("path", ["quick", "full"])
def test_a_worker_reads_numbers_as_the_decimals_their_json_text_writes(
    raw: bytes, expected: dict[str, Any] | None, op: str, path: str
) -> None:
    unpack = unpack_of()
    fields = flat(op, raw, "orders" if path == "full" else None)  # a table field: the full path
    if op == "incr" and (b"wide" in raw or b"ratio" in raw):
        expected = None  # max columns take no incr; an lww float column would, but not here
        if b"ratio" in raw:
            expected = {"total": Decimal("12.30"), "ratio": 0.1}
    if expected is None:
        with pytest.raises(ValidationError) as caught:
            unpack(fields)
        assert caught.value.field.startswith("data.")
        return
    event, table = unpack(fields)
    assert table is ORDERS
    assert event.data == {"id": 1, **expected}
    for name, value in expected.items():
        assert type(event.data[name]) is type(value)
        assert str(event.data[name]) == str(value)


@settings(max_examples=300, deadline=None)
@given(
    cents=st.integers(-(10**12) + 1, 10**12 - 1),
    spelling=st.sampled_from(["number", "text", "exponent"]),
)
def test_both_paths_read_every_spelling_of_a_value_alike(cents: int, spelling: str) -> None:
    value = Decimal(cents).scaleb(-2)
    literal = {"number": str(value), "text": f'"{value}"', "exponent": f"{cents}e-2"}[spelling]
    raw = b'{"id":1,"total":%s}' % literal.encode()
    unpack = unpack_of()
    quick, _ = unpack(flat("incr", raw))
    full, _ = unpack(flat("incr", raw, "orders"))
    assert quick.data == full.data == {"id": 1, "total": value}
    assert str(quick.data["total"]) == str(full.data["total"]) == format(value, "f")


def test_tables_without_numeric_columns_read_floats_as_orjson_does() -> None:
    plain = Table("p", ("id",), {"id": Column(ColumnType.INT), "x": Column(ColumnType.FLOAT)})

    def check(event: Event) -> Table:
        validate(event, plain)
        return plain

    unpack = unpacker(plain, check)
    raw = b'{"id":1,"x":0.30000000000000004441}'
    event, _ = unpack(flat("set", raw))
    assert event.data == orjson.loads(raw) == {"id": 1, "x": 0.30000000000000004}


def test_a_producers_decimal_reaches_the_worker_exactly() -> None:
    event = Event.make("1", "incr", {"id": 1, "total": Decimal("-0.05")})
    fields = encode(event)
    read, _ = unpack_of()(fields)
    assert read.data == {"id": 1, "total": Decimal("-0.05")}
    assert entry_fields(fields)[b"data"] == b'{"id":1,"total":"-0.05"}'
    assert json.loads(entry_fields(fields)[b"data"])["total"] == "-0.05"


@settings(max_examples=300, deadline=None)
@given(pair=st.lists(st.integers(-(10**27) + 1, 10**27 - 1), min_size=2, max_size=2))
def test_numeric_order_keys_order_as_the_numbers(pair: list[int]) -> None:
    a, b = (format(Decimal(n).scaleb(-8), "f") for n in pair)  # one column: one scale
    assert (order_key(ColumnType.NUMERIC, a) < order_key(ColumnType.NUMERIC, b)) == (
        Decimal(a) < Decimal(b)
    )


def test_a_row_from_postgresql_goes_into_the_read_model_as_exact_text_and_back() -> None:
    model_table = Table(
        "orders",
        key=("id",),
        columns={
            "id": Column(ColumnType.INT, nullable=False),
            "total": Column(ColumnType.NUMERIC, Policy.SUM, precision=12, scale=2),
            "top": Column(ColumnType.NUMERIC, Policy.MAX, precision=12, scale=2),
        },
    )
    row = {"id": 1, "total": Decimal("12.30"), "top": Decimal("-0.50")}  # as psycopg2 reads
    fields = to_hash(model_table, row)
    assert fields == [
        "id",
        1,
        "total",
        "12.30",
        "top",
        "-0.50",
        b"~o:top",
        order_key(ColumnType.NUMERIC, "-0.50"),
    ]
    as_redis = [x if isinstance(x, bytes) else str(x).encode() for x in fields]
    held = dict(zip(as_redis[::2], as_redis[1::2], strict=True))  # as HGETALL returns it
    assert from_hash(model_table, held) == row
