"""The wire format: encode/decode of stream entry fields, and the shard of a key."""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import json
import math
import pickle
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any, NoReturn

import hypothesis
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamsink.errors import DecodeError, EventError, PayloadTooLarge, ValidationError
from streamsink.schemas import wire
from streamsink.schemas.config import Config, StreamSpec
from streamsink.schemas.event import Event, Op
from streamsink.schemas.table import INT64_MAX, INT64_MIN, Column, ColumnType, Policy, Table
from streamsink.schemas.wire import (
    DEFAULT_MAX_DATA_BYTES,
    MAX_DEPTH,
    decode,
    encode,
    entry_fields,
    pack,
    packer,
    shard_of,
    unpacker,
)
from tests.schemas.expect import expect
from tests.schemas.strategies import events, json_values, keys, text

FULL = Event(
    key="task:1",
    op=Op.SET,
    data={"status": "done", "n": 3},
    table="tasks",
    ts=1700000000000,
    version=2,
    id="evt-1",
)


def pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """The {name: value} mapping of a flat [name, value, ...] field list (as XRANGE gives)."""
    assert len(flat) % 2 == 0
    return dict(zip(flat[::2], flat[1::2], strict=True))


def entry(**fields: bytes | None) -> dict[bytes, bytes]:
    """Stream entry fields: a valid `set` event, with `fields` replaced (None drops one)."""
    base: dict[str, bytes | None] = {"key": b"k", "op": b"set", "data": b'{"a":1}'}
    base.update(fields)
    return {name.encode(): value for name, value in base.items() if value is not None}


# --- encode -------------------------------------------------------------------------------


def test_encode_lays_out_flat_fields_in_order() -> None:
    assert encode(FULL) == [
        b"key",
        b"task:1",
        b"op",
        b"set",
        b"data",
        b'{"status":"done","n":3}',
        b"table",
        b"tasks",
        b"ts",
        b"1700000000000",
        b"v",
        b"2",
        b"id",
        b"evt-1",
    ]


def test_encode_leaves_out_absent_optional_fields() -> None:
    flat = encode(Event("k", Op.DEL, {"id": 1}))
    assert flat == [b"key", b"k", b"op", b"del", b"data", b'{"id":1}']


def test_encode_writes_compact_utf8_json() -> None:
    flat = encode(Event("k", Op.SET, {"name": "Zoë 🎉", "list": [1, 2.5, None, True]}))
    assert pairs(flat)[b"data"] == '{"name":"Zoë 🎉","list":[1,2.5,null,true]}'.encode()


def test_encode_takes_any_mapping_as_data() -> None:
    data = MappingProxyType({"a": MappingProxyType({"b": [1]})})
    flat = encode(Event("k", Op.SET, data))
    assert pairs(flat)[b"data"] == b'{"a":{"b":[1]}}'
    assert decode(pairs(flat)).data == {"a": {"b": [1]}}


def test_encode_refuses_empty_key() -> None:
    with expect(EventError, "key", "must not be empty"):
        encode(Event("", Op.SET, {"a": 1}))


def test_encode_refuses_key_that_is_not_text() -> None:
    with expect(EventError, "key", "must be a string, got bytes"):
        encode(Event(b"k", Op.SET, {"a": 1}))  # type: ignore[arg-type]


def test_encode_refuses_lone_surrogate_in_key() -> None:
    with expect(EventError, "key", "not valid UTF-8"):
        encode(Event("k\ud800", Op.SET, {"a": 1}))


def test_encode_refuses_lone_surrogate_in_data() -> None:
    with expect(EventError, "data", "cannot be encoded as JSON"):
        encode(Event("k", Op.SET, {"a": "x\udcff"}))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"a": math.nan}, "data.a"),
        ({"a": math.inf}, "data.a"),
        ({"a": -math.inf}, "data.a"),
        ({"a": {"b": [1, 2.0, math.inf]}}, "data.a.b[2]"),
        ({"x": [{"y": math.nan}]}, "data.x[0].y"),
        ({"t": (1, -math.inf)}, "data.t[1]"),
    ],
)
def test_encode_refuses_nan_and_infinity_anywhere(data: dict[str, object], field: str) -> None:
    # orjson would silently write null for them; the check must come first.
    with expect(EventError, field, "is not a JSON number"):
        encode(Event("k", Op.SET, data))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({1, 2}, "cannot be encoded as JSON"),
        (b"raw", "cannot be encoded as JSON"),
        (object(), "cannot be encoded as JSON"),
        (2**64, "64-bit"),
        ({1: "non-string key below the top"}, "cannot be encoded as JSON"),
    ],
)
def test_encode_refuses_values_json_cannot_carry(value: object, reason: str) -> None:
    with expect(EventError, "data", reason):
        encode(Event("k", Op.SET, {"a": value}))


def test_encode_refuses_data_over_the_given_limit() -> None:
    event = Event("k", Op.SET, {"a": "x" * 20})  # {"a":"xxxx…"} is 28 bytes
    assert len(pairs(encode(event, max_data_bytes=28))[b"data"]) == 28
    with expect(PayloadTooLarge, "data", "is 28 bytes; the limit is 27"):
        encode(event, max_data_bytes=27)


def test_encode_refuses_data_over_the_default_limit() -> None:
    at_limit = Event("k", Op.SET, {"blob": "x" * (DEFAULT_MAX_DATA_BYTES - 11)})
    assert len(pairs(encode(at_limit))[b"data"]) == DEFAULT_MAX_DATA_BYTES
    over = Event("k", Op.SET, {"blob": "x" * (DEFAULT_MAX_DATA_BYTES - 10)})
    with expect(PayloadTooLarge, "data", f"the limit is {DEFAULT_MAX_DATA_BYTES}"):
        encode(over)


def test_payload_limit_counts_utf8_bytes_not_characters() -> None:
    event = Event("k", Op.SET, {"a": "中" * 10})  # 10 characters, 30 bytes of UTF-8
    with expect(PayloadTooLarge, "data", "is 38 bytes"):
        encode(event, max_data_bytes=37)


# --- decode: bad entries ------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b'{"a":', b"{'a': 1}", b"{a:1}", b'{"a":1,}', b"", b"{} {}"])
def test_decode_refuses_bad_json(raw: bytes) -> None:
    with expect(DecodeError, "data", "is not valid JSON"):
        decode(entry(data=raw))


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"[1,2]", "list"),
        (b"[]", "list"),
        (b'"text"', "str"),
        (b"42", "int"),
        (b"4.5", "float"),
        (b"null", "NoneType"),
        (b"true", "bool"),
    ],
)
def test_decode_refuses_data_that_is_not_an_object(raw: bytes, kind: str) -> None:
    with expect(DecodeError, "data", f"must be a JSON object, got {kind}"):
        decode(entry(data=raw))


@pytest.mark.parametrize("name", ["key", "op", "data"])
def test_decode_refuses_missing_required_field(name: str) -> None:
    with expect(DecodeError, name, "is missing"):
        decode(entry(**{name: None}))


def test_decode_refuses_empty_key() -> None:
    with expect(DecodeError, "key", "must not be empty"):
        decode(entry(key=b""))


def test_decode_refuses_key_over_the_limit() -> None:
    with expect(DecodeError, "key", "is 1025 bytes long; the limit is 1024"):
        decode(entry(key=b"k" * 1025))


@pytest.mark.parametrize("raw", [b"upsert", b"SET", b"Set", b"", b"set ", b"\xff"])
def test_decode_refuses_unknown_op(raw: bytes) -> None:
    with expect(DecodeError, "op", "expected one of set, incr, del, append, call"):
        decode(entry(op=raw))


@pytest.mark.parametrize("name", ["key", "table", "id"])
def test_decode_refuses_text_fields_that_are_not_utf8(name: str) -> None:
    with expect(DecodeError, name, "is not valid UTF-8"):
        decode(entry(**{name: b"caf\xe9"}))  # latin-1, not UTF-8


@pytest.mark.parametrize(
    ("raw", "byte"),
    [(b'{"a":"caf\xe9"}', 9), (b'{"a":"\xed\xa0\x80"}', 6), (b'{"a":1}\xff', 7)],
)
def test_decode_refuses_data_that_is_not_utf8(raw: bytes, byte: int) -> None:
    # The second is an encoded surrogate, which UTF-8 forbids.
    with expect(DecodeError, "data", f"is not valid UTF-8 (byte {byte})"):
        decode(entry(data=raw))


@pytest.mark.parametrize(
    "raw", [b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":[1,NaN]}', b"NaN"]
)
def test_decode_refuses_nan_and_infinity_literals(raw: bytes) -> None:
    with expect(DecodeError, "data", "is not valid JSON"):
        decode(entry(data=raw))


def test_decode_refuses_numbers_that_overflow_to_infinity() -> None:
    with expect(DecodeError, "data", "infinity"):
        decode(entry(data=b'{"a":1e400}'))


def test_decode_refuses_data_over_the_limit_before_parsing() -> None:
    raw = b'{"a":"' + b"x" * 100 + b'"}'  # 108 bytes
    assert decode(entry(data=raw), max_data_bytes=108).data == {"a": "x" * 100}
    with expect(DecodeError, "data", "is 108 bytes; the limit is 107"):
        decode(entry(data=raw), max_data_bytes=107)
    # Not a PayloadTooLarge: on the read side an entry is bad, whatever the reason.
    huge = b'{"a":"' + b"x" * DEFAULT_MAX_DATA_BYTES + b'"}'
    with expect(DecodeError, "data", f"the limit is {DEFAULT_MAX_DATA_BYTES}"):
        decode(entry(data=huge))


def test_decode_refuses_empty_field_name() -> None:
    with expect(DecodeError, "data", "field names must be non-empty strings"):
        decode(entry(data=b'{"":1}'))


@pytest.mark.parametrize("name", ["ts", "v"])
@pytest.mark.parametrize(
    "raw",
    [
        b"-1",
        b"1.5",
        b"abc",
        b"",
        b" 1",
        b"1e3",
        b"+1",
        b"\xd9\xa1",
        b"9223372036854775808",
        b"1" * 20,
    ],
)
def test_decode_refuses_bad_integers(name: str, raw: bytes) -> None:
    # b"\xd9\xa1" is ARABIC-INDIC DIGIT ONE: str.isdigit would take it.
    with expect(DecodeError, name, "must be an integer in 0..2**63-1"):
        decode(entry(**{name: raw}))


@pytest.mark.parametrize(
    ("raw", "value"), [(b"0", 0), (b"007", 7), (b"9223372036854775807", 2**63 - 1)]
)
def test_decode_reads_integers_up_to_int64(raw: bytes, value: int) -> None:
    event = decode(entry(ts=raw, v=raw))
    assert (event.ts, event.version) == (value, value)


# --- decode: good entries -----------------------------------------------------------------


def test_decode_reads_every_field() -> None:
    event = decode(pairs(encode(FULL)))
    assert event == FULL
    assert event.op is Op.SET
    assert (event.table, event.ts, event.version, event.id) == ("tasks", 1700000000000, 2, "evt-1")


def test_decode_ignores_unknown_fields() -> None:
    fields = pairs(encode(FULL)) | {b"trace": b"\xff\x00", b"v2": b"x", b"": b""}
    assert decode(fields) == FULL


def test_decode_leaves_absent_optionals_none() -> None:
    event = decode(entry())
    assert event == Event("k", Op.SET, {"a": 1})
    assert (event.table, event.ts, event.version, event.id) == (None, None, None, None)


@pytest.mark.parametrize("op", list(Op))
def test_every_op_round_trips(op: Op) -> None:
    event = Event("k", op, {"url": "https://x", "payload": None})
    assert decode(pairs(encode(event))) == event


@settings(max_examples=1000, deadline=None)
@given(events)
@example(Event("🎉", Op.INCR, {"n": 2**63 - 1, "m": -(2**63), "f": 5e-324}))
@example(Event("k", Op.SET, {"s": 'tab\tnl\n"q"\\ \x00 \u2028', "nested": {"": [[], {}]}}))
def test_decode_inverts_encode(event: Event) -> None:
    flat = encode(event)
    assert all(isinstance(item, bytes) for item in flat)
    decoded = decode(pairs(flat))
    assert decoded == event
    assert encode(decoded) == flat  # stable bytes: re-encoding a decoded event changes nothing


@settings(max_examples=200, deadline=None)
@given(events)
def test_encoded_data_is_json_any_parser_reads(event: Event) -> None:
    raw = pairs(encode(event))[b"data"]
    assert json.loads(raw.decode("utf-8"), parse_constant=_refuse) == event.data


def _refuse(name: str) -> None:
    raise AssertionError(f"{name} in encoded data")


# --- shard_of -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "crc"),
    [
        ("123456789", 0xCBF43926),  # the CRC-32/IEEE check value of every CRC catalogue
        ("The quick brown fox jumps over the lazy dog", 0x414FA339),
        ("a", 0xE8B7BE43),
        ("é", 0x0E048D3E),  # from Node's zlib.crc32, not from Python
    ],
)
def test_shard_of_is_crc32_ieee(key: str, crc: int) -> None:
    assert shard_of(key, 2**32) == crc
    assert binascii.crc32(key.encode("utf-8")) == crc
    for shards in (1, 2, 3, 4, 16, 64, 1024):
        assert shard_of(key, shards) == crc % shards


def test_shard_of_hashes_utf8_bytes() -> None:
    assert shard_of("é", 2**32) == binascii.crc32(b"\xc3\xa9")
    assert shard_of("é", 2**32) != binascii.crc32("é".encode("latin-1"))
    assert shard_of("é", 2**32) != binascii.crc32("é".encode("utf-16-le"))


def test_shard_of_known_small_counts() -> None:
    assert [shard_of("task:1", n) for n in (1, 4, 16, 64)] == [0, 1, 9, 57]
    assert [shard_of("post:42:user:7", n) for n in (1, 4, 16, 64)] == [0, 3, 11, 59]


@settings(max_examples=300, deadline=None)
@given(keys, st.integers(1, 1024))
def test_shard_of_is_in_range_and_matches_binascii(key: str, shards: int) -> None:
    shard = shard_of(key, shards)
    assert 0 <= shard < shards
    assert shard == binascii.crc32(key.encode("utf-8")) % shards
    assert shard_of(key, shards) == shard
    assert shard_of(key, 1) == 0


# --- packer: pack and validate, with a quick path for plain events -------------------------

T = ColumnType
ROWS = Table(
    "rows",
    key=("id",),
    columns={
        "id": Column(T.INT, nullable=False),
        "n": Column(T.INT),
        "f": Column(T.FLOAT),
        "s": Column(T.TEXT),
        "b": Column(T.BOOL),
        "j": Column(T.JSON),
        "at": Column(T.TIMESTAMP),
        "u": Column(T.UUID),
        "total": Column(T.INT, Policy.SUM),
        "name": Column(T.TEXT, nullable=False),
        "best": Column(T.INT, Policy.MAX),
        "low": Column(T.FLOAT, Policy.MIN),
    },
)
LOG = Table("log", key=(), columns=ROWS.columns)  # append only
KEYED = Table("keyed", key=("id",), columns=ROWS.columns, key_format="row:{id}")
CONFIG = Config(
    streams={
        "rows": StreamSpec("rows", 4, "rows"),
        "log": StreamSpec("log", 4, "log"),
        "keyed": StreamSpec("keyed", 4, "keyed"),
    },
    tables={"rows": ROWS, "log": LOG, "keyed": KEYED},
)


class Text(str):
    """A str subclass: not a plain value."""


class Obj(dict[str, object]):
    """A dict subclass: not plain data."""


in_range = st.integers(INT64_MIN, INT64_MAX)
ints = st.one_of(
    in_range,
    st.sampled_from([INT64_MIN, INT64_MAX, INT64_MAX + 1, INT64_MIN - 1, 2**64, -(2**70)]),
)
floats = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308]))
no_nul = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
plain_values = {  # values the quick path takes (json_values hold a null now and then)
    "n": in_range,
    "f": st.one_of(st.floats(allow_nan=False, allow_infinity=False), in_range),
    "s": no_nul,
    "b": st.booleans(),
    "j": json_values,
    "total": in_range,
    "name": no_nul,
    "best": in_range,
    "low": st.floats(allow_nan=False, allow_infinity=False),
}
odd = st.sampled_from(
    [None, True, 0, 1.0, "", "null", "\x00", "\\u0000", Text("x"), Obj(a=1), {1: 2}, (1,), b"x"]
)
any_values = st.one_of(ints, floats, text, json_values, odd)
plain_data = st.fixed_dictionaries({"id": in_range}, optional=plain_values)
plain_events = st.builds(
    Event,
    key=st.text(st.characters(codec="ascii"), min_size=1, max_size=20),
    op=st.sampled_from([Op.SET, Op.APPEND]),
    data=plain_data,
)
odd_keys = st.sampled_from(["", "x" * 1024, "x" * 1025, "é" * 513, "\ud800", Text("k"), 5])
odd_columns = {
    "id": st.one_of(ints, odd),
    "n": st.one_of(ints, odd),
    "f": st.one_of(floats, odd),
    "s": st.one_of(text, odd),
    "b": odd,
    "j": st.one_of(json_values, odd),
    "at": st.sampled_from(["2024-05-01T12:00:00Z", "2024-05-01T12:00:00", "x"]),
    "u": st.sampled_from(["0b7e3c6a-5c1f-4f0e-9a4e-3f2b1c0d9e8f", "0b7e3c6a"]),
    "name": st.one_of(text, odd),
    "best": st.one_of(ints, odd),
    "low": st.one_of(floats, odd),
    "extra": any_values,
    "": any_values,
}
changes = st.one_of(  # one thing off plain (or not: some changes keep it plain)
    st.fixed_dictionaries({"key": st.one_of(odd_keys, keys)}),
    st.fixed_dictionaries({"op": st.sampled_from(Op)}),
    st.fixed_dictionaries({"table": st.sampled_from(["rows", "log", "nope", ""])}),
    st.fixed_dictionaries({"ts": st.sampled_from([0, -1, 2**63])}),
    st.fixed_dictionaries({"version": st.sampled_from([0, 3, True])}),
    st.fixed_dictionaries({"id": st.sampled_from(["e-1", "", "é"])}),
    st.fixed_dictionaries({"data": st.one_of(plain_data.map(Obj), st.sampled_from([[], None]))}),
    st.fixed_dictionaries(
        {"data": st.dictionaries(st.sampled_from(list(odd_columns)), any_values)}
    ),
    st.fixed_dictionaries(
        {"value": st.one_of(*(st.tuples(st.just(c), v) for c, v in odd_columns.items()))}
    ),
)


def changed(event: Event, change: dict[str, Any]) -> Event:
    """`event` with one field changed, or one value of its data set."""
    if "value" in change:
        name, value = change["value"]
        return dataclasses.replace(event, data={**event.data, name: value})
    return dataclasses.replace(event, **change)


packer_events = st.one_of(plain_events, st.builds(changed, plain_events, changes))


def outcome(pack_one: object, event: Event) -> object:
    """What packing `event` gives: its values, or the exact error (class, field, reason)."""
    try:
        return pack_one(event)  # type: ignore[operator]
    except EventError as exc:
        return (type(exc), exc.field, exc.reason)


def row_keyed(event: Event) -> Event:
    """`event` with the key KEYED spells for its data (when it holds an int id)."""
    row = event.data.get("id") if isinstance(event.data, dict) else None
    return dataclasses.replace(event, key=f"row:{row}") if type(row) is int else event


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(packer_events, packer_events.map(row_keyed)),
    st.sampled_from(["rows", "log", "keyed"]),
    st.sampled_from([1000, 100, 30]),
)
@example(Event("row:1", Op.SET, {"id": 1, "s": "x"}), "keyed", 100)
@example(Event("row:2", Op.SET, {"id": 1, "s": "x"}), "keyed", 100)
@example(Event("row:1", Op.SET, {"id": True}), "keyed", 100)
@example(Event("k", Op.SET, {"id": 1, "s": "a\x00b"}), "rows", 100)
@example(Event("k", Op.SET, {"id": 1, "n": INT64_MAX + 1}), "rows", 100)
@example(Event("k", Op.SET, {"id": 1, "f": math.nan}), "rows", 100)
@example(Event("k", Op.SET, {"id": 1, "j": {"a": ["\x00"]}}), "rows", 100)
@example(Event("k", Op.SET, {"id": 1, "j": (1, "\x00")}), "rows", 100)
@example(Event("k", Op.SET, {"n": 1}), "rows", 100)
@example(Event("k", Op.SET, {"n": 1}), "log", 100)
@example(Event("k", Op.APPEND, {"n": 1}), "log", 100)
@example(Event("k", Op.SET, {"id": 1, "s": "x" * 30}), "rows", 30)
@example(Event("\ud800", Op.SET, {"id": 1}), "rows", 100)
@example(Event("é" * 513, Op.SET, {"id": 1}), "rows", 100)
@example(Event("k", Op.SET, {"id": 1}, id="e-1"), "rows", 100)
@example(Event("k", Op.SET, {"id": 1}, ts=1), "rows", 100)
@example(Event("k", Op.SET, {"id": 1}, version=1), "rows", 100)
@example(Event("k", Op.SET, {"id": 1}, table="log"), "rows", 100)
@example(Event("k", Op.SET, {"id": 1, "f": True}), "rows", 100)
def test_packer_agrees_with_pack_then_validate(event: Event, stream: str, limit: int) -> None:
    validate = CONFIG.validator(stream)

    def full(event: Event) -> tuple[bytes, ...]:
        values = pack(event, limit)
        validate(event)
        return values if any(values[3:]) else values[:3]

    quick = packer(CONFIG.tables[stream], validate, limit)
    assert outcome(quick, event) == outcome(full, event)


@pytest.mark.parametrize(
    ("stream", "event"),
    [
        ("rows", Event("task:1", Op.SET, {"id": 7, "n": -5, "f": 1, "s": 'é\t"', "b": False})),
        ("log", Event("task:1", Op.APPEND, {"id": INT64_MIN, "j": {"a": [1, 2.5, "x", True]}})),
        ("rows", Event("k", Op.SET, {"id": INT64_MAX, "f": 2.5, "j": "s", "name": ""})),
        ("log", Event("k", Op.APPEND, {"n": 1, "j": [1]})),
        ("log", Event("k", Op.APPEND, {})),
    ],
)
def test_packer_takes_plain_events_the_quick_way(
    stream: str, event: Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = pack(event)[:3]
    CONFIG.validator(stream)(event)

    def refuse(event: Event, *_: object) -> None:
        raise AssertionError("took the full path")

    monkeypatch.setattr(wire, "pack", refuse)
    assert packer(CONFIG.tables[stream], refuse)(event) == expected


# --- unpacker: decode and validate, with a quick path for plain entries ---------------------

incr_data = st.fixed_dictionaries(  # the key, and deltas of lww or sum numbers (maybe none)
    {"id": in_range}, optional={"n": in_range, "f": plain_values["f"], "total": in_range}
)
plain_entries = st.one_of(  # the events of entries the quick path takes (incr: with a delta)
    plain_events,
    st.builds(
        Event,
        key=st.text(st.characters(codec="ascii"), min_size=1, max_size=20),
        op=st.just(Op.INCR),
        data=incr_data,
    ),
)
writers = st.sampled_from(["orjson", "ascii", "utf8"])


def fields_of(event: Event, writer: str) -> list[bytes]:
    """The flat fields an XADD of `event` would hold, checking nothing (unlike `encode`).

    A lone surrogate becomes bytes that are not UTF-8, NaN the literal JSON refuses (or null,
    from orjson). `writer`: orjson, as producers write (when it can), or the json module's
    text, ASCII-escaped or UTF-8.
    """
    raw = None
    if writer == "orjson":
        with contextlib.suppress(TypeError):  # what orjson cannot write, the json module can
            raw = orjson.dumps(event.data)
    if raw is None:
        written = json.dumps(
            event.data, ensure_ascii=writer == "ascii", separators=(",", ":"), default=repr
        )
        raw = written.encode("utf-8", "surrogatepass")
    flat = [b"key", _raw(event.key), b"op", event.op.value.encode(), b"data", raw]
    optional = {b"table": event.table, b"ts": event.ts, b"v": event.version, b"id": event.id}
    for name, value in optional.items():
        if value is not None:
            flat += (name, _raw(value))
    return flat


def _raw(value: object) -> bytes:
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else str(value).encode()


def entry_of(key: bytes, op: bytes, data: bytes) -> list[bytes]:
    """The flat fields of an entry as producers lay it out: key, op, data."""
    return [b"key", key, b"op", op, b"data", data]


def reordered(flat: list[bytes], order: Sequence[int]) -> list[bytes]:
    """`flat` with its first three fields (key, op, data) in `order`."""
    fields = [flat[at : at + 2] for at in range(0, 6, 2)]
    return [item for index in order for item in fields[index]] + flat[6:]


def with_field(flat: list[bytes], name: bytes, value: bytes, index: int) -> list[bytes]:
    """`flat` with one more field (a repeat, when `name` is there) before field `index`."""
    at = 2 * min(index, len(flat) // 2)
    return [*flat[:at], name, value, *flat[at:]]


def without(flat: list[bytes], index: int) -> list[bytes]:
    """`flat` less its field number `index`."""
    return flat[: 2 * index] + flat[2 * index + 2 :]


def with_value(flat: list[bytes], name: bytes, value: bytes) -> list[bytes]:
    """`flat` with the value of field `name` replaced."""
    return [value if at % 2 and flat[at - 1] == name else item for at, item in enumerate(flat)]


RAW_KEYS = [
    b"k",
    b"",
    b"k" * 1024,
    b"k" * 1025,
    "é".encode() * 512,  # 1024 bytes, not ASCII
    "é".encode() * 513,
    "🎉".encode(),
    b"caf\xe9",  # latin-1
    b"\xff",
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\x00",
    b"\x7f \t",
]
RAW_OPS = [b"set", b"incr", b"append", b"del", b"call", b"upsert", b"SET", b"", b"set ", b"\xff"]
RAW_DATA = [
    b'{"id":1}',
    b'{"id":1,"n":2,"f":0.5,"total":-3}',
    b'{"id":1,"f":2}',
    b'{"id":1,"s":"x","b":true,"j":{"a":[null]},"name":""}',
    b'{"id":1,"best":2,"low":0.5}',
    b'{"id":1,"at":"2024-05-01T12:00:00Z","u":"0b7e3c6a-5c1f-4f0e-9a4e-3f2b1c0d9e8f"}',
    b'{"n":1}',
    b"{}",
    b' {"id" : 1} ',
    b'{"id":1,"id":"x"}',
    b'{"id":"x","id":1}',
    # not JSON, or not an object
    b"",
    b'{"id":',
    b"{'id': 1}",
    b'{"id":1,}',
    b'{"id":1} {}',
    b'{"id":NaN}',
    b'{"id":1,"f":Infinity}',
    b'{"id":1,"f":1e400}',
    b'\xef\xbb\xbf{"id":1}',
    b"[1]",
    b'"text"',
    b"42",
    b"null",
    b"true",
    # NUL, escaped or raw, and text that only looks like it
    b'{"id":1,"s":"a\\u0000b"}',
    b'{"id":1,"j":{"a\\u0000":1}}',
    b'{"id":1,"j":["\\u0000"]}',
    b'{"id":1,"s":"a\x00b"}',
    b'{"id":1,"s":"a\\\\u0000b"}',
    b'{"id":1,"name":"\\\\u0000"}',
    b'{"id":1,"s":"\\u00e9\\u2028"}',
    # not UTF-8, surrogates
    b'{"id":1,"s":"caf\xe9"}',
    b'{"id":1,"s":"\xed\xa0\x80"}',
    b'{"id":1,"s":"\\ud800"}',
    b'{"id":1,"s":"\\ud83c\\udf89"}',
    # int64 and beyond
    b'{"id":9223372036854775807,"n":-9223372036854775808}',
    b'{"id":9223372036854775808}',
    b'{"id":-9223372036854775809}',
    b'{"id":1,"n":18446744073709551615}',
    b'{"id":1,"total":18446744073709551616}',
    b'{"id":1,"f":18446744073709551616}',
    b'{"id":1,"j":18446744073709551615}',
    # floats for ints, bools for numbers
    b'{"id":1.0}',
    b'{"id":1,"n":1.5}',
    b'{"id":1,"total":1e3}',
    b'{"id":1,"best":2.0}',
    b'{"id":true}',
    b'{"id":1,"n":false}',
    b'{"id":1,"f":true}',
    b'{"id":1,"total":true}',
    b'{"id":1,"b":0}',
    b'{"id":"1"}',
    # nulls
    b'{"id":null}',
    b'{"id":1,"n":null}',
    b'{"id":1,"f":null}',
    b'{"id":1,"total":null}',
    b'{"id":1,"name":null}',
    b'{"id":1,"best":null}',
    b'{"id":1,"j":null}',
    # incr of columns that take none, names that are no column
    b'{"id":1,"s":"x"}',
    b'{"id":1,"b":true}',
    b'{"id":1,"j":1}',
    b'{"id":1,"nope":1}',
    b'{"id":1,"":1}',
    # calls
    b'{"url":"https://x","payload":1}',
    b'{"url":"https://x"}',
]


def sized(size: int) -> bytes:
    """Valid data of `size` bytes (at least 15)."""
    return b'{"id":1,"s":"' + b"x" * (size - 15) + b'"}'


raw_keys = st.one_of(st.sampled_from(RAW_KEYS), st.binary(max_size=6))
raw_ops = st.sampled_from(RAW_OPS)
raw_data = st.one_of(
    st.sampled_from(RAW_DATA), st.sampled_from([30, 31, 100, 101, 1000, 1001]).map(sized)
)
field_names = st.sampled_from(
    [b"key", b"op", b"data", b"table", b"ts", b"v", b"id", b"trace", b"", b"KEY", b"\xff"]
)
field_values = st.one_of(
    st.sampled_from([b"", b"1", b"-1", b"rows", b"log", b"nope", b"\xff"]),
    raw_keys,
    raw_ops,
    raw_data,
)
entry_flats = st.builds(
    fields_of, st.one_of(plain_entries, st.builds(changed, plain_entries, changes)), writers
)
raw_flats = st.builds(entry_of, raw_keys, raw_ops, raw_data)
some_flats = st.one_of(entry_flats, raw_flats)
flats = st.one_of(
    st.builds(fields_of, plain_entries, writers),
    entry_flats,
    raw_flats,
    st.builds(reordered, some_flats, st.permutations(range(3))),
    st.builds(with_field, some_flats, field_names, field_values, st.integers(0, 3)),
    st.builds(without, some_flats, st.integers(0, 2)),
    st.builds(with_value, some_flats, st.just(b"key"), raw_keys),
    st.builds(with_value, some_flats, st.just(b"op"), raw_ops),
    st.builds(with_value, some_flats, st.just(b"data"), raw_data),
)

Unpack = Callable[[list[bytes]], tuple[Event, Table | None]]


def unpacked(unpack: Unpack, flat: list[bytes]) -> tuple[object, ...]:
    """What unpacking `flat` gives: the event (its repr too) and table, or the exact error."""
    try:
        event, table = unpack(flat)
    except EventError as exc:
        return (type(exc), exc.field, exc.reason)
    return (repr(event), event, table)  # repr: True == 1 and 1 == 1.0, but not in a repr


def set_of(data: bytes, key: bytes = b"k") -> list[bytes]:
    """The fields of a set of `data` on `key`."""
    return entry_of(key, b"set", data)


def incr_of(data: bytes) -> list[bytes]:
    """The fields of an incr of `data` on key k."""
    return entry_of(b"k", b"incr", data)


@settings(max_examples=1500, deadline=None)
@given(flats, st.sampled_from(["rows", "log"]), st.sampled_from([1000, 100, 30]))
@example(set_of(b'{"id":1,"s":"a\\u0000b"}'), "rows", 100)
@example(set_of(b'{"id":1,"j":{"a\\u0000":1}}'), "rows", 100)
@example(set_of(b'{"id":1,"s":"a\\\\u0000b"}'), "rows", 100)
@example(set_of(b'{"id":1,"s":"a\x00b"}'), "rows", 100)
@example(set_of(b'{"id":9223372036854775808}'), "rows", 100)
@example(set_of(b'{"id":1,"n":-9223372036854775809}'), "rows", 100)
@example(incr_of(b'{"id":1,"total":18446744073709551615}'), "rows", 100)
@example(incr_of(b'{"id":1,"total":9223372036854775807}'), "rows", 100)
@example(set_of(b'{"id":1.0}'), "rows", 100)
@example(incr_of(b'{"id":1,"total":1.5}'), "rows", 100)
@example(set_of(b'{"id":1,"f":true}'), "rows", 100)
@example(incr_of(b'{"id":1,"n":false}'), "rows", 100)
@example(set_of(b'{"id":null}'), "rows", 100)
@example(set_of(b'{"id":1,"name":null}'), "rows", 100)
@example(incr_of(b'{"id":1,"n":null}'), "rows", 100)
@example(incr_of(b'{"id":1,"total":null}'), "rows", 100)
@example(incr_of(b'{"id":1}'), "rows", 100)
@example(incr_of(b'{"id":1,"best":1}'), "rows", 100)
@example(incr_of(b'{"id":1,"low":0.5}'), "rows", 100)
@example(incr_of(b'{"id":1,"s":"x"}'), "rows", 100)
@example(incr_of(b'{"id":1,"f":2}'), "rows", 100)
@example(incr_of(b'{"n":1}'), "log", 100)
@example(entry_of(b"k", b"del", b'{"id":1}'), "rows", 100)
@example(entry_of(b"k", b"call", b'{"url":"https://x","payload":1}'), "rows", 100)
@example(entry_of(b"k", b"upsert", b'{"id":1}'), "rows", 100)
@example(set_of(b'{"n":1}'), "log", 100)
@example(entry_of(b"k", b"append", b'{"n":1}'), "log", 100)
@example(set_of(b'{"id":1}', key=b""), "rows", 100)
@example(set_of(b'{"id":1}', key=b"k" * 1024), "rows", 100)
@example(set_of(b'{"id":1}', key=b"k" * 1025), "rows", 100)
@example(set_of(b'{"id":1}', key="é".encode() * 512), "rows", 100)
@example(set_of(b'{"id":1}', key=b"caf\xe9"), "rows", 100)
@example(set_of(b'{"id":'), "rows", 100)
@example(set_of(b"[1]"), "rows", 100)
@example(set_of(sized(30)), "rows", 30)
@example(set_of(sized(31)), "rows", 30)
@example([b"op", b"set", b"key", b"k", b"data", b'{"id":1}'], "rows", 100)
@example([*set_of(b'{"id":1}'), b"ts", b"1"], "rows", 100)
@example([*set_of(b'{"id":1}'), b"table", b"log"], "rows", 100)
@example([*set_of(b'{"id":1}'), b"trace", b"\xff"], "rows", 100)
@example([b"key", b"k", b"op", b"set"], "rows", 100)
@example([*set_of(b'{"id":1}'), b"data", b'{"id":"x"}'], "rows", 100)
@example([b"key", b"k", *set_of(b'{"id":1}')], "rows", 100)
def test_unpacker_agrees_with_decode_then_validate(
    flat: list[bytes], stream: str, limit: int
) -> None:
    unpacker_agrees(flat, stream, limit)


def unpacker_agrees(
    flat: list[bytes],
    stream: str,
    limit: int,
    shard: tuple[int, int] | None = None,
    calls: bool = True,
) -> None:
    """Same event and table, or same error; the statistics tell how many took the quick path."""
    validate = CONFIG.validator(stream)
    validated: list[Event] = []

    def counted(event: Event) -> Table | None:
        validated.append(event)
        return validate(event)

    def full(flat: list[bytes]) -> tuple[Event, Table | None]:
        event = decode(entry_fields(flat), limit)
        if shard is not None and shard_of(event.key, shard[1]) != shard[0]:
            (index, count), own = shard, shard_of(event.key, shard[1])
            raise ValidationError(
                "key",
                f"belongs to shard {own} of {count} (crc32 of its UTF-8 bytes mod {count}), "
                f"not to shard {index} it was added to: XADD it to shard {own}",
            )
        if event.op is Op.CALL and not calls:
            raise ValidationError(
                "op", "no sink of this group sends calls: give the group an HTTP sink"
            )
        return event, validate(event)

    expected = unpacked(full, flat)
    unpack = unpacker(CONFIG.tables[stream], counted, limit, shard=shard, calls=calls)
    got = unpacked(unpack, flat)
    if isinstance(got[0], type):
        hypothesis.event(f"refused: {got[0].__name__}")
    else:
        hypothesis.event("full path" if validated else "quick path")
    assert got == expected


def keyed_flat(flat: list[bytes]) -> list[bytes]:
    """`flat` with the key KEYED spells for its data, when its data holds an int id."""
    try:
        data = orjson.loads(flat[flat.index(b"data") + 1])
    except (ValueError, orjson.JSONDecodeError):
        return flat
    row = data.get("id") if type(data) is dict else None
    return with_value(flat, b"key", f"row:{row}".encode()) if type(row) is int else flat


deep = st.integers(MAX_DEPTH - 2, MAX_DEPTH + 1).map(
    lambda n: set_of(b'{"id":1,"j":' + b"[" * (n - 1) + b"]" * (n - 1) + b"}")
)


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(flats, flats.map(keyed_flat), deep),
    st.sampled_from(["rows", "log", "keyed"]),
    st.sampled_from([1000, 100, 30, DEFAULT_MAX_DATA_BYTES]),
    st.sampled_from([None, (0, 1), (0, 4), (1, 4), (2, 4), (3, 4), (5, 7)]),
    st.booleans(),
)
@example(set_of(b'{"id":1}', key=b"row:1"), "keyed", 100, None, True)
@example(set_of(b'{"id":1}', key=b"row:2"), "keyed", 100, None, True)
@example(incr_of(b'{"id":1,"n":1}'), "keyed", 100, None, True)
@example(set_of(b'{"id":1}', key=b"k"), "rows", 100, (2, 4), True)
@example(set_of(b'{"id":1}', key=b"k"), "rows", 100, (1, 4), True)
@example(set_of(b'{"id":1}', key=b"\xff"), "rows", 100, (1, 4), True)
@example(entry_of(b"k", b"call", b'{"url":"https://x","payload":1}'), "rows", 100, None, False)
@example(entry_of(b"k", b"call", b'{"url":"https://x"}'), "rows", 100, None, False)
@example(set_of(b'{"id":1,"j":' + b"[" * 253 + b"]" * 253 + b"}"), "rows", 1000, None, True)
@example(set_of(b'{"id":1,"j":' + b"[" * 254 + b"]" * 254 + b"}"), "rows", 1000, None, True)
@example(set_of(b'{"id":1,"j":"' + b"[" * 300 + b'"}'), "rows", 1000, None, True)
@example([*set_of(b'{"id":1}'), b"trace", b"1", b"trace", b"2"], "rows", 100, None, True)
@example([*set_of(b'{"id":1}'), b"op", b"set"], "rows", 100, None, True)
def test_unpacker_agrees_on_routing_key_strings_depth_and_calls(
    flat: list[bytes], stream: str, limit: int, shard: tuple[int, int] | None, calls: bool
) -> None:
    unpacker_agrees(flat, stream, limit, shard, calls)


QUICK_FLATS = [
    ("rows", encode(Event("task:1", Op.SET, {"id": 7, "n": -5, "f": 1, "s": 'é\t"', "b": False}))),
    ("log", encode(Event("t:1", Op.APPEND, {"id": INT64_MIN, "j": {"a": [1, 2.5, "x", True]}}))),
    ("rows", encode(Event("k" * 1024, Op.SET, {"id": INT64_MAX, "best": 3, "low": -0.5}))),
    ("rows", encode(Event("task:1", Op.INCR, {"id": 7, "n": 1, "f": 0.5, "total": INT64_MAX}))),
    ("rows", encode(Event("task:1", Op.INCR, {"total": INT64_MIN, "id": 7, "f": 2}))),
    ("rows", set_of(b'{"id":1,"s":"\\u00e9\\u2028\\/"}')),  # escapes, none of them NUL
    ("rows", set_of(sized(DEFAULT_MAX_DATA_BYTES))),
    ("log", encode(Event("k", Op.APPEND, {"n": 1, "j": [1]}))),
    ("log", encode(Event("k", Op.APPEND, {}))),
]


@pytest.mark.parametrize(("stream", "flat"), QUICK_FLATS)
def test_unpacker_takes_plain_entries_the_quick_way(
    stream: str, flat: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = decode(pairs(flat))
    table = CONFIG.validator(stream)(expected)

    def refuse(*_: object) -> NoReturn:
        raise AssertionError("took the full path")

    monkeypatch.setattr(wire, "decode", refuse)
    event, got = unpacker(CONFIG.tables[stream], refuse)(flat)
    assert (repr(event), event) == (repr(expected), expected)
    assert got is table is CONFIG.tables[stream]


def test_unpacked_event_is_an_ordinary_event() -> None:
    def refuse(_: Event) -> NoReturn:
        raise AssertionError("took the full path")

    flat = incr_of(b'{"id":7,"total":2,"f":0.5}')
    event, _ = unpacker(ROWS, refuse)(flat)  # the quick path: its Event is built by hand
    built = Event("k", Op.INCR, {"id": 7, "total": 2, "f": 0.5})
    assert type(event) is Event
    assert event == built and built == event
    assert (event != built) is False
    assert dataclasses.astuple(event) == dataclasses.astuple(built)
    assert repr(event) == repr(built)
    assert (event.table, event.ts, event.version, event.id) == (None, None, None, None)
    for one in (event, built):  # dict data: unhashable, both the same way
        with pytest.raises(TypeError, match="unhashable type: 'dict'"):
            hash(one)
    assert pickle.loads(pickle.dumps(event)) == built
    assert dataclasses.replace(event, key="x") == dataclasses.replace(built, key="x")
    assert not hasattr(event, "__dict__")
    for field in dataclasses.fields(Event):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, field.name, None)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(event, field.name)
    for one in (event, built):  # not a field: refused too (TypeError on CPython 3.11)
        with pytest.raises((TypeError, AttributeError)):
            one.extra = 1  # type: ignore[attr-defined]
    assert event == built  # nothing changed


# --- exact reasons, limits and routing ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"id":1,"n":18446744073709551616}', "1.8446744073709552e+19 does not fit in a 64-bit"),
        (b'{"id":1,"n":-9223372036854775809}', "-9.2233720368547758e+18 does not fit in a 64-bit"),
        (b'{"id":1,"n":9223372036854775808}', "9223372036854775808 does not fit in a 64-bit"),
        (b'{"id":1,"n":1e3}', "expected an integer, got float 1000.0: write it as 1000"),
    ],
)
def test_unpacker_says_why_a_huge_integer_is_refused(raw: bytes, reason: str) -> None:
    unpack = unpacker(ROWS, CONFIG.validator("rows"))
    with expect(ValidationError, "data.n", reason):
        unpack(set_of(raw))


def nested(depth: int) -> bytes:
    """Data of `depth` levels of objects and arrays, itself included."""
    return b'{"id":1,"j":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_decode_refuses_data_nested_deeper_than_sinks_can_write() -> None:
    # orjson reads 1024 levels but writes 254: deeper data would wedge the COPY of its row.
    unpack = unpacker(ROWS, CONFIG.validator("rows"))
    event, _ = unpack(set_of(nested(MAX_DEPTH)))
    orjson.dumps(event.data)  # what every sink, and the dead-letter stream, does with it
    reason = "nests arrays and objects deeper than 254 levels (data itself is one)"
    for flat in (set_of(nested(MAX_DEPTH + 1)), set_of(nested(1000))):
        with expect(DecodeError, "data", reason):
            decode(pairs(flat))
        with expect(DecodeError, "data", reason):
            unpack(flat)
    with expect(EventError, "data", reason):
        pack(Event("k", Op.SET, orjson.loads(nested(MAX_DEPTH + 1))))
    brackets = b'{"id":1,"s":"' + b"[" * 1000 + b'"}'  # in a string: no nesting
    assert unpack(set_of(brackets))[0].data["s"] == "[" * 1000


def test_unpacker_refuses_an_entry_added_to_another_shard() -> None:
    own = shard_of("task:42", 4)
    other = (own + 1) % 4
    flat = set_of(b'{"id":42}', key=b"task:42")
    assert unpacker(ROWS, CONFIG.validator("rows"), shard=(own, 4))(flat)[0].key == "task:42"
    reason = (
        f"belongs to shard {own} of 4 (crc32 of its UTF-8 bytes mod 4), "
        f"not to shard {other} it was added to: XADD it to shard {own}"
    )
    for one in (flat, [*flat, b"ts", b"1"]):  # the quick path and the full one
        with expect(ValidationError, "key", reason):
            unpacker(ROWS, CONFIG.validator("rows"), shard=(other, 4))(one)


def test_unpacker_refuses_calls_when_no_sink_sends_them() -> None:
    flat = entry_of(b"order:1", b"call", b'{"url":"https://x/h","payload":{"a":1}}')
    assert unpacker(ROWS, CONFIG.validator("rows"))(flat)[1] is None
    with expect(ValidationError, "op", "no sink of this group sends calls: give the group an"):
        unpacker(ROWS, CONFIG.validator("rows"), calls=False)(flat)


def test_unpacker_checks_the_key_string_against_key_format() -> None:
    unpack = unpacker(KEYED, CONFIG.validator("keyed"))
    assert unpack(set_of(b'{"id":42,"s":"x"}', key=b"row:42"))[0].key == "row:42"
    reason = "'row:41' disagrees with the key columns in data: table 'keyed' spells their key"
    for flat in (
        set_of(b'{"id":42,"s":"x"}', key=b"row:41"),
        incr_of(b'{"id":42,"n":1}'),
        entry_of(b"row:41", b"del", b'{"id":42}'),
    ):
        with expect(ValidationError, "key", reason.replace("row:41", flat[1].decode())):
            unpack(flat)


@pytest.mark.parametrize("name", [b"key", b"op", b"data", b"table", b"ts", b"v", b"id"])
def test_unpacker_refuses_a_field_it_reads_given_twice(name: bytes) -> None:
    flat = [*set_of(b'{"id":1}'), b"ts", b"1", b"v", b"1", b"id", b"e1", b"table", b"rows"]
    at = flat.index(name)
    twice = [*flat, name, flat[at + 1]]  # even with the same value: a producer bug
    with expect(DecodeError, name.decode(), "appears more than once in the entry"):
        unpacker(ROWS, CONFIG.validator("rows"))(twice)


def test_unpacker_ignores_repeats_of_fields_it_does_not_read() -> None:
    flat = [*set_of(b'{"id":1}'), b"trace", b"a", b"trace", b"b"]
    assert unpacker(ROWS, CONFIG.validator("rows"))(flat)[0].data == {"id": 1}


def test_a_name_given_twice_inside_data_keeps_its_last_value() -> None:
    # As JSON.parse does (the README says so); the entry's own fields may not repeat.
    quick = set_of(b'{"id":1,"s":"a","s":"b"}')
    for flat in (quick, [*quick, b"v", b"1"]):
        assert unpacker(ROWS, CONFIG.validator("rows"))(flat)[0].data == {"id": 1, "s": "b"}


def test_packer_takes_an_event_with_an_ascii_id_the_quick_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = Event("k", Op.SET, {"id": 7, "s": "x"}, id="order-7:retry")
    expected = pack(event)
    CONFIG.validator("rows")(event)

    def refuse(event: Event, *_: object) -> None:
        raise AssertionError("took the full path")

    monkeypatch.setattr(wire, "pack", refuse)
    assert packer(CONFIG.tables["rows"], refuse)(event) == expected
    with pytest.raises(AssertionError, match="full path"):  # not ASCII: checked the full way
        packer(CONFIG.tables["rows"], refuse)(Event("k", Op.SET, {"id": 7}, id="é"))
