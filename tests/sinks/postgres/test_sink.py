"""The PostgreSQL sink against a real server: merge semantics, escaping, offsets, poison rows."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.errors import Fenced, SinkMisconfigured, SinkUnavailable
from streamsink.schemas.event import Event, Op
from streamsink.schemas.merge import Entry, Row, apply_event, merge
from streamsink.schemas.table import Column, ColumnType, Mode, Policy, Table
from streamsink.sinks.base import Batch, Rejected
from streamsink.sinks.postgres import Pool, PostgresSink
from streamsink.sinks.postgres.statements import target
from tests.schemas.test_merge import BOOL, FLOAT, INT, JSON, TEXT, TS, UUID, Case, windows
from tests.sinks.conftest import create, rows, schema_of

_ids = itertools.count(1)


def entries(table: Table, events: Sequence[Event]) -> list[Entry]:
    """Entries with increasing IDs (one counter for the whole test run)."""
    return [Entry(f"1700000000000-{next(_ids)}", event, table) for event in events]


def batch(
    items: Sequence[Entry], epoch: int = 1, shard: int = 0, stream: str = "s", group: str = "g"
) -> Batch:
    return Batch(
        group=group,
        stream=stream,
        shard=shard,
        epoch=epoch,
        first_id=items[0].id,
        last_id=items[-1].id,
        entries=items,
        merged=merge(items),
    )


def write(sink: PostgresSink, item: Batch) -> Sequence[Rejected]:
    return asyncio.run(sink.write(item))


def normal(table: Table, row: Row) -> dict[str, Any]:
    """A reference row as psycopg2 reads it back (timestamps as instants, UUIDs lower case)."""
    out = {}
    for name, value in row.items():
        if value is not None and table.columns[name].type is TS:
            value = datetime.fromisoformat(value)
        elif value is not None and table.columns[name].type is UUID:
            value = value.lower()  # as PostgreSQL spells it
        out[name] = value
    return out


def reference(table: Table, starts: dict[Any, Row | None], events: Sequence[Event]) -> list[Row]:
    """The rows after applying every event one by one (merge.apply_event)."""
    state = dict(starts)
    for event in events:
        key = table.row_key(event.data)
        state[key] = apply_event(state.get(key), event, table)
    return [normal(table, state[k]) for k in sorted(state, key=repr) if state[k] is not None]


def by_key(table: Table, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def order(value: Any) -> Any:
        return value.timestamp() if isinstance(value, datetime) else value  # an instant

    return sorted(found, key=lambda row: repr(tuple(order(row[k]) for k in table.key)))


def insert(conn: Connection, table: Table, row: Row) -> None:
    names = list(row)
    values = [
        psycopg2.extras.Json(v) if table.columns[n].type is JSON and v is not None else v
        for n, v in row.items()
    ]
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                target(table),
                sql.SQL(", ").join(map(sql.Identifier, names)),
                sql.SQL(", ").join(sql.Placeholder() * len(names)),
            ),
            values,
        )


import psycopg2.extras  # noqa: E402  (Json, above)

# --- the merge, as PostgreSQL applies it ---------------------------------------------------

_streams = itertools.count()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=windows(), cuts=st.lists(st.integers(0, 30), max_size=3))
def test_windows_applied_by_postgres_equal_events_applied_one_by_one(
    pg: Connection, sink: PostgresSink, case: Case, cuts: list[int]
) -> None:
    """For any table, stored rows and window (split anywhere), the database ends as the
    reference: set last-write-wins, incr adds, del and re-create, max/min, update mode."""
    table, starts, window = case
    table = dataclasses.replace(table, schema=schema_of(pg))
    events = [e.event for e in window]
    create(pg, table)
    for row in starts.values():
        if row is not None:
            insert(pg, table, row)
    items = entries(table, events)
    stream = f"s{next(_streams)}"
    bounds = [0, *sorted(c for c in cuts if c < len(items)), len(items)]
    for start, end in itertools.pairwise(bounds):
        if end > start:
            assert write(sink, batch(items[start:end], stream=stream)) == []
    assert by_key(table, rows(pg, table)) == by_key(table, reference(table, starts, events))


# --- values -------------------------------------------------------------------------------

NASTY = [
    "tab\there",
    "new\nline",
    "cr\rlf\r\n",
    "back\\slash \\N",
    "quote ' \" ",
    "é中文🎉",
    "",
    "\\.",
]


def test_every_value_survives_copy_escaping(pg: Connection, sink: PostgresSink) -> None:
    table = Table(
        "vals",
        ("id",),
        {
            "id": Column(INT),
            "t": Column(TEXT),
            "j": Column(JSON),
            "f": Column(FLOAT),
            "b": Column(BOOL),
            "ts": Column(TS),
            "u": Column(UUID),
        },
        schema=schema_of(pg),
    )
    create(pg, table)
    events = [
        Event(
            str(i),
            Op.SET,
            {
                "id": i,
                "t": text,
                "j": {"s": text, "list": [text, None, 1.5, True], text: {"n": None}},
                "f": 1e-300 if i % 2 else -0.1,
                "b": bool(i % 2),
                "ts": "2026-11-23T10:00:00.123456+05:30",
                "u": "0F8FAD5B-D9CB-469F-A165-70867728950E" if i % 2 else None,
            },
        )
        for i, text in enumerate(NASTY)
    ]
    events.append(Event("99", Op.SET, {"id": 99, "t": None, "j": None, "f": None}))
    assert write(sink, batch(entries(table, events))) == []
    found = {row["id"]: row for row in rows(pg, table)}
    for i, text in enumerate(NASTY):
        row = found[i]
        assert row["t"] == text
        assert row["j"] == {"s": text, "list": [text, None, 1.5, True], text: {"n": None}}
        assert row["f"] == (1e-300 if i % 2 else -0.1)
        assert row["b"] is bool(i % 2)
        assert row["ts"] == datetime.fromisoformat("2026-11-23T10:00:00.123456+05:30")
        assert row["u"] == ("0f8fad5b-d9cb-469f-a165-70867728950e" if i % 2 else None)
    assert found[99] == dict.fromkeys(["t", "j", "f", "b", "ts", "u"]) | {"id": 99}


def counters(pg: Connection) -> Table:
    table = Table(
        "counters",
        ("id",),
        {
            "id": Column(INT),
            "n": Column(INT, Policy.SUM),
            "best": Column(INT, Policy.MAX),
            "name": Column(TEXT),
        },
        schema=schema_of(pg),
    )
    create(pg, table)
    return table


def test_partial_updates_never_null_out_untouched_columns(
    pg: Connection, sink: PostgresSink
) -> None:
    table = counters(pg)
    insert(pg, table, {"id": 1, "n": 10, "best": 7, "name": "kept"})
    items = entries(
        table,
        [
            Event("1", Op.INCR, {"id": 1, "n": 5}),
            Event("1", Op.SET, {"id": 1, "best": 3}),
            Event("2", Op.SET, {"id": 2, "name": "new"}),
            Event("3", Op.SET, {"id": 3}),
        ],
    )
    write(sink, batch(items))
    assert rows(pg, table) == [
        {"id": 1, "n": 15, "best": 7, "name": "kept"},
        {"id": 2, "n": None, "best": None, "name": "new"},
        {"id": 3, "n": None, "best": None, "name": None},
    ]
    assert sink.stats.statements >= 3


def test_update_mode_touches_existing_rows_only_and_counts_misses(
    pg: Connection, sink: PostgresSink
) -> None:
    table = dataclasses.replace(counters(pg), mode=Mode.UPDATE)
    insert(pg, table, {"id": 1, "n": 1, "best": 1, "name": "a"})
    items = entries(
        table,
        [Event(str(i), Op.INCR, {"id": i, "n": 2}) for i in (1, 2, 3)]
        + [Event("1", Op.SET, {"id": 1, "name": "b"})],
    )
    write(sink, batch(items))
    assert rows(pg, table) == [{"id": 1, "n": 3, "best": 1, "name": "b"}]
    assert sink.stats.update_misses == 2


def test_appends_are_copied_as_rows_in_order(pg: Connection, sink: PostgresSink) -> None:
    table = Table(
        "log",
        (),
        {"user_id": Column(INT), "action": Column(TEXT), "meta": Column(JSON)},
        schema=schema_of(pg),
    )
    create(pg, table)
    events = [Event("u", Op.APPEND, {"user_id": i % 3, "action": f"a\t{i}"}) for i in range(50)]
    events[7] = Event("u", Op.APPEND, {"user_id": 9, "action": "x", "meta": {"k": [1]}})
    write(sink, batch(entries(table, events)))
    with pg.cursor() as cur:
        cur.execute(sql.SQL("SELECT user_id, action, meta FROM {}").format(target(table)))
        found = sorted(cur.fetchall(), key=repr)
    expected = [(e.data["user_id"], e.data["action"], e.data.get("meta")) for e in events]
    assert found == sorted(expected, key=repr)


# --- exactly once ---------------------------------------------------------------------------


def test_a_window_written_twice_is_applied_once(pg: Connection, sink: PostgresSink) -> None:
    table = counters(pg)
    items = entries(table, [Event("1", Op.INCR, {"id": 1, "n": 1})] * 10)
    write(sink, batch(items))
    write(sink, batch(items))  # e.g. the acknowledgement was lost and the window re-read
    assert rows(pg, table)[0]["n"] == 10
    assert sink.stats.skipped_entries == 10


def test_a_new_owner_skips_what_the_old_one_committed(
    pg: Connection, sink: PostgresSink, sink_settings: Any
) -> None:
    """Crash between commit and XACK: the next owner claims a window that straddles the
    stored offset; only the part after it is applied."""
    table = counters(pg)
    items = entries(table, [Event("1", Op.INCR, {"id": 1, "n": 1}) for _ in range(10)])
    write(sink, batch(items[:6], epoch=1))
    newer = PostgresSink(sink.pool, sink.name, sink_settings)  # another process, same sink
    assert write(newer, batch(items, epoch=2)) == []
    assert rows(pg, table)[0]["n"] == 10
    assert newer.stats.skipped_entries == 6


def test_a_zombie_owner_cannot_commit(
    pg: Connection, sink: PostgresSink, sink_settings: Any
) -> None:
    table = counters(pg)
    items = entries(table, [Event("1", Op.INCR, {"id": 1, "n": 1}) for _ in range(4)])
    write(sink, batch(items[:1], epoch=1))
    newer = PostgresSink(sink.pool, sink.name, sink_settings)
    write(newer, batch(items[1:2], epoch=2))
    with pytest.raises(Fenced):
        write(sink, batch(items[2:3], epoch=1))  # paused past its lease, woke up
    with pytest.raises(Fenced):  # and again, after re-reading the offset
        write(sink, batch(items[2:3], epoch=1))
    write(newer, batch(items[2:], epoch=2))
    assert rows(pg, table)[0]["n"] == 4


def test_an_offset_moved_under_the_same_epoch_is_retried_not_fenced(
    pg: Connection, sink: PostgresSink, sink_settings: Any
) -> None:
    """Two writers of one epoch (a cancelled flush and its successor, say): the one whose
    compare-and-set fails is told to retry (SinkUnavailable), and its retry applies only
    what the other did not."""
    table = counters(pg)
    items = entries(table, [Event("1", Op.INCR, {"id": 1, "n": 1}) for _ in range(4)])
    other = PostgresSink(sink.pool, sink.name, sink_settings)
    write(other, batch(items[:1]))
    write(sink, batch(items[:3]))
    with pytest.raises(SinkUnavailable, match="the offset moved"):
        write(other, batch(items[1:]))
    assert write(other, batch(items[1:])) == []
    assert rows(pg, table)[0]["n"] == 4


class LostReply(psycopg2.OperationalError):
    """What the sink sees when the link dies after COMMIT reached the server."""


class LossyConnection(psycopg2.extensions.connection):
    """Commits, then fails the second commit of its life as a lost reply would."""

    commits = 0

    def commit(self) -> None:
        super().commit()
        LossyConnection.commits += 1
        if LossyConnection.commits == 2:  # the data transaction (the first is the fence)
            raise LostReply("server closed the connection unexpectedly")


class LossyPool:
    """A pool of LossyConnections (the sink takes any object with these two methods)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        conn = psycopg2.connect(self.dsn, connection_factory=LossyConnection)
        try:
            yield conn
        finally:
            conn.close()

    def close(self) -> None:
        pass


def test_a_commit_whose_reply_is_lost_is_not_applied_again(
    pg: Connection, sink_settings: Any
) -> None:
    table = counters(pg)
    items = entries(table, [Event("1", Op.INCR, {"id": 1, "n": 1}) for _ in range(5)])
    lossy = PostgresSink(LossyPool(sink_settings.dsn), "lossy", sink_settings)  # type: ignore[arg-type]
    with pytest.raises(SinkUnavailable) as raised:  # retried by the worker
        write(lossy, batch(items))
    assert isinstance(raised.value.__cause__, LostReply)
    assert write(lossy, batch(items)) == []
    assert rows(pg, table)[0]["n"] == 5
    assert lossy.stats.skipped_entries == 5


# --- refused rows ---------------------------------------------------------------------------


def test_rows_the_database_refuses_are_isolated_and_the_rest_commit(
    pg: Connection, sink: PostgresSink, sink_settings: Any
) -> None:
    table = counters(pg)
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT best_small CHECK (best < 1000)").format(
                target(table)
            )
        )
    events = [Event(str(i), Op.SET, {"id": i, "best": i, "name": "ok"}) for i in range(200)]
    events[17] = Event("17", Op.SET, {"id": 17, "best": 5000})
    events[150] = Event("150", Op.SET, {"id": 150, "best": 7000})
    events.append(Event("150", Op.INCR, {"id": 150, "n": 1}))  # same row: refused with it
    items = entries(table, events)
    rejected = write(sink, batch(items))
    assert {r.entry_id for r in rejected} == {items[17].id, items[150].id, items[200].id}
    assert all("best_small" in r.reason and "23514" in r.reason for r in rejected)
    stored = {row["id"] for row in rows(pg, table)}
    assert stored == set(range(200)) - {17, 150}
    # A new owner re-reading the window refuses the same entries again (so none is lost
    # if the worker died before dead-lettering them) and applies nothing twice.
    newer = PostgresSink(sink.pool, sink.name, sink_settings)
    again = write(newer, batch(items, epoch=2))
    assert {r.entry_id for r in again} == {r.entry_id for r in rejected}
    assert len(rows(pg, table)) == 198


def test_sums_a_column_cannot_hold_are_refused_and_remembered(
    pg: Connection, sink: PostgresSink, sink_settings: Any
) -> None:
    # Two float incr of 1.7e308 in one window: Infinity was stored (issue 11).
    table = Table(
        "sums",
        ("id",),
        {"id": Column(INT), "f": Column(ColumnType.FLOAT, Policy.SUM), "n": Column(INT)},
        schema=schema_of(pg),
    )
    create(pg, table)
    events = [
        Event("1", Op.INCR, {"id": 1, "f": 1.7e308}),
        Event("1", Op.INCR, {"id": 1, "f": 1.7e308, "n": 1}),
        Event("1", Op.INCR, {"id": 1, "n": 2**63 - 1}),
        Event("1", Op.INCR, {"id": 1, "n": 1}),
    ]
    items = entries(table, events)
    rejected = write(sink, batch(items))
    assert [r.entry_id for r in rejected] == [items[1].id, items[3].id]
    assert rejected[0].reason.startswith("merge: data.f: added to the earlier changes of its")
    assert rows(pg, table) == [{"id": 1, "f": 1.7e308, "n": 2**63 - 1}]
    newer = PostgresSink(sink.pool, sink.name, sink_settings)  # after a crash: refused again
    assert write(newer, batch(items, epoch=2)) == rejected
    assert rows(pg, table) == [{"id": 1, "f": 1.7e308, "n": 2**63 - 1}]


def test_a_missing_table_stops_the_group_not_dead_lettered(
    pg: Connection, sink: PostgresSink
) -> None:
    """More in test_errors.py: each error class against the server."""
    table = Table("absent", ("id",), {"id": Column(INT)}, schema=schema_of(pg))
    with pytest.raises(SinkMisconfigured) as raised:
        write(sink, batch(entries(table, [Event("1", Op.SET, {"id": 1})])))
    assert isinstance(raised.value.__cause__, psycopg2.errors.UndefinedTable)


def test_the_pool_reuses_connections_and_drops_broken_ones(sink_settings: Any) -> None:
    pool = Pool(sink_settings)
    with pool.connection() as conn:
        first = conn.get_backend_pid()
    with pool.connection() as conn:
        assert conn.get_backend_pid() == first  # one connection, not one per window
        conn.close()  # as a broken link leaves it
    with pool.connection() as conn:
        assert not conn.closed and conn.get_backend_pid() != first
    pool.close()


# --- the sink's threads ---------------------------------------------------------------------


class SlowDict(dict[str, int]):
    """A dict whose reads yield to other threads: a thread switch between reading a count
    and writing it back, made certain instead of rare."""

    def get(self, key: str, default: Any = None) -> Any:
        found = super().get(key, default)
        time.sleep(0.005)
        return found


def test_stats_count_every_window_written_by_concurrent_threads(
    pg: Connection, sink_settings: Any
) -> None:
    table = counters(pg)
    settings = dataclasses.replace(sink_settings, pool_size=4)
    sink = PostgresSink(Pool(settings), "threads", settings)
    sink.stats.by_table = SlowDict()
    windows = [
        batch(
            entries(
                table,
                [
                    Event(str(k), Op.INCR, {"id": k, "n": 1})
                    for k in range(shard * 5, shard * 5 + 5)
                ],
            ),
            shard=shard,
            stream=f"threads{shard}",
        )
        for shard in range(16)
    ]

    async def all_at_once() -> None:
        await asyncio.gather(*(sink.write(w) for w in windows))

    try:
        asyncio.run(all_at_once())
    finally:
        asyncio.run(sink.close())
    assert sink.stats.windows == 16
    assert sink.stats.rows == 16 * 5
    assert sink.stats.by_table == {table.name: 16 * 5}


class FailingRollback(psycopg2.extensions.connection):
    """A connection whose rollback fails (the link stays open: nothing marks it closed)."""

    def rollback(self) -> None:
        raise psycopg2.OperationalError("rollback failed")


def test_the_pool_closes_a_connection_whose_rollback_failed(sink_settings: Any) -> None:
    pool = Pool(sink_settings)
    failing = psycopg2.connect(sink_settings.dsn, connection_factory=FailingRollback)
    pool._connect = lambda: failing  # type: ignore[method-assign]
    with pool.connection() as conn:
        assert conn is failing
        with conn.cursor() as cur:
            cur.execute("SELECT 1")  # a transaction is open now
    assert failing.closed, "a connection whose rollback failed must be closed"
    del pool._connect
    with pool.connection() as conn:
        assert conn is not failing
    pool.close()


def test_the_pool_closes_a_connection_left_in_a_transaction(sink_settings: Any) -> None:
    """A rollback that "succeeds" but leaves the session in a transaction is no reset."""
    pool = Pool(sink_settings)
    with pool.connection() as conn:
        first = conn
        conn.autocommit = True  # rollback() does nothing now
        with conn.cursor() as cur:
            cur.execute("BEGIN")
    assert first.closed
    with pool.connection() as conn:
        assert conn is not first and conn.info.transaction_status == 0
    pool.close()
