"""Prometheus metrics of one worker, read from its objects when scraped (no hot-path calls).

Every metric is named `streamsink_*` and labelled only by bounded things: group, stream,
shard, table, sink, endpoint, state, error class; never by key. Counters of a shard count
from when this process first owned it (a shard taken by another worker goes on there).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamsink.consumers.telemetry import Histogram, Telemetry
from streamsink.consumers.worker import GroupRunner, Worker
from streamsink.streams.endpoints import EndpointRow

SHARD = ("group", "stream", "shard")
STATES = ("running", "retrying", "stopped")

_SHARD_COUNTERS = (
    ("read", "events_read", "Entries read from the shard (decoded or dead-lettered)."),
    ("applied", "events_applied", "Entries committed to every sink and acknowledged."),
    ("dead_lettered", "events_dead_lettered", "Entries moved to the dead-letter stream."),
    ("flushed_windows", "windows_flushed", "Windows flushed and acknowledged."),
    ("sink_retries", "sink_retries", "Sink writes that failed and were retried."),
)


@dataclass(slots=True)
class Facts:
    """What the endpoint read from Redis just before a scrape (the collector cannot await)."""

    backlog: dict[tuple[str, int], tuple[int | None, int]] = field(default_factory=dict)
    """(group, shard) -> (lag, pending) of the shards this worker owns."""
    endpoints: dict[str, Sequence[EndpointRow]] = field(default_factory=dict)
    """HTTP sink -> its endpoints' counts and breakers (kept in Redis, for every worker)."""


class WorkerCollector(Collector):
    """Turns a Worker's runners, telemetry and sinks into metric families at each scrape."""

    def __init__(self, worker: Worker, facts: Facts) -> None:
        self.worker, self.facts = worker, facts

    def collect(self) -> Iterator[Metric]:
        yield from self._shards()
        yield from self._telemetry()
        yield from self._groups()
        yield from self._sinks()

    def _shards(self) -> Iterator[Metric]:
        counters = {
            attr: CounterMetricFamily(f"streamsink_{name}", text, labels=SHARD)
            for attr, name, text in _SHARD_COUNTERS
        }
        lag = GaugeMetricFamily(
            "streamsink_lag",
            "Entries not yet delivered to the group (a lower bound past 1000 on both sides).",
            labels=SHARD,
        )
        pending = GaugeMetricFamily(
            "streamsink_pending", "Entries read, not yet acknowledged.", labels=SHARD
        )
        epoch = GaugeMetricFamily(
            "streamsink_lease_epoch",
            "Fencing epoch of the held lease (changes() counts new owners).",
            labels=SHARD,
        )
        state = GaugeMetricFamily(
            "streamsink_shard_state", "1 for the state the shard is in.", labels=(*SHARD, "state")
        )
        since = GaugeMetricFamily(
            "streamsink_shard_state_since_seconds",
            "Unix time the shard entered its state.",
            labels=SHARD,
        )
        error = GaugeMetricFamily(
            "streamsink_shard_last_error",
            "1 while the shard retries or stopped, labelled by the class of its last error.",
            labels=(*SHARD, "error_class"),
        )
        for group in self.worker.groups:
            for shard, (runner, _) in sorted(group.runners.items()):
                labels = [group.group.name, group.stream, str(shard)]
                for attr, family in counters.items():
                    family.add_metric(labels, getattr(runner.stats, attr, 0))
                backlog = self.facts.backlog.get((group.group.name, shard))
                if backlog is not None:
                    if backlog[0] is not None:
                        lag.add_metric(labels, backlog[0])
                    pending.add_metric(labels, backlog[1])
                epoch.add_metric(labels, runner.lease.epoch)
                now = str(getattr(runner, "state", "running"))
                for name in STATES:
                    state.add_metric([*labels, name], 1.0 if now == name else 0.0)
                since.add_metric(labels, float(getattr(runner, "state_since", 0.0) or 0.0))
                last = str(getattr(runner, "last_error", "") or "")
                if last and now != "running":
                    error.add_metric([*labels, error_class(last)], 1.0)
        yield from counters.values()
        yield from (lag, pending, epoch, state, since, error)

    def _telemetry(self) -> Iterator[Metric]:
        flush = HistogramMetricFamily(
            "streamsink_flush_duration_seconds",
            "Merge, write to every sink and acknowledge, per window.",
            labels=SHARD,
        )
        batch = HistogramMetricFamily(
            "streamsink_batch_events", "Entries per flushed window.", labels=SHARD
        )
        latency = HistogramMetricFamily(
            "streamsink_publish_commit_latency_seconds",
            "From the entry ID's time (XADD) to its window's acknowledgement.",
            labels=SHARD,
        )
        events = CounterMetricFamily(
            "streamsink_table_events",
            "Events merged into rows (or appended) of a table.",
            labels=("group", "table"),
        )
        rows = CounterMetricFamily(
            "streamsink_table_row_writes",
            "Row writes those events became (one per row per window).",
            labels=("group", "table"),
        )
        saved = CounterMetricFamily(
            "streamsink_writes_saved",
            "Row writes saved by merging: events in minus row writes out.",
            labels=("group", "table"),
        )
        ratio = GaugeMetricFamily(
            "streamsink_coalescing_ratio",
            "Events in per row write out, since the worker started.",
            labels=("group", "table"),
        )
        for group in self.worker.groups:
            measured: Mapping[int, Telemetry] = group.telemetry or {}
            totals: dict[str, list[int]] = {}
            for shard, telemetry in sorted(measured.items()):
                labels = [group.group.name, group.stream, str(shard)]
                _histogram(flush, labels, telemetry.flush_seconds)
                _histogram(batch, labels, telemetry.batch_events)
                _histogram(latency, labels, telemetry.latency_seconds)
                for table, counts in telemetry.tables.items():
                    into = totals.setdefault(table, [0, 0])
                    into[0] += counts.events
                    into[1] += counts.rows
            for table, (n_events, n_rows) in sorted(totals.items()):
                labels = [group.group.name, table]
                events.add_metric(labels, n_events)
                rows.add_metric(labels, n_rows)
                saved.add_metric(labels, n_events - n_rows)
                if n_rows:
                    ratio.add_metric(labels, n_events / n_rows)
        yield from (flush, batch, latency, events, rows, saved, ratio)

    def _groups(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "streamsink_leases_held", "Shard leases this worker holds.", labels=("group", "stream")
        )
        stopped = GaugeMetricFamily(
            "streamsink_group_stopped",
            "1 when the group stopped on a configuration error.",
            labels=("group", "stream"),
        )
        for group in self.worker.groups:
            labels = [group.group.name, group.stream]
            held.add_metric(labels, len(group.runners))
            stopped.add_metric(labels, 1.0 if group_stopped(group) else 0.0)
        yield held
        yield stopped

    def _sinks(self) -> Iterator[Metric]:
        written = CounterMetricFamily(
            "streamsink_rows_written",
            "Rows a PostgreSQL sink wrote (upserted, updated or appended), per table.",
            labels=("sink", "table"),
        )
        statements = CounterMetricFamily(
            "streamsink_sql_statements", "SQL statements a PostgreSQL sink ran.", labels=("sink",)
        )
        for name, sink in sorted(self.worker.sinks.items()):
            stats: Any = getattr(sink, "stats", None)
            for table, count in sorted(getattr(stats, "by_table", {}).items()):
                written.add_metric([name, table], count)
            if hasattr(stats, "statements"):
                statements.add_metric([name], stats.statements)
        yield written
        yield statements
        callbacks = CounterMetricFamily(
            "streamsink_http_callbacks",
            "HTTP sink callbacks by outcome, all workers together (kept in Redis).",
            labels=("sink", "endpoint", "outcome"),
        )
        breaker = GaugeMetricFamily(
            "streamsink_http_breaker_open",
            "1 while the endpoint's circuit breaker is open (0.5 half-open).",
            labels=("sink", "endpoint"),
        )
        for sink_name, endpoints in sorted(self.facts.endpoints.items()):
            for row in endpoints:
                for outcome in ("sent", "failed", "retried", "dead"):
                    callbacks.add_metric(
                        [sink_name, row.endpoint, outcome], getattr(row, outcome, 0)
                    )
                value = {"open": 1.0, "half-open": 0.5, "half_open": 0.5}.get(row.breaker, 0.0)
                breaker.add_metric([sink_name, row.endpoint], value)
        yield callbacks
        yield breaker
        requests = CounterMetricFamily(
            "streamsink_http_requests",
            "HTTP sink requests this worker sent, by reply status class (error: no reply).",
            labels=("sink", "endpoint", "status_class"),
        )
        waited = CounterMetricFamily(
            "streamsink_http_rate_limit_wait_seconds",
            "Time this worker's requests waited for the endpoint's rate limit or Retry-After.",
            labels=("sink", "endpoint"),
        )
        for name, sink in sorted(self.worker.sinks.items()):
            sender: Any = getattr(sink, "sender", None)
            for (endpoint, status), count in sorted(getattr(sender, "requests", {}).items()):
                requests.add_metric([name, endpoint, status], count)
            for endpoint, seconds in sorted(getattr(sender, "permit_wait_s", {}).items()):
                waited.add_metric([name, endpoint], seconds)
        yield requests
        yield waited


def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    family.add_metric(labels, list(histogram.cumulative()), histogram.sum)


def group_stopped(group: GroupRunner) -> str | None:
    """The error that stopped the group, if one did (None while it runs)."""
    stopped = getattr(group, "stopped", None)
    return str(stopped) if stopped else None


def error_class(text: str) -> str:
    """`ConnectionError` of "ConnectionError('…')" or "ConnectionError: …": a bounded label."""
    head = text.strip().split("(", 1)[0].split(":", 1)[0].strip()
    name = head.rsplit(".", 1)[-1]
    return name if name.isidentifier() and len(name) <= 64 else "Error"
