"""Merging a window equals applying its events one by one: properties and seed scenarios."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsink.schemas.event import Event, Op, check_call
from streamsink.schemas.merge import (
    ADD,
    ASSIGN,
    MAX,
    MIN,
    Entry,
    Merged,
    Row,
    RowChange,
    apply_change,
    apply_event,
    merge,
)
from streamsink.schemas.table import Column, ColumnType, Mode, Policy, Table, validate

PROPERTY = settings(max_examples=1000, deadline=None)

INT, FLOAT, TEXT, BOOL, JSON, TS, UUID = (
    ColumnType.INT,
    ColumnType.FLOAT,
    ColumnType.TEXT,
    ColumnType.BOOL,
    ColumnType.JSON,
    ColumnType.TIMESTAMP,
    ColumnType.UUID,
)
LWW, SUM, MAXP, MINP = Policy.LWW, Policy.SUM, Policy.MAX, Policy.MIN

# --- strategies ----------------------------------------------------------------------------

KEY_VALUES = {
    INT: [0, 1, 2],
    TEXT: ["a", "b"],
    TS: ["2024-01-01T08:00:00+00:00", "2024-01-01T10:00:00+02:00", "2024-01-01T09:00:00Z"],
    UUID: [
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        "b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    ],
}
"""Few key values, so that events of a window collide on keys; the first two timestamps
are one instant and the first two UUIDs one UUID, spelled apart (one row in PostgreSQL)."""

INSTANTS = [
    datetime(2024, 1, 1, hour, tzinfo=timezone(timedelta(hours=offset))).isoformat()
    for hour in (8, 9, 10)
    for offset in (0, 1, 2)
]
"""ISO texts whose string order differs from their time order, with ties between offsets."""

EXACT_FLOATS = st.integers(-4000, 4000).map(lambda i: i / 4)
"""Floats whose sums stay exact, so rows compare with ==."""

json_values = st.sampled_from([None, 0, "x", True, [], [1, "a"], {"a": None}, {"a": [2]}])
texts = st.sampled_from(["", "a", "B", "ab", "a b", "é", "😀"])

VALUES: dict[ColumnType, st.SearchStrategy[Any]] = {
    INT: st.integers(-1000, 1000),
    FLOAT: EXACT_FLOATS,
    TEXT: texts,
    BOOL: st.booleans(),
    JSON: json_values,
    TS: st.sampled_from(INSTANTS),
}
VALUE_COLUMNS = [
    (INT, LWW),
    (FLOAT, LWW),
    (TEXT, LWW),
    (BOOL, LWW),
    (JSON, LWW),
    (INT, SUM),
    (INT, MAXP),
    (INT, MINP),
    (TEXT, MAXP),
    (TS, MAXP),
    (TS, MINP),
]


KEY_TYPES = st.lists(st.sampled_from([INT, TEXT, TS, UUID]), min_size=1, max_size=2)
MODES = st.sampled_from([Mode.UPSERT, Mode.UPDATE])
LENGTHS = st.integers(0, 30)


@st.composite
def tables(
    draw: st.DrawFn, value_columns: Sequence[tuple[ColumnType, Policy]] = VALUE_COLUMNS
) -> Table:
    """A table with 1-2 key columns, 0-5 value columns and either mode."""
    key_types = draw(KEY_TYPES)
    values = draw(st.lists(st.sampled_from(value_columns), max_size=5))
    columns = {f"k{i}": Column(t, nullable=False) for i, t in enumerate(key_types)}
    columns |= {f"c{i}": Column(t, p) for i, (t, p) in enumerate(values)}
    return Table("t", tuple(f"k{i}" for i in range(len(key_types))), columns, draw(MODES))


def all_spellings(table: Table) -> list[tuple[Any, ...]]:
    """Every key the strategies can draw for `table`, spelled as events spell it."""
    return list(itertools.product(*(KEY_VALUES[table.columns[k].type] for k in table.key)))


def all_keys(table: Table) -> list[tuple[Any, ...]]:
    """Every row key the strategies can draw for `table` (spellings of one row as one)."""
    found = (table.row_key(dict(zip(table.key, k, strict=True))) for k in all_spellings(table))
    return list(dict.fromkeys(found))


@dataclass
class Draws:
    """The strategies of one table's events, built once per table (building them is slow)."""

    table: Table
    values: dict[ColumnType, st.SearchStrategy[Any]]
    deltas: dict[ColumnType, st.SearchStrategy[Any]]
    ops: st.SearchStrategy[Op] = field(init=False)
    keys: st.SearchStrategy[tuple[Any, ...]] = field(init=False)
    fields: dict[str, st.SearchStrategy[Any]] = field(init=False)
    stored: dict[str, st.SearchStrategy[Any]] = field(init=False)
    increments: list[str] = field(init=False)

    def __post_init__(self) -> None:
        columns = self.table.columns
        self.increments = [
            name
            for name in self.table.value_columns
            if columns[name].type in (INT, FLOAT) and columns[name].policy in (LWW, SUM)
        ]
        ops = [Op.SET, Op.DEL, *([Op.INCR] if self.increments else [])]  # keyed: no append
        self.ops = st.sampled_from(ops)
        self.keys = st.sampled_from(all_spellings(self.table))
        # Sum, max and min columns take values only; lww ones take null too.
        self.fields = {
            name: self.values[columns[name].type] | st.none()
            if columns[name].policy is LWW
            else self.values[columns[name].type]
            for name in self.table.value_columns
        }
        self.stored = {
            name: self.values[columns[name].type] | st.none() for name in self.table.value_columns
        }

    def subset(self, draw: st.DrawFn, names: Sequence[str], at_least_one: bool) -> list[str]:
        """Some of `names`, drawn as one bit mask."""
        if not names:
            return []
        mask = draw(MASKS[len(names)][at_least_one])
        return [name for i, name in enumerate(names) if mask >> i & 1]

    def event(self, draw: st.DrawFn) -> Event:
        """One valid set, incr, del or append of the table."""
        table, op, key = self.table, draw(self.ops), draw(self.keys)
        data: dict[str, Any] = dict(zip(table.key, key, strict=True))
        if op is Op.INCR:
            for name in self.subset(draw, self.increments, at_least_one=True):
                data[name] = draw(self.deltas[table.columns[name].type])
        elif op is not Op.DEL:
            for name in self.subset(draw, table.value_columns, at_least_one=False):
                data[name] = draw(self.fields[name])
        event = Event(str(key), op, data)
        validate(event, table)
        return event

    def row(self, draw: st.DrawFn, key: tuple[Any, ...]) -> Row | None:
        """A stored row for `key` (any column may hold null), or None."""
        if draw(st.booleans()):
            return None
        row: Row = dict(zip(self.table.key, key, strict=True))
        for name in self.table.value_columns:
            row[name] = draw(self.stored[name])
        return row


MASKS = {n: {b: st.integers(int(b), 2**n - 1) for b in (False, True)} for n in range(1, 6)}


def entries_of(table: Table | None, window: Sequence[Event]) -> list[Entry]:
    """Stream entries with increasing IDs."""
    return [Entry(f"1700000000000-{i}", event, table) for i, event in enumerate(window)]


Case = tuple[Table, dict[tuple[Any, ...], Row | None], list[Entry]]


@st.composite
def windows(
    draw: st.DrawFn,
    table_strategy: st.SearchStrategy[Table] | None = None,
    values: dict[ColumnType, st.SearchStrategy[Any]] = VALUES,
    deltas: dict[ColumnType, st.SearchStrategy[Any]] = VALUES,
) -> Case:
    """A table, a window of 0-30 of its events, and the stored row of each key it touches."""
    table = draw(tables() if table_strategy is None else table_strategy)
    draws = Draws(table, values, deltas)
    window = [draws.event(draw) for _ in range(draw(LENGTHS))]
    keys = {table.row_key(event.data) for event in window}
    starts = {key: draws.row(draw, key) for key in all_keys(table) if key in keys}
    return table, starts, entries_of(table, window)


# --- helpers -------------------------------------------------------------------------------


def one_by_one(
    table: Table, starts: dict[tuple[Any, ...], Row | None], entries: Sequence[Entry]
) -> dict[tuple[Any, ...], Row | None]:
    """The reference: every event applied alone, in stream order."""
    state = dict(starts)
    for entry in entries:
        key = table.row_key(entry.event.data)
        state[key] = apply_event(state[key], entry.event, table)
    return state


def merged_applied(
    table: Table, starts: dict[tuple[Any, ...], Row | None], merged: Merged
) -> dict[tuple[Any, ...], Row | None]:
    """The merged window applied to the stored rows."""
    state = dict(starts)
    for key, change in merged.rows.get(table.name, {}).items():
        state[key] = apply_change(starts[key], change, table)
    return state


def close(a: Any, b: Any) -> bool:
    """Equal, or both numbers within float rounding."""
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    return bool(a == b)


def rows_close(a: Row | None, b: Row | None) -> bool:
    """Same row, floats compared with `close`."""
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)


# --- properties ----------------------------------------------------------------------------


@PROPERTY
@given(windows())
def test_merged_window_applies_like_its_events_one_by_one(
    case: Case,
) -> None:
    table, starts, entries = case
    assert merged_applied(table, starts, merge(entries)) == one_by_one(table, starts, entries)


FLOAT_COLUMNS = [(FLOAT, LWW), (FLOAT, SUM), (FLOAT, MAXP), (FLOAT, MINP), (INT, SUM)]
FLOATS = {
    **VALUES,
    FLOAT: st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
}


@PROPERTY
@given(windows(tables(FLOAT_COLUMNS), values=FLOATS, deltas=FLOATS))
def test_merged_floats_apply_like_their_events_within_rounding(
    case: Case,
) -> None:
    table, starts, entries = case
    expected = one_by_one(table, starts, entries)
    actual = merged_applied(table, starts, merge(entries))
    assert all(rows_close(actual[key], expected[key]) for key in expected), (actual, expected)


LOG = Table("log", (), {"n": Column(INT), "note": Column(TEXT)})
"""A table without a key: the one kind appends go to."""


@PROPERTY
@given(windows(), st.lists(st.tuples(st.integers(0, 30), st.integers(0, 9)), max_size=10))
def test_appends_are_never_merged(case: Case, inserts: list[tuple[int, int]]) -> None:
    """Appends to a keyless table, anywhere among a keyed table's events, stay as they are,
    in stream order, and change nothing of the keyed table's rows."""
    table, _, entries = case
    mixed = list(entries)
    for at, n in inserts:
        appended = Event(f"log:{n}", Op.APPEND, {"n": n, "note": "x"})
        validate(appended, LOG)
        mixed.insert(min(at, len(mixed)), Entry("", appended, LOG))
    mixed = [entry._replace(id=f"1700000000000-{i}") for i, entry in enumerate(mixed)]
    merged = merge(mixed)
    assert merged.appends.get("log", []) == [e for e in mixed if e.table is LOG]
    assert set(merged.rows.get(table.name, {})) == {table.row_key(e.event.data) for e in entries}

    def changes(rows: dict[Any, RowChange]) -> dict[Any, tuple[Any, ...]]:
        return {key: (c.deleted, c.fields, c.events) for key, c in rows.items()}

    alone = merge(entries).rows.get(table.name, {})
    assert changes(merged.rows.get(table.name, {})) == changes(alone)


URLS = ["https://a.example/hook", "https://b.example/hook"]


@st.composite
def calls(draw: st.DrawFn, coalescing: bool) -> Event:
    """A valid call event, with a coalescing key when `coalescing` allows one."""
    data: dict[str, Any] = {"url": draw(st.sampled_from(URLS)), "payload": draw(st.integers())}
    if coalescing and draw(st.booleans()):
        data["coalesce"] = draw(st.sampled_from(["task-1", "task-2"]))
    event = Event("k", Op.CALL, data)
    check_call(event)
    return event


def newest_calls(entries: Sequence[Entry]) -> list[Entry]:
    """The reference: a coalescing call survives if no later call has its (url, coalesce)."""
    calls = [entry for entry in entries if entry.event.op is Op.CALL]

    def slot(entry: Entry) -> tuple[Any, Any]:
        return entry.event.data["url"], entry.event.data.get("coalesce")

    return [
        entry
        for i, entry in enumerate(calls)
        if slot(entry)[1] is None or all(slot(later) != slot(entry) for later in calls[i + 1 :])
    ]


@PROPERTY
@given(st.booleans().flatmap(lambda c: st.lists(calls(c), max_size=30)), windows())
def test_calls_survive_in_order_and_coalesce_to_the_newest(window: list[Event], case: Case) -> None:
    _, _, table_entries = case
    interleaved = itertools.zip_longest(entries_of(None, window), table_entries)
    mixed = [
        Entry(f"1-{i}", e.event, e.table) for i, e in enumerate(itertools.chain(*interleaved)) if e
    ]
    merged = merge(mixed)
    assert merged.calls == newest_calls(mixed)
    if not any("coalesce" in event.data for event in window):
        assert merged.calls == [entry for entry in mixed if entry.event.op is Op.CALL]


@PROPERTY
@given(windows())
def test_each_key_merges_independently_of_the_others(
    case: Case,
) -> None:
    table, _, entries = case
    merged = merge(entries)
    for key, change in merged.rows.get(table.name, {}).items():
        alone = [entry for entry in entries if table.row_key(entry.event.data) == key]
        assert merge(alone).rows[table.name][key] == change


@PROPERTY
@given(windows())
def test_changes_count_their_events_and_keep_the_last_id(
    case: Case,
) -> None:
    table, _, entries = case
    merged = merge(entries)
    assert merged.events == len(entries)
    assert (merged.first_id, merged.last_id) == (
        (entries[0].id, entries[-1].id) if entries else (None, None)
    )
    for key, change in merged.rows.get(table.name, {}).items():
        mine = [
            e for e in entries if e.event.op is not Op.APPEND and table.row_key(e.event.data) == key
        ]
        assert change.key == key
        assert (change.events, change.last_id) == (len(mine), mine[-1].id)
        assert change.deleted == any(e.event.op is Op.DEL for e in mine)
    assert merged.tables == ({table.name: table} if entries else {})


# --- the seeds' scenarios ------------------------------------------------------------------

TASKS = Table(
    "tasks",
    ("id",),
    {"id": Column(TEXT), "status": Column(TEXT), "progress": Column(INT)},
)
LIKES = Table("likes", ("post_id", "user_id"), {"post_id": Column(INT), "user_id": Column(INT)})
COUNTERS = Table(
    "counters",
    ("id",),
    {
        "id": Column(INT),
        "likes": Column(INT, SUM),
        "views": Column(INT),
        "best": Column(INT, MAXP),
        "first_seen": Column(TS, MINP),
    },
)


def window_of(table: Table | None, *events: tuple[str, dict[str, Any]]) -> list[Entry]:
    """Entries of (op, data) pairs."""
    return entries_of(table, [Event("k", Op(op), data) for op, data in events])


def only_change(merged: Merged, table: Table) -> RowChange:
    """The single row change of a window that touches one row."""
    (change,) = merged.rows[table.name].values()
    return change


def test_ten_thousand_status_updates_become_one_row_change() -> None:
    entries = window_of(
        TASKS, *(("set", {"id": "t1", "status": f"step-{i}"}) for i in range(10_000))
    )
    merged = merge(entries)
    change = only_change(merged, TASKS)
    assert change == RowChange(
        key=("t1",),
        fields={"id": (ASSIGN, "t1"), "status": (ASSIGN, "step-9999")},
        events=10_000,
        last_id="1700000000000-9999",
    )
    stored = {"id": "t1", "status": "queued", "progress": 40}
    assert apply_change(stored, change, TASKS) == {**stored, "status": "step-9999"}


@pytest.mark.parametrize("toggles", [1000, 1001])
def test_like_unlike_toggles_end_in_the_final_state(toggles: int) -> None:
    like = {"post_id": 7, "user_id": 3}
    entries = window_of(LIKES, *(("set" if i % 2 == 0 else "del", like) for i in range(toggles)))
    change = only_change(merge(entries), LIKES)
    liked = toggles % 2 == 1
    assert change.deleted
    assert change.fields == ({name: (ASSIGN, v) for name, v in like.items()} if liked else {})
    for stored in (None, like):
        assert apply_change(stored, change, LIKES) == (like if liked else None)


def test_counter_increments_add_up_to_one_delta() -> None:
    entries = window_of(COUNTERS, *(("incr", {"id": 1, "likes": 1}) for _ in range(1000)))
    change = only_change(merge(entries), COUNTERS)
    assert change.fields == {"id": (ASSIGN, 1), "likes": (ADD, 1000)}
    assert not change.deleted
    stored = {"id": 1, "likes": 5, "views": None, "best": None, "first_seen": None}
    assert apply_change(stored, change, COUNTERS) == {**stored, "likes": 1005}
    assert apply_change(None, change, COUNTERS) == {**stored, "likes": 1000}


def test_set_then_incr_assigns_the_sum_and_incr_then_set_assigns_the_set() -> None:
    entries = window_of(
        COUNTERS,
        ("set", {"id": 1, "views": 10}),
        ("incr", {"id": 1, "views": 5}),
        ("incr", {"id": 2, "views": 5}),
        ("set", {"id": 2, "views": 1}),
        ("set", {"id": 3, "views": None}),
        ("incr", {"id": 3, "views": 2}),
    )
    rows = merge(entries).rows["counters"]
    assert rows[(1,)].fields["views"] == (ASSIGN, 15)
    assert rows[(2,)].fields["views"] == (ASSIGN, 1)
    assert rows[(3,)].fields["views"] == (ASSIGN, 2)


def test_a_set_of_a_sum_column_adds_and_max_min_keep_the_extremes() -> None:
    entries = window_of(
        COUNTERS,
        ("set", {"id": 1, "likes": 2, "best": 5, "first_seen": "2024-01-01T10:00:00+02:00"}),
        ("incr", {"id": 1, "likes": 3}),
        ("set", {"id": 1, "likes": 4, "best": 9, "first_seen": "2024-01-01T09:00:00+00:00"}),
        ("set", {"id": 1, "best": 7}),
    )
    fields = only_change(merge(entries), COUNTERS).fields
    # 10:00+02:00 is 08:00Z: earlier than 09:00Z although its text sorts after it.
    assert fields["likes"] == (ADD, 9)
    assert fields["best"] == (MAX, 9)
    assert fields["first_seen"] == (MIN, "2024-01-01T10:00:00+02:00")
    stored = {"id": 1, "likes": 1, "views": 4, "best": 12, "first_seen": "2023-12-31T00:00:00Z"}
    assert apply_change(stored, only_change(merge(entries), COUNTERS), COUNTERS) == {
        **stored,
        "likes": 10,
    }


def test_del_then_set_recreates_the_row() -> None:
    entries = window_of(
        TASKS,
        ("set", {"id": "t1", "progress": 50}),
        ("del", {"id": "t1"}),
        ("set", {"id": "t1", "status": "new"}),
    )
    change = only_change(merge(entries), TASKS)
    assert change.deleted
    assert change.fields == {"id": (ASSIGN, "t1"), "status": (ASSIGN, "new")}
    stored = {"id": "t1", "status": "done", "progress": 100}
    assert apply_change(stored, change, TASKS) == {"id": "t1", "status": "new", "progress": None}


def test_a_set_of_only_the_key_creates_the_row() -> None:
    change = only_change(merge(window_of(LIKES, ("set", {"post_id": 1, "user_id": 2}))), LIKES)
    assert apply_change(None, change, LIKES) == {"post_id": 1, "user_id": 2}


def test_update_mode_misses_absent_rows_and_updates_present_ones() -> None:
    table = Table("tasks", TASKS.key, TASKS.columns, Mode.UPDATE)
    entries = window_of(table, ("set", {"id": "t1", "status": "done"}))
    change = only_change(merge(entries), table)
    assert apply_change(None, change, table) is None
    assert apply_event(None, entries[0].event, table) is None
    stored = {"id": "t1", "status": "running", "progress": 3}
    assert apply_change(stored, change, table) == {**stored, "status": "done"}
    deleted = only_change(
        merge([Entry("1-0", Event("k", Op.DEL, {"id": "t1"}), table), *entries]), table
    )
    assert apply_change(stored, deleted, table) is None


def test_events_without_a_table_pass_through_unmerged() -> None:
    entries = window_of(None, ("set", {"id": 1}), ("set", {"id": 1}), ("append", {"line": "x"}))
    merged = merge(entries)
    assert merged.tableless == entries
    assert (merged.rows, merged.appends, merged.calls) == ({}, {}, [])


def test_an_empty_window_merges_to_nothing() -> None:
    assert merge([]) == Merged()


def test_two_different_declarations_of_one_table_in_a_window_are_refused() -> None:
    other = Table("tasks", ("id",), {"id": Column(TEXT)})
    entries = [
        Entry("1-0", Event("k", Op.SET, {"id": "a"}), TASKS),
        Entry("1-1", Event("k", Op.SET, {"id": "a"}), other),
    ]
    with pytest.raises(ValueError, match="declared twice"):
        merge(entries)


def test_apply_event_leaves_its_input_row_alone() -> None:
    stored = {"id": 1, "likes": 1, "views": 4, "best": 12, "first_seen": None}
    copy = dict(stored)
    apply_event(stored, Event("k", Op.INCR, {"id": 1, "likes": 2}), COUNTERS)
    change = only_change(merge(window_of(COUNTERS, ("incr", {"id": 1, "likes": 2}))), COUNTERS)
    apply_change(stored, change, COUNTERS)
    assert stored == copy


# --- sums a column cannot hold: the entry that overflows is refused whole --------------------

BIG = 1.7e308
SUMS = Table(
    "sums",
    key=("id",),
    columns={
        "id": Column(INT, nullable=False),
        "f": Column(FLOAT),
        "g": Column(FLOAT, SUM),
        "n": Column(INT, SUM),
        "m": Column(INT),
        "s": Column(TEXT),
    },
)
I64 = 2**63 - 1


def test_two_float_increments_that_overflow_refuse_the_second() -> None:
    entries = window_of(SUMS, ("incr", {"id": 1, "f": BIG}), ("incr", {"id": 1, "f": BIG}))
    merged = merge(entries)
    assert only_change(merged, SUMS).fields == {"id": (ASSIGN, 1), "f": (ADD, BIG)}
    assert only_change(merged, SUMS).events == 1
    assert only_change(merged, SUMS).last_id == entries[0].id
    assert merged.refused == {
        entries[1].id: "data.f: added to the earlier changes of its row in this window, "
        "the sum overflows a float (double precision) to inf"
    }


def test_an_overflowing_entry_is_refused_whole_and_later_ones_fold_on() -> None:
    entries = window_of(
        SUMS,
        ("set", {"id": 1, "g": -BIG, "m": 5}),
        ("incr", {"id": 1, "m": 1, "n": 1, "g": -BIG}),  # g: -inf, so m and n stay unchanged
        ("incr", {"id": 1, "n": I64}),
        ("incr", {"id": 1, "n": 1}),  # I64 + 1 does not fit...
        ("incr", {"id": 1, "g": BIG, "n": -1}),
        ("incr", {"id": 1, "n": 1}),  # ... I64 - 1 + 1 does
        ("set", {"id": 2, "g": BIG}),
        ("set", {"id": 2, "g": 1.0}),
    )
    merged = merge(entries)
    rows = merged.rows["sums"]
    assert rows[(1,)].fields == {
        "id": (ASSIGN, 1),
        "g": (ADD, 0.0),
        "m": (ASSIGN, 5),
        "n": (ADD, I64),
    }
    assert rows[(1,)].events == 4 and rows[(1,)].last_id == entries[5].id
    assert rows[(2,)].fields == {"id": (ASSIGN, 2), "g": (ADD, BIG + 1.0)}
    assert list(merged.refused) == [entries[1].id, entries[3].id]
    assert merged.refused[entries[3].id] == (
        "data.n: added to the earlier changes of its row in this window, "
        f"the sum {I64 + 1} does not fit in a 64-bit integer"
    )


def test_a_delete_starts_the_sums_again() -> None:
    entries = window_of(
        SUMS,
        ("incr", {"id": 1, "f": BIG}),
        ("del", {"id": 1}),
        ("incr", {"id": 1, "f": BIG}),
        ("set", {"id": 1, "s": "x"}),
    )
    merged = merge(entries)
    assert merged.refused == {}
    assert only_change(merged, SUMS).fields == {
        "id": (ASSIGN, 1),
        "f": (ADD, BIG),
        "s": (ASSIGN, "x"),
    }


EXTREMES = st.sampled_from([BIG, -BIG, 1e308, 1.0, -2.5, 0.0])
INT_EXTREMES = st.sampled_from([I64, -I64 - 1, I64 // 2 + 1, 1, -1, 0])
SUM_EVENTS = st.one_of(
    st.builds(
        lambda op, data: (op, {"id": 1, **data}),
        st.sampled_from(["set", "incr"]),
        st.fixed_dictionaries({}, optional={"f": EXTREMES, "g": EXTREMES, "n": INT_EXTREMES}),
    ),
    st.just(("del", {"id": 1})),
    st.builds(lambda m: ("set", {"id": 1, "m": m}), INT_EXTREMES),
)


def fits(row: Row | None) -> bool:
    """Whether every value of `row` is one PostgreSQL stores: finite, ints of 64 bits."""
    return row is None or all(
        (math.isfinite(v) if isinstance(v, float) else -I64 - 1 <= v <= I64)
        for v in row.values()
        if isinstance(v, int | float) and not isinstance(v, bool)
    )


@PROPERTY
@given(st.lists(SUM_EVENTS, max_size=12))
def test_refusals_match_applying_events_one_by_one_from_no_row(
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    # From no row, a merged sum is the running value: each event that would leave a value
    # PostgreSQL cannot store is refused, the others apply, as they would one by one.
    entries = window_of(SUMS, *events)
    row: Row | None = None
    refused = []
    for entry in entries:
        after = apply_event(row, entry.event, SUMS)
        if fits(after):
            row = after
        else:
            refused.append(entry.id)
    merged = merge(entries)
    assert list(merged.refused) == refused
    changes = merged.rows.get("sums", {})
    assert (apply_change(None, changes[(1,)], SUMS) if changes else None) == row
