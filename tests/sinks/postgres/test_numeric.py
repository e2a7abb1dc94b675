"""Numeric columns in PostgreSQL: the DDL `tables create` writes and `tables check` reads,
exact COPY, and a few thousand money events through a real worker summing to the cent."""

from __future__ import annotations

import dataclasses
import random
import time
from decimal import Decimal
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.schemas import (
    Column,
    ColumnType,
    Config,
    Event,
    GroupSpec,
    Op,
    Policy,
    SinkSpec,
    StreamSpec,
    Table,
    shard_of,
)
from streamsink.schemas.readmodel import ReadModel
from streamsink.sinks.postgres import PostgresSink
from streamsink.sinks.postgres.schema import check_tables, table_ddl
from streamsink.streams import Keys, Producer, Rows, create_stream
from tests.consumers.test_worker import FAST
from tests.sinks.conftest import create, rows, schema_of
from tests.sinks.postgres.test_read_model import WorkerThread
from tests.sinks.postgres.test_sink import batch, entries, write

SHARDS = 3
ORDERS = Table(
    "orders",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "total": Column(ColumnType.NUMERIC, Policy.SUM, precision=12, scale=2),
        "top": Column(ColumnType.NUMERIC, Policy.MAX, precision=12, scale=2),
        "price": Column(ColumnType.NUMERIC, precision=20, scale=8),
    },
)


def orders_in(pg: Connection) -> Table:
    return dataclasses.replace(ORDERS, schema=schema_of(pg))


def column_types(pg: Connection, table: str) -> dict[str, tuple[str, Any, Any]]:
    with pg.cursor() as cur:
        cur.execute(
            "SELECT column_name, data_type, numeric_precision, numeric_scale"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            (schema_of(pg), table),
        )
        return {name: (kind, p, s) for name, kind, p, s in cur.fetchall()}


def test_tables_create_makes_numeric_columns_of_the_declared_digits(pg: Connection) -> None:
    table = orders_in(pg)
    assert '"total" numeric(12,2)' in table_ddl(table).as_string(pg)
    create(pg, table)
    assert column_types(pg, "orders") == {
        "id": ("bigint", 64, 0),
        "total": ("numeric", 12, 2),
        "top": ("numeric", 12, 2),
        "price": ("numeric", 20, 8),
    }
    assert check_tables(pg, Config(tables={"orders": table})) == []


def test_tables_check_refuses_a_numeric_column_that_cannot_hold_every_value(
    pg: Connection,
) -> None:
    table = orders_in(pg)
    create(pg, table)
    where = f"{schema_of(pg)}.orders"
    with pg.cursor() as cur:
        for column, kind in [
            ("total", "numeric(10,2)"),
            ("top", "numeric"),
            ("price", "numeric(24,10)"),
        ]:
            cur.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(
                    sql.Identifier(schema_of(pg), "orders"), sql.Identifier(column), sql.SQL(kind)
                )
            )
    assert check_tables(pg, Config(tables={"orders": table})) == [
        f"{where}.total: type is numeric(10,2); expected numeric(12,2) or wider (it must hold"
        " every value the workers accept)"
    ]  # numeric without digits and a wider numeric(24,10) hold all numeric(20,8) holds
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN total TYPE double precision").format(
                sql.Identifier(schema_of(pg), "orders")
            )
        )
    assert check_tables(pg, Config(tables={"orders": table})) == [
        f"{where}.total: type is double precision; expected numeric(12,2)"
    ]


def test_the_sink_copies_exact_decimals_and_refuses_a_sum_past_the_precision(
    pg: Connection, sink: PostgresSink
) -> None:
    table = orders_in(pg)
    create(pg, table)
    big = Decimal("9999999999.99")
    first = [
        Event("1", Op.SET, {"id": 1, "total": big, "top": Decimal("0.10")}),
        Event("2", Op.SET, {"id": 2, "price": Decimal("123456789012.12345678")}),
        Event("3", Op.INCR, {"id": 3, "total": Decimal("-0.01")}),
    ]
    assert write(sink, batch(entries(table, first))) == []
    second = entries(
        table,
        [
            Event("1", Op.INCR, {"id": 1, "total": Decimal("0.01")}),
            Event("3", Op.SET, {"id": 3, "top": Decimal("-5.50")}),
        ],
    )
    rejected = write(sink, batch(second))
    assert [r.entry_id for r in rejected] == [second[0].id]  # stored + 0.01 overflows
    assert "numeric field overflow" in rejected[0].reason
    assert rows(pg, table) == [
        {"id": 1, "total": big, "top": Decimal("0.10"), "price": None},
        {"id": 2, "total": None, "top": None, "price": Decimal("123456789012.12345678")},
        {"id": 3, "total": Decimal("-0.01"), "top": Decimal("-5.50"), "price": None},
    ]


def test_thousands_of_money_events_through_a_worker_sum_to_the_cent(
    r: redis.Redis, keys: Keys, pg: Connection, sink: PostgresSink, redis_url: str
) -> None:
    table = orders_in(pg)
    create(pg, table)
    config = Config(
        prefix=keys.prefix,
        streams={"orders": StreamSpec("orders", SHARDS, table="orders")},
        tables={"orders": table},
        groups={"g": GroupSpec("g", "orders", ("pg",), FAST)},
        sinks={"pg": SinkSpec("pg", "postgres")},
        read_models={"orders": ReadModel()},
    )
    create_stream(r, keys, "orders", SHARDS)
    pick = random.Random(15)
    totals: dict[int, Decimal] = {}
    tops: dict[int, Decimal] = {}
    published: list[Event] = []  # by the producer: Decimals, sent as text
    for _ in range(2000):
        key, amount = pick.randrange(1, 21), Decimal(pick.randint(-99_999, 99_999)).scaleb(-2)
        op = pick.choice(["incr", "set"])
        data = (
            {"id": key, "total": amount}
            if op == "incr"
            else {"id": key, "total": amount, "top": amount}
        )
        published.append(Event.make(str(key), op, data))
        totals[key] = totals.get(key, Decimal(0)) + amount
        if op == "set":
            tops[key] = max(tops.get(key, amount), amount)
    raw: list[tuple[int, bytes]] = []  # by XADD, as JSON numbers: a float would round them
    for _ in range(1500):
        key, amount = pick.randrange(21, 41), Decimal(pick.randint(-99_999, 99_999)).scaleb(-2)
        literal = pick.choice([str(amount), f"{int(amount * 100)}e-2", f'"{amount}"'])
        raw.append((key, b'{"id":%d,"total":%s}' % (key, literal.encode())))
        totals[key] = totals.get(key, Decimal(0)) + amount
    poison = [  # refused at decode: each dead-lettered with its reason, the rest applied
        (41, b'{"id":41,"total":0.005}', "more than 2 digits after the point"),
        (41, b'{"id":41,"total":"NaN"}', "NaN and infinities are not"),
        (41, b'{"id":41,"total":1e10}', "does not fit numeric(12,2)"),
        (41, b'{"id":41,"total":0.1000000000000000055511151231257827}', "more than 2 digits"),
    ]
    producer = Producer(r, config)
    with WorkerThread(redis_url, config, sink):
        for start in range(0, len(published), 500):
            producer.publish_many("orders", published[start : start + 500])
        for key, data in [*raw, *((k, d) for k, d, _ in poison)]:
            shard = shard_of(str(key), SHARDS)
            r.xadd(keys.shard("orders", shard), {"key": str(key), "op": "incr", "data": data})
        wait_drained(r, keys)
    stored = {row["id"]: row for row in rows(pg, table)}
    assert {key: row["total"] for key, row in stored.items()} == totals
    assert all(str(row["total"]) == format(row["total"], "f") for row in stored.values())
    assert {key: row["top"] for key, row in stored.items() if row["top"] is not None} == tops
    assert sum(totals.values()) == sum(row["total"] for row in stored.values())
    model = Rows(r, config).read_many("orders", list(range(1, 21)))
    assert [None if m is None else (m["total"], m["top"]) for m in model] == [
        (totals[k], tops.get(k)) if k in totals else None for k in range(1, 21)
    ]
    for k in range(1, 21):  # as exact text at the column's scale, as PostgreSQL spells it
        held = r.hget(keys.row("orders", shard_of(str(k), SHARDS), "orders", str(k)), "total")
        assert held == format(totals[k], "f").encode()
    reasons = [
        fields[b"reason"].decode()
        for fields in (f for _, f in r.xrange(keys.dead("orders", shard_of("41", SHARDS), "g")))
    ]
    assert len(reasons) == len(poison)
    for reason, (_, _, expected) in zip(reasons, poison, strict=True):
        assert expected in reason


def wait_drained(r: redis.Redis, keys: Keys, within: float = 60) -> None:
    """Until group g has acknowledged (so committed or dead-lettered) every entry."""
    deadline = time.monotonic() + within
    while not all(
        groups and not any(g["lag"] or g["pending"] for g in groups)
        for groups in (r.xinfo_groups(keys.shard("orders", s)) for s in range(SHARDS))
    ):
        assert time.monotonic() < deadline, "the worker did not drain the stream"
        time.sleep(0.02)


LEDGER = Table(
    "ledger",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "amount": Column(ColumnType.NUMERIC, Policy.SUM, precision=28, scale=8),
        "whole": Column(ColumnType.NUMERIC, Policy.SUM, precision=5, scale=0),
    },
)
_ledger_keys = iter(range(1, 10**9))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(-(10**27), 10**27).map(lambda n: Decimal(n).scaleb(-8)),
            st.integers(-999, 999).map(Decimal),
            st.sampled_from(["incr", "set"]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_the_read_model_sums_numeric_text_exactly_digit_by_digit(
    r: redis.Redis, keys: Keys, steps: list[tuple[Decimal, Decimal, str]]
) -> None:
    config = Config(
        prefix=keys.prefix,
        streams={"ledger": StreamSpec("ledger", 1, table="ledger")},
        tables={"ledger": LEDGER},
        read_models={"ledger": ReadModel()},
    )
    key = next(_ledger_keys)
    create_stream(r, keys, "ledger", 1)  # idempotent: once per test, whatever the example
    producer = Producer(r, config)
    events = [
        Event.make(str(key), op, {"id": key, "amount": amount, "whole": whole})
        for amount, whole, op in steps
    ]
    producer.publish_many("ledger", events)
    fields = r.hgetall(keys.row("ledger", 0, "ledger", str(key)))
    amount = sum((a for a, _, _ in steps), Decimal(0))
    whole = sum((w for _, w, _ in steps), Decimal(0))
    assert fields[b"amount"].decode() == format(amount.quantize(Decimal("1e-8")), "f")
    assert fields[b"whole"].decode() == format(whole, "f")
    row = Rows(r, config).read("ledger", key)
    assert row is not None and row["amount"] == amount and row["whole"] == whole


def test_appends_copy_numeric_values_exactly(pg: Connection, sink: PostgresSink) -> None:
    log = Table(
        "payments",
        key=(),
        columns={
            "order_id": Column(ColumnType.INT),
            "amount": Column(ColumnType.NUMERIC, precision=28, scale=10),
        },
        schema=schema_of(pg),
    )
    create(pg, log)
    amounts = [Decimal("123456789012345678.0123456789"), Decimal("-0.0000000001"), None]
    events = [Event("p", Op.APPEND, {"order_id": n, "amount": a}) for n, a in enumerate(amounts)]
    assert write(sink, batch(entries(log, events))) == []
    assert [row["amount"] for row in rows(pg, log)] == amounts
