"""Merging numeric columns: sums, maxima and minima of Decimals are exact; a sum past the
column's precision is refused whole, as PostgreSQL would refuse it."""

from __future__ import annotations

import random
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from streamsink.schemas.event import Event, Op
from streamsink.schemas.merge import (
    ADD,
    ASSIGN,
    MAX,
    MIN,
    Entry,
    apply_change,
    apply_event,
    merge,
)
from streamsink.schemas.table import Column, ColumnType, Policy, Table, validate

ORDERS = Table(
    "orders",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "total": Column(ColumnType.NUMERIC, Policy.SUM, precision=12, scale=2),
        "paid": Column(ColumnType.NUMERIC, precision=12, scale=2),
        "top": Column(ColumnType.NUMERIC, Policy.MAX, precision=12, scale=2),
        "least": Column(ColumnType.NUMERIC, Policy.MIN, precision=12, scale=2),
    },
)
LIMIT = 10**12  # cents: numeric(12,2) holds |value| < 10**10
COUNT = 100_000


def cents(n: int) -> Decimal:
    """`n` cents as the Decimal a worker holds (two places)."""
    return Decimal(n).scaleb(-2)


def entries(events: list[Event]) -> list[Entry]:
    return [Entry(f"1-{n}", event, ORDERS) for n, event in enumerate(events)]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), keys=st.integers(1, 50), set_share=st.floats(0, 1))
def test_a_hundred_thousand_random_cents_sum_exactly(
    seed: int, keys: int, set_share: float
) -> None:
    pick = random.Random(seed)
    bound = LIMIT // (2 * COUNT)  # no partial sum can leave the column's range
    events, expected = [], {key: Decimal("0.00") for key in range(keys)}
    for _ in range(COUNT):
        key, amount = pick.randrange(keys), cents(pick.randint(-bound, bound))
        op = "set" if pick.random() < set_share else "incr"  # a set of a sum column adds too
        events.append(Event(str(key), Op(op), {"id": key, "total": amount}))
        expected[key] += amount
    merged = merge(entries(events))
    assert merged.refused == {}
    rows = merged.rows["orders"]
    totals = {key: change.fields["total"] for (key,), change in rows.items()}
    assert totals == {key: (ADD, total) for key, total in expected.items() if (key,) in rows}
    assert all(type(value) is Decimal for _, value in totals.values())


amounts = st.integers(-(LIMIT - 1), LIMIT - 1).map(cents)
ops = st.one_of(
    st.tuples(st.just("incr"), st.fixed_dictionaries({"total": amounts})),
    st.tuples(
        st.just("set"),
        st.fixed_dictionaries(
            {},
            optional={"total": amounts, "paid": amounts, "top": amounts, "least": amounts},
        ),
    ),
    st.tuples(st.just("del"), st.just({})),
)


@settings(max_examples=500, deadline=None)
@given(window=st.lists(ops, max_size=40))
def test_a_merged_window_applies_exactly_like_its_events_one_by_one(
    window: list[tuple[str, dict[str, Decimal]]],
) -> None:
    events = [Event("1", Op(op), {"id": 1, **data}) for op, data in window]
    for event in events:
        validate(event, ORDERS)
    merged = merge(entries(events))
    row, by_one = None, None
    kept = [e for e in entries(events) if e.id not in merged.refused]
    for entry in kept:
        by_one = apply_event(by_one, entry.event, ORDERS)
    change = merged.rows.get("orders", {}).get((1,))
    if change is not None:
        row = apply_change(row, change, ORDERS)
    assert row == by_one
    for entry_id, reason in merged.refused.items():
        assert "does not fit numeric(12,2)" in reason, (entry_id, reason)
    if row is not None and row["total"] is not None:
        assert -LIMIT < row["total"] * 100 < LIMIT


def test_a_sum_past_the_precision_refuses_that_entry_and_the_rest_folds_on() -> None:
    events = [
        Event("1", Op.SET, {"id": 1, "total": Decimal("9999999999.98")}),
        Event("1", Op.INCR, {"id": 1, "total": Decimal("0.01")}),
        Event("1", Op.INCR, {"id": 1, "total": Decimal("0.01")}),  # 10**10: too many digits
        Event("1", Op.INCR, {"id": 1, "total": Decimal("-5.00")}),
        Event("1", Op.INCR, {"id": 1, "total": Decimal("0.01")}),  # fits again
        Event("2", Op.INCR, {"id": 2, "total": Decimal("-9999999999.99")}),
        Event("2", Op.INCR, {"id": 2, "total": Decimal("-0.01")}),  # below the range
    ]
    found = entries(events)
    merged = merge(found)
    rows = merged.rows["orders"]
    assert rows[(1,)].fields["total"] == (ADD, Decimal("9999999995.00"))
    assert rows[(2,)].fields["total"] == (ADD, Decimal("-9999999999.99"))
    assert rows[(1,)].events == 4 and rows[(2,)].events == 1
    assert list(merged.refused) == [found[2].id, found[6].id]
    assert merged.refused[found[2].id] == (
        "data.total: added to the earlier changes of its row in this window, the sum "
        "10000000000.00 does not fit numeric(12,2) (at most 10 digits before the point)"
    )
    assert "-10000000000.00 does not fit numeric(12,2)" in merged.refused[found[6].id]


def test_max_min_and_lww_keep_exact_values() -> None:
    events = [
        Event("1", Op.SET, {"id": 1, "top": Decimal("0.10"), "least": Decimal("0.10")}),
        Event("1", Op.SET, {"id": 1, "top": Decimal("0.30"), "least": Decimal("-0.30")}),
        Event("1", Op.SET, {"id": 1, "top": Decimal("0.20"), "least": Decimal("0.00")}),
        Event("1", Op.SET, {"id": 1, "paid": Decimal("12.30")}),
        Event("1", Op.INCR, {"id": 1, "paid": Decimal("0.01")}),
    ]
    change = merge(entries(events)).rows["orders"][(1,)]
    assert change.fields == {
        "id": (ASSIGN, 1),
        "top": (MAX, Decimal("0.30")),
        "least": (MIN, Decimal("-0.30")),
        "paid": (ASSIGN, Decimal("12.31")),  # a set of an lww column, then an incr on top
    }
