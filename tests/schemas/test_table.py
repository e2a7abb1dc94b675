"""Table declarations, and the check of an event against its table."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from streamsink.errors import ConfigError, ValidationError
from streamsink.schemas.event import Event
from streamsink.schemas.table import Column, ColumnType, Mode, Policy, Table, validate
from tests.schemas.expect import expect

T = ColumnType

ITEMS = Table(
    name="items",
    key=("id",),
    columns={
        "id": Column(T.INT, nullable=False),
        "title": Column(T.TEXT),
        "price": Column(T.FLOAT),
        "done": Column(T.BOOL),
        "meta": Column(T.JSON),
        "at": Column(T.TIMESTAMP),
        "ref": Column(T.UUID),
        "views": Column(T.INT, Policy.SUM),
        "score": Column(T.FLOAT, Policy.SUM),
        "best": Column(T.INT, Policy.MAX),
        "first_at": Column(T.TIMESTAMP, Policy.MIN),
        "name": Column(T.TEXT, nullable=False),
    },
)

LIKES = Table(
    name="post_likes",
    key=("post_id", "user_id"),
    columns={"post_id": Column(T.INT), "user_id": Column(T.INT), "liked_at": Column(T.TIMESTAMP)},
)

LOG = Table(name="activity_log", key=(), columns={"user_id": Column(T.INT), "meta": Column(T.JSON)})

UUID = "0b7e3c6a-5c1f-4f0e-9a4e-3f2b1c0d9e8f"


def ev(op: str, **data: Any) -> Event:
    """An event of `op` on key 'k' with `data`."""
    return Event.make("k", op, data)


# --- declarations --------------------------------------------------------------------------


def test_table_derives_value_columns_and_row_key() -> None:
    assert LIKES.value_columns == ("liked_at",)
    assert LIKES.row_key({"user_id": 7, "post_id": 42, "liked_at": None}) == (42, 7)
    assert LOG.value_columns == ("user_id", "meta")
    assert LOG.row_key({"user_id": 1}) == ()
    assert ITEMS.mode is Mode.UPSERT and ITEMS.schema is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad-name"}, "'bad-name' is not a valid identifier"),
        ({"name": "1st"}, "is not a valid identifier"),
        ({"name": "t" * 64}, "is not a valid identifier"),
        ({"columns": {"id": Column(T.INT), "a b": Column(T.INT)}}, "'a b' is not a valid"),
        (
            {"columns": {"id": Column(T.INT), 'x"; drop': Column(T.INT)}},
            "is not a valid identifier",
        ),
        ({"schema": "my schema"}, "'my schema' is not a valid identifier"),
        ({"key": (), "columns": {}}, "declares no columns"),
        ({"key": ("nope",)}, "key column 'nope' is not declared"),
        ({"key": ("id", "id")}, "key columns repeat"),
        ({"columns": {"id": Column(T.INT, Policy.SUM)}}, "key column 'id' must be lww"),
        (
            {"columns": {"id": Column(T.INT), "s": Column(T.TEXT, Policy.SUM)}},
            "sum needs int, float or numeric",
        ),
        (
            {"columns": {"id": Column(T.INT), "s": Column(T.BOOL, Policy.SUM)}},
            "sum needs int, float or numeric",
        ),
        (
            {"columns": {"id": Column(T.INT), "b": Column(T.BOOL, Policy.MAX)}},
            "max needs int, float",
        ),
        (
            {"columns": {"id": Column(T.INT), "j": Column(T.JSON, Policy.MIN)}},
            "min needs int, float",
        ),
        ({"columns": {"id": Column(T.INT), "u": Column(T.UUID, Policy.MAX)}}, "max needs"),
    ],
)
def test_table_refuses_bad_declaration(kwargs: dict[str, Any], message: str) -> None:
    spec: dict[str, Any] = {"name": "t", "key": ("id",), "columns": {"id": Column(T.INT)}}
    with pytest.raises(ConfigError, match="table") as caught:
        Table(**(spec | kwargs))
    assert message in str(caught.value)


@pytest.mark.parametrize(("type_", "policy"), [(T.TEXT, Policy.MAX), (T.TIMESTAMP, Policy.MIN)])
def test_table_allows_ordered_policies_on_text_and_timestamps(type_: T, policy: Policy) -> None:
    Table("t", ("id",), {"id": Column(T.INT), "c": Column(type_, policy)})


def test_plain_deltas_are_key_columns_and_lww_or_sum_numbers() -> None:
    # What an incr takes as is (wire.unpacker): anything else goes through the full check.
    table = Table(
        "t",
        key=("id", "code"),
        columns={
            "id": Column(T.INT),
            "code": Column(T.TEXT),
            "n": Column(T.INT),
            "f": Column(T.FLOAT),
            "total": Column(T.INT, Policy.SUM),
            "score": Column(T.FLOAT, Policy.SUM),
            "best": Column(T.INT, Policy.MAX),
            "low": Column(T.FLOAT, Policy.MIN),
            "s": Column(T.TEXT),
            "last": Column(T.TEXT, Policy.MAX),
            "b": Column(T.BOOL),
            "j": Column(T.JSON),
            "at": Column(T.TIMESTAMP),
            "u": Column(T.UUID),
        },
    )
    assert set(table.plain_deltas) == {"id", "code", "n", "f", "total", "score"}
    assert {name: table.plain[name] for name in table.plain_deltas} == table.plain_deltas
    assert table.plain_deltas["code"] == frozenset({str})  # a key column, whatever its type
    assert set(ITEMS.plain_deltas) == {"id", "price", "views", "score"}
    assert set(LIKES.plain_deltas) == {"post_id", "user_id"}
    assert set(LOG.plain_deltas) == {"user_id"}


# --- validate: accepted --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "event"),
    [
        (ITEMS, ev("set", id=1, name="n", title="t", price=2, done=False, meta={"a": [1]})),
        (
            ITEMS,
            ev("set", id=1, at="2024-05-01T12:00:00+02:00", ref=UUID, first_at="2024-01-01 00:00Z"),
        ),
        (ITEMS, ev("set", id=1, at="2024-05-01T12:00:00Z", ref=UUID.upper(), title=None)),
        (ITEMS, ev("set", id=-(2**63), best=2**63 - 1, price=1.5e300, meta=None)),
        (ITEMS, ev("set", id=1, meta="a string is JSON too")),
        (ITEMS, ev("incr", id=1, views=-3, score=0.5, price=1)),
        (ITEMS, ev("del", id=1)),
        (LIKES, ev("set", post_id=1, user_id=2)),
        (LIKES, ev("del", post_id=1, user_id=2)),
        (LOG, ev("append", user_id=1, meta={"ip": "1.2.3.4"})),
        (LOG, ev("append")),
    ],
)
def test_validate_accepts(table: Table, event: Event) -> None:
    validate(event, table)


# --- validate: wrong types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("views", "5", "expected an integer, got a string"),
        ("best", 1.0, "expected an integer, got float 1.0: write it as 1, without a fraction"),
        ("best", 1e3, "expected an integer, got float 1000.0: write it as 1000, without"),
        ("best", 0.5, "expected an integer, got float"),
        ("best", 2.0**64, "1.8446744073709552e+19 does not fit in a 64-bit integer (-2**63"),
        ("best", -(2.0**63) * 2, "-1.8446744073709552e+19 does not fit in a 64-bit integer"),
        ("best", math.inf, "expected an integer, got float"),
        ("best", True, "expected an integer, got a boolean"),
        ("best", [1], "expected an integer, got an array"),
        ("best", 2**63, "9223372036854775808 does not fit in a 64-bit integer"),
        ("best", -(2**63) - 1, "does not fit in a 64-bit integer"),
        ("done", 1, "expected true or false, got int"),
        ("done", 0, "expected true or false, got int"),
        ("done", "true", "expected true or false, got a string"),
        ("price", "1.5", "expected a number, got a string"),
        ("price", False, "expected a number, got a boolean"),
        ("title", 5, "expected a string, got int"),
        ("title", {"a": 1}, "expected a string, got an object"),
        ("title", "a\x00b", "text must not contain NUL characters"),
        ("meta", {"k": "a\x00b"}, "JSON strings must not contain NUL characters"),
        ("meta", {"a\x00": 1}, "JSON strings must not contain NUL characters"),
        ("meta", [[1, "\x00"]], "JSON strings must not contain NUL characters"),
        ("at", "2024-05-01T12:00:00", "'2024-05-01T12:00:00' has no time zone offset"),
        ("at", "2024-05-01", "has no time zone offset"),
        ("at", "yesterday", "'yesterday' is not an ISO 8601 timestamp"),
        ("at", "2024-13-01T00:00:00Z", "is not an ISO 8601 timestamp"),
        ("at", 1714564800, "expected an ISO 8601 timestamp string, got int"),
        ("at", "0001-01-01T00:00:00+01:00", "is outside years 1..9999 in UTC"),
        ("at", "9999-12-31T23:30:00-01:00", "is outside years 1..9999 in UTC"),
        ("ref", "not-a-uuid", "'not-a-uuid' is not a UUID"),
        ("ref", UUID[:-1], "is not a UUID"),
        ("ref", UUID + "0", "is not a UUID"),
        ("ref", "urn:uuid:" + UUID, "is not a UUID"),
        ("ref", "1234567_123456781234567812345678", "is not a UUID"),
        ("ref", 12345, "expected a UUID string, got int"),
    ],
)
def test_validate_refuses_wrong_type(column: str, value: Any, reason: str) -> None:
    with expect(ValidationError, f"data.{column}", reason):
        validate(ev("set", id=1, **{column: value}), ITEMS)


def test_validate_checks_key_column_types_too() -> None:
    with expect(ValidationError, "data.id", "expected an integer, got a string"):
        validate(ev("set", id="1"), ITEMS)
    with expect(ValidationError, "data.user_id", "expected an integer, got float"):
        validate(ev("del", post_id=1, user_id=2.0), LIKES)


# --- validate: shape against the table -----------------------------------------------------


def test_validate_refuses_unknown_column() -> None:
    with expect(ValidationError, "data.colour", "table 'items' has no such column"):
        validate(ev("set", id=1, colour="red"), ITEMS)


def test_validate_refuses_an_append_to_a_table_with_a_key() -> None:
    """Appends add rows to tables without a key (logs); a keyed row is written with set."""
    with expect(ValidationError, "op", "table 'items' has key columns: append adds rows"):
        validate(ev("append", id=1, title="x"), ITEMS)


@pytest.mark.parametrize("op", ["set", "incr", "del"])
def test_validate_refuses_missing_key_column(op: str) -> None:
    with expect(ValidationError, "data.user_id", "key column of 'post_likes' is missing"):
        validate(ev(op, post_id=1, liked_at=None), LIKES)


@pytest.mark.parametrize("op", ["set", "incr", "del"])
def test_validate_refuses_null_key_column(op: str) -> None:
    with expect(ValidationError, "data.post_id", "key column must not be null"):
        validate(ev(op, post_id=None, user_id=2), LIKES)


def test_validate_refuses_null_in_non_nullable_column() -> None:
    with expect(ValidationError, "data.name", "must not be null"):
        validate(ev("set", id=1, name=None), ITEMS)


@pytest.mark.parametrize("column", ["views", "best", "first_at"])
def test_validate_refuses_null_in_aggregating_column(column: str) -> None:
    with expect(ValidationError, f"data.{column}", "column takes a value, not null"):
        validate(ev("set", id=1, **{column: None}), ITEMS)


@pytest.mark.parametrize(
    ("column", "value", "kind"),
    [("title", 1, "text"), ("done", 1, "bool"), ("meta", 1, "json"), ("at", 1, "timestamp")],
)
def test_validate_refuses_incr_of_non_numeric_column(column: str, value: Any, kind: str) -> None:
    with expect(
        ValidationError,
        f"data.{column}",
        f"incr needs an int, float or numeric column with lww or sum, not {kind}",
    ):
        validate(ev("incr", id=1, **{column: value}), ITEMS)


def test_validate_refuses_incr_of_max_column() -> None:
    with expect(ValidationError, "data.best", "incr needs an int, float or numeric column"):
        validate(ev("incr", id=1, best=1), ITEMS)


def test_validate_refuses_incr_with_wrong_delta_type() -> None:
    with expect(ValidationError, "data.views", "expected an integer, got float"):
        validate(ev("incr", id=1, views=0.5), ITEMS)


def test_validate_refuses_null_delta() -> None:
    with expect(ValidationError, "data.price", "an incr delta must not be null"):
        validate(ev("incr", id=1, price=None), ITEMS)


def test_validate_refuses_incr_without_a_delta() -> None:
    with expect(ValidationError, "data", "incr names no column to add to"):
        validate(ev("incr", id=1), ITEMS)


@pytest.mark.parametrize("column", ["title", "views", "name"])
def test_validate_refuses_del_with_non_key_columns(column: str) -> None:
    with expect(ValidationError, f"data.{column}", "del takes only the key columns"):
        validate(ev("del", id=1, **{column: "x"}), ITEMS)


def test_validate_refuses_call_on_a_table() -> None:
    with expect(ValidationError, "op", "call events go to an endpoint, not to table 'items'"):
        validate(ev("call", url="https://x", payload=1), ITEMS)


@pytest.mark.parametrize("op", ["set", "incr", "del"])
def test_keyless_table_takes_only_append(op: str) -> None:
    with expect(ValidationError, "op", "table 'activity_log' has no key columns: only append"):
        validate(ev(op, user_id=1), LOG)


def test_row_keys_spell_uuids_and_timestamps_as_postgresql_compares_them() -> None:
    table = Table(
        "seen",
        key=("at", "ref", "n"),
        columns={"at": Column(T.TIMESTAMP), "ref": Column(T.UUID), "n": Column(T.INT)},
    )
    uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    one = table.row_key({"at": "2024-05-01T12:00:00Z", "ref": uuid.upper(), "n": 1})
    same = table.row_key({"at": "2024-05-01T14:00:00+02:00", "ref": uuid, "n": 1})
    assert one == same == ("2024-05-01T12:00:00+00:00", uuid, 1)
    other = table.row_key({"at": "2024-05-01T12:00:00.000001Z", "ref": uuid, "n": 1})
    assert other != one
    assert ITEMS.row_key({"id": 7, "title": "x"}) == (7,)  # other types as they are


def test_a_json_key_column_is_refused() -> None:
    with pytest.raises(ConfigError, match="key column 'doc' cannot be json"):
        Table("docs", key=("doc",), columns={"doc": Column(T.JSON)})


# --- key_format: the key string checked against the key columns ----------------------------


def keyed(key_format: str, key: tuple[str, ...] = ("post_id", "user_id")) -> Table:
    columns = {
        "post_id": Column(T.INT, nullable=False),
        "user_id": Column(T.INT, nullable=False),
        "name": Column(T.TEXT),
        "ref": Column(T.UUID),
        "on": Column(T.BOOL),
        "at": Column(T.TIMESTAMP),
        "n": Column(T.INT, Policy.SUM),
    }
    return Table("likes", key=key, columns=columns, key_format=key_format)


@pytest.mark.parametrize(
    ("key_format", "key", "data", "spelled"),
    [
        ("{post_id}:{user_id}", ("post_id", "user_id"), {"post_id": 42, "user_id": 7}, "42:7"),
        (
            "like-{user_id}-{post_id}",
            ("post_id", "user_id"),
            {"post_id": 1, "user_id": -2},
            "like--2-1",
        ),
        ("post:{post_id}", ("post_id",), {"post_id": 42}, "post:42"),
        ("{post_id}", ("post_id",), {"post_id": 42}, "42"),
        ("{name}/{post_id}", ("name", "post_id"), {"name": "é:x", "post_id": 1}, "é:x/1"),
        ("r:{ref}", ("ref",), {"ref": UUID.upper()}, f"r:{UUID}"),
        ("{on}!", ("on",), {"on": True}, "true!"),
    ],
)
def test_key_format_spells_the_key_of_a_row(
    key_format: str, key: tuple[str, ...], data: dict[str, Any], spelled: str
) -> None:
    table = keyed(key_format, key)
    assert table.key_of is not None and table.key_of(data) == spelled
    validate(Event.make(spelled, "set", data), table)
    validate(Event.make(spelled, "del", data), table)
    with expect(ValidationError, "key", f"{spelled + 'x'!r} disagrees with the key columns"):
        validate(Event.make(spelled + "x", "set", data), table)


def test_key_format_refuses_a_key_string_that_names_another_row() -> None:
    table = keyed("{post_id}:{user_id}")
    reason = "'42:8' disagrees with the key columns in data: table 'likes' spells their key '42:7'"
    for op, extra in (("set", {"name": "x"}), ("incr", {"n": 1}), ("del", {})):
        with expect(ValidationError, "key", reason):
            validate(Event.make("42:8", op, {"post_id": 42, "user_id": 7, **extra}), table)


def test_key_format_is_checked_after_the_values() -> None:
    table = keyed("{post_id}:{user_id}")
    with expect(ValidationError, "data.user_id", "expected an integer, got a string"):
        validate(Event.make("42:7", "set", {"post_id": 42, "user_id": "7"}), table)
    with expect(ValidationError, "data.user_id", "key column of 'likes' is missing"):
        validate(Event.make("42:7", "set", {"post_id": 42}), table)


def test_without_key_format_any_key_string_goes() -> None:
    assert ITEMS.key_of is None
    validate(Event.make("anything", "set", {"id": 1}), ITEMS)


@pytest.mark.parametrize(
    ("key_format", "key", "reason"),
    [
        ("{post_id}", ("post_id", "user_id"), "must name every key column: post_id, user_id"),
        ("{post_id}{post_id}:{user_id}", ("post_id", "user_id"), "{post_id} appears twice"),
        ("{name}", ("post_id",), "{name} must name a key column"),
        ("{post_id:>3}", ("post_id",), "{post_id} must name a key column, as {column}"),
        ("{post_id!r}", ("post_id",), "must name a key column"),
        ("{}", ("post_id",), "{} must name a key column"),
        ("{post_id", ("post_id",), "expected '}'"),
        ("{at}", ("at",), "'at' must be an int, text, uuid or bool column"),
        ("x", (), "a table without key columns has no key string to check"),
    ],
)
def test_key_format_is_checked_when_declared(
    key_format: str, key: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        keyed(key_format, key)
