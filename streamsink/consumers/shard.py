"""One owned shard of one group: read, window, flush to every sink, then acknowledge."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from streamsink.consumers.merge import Entry, merge
from streamsink.consumers.retry import TRANSIENT, Backoff, cancelling, retrying
from streamsink.consumers.settings import GroupSettings
from streamsink.consumers.telemetry import Telemetry
from streamsink.consumers.window import Window
from streamsink.errors import EventError, Fenced
from streamsink.schemas.config import Config
from streamsink.schemas.wire import encode, unpacker
from streamsink.sinks.base import Batch, Rejected, Sink
from streamsink.streams.leases import Lease
from streamsink.streams.reader import Raw, Read, ShardReader, parse_id

log = logging.getLogger("streamsink.shard")


@dataclass(slots=True)
class ShardStats:
    """Counts of one shard's runner, for status and metrics."""

    read: int = 0
    flushed_windows: int = 0
    applied: int = 0
    dead_lettered: int = 0
    sink_retries: int = 0


class ShardRunner:
    """Runs one shard until told to hand it over (`drain`) or cancelled (lease lost).

    At most one flush is in flight and windows flush in order, so per-key order holds.
    While a flush is in flight the next window fills; once it is full, reading waits.
    Cancelling drops the open windows unacknowledged: the next owner claims them.
    """

    def __init__(
        self,
        reader: ShardReader,
        lease: Lease,
        config: Config,
        stream: str,
        sinks: Sequence[Sink],
        settings: GroupSettings,
    ) -> None:
        self.reader, self.lease, self.config = reader, lease, config
        self.stream, self.sinks, self.settings = stream, sinks, settings
        self.draining = asyncio.Event()
        self.lost = False  # the lease is gone: stop without flushing or acknowledging
        self.stats = ShardStats()
        self.telemetry: Telemetry | None = None  # ops: set by the worker when measuring
        self.lead = 0.0  # how long a flush may take (seconds): windows close that early
        self._flushes: deque[float] = deque(maxlen=8)  # the last flushes' durations
        self._where = {"group": reader.group, "stream": stream, "shard": lease.shard}
        self._unpack = unpacker(
            config.default_table(stream), config.validator(stream), config.max_data_bytes
        )

    async def run(self) -> None:
        """Read and flush until draining, then flush what is open and return.

        Returns early, acknowledging nothing more, when a sink says a newer owner has
        fenced the shard: the lease loop then finds the lease gone.
        """
        try:
            await self._run()
        except Fenced as exc:
            log.warning("shard fenced by a newer owner", extra={**self._where, "error": str(exc)})

    async def _run(self) -> None:
        await retrying(self.reader.ensure_group, "create group")
        window, flushing = Window(), None
        settings = self.settings
        try:
            while not self.draining.is_set() and not self.lost:
                if cancelling():  # a cancellation turned into a timeout on the way
                    raise asyncio.CancelledError
                now = time.monotonic()
                if window.due(settings, now, self.lead):
                    if flushing is not None:
                        await flushing  # one flush at a time; a full window waits here
                    flushing = asyncio.create_task(self.flush(window))
                    window = Window()
                    continue
                block = settings.block_ms
                if window:
                    due_at = window.due_at(settings, self.lead)
                    block = max(0, min(block, int((due_at - now) * 1000)))
                count = min(settings.read_count, settings.max_events - len(window))
                await self._take(window, await self._read(count, block), count)
            if flushing is not None and not self.lost:
                await flushing
        finally:
            # Cancelled (lease lost) or crashed: the flush in flight must not write or
            # acknowledge on behalf of an owner that is gone; the next owner claims it.
            if flushing is not None and not flushing.done():
                flushing.cancel()
                await asyncio.wait([flushing])
        if self.lost:
            return
        if window:
            await self.flush(window)
        log.info("shard drained", extra=self._where)

    async def _read(self, count: int, block: int) -> Read:
        """Read, riding out Redis restarts; a reply lost in one is claimed back afterwards."""
        backoff = Backoff()
        while True:
            try:
                return await self.reader.next(count, block)
            except TRANSIENT as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                self.reader.recover()
                delay = backoff.next()
                log.warning("read failed", extra={**self._where, "error": repr(exc), "in_s": delay})
                await asyncio.sleep(delay)

    async def _take(self, window: Window, read: Read, asked: int) -> None:
        """Decode and check what was read into the window; dead-letter what cannot be applied.

        `asked`: how many entries the read asked for. Fewer came: the shard is read to its
        newest entry, and a window opened now counts its age from when its first entry
        was added. As many came: there is a backlog, and windows fill as large as they may.

        The hot loop of a worker (every entry passes here once): locals only, no call per
        entry beyond decoding it, its Entry and two list appends.
        """
        unpack, deliveries, most = self._unpack, read.deliveries, self.settings.max_deliveries
        entries, ids = window.entries, window.ids
        taken, size = len(entries), 0
        new_entry = tuple.__new__  # Entry(...) without its Python-level __new__
        for entry_id, fields in read.entries:
            times = deliveries.get(entry_id, 1) if deliveries else 1  # only claims have them
            if times > most:
                reason = f"delivered {times} times (max_deliveries={most})"
            else:
                try:
                    event, table = unpack(fields)
                except EventError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    entries.append(new_entry(Entry, (entry_id.decode(), event, table)))
                    ids.append(entry_id)
                    size += len(fields[5]) if len(fields) == 6 else sum(map(len, fields))
                    continue
            await self._dead_letter(Raw(entry_id.decode(), fields, times), reason)
        self.stats.read += len(read.entries)
        if len(entries) > taken:
            if deliveries:
                window.deliveries.update(deliveries)
            caught_up = not taken and len(read.entries) < asked
            waited = self._waited(ids[taken], read.newest) if caught_up else 0.0
            window.grew(size + 64 * (len(entries) - taken), time.monotonic(), waited)

    def _waited(self, first: bytes, newest: bytes) -> float:
        """How long `first` had been in the shard when read, on Redis' own clock (seconds).

        The newest entry's ID, read in the same transaction, stands for "now": no clock of
        another machine is compared. At most a quarter of the max age, so a window opened
        on a backlog still fills (its first entry may be hours old).
        """
        if not newest:
            return 0.0
        ms = parse_id(newest)[0] - parse_id(first)[0]
        return min(max(ms, 0) / 1000, self.settings.max_age_ms / 4000)

    async def flush(self, window: Window) -> None:
        """Merge the window, write it to every sink, dead-letter rejects, then acknowledge."""
        started, retries = time.monotonic(), self.stats.sink_retries
        entries = window.entries
        batch = Batch(
            group=self.reader.group,
            stream=self.stream,
            shard=self.lease.shard,
            epoch=self.lease.epoch,
            first_id=entries[0].id,
            last_id=entries[-1].id,
            entries=entries,
            merged=merge(entries),
        )
        rejected: dict[str, str] = {}
        for sink in self.sinks:
            for reject in await self._write(sink, batch):
                rejected.setdefault(reject.entry_id, reject.reason)
        if self.stats.sink_retries == retries:  # a retried write says nothing of the next
            self._took(time.monotonic() - started)
        ids = window.ids
        if rejected:
            refused = [n for n, entry in enumerate(entries) if entry.id in rejected]
            stored = await retrying(lambda: self.reader.fields([ids[n] for n in refused]), "read")
            for n, fields in zip(refused, stored, strict=True):
                entry = entries[n]
                # Deleted from the stream since it was read: its event, encoded again.
                raw = Raw(entry.id, fields or encode(entry.event), window.delivered(n))
                await self._dead_letter(raw, f"sink: {rejected[entry.id]}")
            ids = [i for i, entry in zip(ids, entries, strict=True) if entry.id not in rejected]
        await retrying(lambda: self.reader.ack(ids), "ack")
        self.stats.flushed_windows += 1
        self.stats.applied += len(ids)
        if self.telemetry is not None:  # ops: one note per committed window
            self.telemetry.flushed(batch.merged, ids, time.monotonic() - started)

    def _took(self, seconds: float) -> None:
        """Note a flush's merge-and-write time: `lead` is the longest of the last eight
        (the slow ones make the latency's tail), at most half the max age."""
        self._flushes.append(seconds)
        self.lead = min(max(self._flushes), self.settings.max_age_ms / 2000)

    async def _write(self, sink: Sink, batch: Batch) -> Sequence[Rejected]:
        """Write until the sink accepts: any error is retried with backoff, keeping the lease."""
        backoff = Backoff()
        while True:
            try:
                return await sink.write(batch)
            except (asyncio.CancelledError, Fenced):
                raise
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                self.stats.sink_retries += 1
                delay = backoff.next()
                log.warning(
                    "sink write failed, retrying",
                    extra={
                        **self._where,
                        "sink": type(sink).__name__,
                        "error": repr(exc),
                        "in_s": round(delay, 3),
                    },
                )
                await asyncio.sleep(delay)

    async def _dead_letter(self, raw: Raw, reason: str) -> None:
        await retrying(lambda: self.reader.dead_letter(raw, reason), "dead-letter")
        self.stats.dead_lettered += 1
        log.warning("dead-lettered", extra={**self._where, "entry": raw.id, "reason": reason})
