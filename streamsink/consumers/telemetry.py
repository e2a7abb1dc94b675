"""What one shard's flushes measured, for metrics and the status page: noted once per window.

A ShardRunner calls `Telemetry.flushed` after each committed window when the worker runs
with telemetry on (its HTTP endpoint); nothing is counted per event. The endpoint reads
these objects when scraped (streamsink.ops.metrics); nothing here knows of Prometheus.
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from streamsink.schemas.hotkeys import HotKeys
from streamsink.schemas.merge import Merged

FLUSH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 20_000, 50_000, 100_000)
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_row_events = attrgetter("events")

LATENCY_SAMPLES = 64
"""Publish→commit latency is noted for at most this many entries of a window, each standing
for its share of the window (the count stays exact; the spread is sampled evenly)."""


@dataclass(slots=True)
class Histogram:
    """Cumulative-ready bucket counts with a sum, as Prometheus histograms hold them."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, the last one is +Inf
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, times: int = 1) -> None:
        """Note `value`, `times` times."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def cumulative(self) -> Iterator[tuple[str, int]]:
        """(upper bound, observations at most that) pairs, "+Inf" last."""
        total = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            yield bound, total


@dataclass(slots=True)
class TableCounts:
    """Of one table: events merged into rows (or appended), and the row writes they became."""

    events: int = 0
    rows: int = 0


class Telemetry:
    """One shard's measurements, kept by its group across owners in this process."""

    def __init__(self, hot_capacity: int = 32) -> None:
        self.flush_seconds = Histogram(FLUSH_BUCKETS_S)
        self.batch_events = Histogram(BATCH_BUCKETS)
        self.latency_seconds = Histogram(LATENCY_BUCKETS_S)
        self.tables: dict[str, TableCounts] = {}
        self.hot: HotKeys[tuple[str, tuple[Any, ...]]] = HotKeys(hot_capacity)
        self.last_flush = 0.0  # time.time() of the last committed window

    def flushed(self, merged: Merged, ids: Sequence[bytes], seconds: float) -> None:
        """A window committed: its merge, the IDs it acknowledged, how long its flush took."""
        now = time.time()
        self.last_flush = now
        self.flush_seconds.observe(seconds)
        self.batch_events.observe(merged.events)
        self._latency(ids, now * 1000)
        window: list[tuple[tuple[str, tuple[Any, ...]], int]] = []
        cut, total, wanted = 0, 0, 2 * self.hot.capacity
        for table, rows in merged.rows.items():
            counts = list(map(_row_events, rows.values()))
            events = sum(counts)
            into = self.tables.get(table) or self.tables.setdefault(table, TableCounts())
            into.events += events
            into.rows += len(rows)
            total += events
            if len(counts) > wanted:  # only the busiest rows become pairs (a window of
                # unique keys has as many rows as events)
                top = heapq.nlargest(wanted + 1, range(len(counts)), key=counts.__getitem__)
                cut = max(cut, counts[top.pop()])
                keys = list(rows)
                window += [((table, keys[n]), counts[n]) for n in top]
            else:
                window += [((table, key), n) for key, n in zip(rows, counts, strict=True)]
        for table, appended in merged.appends.items():
            into = self.tables.get(table) or self.tables.setdefault(table, TableCounts())
            into.events += len(appended)
            into.rows += len(appended)
        self.hot.add(window, cut, total)

    def _latency(self, ids: Sequence[bytes], now_ms: float) -> None:
        """Publish→commit from each entry ID's millisecond part (Redis' clock at XADD)."""
        if not ids:
            return
        step = max(1, len(ids) // LATENCY_SAMPLES)
        for start in range(0, len(ids), step):
            weight = min(step, len(ids) - start)
            ms = int(ids[start].split(b"-", 1)[0])
            self.latency_seconds.observe(max(now_ms - ms, 0.0) / 1000, weight)

    def hot_keys(self, n: int | None = None) -> list[dict[str, Any]]:
        """The busiest rows as `{"key": "table:value[,value]", "count", "error"}`."""
        return [
            {"key": f"{table}:{','.join(map(str, key))}", "count": hot.count, "error": hot.error}
            for hot in self.hot.top(n)
            for table, key in (hot.key,)
        ]
