"""The publish script's quick layouts: plain read-model sets (by shape: the HSET of the
fields a shape's pattern reads from the data) change every hash exactly as the general
layout does (whose rules the PostgreSQL property test in
tests/sinks/postgres/test_read_model.py checks); events with only an id ('!') and
read-model events with ids ('#') publish each id once, repeated in one call or not."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsink.errors import ValidationError
from streamsink.schemas import Column, ColumnType, Config, Event, StreamSpec, Table
from streamsink.schemas.readmodel import ReadModel, from_hash
from streamsink.streams import Keys, Producer, create_stream, publish
from tests.streams.conftest import lengths

SHARDS = 2
TYPES = [ColumnType.INT, ColumnType.TEXT, ColumnType.FLOAT, ColumnType.TIMESTAMP, ColumnType.UUID]
COLUMNS = {f"c{n}": Column(TYPES[n % len(TYPES)]) for n in range(9)}  # more than 8 fields too
WIDE = Table("wide", ("id",), {"id": Column(ColumnType.INT, nullable=False),
                               "status": Column(ColumnType.TEXT), **COLUMNS})  # fmt: skip
MODEL = ReadModel(ttl_by="status", ttl={"processing": 300, "success": 86400}, default=3600)
STREAMS = itertools.count()

VALUES: dict[ColumnType, st.SearchStrategy[Any]] = {
    ColumnType.INT: st.integers(-(2**63), 2**63 - 1),
    ColumnType.TEXT: st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
    ),
    ColumnType.FLOAT: st.floats(allow_nan=False, allow_infinity=False),
    ColumnType.TIMESTAMP: st.sampled_from(
        ["2026-12-03T10:00:00+00:00", "2026-12-03T12:00:00+01:00"]
    ),
    ColumnType.UUID: st.uuids().map(str),
}
FIELDS = {name: VALUES[column.type] for name, column in COLUMNS.items()}
FIELDS["status"] = st.sampled_from(["processing", "success", "queued"])
FIELDS["c0"] = st.integers(-(10**6), 10**6)  # incremented: far from an int64's ends (c5 is not)


@st.composite
def events(draw: st.DrawFn) -> Event:
    """A set of some fields in any order (now and then a null), an incr or a del."""
    row = draw(st.integers(1, 3))
    op = draw(st.sampled_from(["set", "set", "set", "incr", "del"]))
    data: dict[str, Any] = {"id": row}
    if op == "set":
        for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True)):
            data[name] = None if draw(st.integers(0, 9)) == 0 else draw(FIELDS[name])
    elif op == "incr":
        data["c0"] = draw(st.integers(-1000, 1000))
    if draw(st.booleans()):  # the key column last: the shape's pattern skips it there
        data = dict(reversed(data.items()))
    ident = draw(st.none() | st.sampled_from(["a", "b"]))  # ids: the general '#' layout
    return Event.make(str(row), op, data, **({"id": ident} if ident else {}))


def config(keys: Keys, *streams: str) -> Config:
    return Config(
        prefix=keys.prefix,
        streams={stream: StreamSpec(stream, SHARDS, table="wide") for stream in streams},
        tables={"wide": WIDE},
        read_models={"wide": MODEL},
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(st.lists(events(), min_size=1, max_size=6), min_size=1, max_size=5))
def test_plain_sets_change_the_hash_as_the_general_layout_does(
    r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch, batches: list[list[Event]]
) -> None:
    n = next(STREAMS)
    mine, theirs = f"q{n}", f"g{n}"  # the same events, the quick way and the general way
    quick, general = (Producer(r, config(keys, mine, theirs)) for _ in range(2))
    for stream in (mine, theirs):
        create_stream(r, keys, stream, SHARDS)
    for batch in batches:
        quick.publish_many(mine, batch)
        with monkeypatch.context() as patch:
            patch.setattr(publish, "MAX_SHAPES", 0)  # no shape: every event the general way
            general.publish_many(theirs, batch)
    for row in ("1", "2", "3"):
        shard = publish.crc32(row.encode()) % SHARDS
        got, expected = (keys.row(stream, shard, "wide", row) for stream in (mine, theirs))
        quick_hash, general_hash = r.hgetall(got), r.hgetall(expected)
        assert quick_hash.keys() == general_hash.keys(), row
        # the same values; a float may be written two ways (0.00006103515625, 6.103515625e-05)
        assert from_hash(WIDE, quick_hash) == from_hash(WIDE, general_hash), row
        assert abs(r.pttl(got) - r.pttl(expected)) < 10_000, row


def test_a_plain_set_goes_in_the_quick_layout(r: redis.Redis, keys: Keys) -> None:
    create_stream(r, keys, "s", SHARDS)
    producer = Producer(r, config(keys, "s"))
    producer.publish_many("s", [Event.make("1", "set", {"id": 1, "status": "success"})] * 2)
    queued = Event.make("1", "set", {"status": "queued", "id": 1})
    assert layout_of(producer, "s", queued).startswith(publish.MODEL_PLAIN)
    assert r.hgetall(keys.row("s", publish.crc32(b"1") % SHARDS, "wide", "1")) == {
        b"id": b"1", b"status": b"success"}  # fmt: skip


def test_a_plain_set_whose_routing_key_is_not_its_rows_is_refused(
    r: redis.Redis, keys: Keys
) -> None:
    create_stream(r, keys, "s", SHARDS)
    producer = Producer(r, config(keys, "s"))
    good = Event.make("7", "set", {"id": 7, "status": "success"})
    for bad in ("07", "7 ", "task-7"):
        event = Event.make(bad, "set", {"id": 7, "status": "success"})
        with pytest.raises(ValidationError, match="routing key"):
            producer.publish_many("s", [good, event])  # all or nothing
    assert sum(lengths(r, keys, "s", SHARDS)) == 0
    assert layout_of(producer, "s", good).startswith(publish.MODEL_PLAIN)


def test_many_status_values_keep_their_ttls_and_a_bounded_cache(
    r: redis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A status column of free text: each value the producer met is remembered with its
    # shape's mark, up to MAX_MARKS; past them the TTL is worked out every time.
    monkeypatch.setattr(publish, "MAX_MARKS", 5)
    create_stream(r, keys, "s", SHARDS)
    producer = Producer(r, config(keys, "s"))
    statuses = [f"step {n}" for n in range(20)] + ["processing", "success"] * 3
    for n, status in enumerate(statuses):
        producer.publish("s", Event.make(str(n), "set", {"id": n, "status": status}))
    assert len(producer._prep.marks["wide"]) == 5
    for n, status in enumerate(statuses):
        row = keys.row("s", publish.crc32(str(n).encode()) % SHARDS, "wide", str(n))
        assert r.hget(row, "status") == status.encode()
        ttl = {"processing": 300_000, "success": 86_400_000}.get(status, 3_600_000)
        assert ttl - 10_000 < r.pttl(row) <= ttl, status


def layout_of(producer: Producer, stream: str, event: Event) -> bytes:
    """The mark (or op) the producer gives `event` in its script call."""
    prep = producer._prep
    command = prep.commands([(stream, prep.encode(stream, [event]), None)])[0]
    return command.args[publish.FIRST_EVENT + 1]  # type: ignore[return-value]


def test_sets_the_script_cannot_read_by_shape_go_the_general_way(
    r: redis.Redis, keys: Keys
) -> None:
    many = Table("many", ("id",), {"id": Column(ColumnType.INT, nullable=False)} | {
        f"f{n}": Column(ColumnType.TEXT) for n in range(40)})  # fmt: skip
    setup = Config(
        prefix=keys.prefix,
        streams={"s": StreamSpec("s", SHARDS, table="many")},
        tables={"many": many},
        read_models={"many": ReadModel()},
    )
    create_stream(r, keys, "s", SHARDS)
    producer = Producer(r, setup)
    cases = {  # data -> the layout it takes
        "31 fields and the key": ({"id": 1} | {f"f{n}": "x" for n in range(31)}, b"="),
        "32 fields and the key": ({"id": 1} | {f"f{n}": "x" for n in range(32)}, b"*"),
        "an escape in the JSON": ({"id": 1, "f0": 'say "hi"'}, b"*"),
        "a null": ({"id": 1, "f0": None, "f1": "y"}, b"*"),
        "only the key": ({"id": 1}, b"*"),
    }
    for name, (data, mark) in cases.items():
        event = Event.make("1", "set", data)
        producer.publish("s", event)
        assert layout_of(producer, "s", event)[:1] == mark, name
        row = r.hgetall(keys.row("s", publish.crc32(b"1") % SHARDS, "many", "1"))
        assert from_hash(many, row) == dict.fromkeys(many.columns) | {
            k: v for k, v in data.items() if v is not None} | (
            {} if name != "a null" else {"f0": None}), name  # fmt: skip
        r.delete(keys.row("s", publish.crc32(b"1") % SHARDS, "many", "1"))


@pytest.mark.parametrize("read_model", [False, True])  # the '!' layout, and '#'
def test_each_id_is_published_once(r: redis.Redis, keys: Keys, read_model: bool) -> None:
    create_stream(r, keys, "s", SHARDS)
    setup = config(keys, "s")
    producer = Producer(r, setup if read_model else dataclasses.replace(setup, read_models={}))

    def event(n: int) -> Event:
        return Event.make("1", "set", {"id": 1, "c0": n}, id=f"e{n}")

    first = producer.publish_many("s", [event(n) for n in range(0, 2500, 2)])
    again = [event(n) for n in range(2500)]
    again += again[:3]  # repeated in the same call too
    ids = producer.publish_many("s", again)
    assert ids[0:2500:2] == first and ids[2500:] == ids[:3]
    assert len(set(ids)) == 2500 and sum(lengths(r, keys, "s", SHARDS)) == 2500
    if read_model:  # the last fresh publish set c0
        row = keys.row("s", publish.crc32(b"1") % SHARDS, "wide", "1")
        assert r.hget(row, "c0") == b"2499"
