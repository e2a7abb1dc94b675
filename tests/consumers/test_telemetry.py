"""Per-window telemetry: histograms, events in and row writes out per table, hot keys."""

from __future__ import annotations

import time

from streamsink.consumers.telemetry import Histogram, Telemetry
from streamsink.schemas import Column, ColumnType, Event, Policy, Table
from streamsink.schemas.merge import Entry, merge

TASKS = Table(
    "tasks",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "views": Column(ColumnType.INT, Policy.SUM),
    },
)


def test_histogram_is_cumulative_with_weights() -> None:
    h = Histogram((1.0, 2.0))
    h.observe(0.5)
    h.observe(1.5, times=3)
    h.observe(9.0)
    assert list(h.cumulative()) == [("1.0", 1), ("2.0", 4), ("+Inf", 5)]
    assert h.sum == 0.5 + 4.5 + 9.0


def test_a_window_counts_events_rows_hot_keys_and_latency() -> None:
    now_ms = int(time.time() * 1000)
    entries = [
        Entry(
            f"{now_ms - 1000}-{n}", Event.make(str(n % 3), "incr", {"id": n % 3, "views": 1}), TASKS
        )
        for n in range(300)
    ]
    telemetry = Telemetry(hot_capacity=2)
    ids = [entry.id.encode() for entry in entries]
    telemetry.flushed(merge(entries), ids, seconds=0.02)
    counts = telemetry.tables["tasks"]
    assert (counts.events, counts.rows) == (300, 3)
    assert telemetry.batch_events.counts[-1] + sum(telemetry.batch_events.counts[:-1]) == 1
    assert sum(telemetry.latency_seconds.counts) == 300  # every entry, sampled or not
    assert 0.9 < telemetry.latency_seconds.sum / 300 < 5
    hot = telemetry.hot_keys()
    assert [(h["count"], h["error"]) for h in hot] == [(100, 0), (100, 0)]
    assert {h["key"] for h in hot} < {"tasks:0", "tasks:1", "tasks:2"}


def test_hot_keys_of_large_windows_keep_their_bounds() -> None:
    """Windows with more rows than the summary takes: only their busiest become pairs."""
    import random
    from collections import Counter

    rng = random.Random(3)
    telemetry = Telemetry(hot_capacity=4)
    truth: Counter[str] = Counter()
    for _ in range(30):
        keys = [rng.randrange(300) for _ in range(400)] + [7] * 40  # row 7 is hot
        entries = [
            Entry(f"1-{n}", Event.make(str(k), "incr", {"id": k, "views": 1}), TASKS)
            for n, k in enumerate(keys)
        ]
        truth.update(f"tasks:{k}" for k in keys)
        telemetry.flushed(merge(entries), [e.id.encode() for e in entries], 0.01)
    hot = telemetry.hot_keys()
    assert len(hot) <= 4 and hot[0]["key"] == "tasks:7"
    for h in hot:
        assert h["count"] - h["error"] <= truth[h["key"]] <= h["count"]
    assert telemetry.hot.total == sum(truth.values())
