"""The event and the checks that need no table: shape, finiteness, calls."""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any

import pytest

from streamsink.errors import EventError
from streamsink.schemas.event import (
    MAX_ID_BYTES,
    MAX_KEY_BYTES,
    Event,
    Op,
    check_call,
    check_finite,
    check_shape,
)
from tests.schemas.expect import expect


def test_ops_are_the_five_of_the_design() -> None:
    assert [op.value for op in Op] == ["set", "incr", "del", "append", "call"]
    assert Op("del") is Op.DEL


@pytest.mark.parametrize("op", ["set", Op.SET])
def test_make_takes_op_by_name_or_member(op: str | Op) -> None:
    event = Event.make("task:1", op, {"status": "done"}, ts=5, version=1, id="e1", table="t")
    assert event.op is Op.SET
    assert event == Event("task:1", Op.SET, {"status": "done"}, "t", 5, 1, "e1")


@pytest.mark.parametrize("op", ["upsert", "SET", "", "delete"])
def test_make_refuses_unknown_op(op: str) -> None:
    with expect(
        EventError, "op", f"unknown op {op!r}; expected one of set, incr, del, append, call"
    ):
        Event.make("k", op, {})


def test_make_refuses_op_that_is_not_text() -> None:
    with expect(EventError, "op", "unknown op 5"):
        Event.make("k", 5, {})  # type: ignore[arg-type]


def test_event_is_immutable() -> None:
    event = Event.make("k", "set", {"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.key = "other"  # type: ignore[misc]


def test_make_checks_the_shape() -> None:
    with expect(EventError, "key", "must not be empty"):
        Event.make("", "set", {"a": 1})


# --- check_shape ----------------------------------------------------------------------------


def test_shape_accepts_limits_exactly() -> None:
    check_shape(Event("k" * MAX_KEY_BYTES, Op.SET, {}, "t" * 63, 2**63 - 1, 0, "i" * MAX_ID_BYTES))


@pytest.mark.parametrize(
    ("field", "extra", "reason"),
    [
        ("key", {"key": "k" * (MAX_KEY_BYTES + 1)}, "is 1025 bytes long; the limit is 1024"),
        # 342 characters, but 1026 bytes: the limit is on UTF-8 bytes.
        ("key", {"key": "中" * 342}, "is 1026 bytes long; the limit is 1024"),
        ("key", {"key": ""}, "must not be empty"),
        ("key", {"key": None}, "must be a string, got NoneType"),
        ("key", {"key": "\udc80"}, "is not valid UTF-8 (lone surrogate)"),
        ("table", {"table": ""}, "must not be empty"),
        ("table", {"table": "t" * 64}, "is 64 bytes long; the limit is 63"),
        ("table", {"table": 7}, "must be a string, got int"),
        ("id", {"id": ""}, "must not be empty"),
        ("id", {"id": "é" * 101}, "is 202 bytes long; the limit is 200"),
        ("ts", {"ts": -1}, "must be an integer in 0..2**63-1, got -1"),
        ("ts", {"ts": True}, "got True"),
        ("ts", {"ts": 1.5}, "got 1.5"),
        ("ts", {"ts": "1700000000000"}, "got '1700000000000'"),
        ("ts", {"ts": 2**63}, "got 9223372036854775808"),
        ("version", {"version": -3}, "got -3"),
        ("version", {"version": False}, "got False"),
        ("version", {"version": 2**64}, "must be an integer in 0..2**63-1"),
    ],
)
def test_shape_refuses(field: str, extra: dict[str, Any], reason: str) -> None:
    base: dict[str, Any] = {"key": "k", "op": Op.SET, "data": {"a": 1}}
    with expect(EventError, field, reason):
        check_shape(Event(**(base | extra)))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([("a", 1)], "must be a JSON object, got list"),
        ("{}", "must be a JSON object, got str"),
        (None, "must be a JSON object, got NoneType"),
        ({1: "a"}, "field names must be non-empty strings, got 1"),
        ({"": "a"}, "field names must be non-empty strings, got ''"),
    ],
)
def test_shape_refuses_bad_data(data: Any, reason: str) -> None:
    with expect(EventError, "data", reason):
        check_shape(Event("k", Op.SET, data))


def test_shape_takes_any_mapping() -> None:
    check_shape(Event("k", Op.SET, MappingProxyType({"a": 1})))


# --- check_finite ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (math.nan, "data"),
        ({"a": math.inf}, "data.a"),
        ({"a": [0, {"b": -math.inf}]}, "data.a[1].b"),
        ([[math.nan]], "data[0][0]"),
        ((1.0, math.inf), "data[1]"),
    ],
)
def test_finite_names_the_path_to_the_bad_number(value: Any, field: str) -> None:
    with expect(EventError, field, "is not a JSON number"):
        check_finite("data", value)


@pytest.mark.parametrize(
    "value", [1.5, -0.0, 1e308, 5e-324, {"a": [1, "nan", "inf", None, True, {"b": 2.0}]}]
)
def test_finite_accepts_finite_values(value: Any) -> None:
    check_finite("data", value)


# --- check_call ------------------------------------------------------------------------------


def call(**data: Any) -> Event:
    """A call event with `data`."""
    return Event("order:1", Op.CALL, data)


def test_call_accepts_every_field() -> None:
    check_call(
        call(url="https://x/h", payload={"a": [1]}, headers={"X-A": "1"}, coalesce="order:1")
    )


@pytest.mark.parametrize("payload", [None, 0, "", [], {}])
def test_call_takes_any_json_payload(payload: Any) -> None:
    check_call(call(url="https://x/h", payload=payload))


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"payload": {}}, "data.url", "a call needs the endpoint URL as a non-empty string"),
        ({"url": "", "payload": {}}, "data.url", "non-empty string"),
        ({"url": 5, "payload": {}}, "data.url", "non-empty string"),
        ({"url": "https://x/h"}, "data.payload", "a call needs a payload"),
        ({}, "data.url", "endpoint URL"),
        ({"url": "https://x", "payload": 1, "headers": ["a"]}, "data.headers", "string values"),
        ({"url": "https://x", "payload": 1, "headers": {"A": 1}}, "data.headers", "string values"),
        ({"url": "https://x", "payload": 1, "coalesce": ""}, "data.coalesce", "non-empty string"),
        ({"url": "https://x", "payload": 1, "coalesce": 3}, "data.coalesce", "non-empty string"),
        ({"url": "https://x", "payload": 1, "body": 1}, "data.body", "is not a field of a call"),
    ],
)
def test_call_refuses(data: dict[str, Any], field: str, reason: str) -> None:
    with expect(EventError, field, reason):
        check_call(call(**data))
