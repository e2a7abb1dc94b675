"""The read model's pure parts: what an event does to a hash, and the order keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamsink.errors import ValidationError
from streamsink.schemas import Column, ColumnType, Event, Policy, Table
from streamsink.schemas.readmodel import ReadModel, changer, from_hash, order_key, to_hash

T = Table(
    "t",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "status": Column(ColumnType.TEXT),
        "n": Column(ColumnType.INT, Policy.SUM),
        "ok": Column(ColumnType.BOOL),
        "doc": Column(ColumnType.JSON),
        "best": Column(ColumnType.FLOAT, Policy.MAX),
    },
)
MODEL = ReadModel("status", {"processing": 300}, 3600)


def test_a_set_of_plain_columns_goes_as_it_is() -> None:
    plain = Table("p", ("id",), {"id": Column(ColumnType.INT), "s": Column(ColumnType.TEXT)})
    changes = changer(plain, ReadModel())
    assert changes(Event.make("7", "set", {"id": 7, "s": "é"})) == [
        3_600_000, 2, "id", 7, "s", "é", 0,
    ]  # fmt: skip


def test_kinds_ttl_nulls_and_encoded_columns() -> None:
    changes = changer(T, MODEL)
    event = Event.make(
        "1", "set", {"id": 1, "status": "processing", "n": 2, "ok": True, "doc": {"a": 1},
                     "best": 1.5}
    )  # fmt: skip
    assert changes(event) == [
        300_000, 4, "id", 1, "status", "processing", "ok", "true", "doc", b'{"a":1}',
        2, "n", "i", 2, "", "best", ">", 1.5, b"n1.5",
    ]  # fmt: skip
    keep = changes(Event.make("1", "incr", {"id": 1, "n": 3}))
    assert keep[:2] == [-3_600_000, 1] and keep[-4:] == ["n", "i", 3, ""]
    nulls = changes(Event.make("1", "set", {"id": 1, "status": None}))
    assert nulls == [3_600_000, 1, "id", 1, 1, "status", "x", "", ""]
    assert changes(Event.make("1", "del", {"id": 1})) == [3_600_000, -1]


def test_the_routing_key_must_be_the_rows_key() -> None:
    with pytest.raises(ValidationError, match="routing key"):
        changer(T, MODEL)(Event.make("task-1", "set", {"id": 1}))
    uuids = Table("u", ("id",), {"id": Column(ColumnType.UUID)})
    key = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"
    changer(uuids, ReadModel())(Event.make(key.lower(), "set", {"id": key}))


def test_a_hash_reads_back_as_the_row_and_a_tombstone_as_none() -> None:
    row = {"id": 1, "status": "done", "n": 5, "ok": False, "doc": [1, "x"], "best": 2.5}
    fields = to_hash(T, row)
    stored = {str(k).encode(): str(v).encode() if not isinstance(v, bytes) else v
              for k, v in zip(fields[::2], fields[1::2], strict=True)}  # fmt: skip
    assert from_hash(T, stored) == row
    assert from_hash(T, {b"~del": b"1"}) is None
    assert from_hash(T, {}) is None
    assert from_hash(T, {b"id": b"3"}) == {**dict.fromkeys(T.columns), "id": 3}


@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=2))
def test_int_order_keys_order_as_the_ints(pair: list[int]) -> None:
    a, b = pair
    assert (order_key(ColumnType.INT, a) < order_key(ColumnType.INT, b)) == (a < b)


@given(st.lists(st.text(), min_size=2, max_size=2))
def test_text_order_keys_order_by_code_point(pair: list[str]) -> None:
    a, b = pair
    assert (order_key(ColumnType.TEXT, a) < order_key(ColumnType.TEXT, b)) == (a < b)


@given(
    st.lists(
        st.tuples(
            st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
            st.integers(-14, 14),
        ),
        min_size=2,
        max_size=2,
    )
)
def test_timestamp_order_keys_order_as_instants(pair: list[tuple[datetime, int]]) -> None:
    (a, ha), (b, hb) = pair
    at = [t.replace(tzinfo=timezone(timedelta(hours=h))) for t, h in ((a, ha), (b, hb))]
    keys = [order_key(ColumnType.TIMESTAMP, t.isoformat()) for t in at]
    assert (keys[0] < keys[1]) == (at[0].astimezone(UTC) < at[1].astimezone(UTC))
