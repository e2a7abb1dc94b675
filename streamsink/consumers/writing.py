"""Writing a shard's batches to the sinks of its group, by the class of what they raise.

The classes are errors.py's: a transient error is retried with backoff as long as it takes
(the shard *retrying* in status, one log line when that starts and one when it ends);
SinkMisconfigured and Fenced are raised (the group stops, the shard is gone); anything else
is taken for a bug: tried `max_attempts` times, then the batch is split in halves, each
written on its own, down to the entries the sink fails on alone, which come back refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamsink.errors import Fenced, SinkMisconfigured, SinkUnavailable
from streamsink.schemas.config import Config
from streamsink.schemas.merge import Entry, Merged, merge
from streamsink.sinks.base import Batch, Rejected, Sink
from streamsink.streams.keys import Keys
from streamsink.streams.leases import Lease
from streamsink.streams.reader import ShardReader
from streamsink.streams.retry import TRANSIENT, Backoff, cancelling, describe
from streamsink.streams.state import RunState, publish_state

log = logging.getLogger("streamsink.shard")

SINK_TRANSIENT: tuple[type[BaseException], ...] = (*TRANSIENT, SinkUnavailable, TimeoutError)
"""What a sink may raise that passes by waiting: retried as long as it takes."""


@dataclass(slots=True)
class ShardStats:
    """Counts of one shard's runner, for status and metrics."""

    read: int = 0
    flushed_windows: int = 0
    applied: int = 0
    dead_lettered: int = 0
    sink_retries: int = 0
    skipped: int = 0  # replays addressed to another group
    isolated: int = 0  # entries a failing sink was split down to and dead-lettered


class SinkWriter:
    """One shard's writes to its group's sinks; its run state (for status) is this one's."""

    def __init__(
        self,
        reader: ShardReader,
        lease: Lease,
        config: Config,
        stream: str,
        attempts: Mapping[str, int],
        stats: ShardStats,
    ) -> None:
        self._reader, self._lease, self._stream = reader, lease, stream
        self._keys = Keys(config.prefix)
        self.attempts, self.stats = dict(attempts), stats
        self.state, self.state_since, self.last_error = RunState.RUNNING, time.time(), ""
        self._where = {"group": reader.group, "stream": stream, "shard": lease.shard}

    def stopped(self, error: str) -> None:
        """The group stopped on `error` (a configuration error)."""
        self.state, self.state_since, self.last_error = RunState.STOPPED, time.time(), error

    def batch(
        self, entries: Sequence[Entry], origins: Mapping[str, str], merged: Merged | None = None
    ) -> Batch:
        """A batch of some of the window's entries (`merged`: theirs, if merged already)."""
        return Batch(
            group=self._reader.group,
            stream=self._stream,
            shard=self._lease.shard,
            epoch=self._lease.epoch,
            first_id=entries[0].id,
            last_id=entries[-1].id,
            entries=entries,
            merged=merge(entries) if merged is None else merged,
            origins={e.id: origins[e.id] for e in entries if e.id in origins} if origins else {},
        )

    async def write(self, name: str, sink: Sink, batch: Batch, tries: int = 0) -> list[Rejected]:
        """Write until the sink accepts, by the class of what it raises (errors.py).

        Transient: retried with backoff as long as it takes, the lease kept, the shard
        *retrying* in status. SinkMisconfigured and Fenced: raised (the group stops, the
        shard is gone). Anything else is a bug: after `tries` the batch is split in two,
        each half written on its own, down to the entries the sink fails on alone, which
        come back as refused.
        """
        tries = tries or self.attempts[name]
        backoff, failures = Backoff(), 0
        while True:
            try:
                result = await sink.write(batch)
            except (asyncio.CancelledError, Fenced, SinkMisconfigured):
                raise
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                if not isinstance(exc, SINK_TRANSIENT):
                    failures += 1
                    if failures >= tries:
                        return await self._isolate(name, sink, batch, exc, failures)
                self.stats.sink_retries += 1
                delay = backoff.next()
                await self._retrying(name, exc, delay)
                await asyncio.sleep(delay)
                continue
            await self._recovered(name)
            return _with_merge_refusals(list(result), batch)

    async def _isolate(
        self, name: str, sink: Sink, batch: Batch, exc: Exception, tries: int
    ) -> list[Rejected]:
        """Split a batch the sink keeps failing on; an entry that fails alone is refused."""
        entries = batch.entries
        await self._recovered(name)
        if len(entries) == 1:
            self.stats.isolated += 1
            reason = f"raised {type(exc).__name__}: {exc} ({tries} attempts)"
            log.error(
                "sink fails on an entry: dead-lettering it",
                extra={**self._where, "sink": name, "entry": entries[0].id, "error": describe(exc)},
            )
            return [Rejected(entries[0].id, reason)]
        log.warning(
            "sink keeps failing: splitting the window to find the entries it fails on",
            extra={**self._where, "sink": name, "entries": len(entries), "error": describe(exc)},
        )
        middle = len(entries) // 2
        rejected: list[Rejected] = []
        for half in (entries[:middle], entries[middle:]):
            tries = self.attempts[name] if len(half) == 1 else 1
            rejected += await self.write(name, sink, self.batch(half, batch.origins), tries)
        return rejected

    async def _retrying(self, name: str, exc: BaseException, delay: float) -> None:
        """A write failed and will be tried again: say so once, and keep status current."""
        error = f"{name}: {type(exc).__name__}: {exc}"
        extra = {**self._where, "sink": name, "error": error, "in_s": round(delay, 3)}
        if self.state is not RunState.RETRYING:
            self.state, self.state_since = RunState.RETRYING, time.time()
            log.warning("sink write failed: retrying", extra=extra)
        else:
            log.debug("sink write failed again", extra=extra)
        self.last_error = error
        await self.publish(RunState.RETRYING, error)

    async def _recovered(self, name: str) -> None:
        """A write went through (or was given up on): end the retrying state, if any."""
        if self.state is not RunState.RETRYING:
            return
        took = round(time.time() - self.state_since, 3)
        self.state, self.state_since = RunState.RUNNING, time.time()
        log.info("sink recovered", extra={**self._where, "sink": name, "after_s": took})
        await self.publish(RunState.RUNNING)

    async def publish(self, state: RunState, error: str = "") -> None:
        """Best effort: status is told the shard's state (Redis may be what is failing)."""
        with contextlib.suppress(*TRANSIENT, TimeoutError):
            async with asyncio.timeout(2):
                await publish_state(
                    self._reader.client,
                    self._keys,
                    self._stream,
                    self._lease.shard,
                    self._reader.group,
                    state=state,
                    worker=self._reader.consumer,
                    epoch=self._lease.epoch,
                    error=error,
                    since=self.state_since,
                )


def sink_attempts(config: Config, sink: str, default: int) -> int:
    """A sink's `max_attempts` option, else the group's."""
    spec = config.sinks.get(sink)
    value: Any = spec.options.get("max_attempts", default) if spec is not None else default
    return int(value)


def _with_merge_refusals(rejected: list[Rejected], batch: Batch) -> list[Rejected]:
    """What the sink refused, and what merging the batch refused (a sum a column cannot
    hold), whether or not the sink said so: such an entry was written by no sink."""
    refused = batch.merged.refused
    if not refused:
        return rejected
    said = {reject.entry_id for reject in rejected}
    rejected += [Rejected(i, f"merge: {why}") for i, why in refused.items() if i not in said]
    return rejected
