"""One owned shard of one group: read, window, flush to every sink, then acknowledge."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import cast

from streamsink.consumers.recovery import check_shard, committed, lost_message, on_shard
from streamsink.consumers.settings import GroupSettings
from streamsink.consumers.telemetry import Telemetry
from streamsink.consumers.window import Window
from streamsink.consumers.writing import SINK_TRANSIENT, ShardStats, SinkWriter, sink_attempts
from streamsink.errors import EventError, Fenced, RedisDataLost, SinkMisconfigured
from streamsink.schemas.config import Config
from streamsink.schemas.layout import DATA_VALUE, PLAIN_ENTRY
from streamsink.schemas.merge import Entry, merge
from streamsink.schemas.wire import encode, parse_id, replayed, unpacker
from streamsink.sinks.base import Sink
from streamsink.streams.keys import Keys
from streamsink.streams.leases import Lease
from streamsink.streams.reader import Raw, Read, ShardReader
from streamsink.streams.retry import (
    TRANSIENT,
    Backoff,
    Spell,
    cancelling,
    retrying,
    server,
)
from streamsink.streams.state import RunState

log = logging.getLogger("streamsink.shard")

__all__ = ["SINK_TRANSIENT", "SUSPECT_TRIES", "ShardRunner", "ShardStats"]

SUSPECT_TRIES = 2
"""How often an entry delivered more than `max_deliveries` times is tried alone: if its
worker dies (or loses the lease) that often while applying it, it is dead-lettered."""


def _sends_calls(sinks: Iterable[Sink]) -> bool:
    """Whether a call may reach an endpoint: some sink is not the PostgreSQL one (it writes
    rows only). Not imported, that module made none of them."""
    postgres = sys.modules.get("streamsink.sinks.postgres.sink")
    return any(postgres is None or not isinstance(s, postgres.PostgresSink) for s in sinks)


HANDOVER_S = 1.0
"""On a drain, how long a flush of sinks that may be interrupted (`interruptible`) has before
it is cancelled, its entries left pending for the next owner."""


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
        sinks: Mapping[str, Sink],
        settings: GroupSettings,
        alone: asyncio.Lock | None = None,
    ) -> None:
        self.reader, self.lease, self.config = reader, lease, config
        self.alone = alone or asyncio.Lock()  # shared by the worker's shards: see flush
        self.stream, self.sinks, self.settings = stream, dict(sinks), settings
        self.draining = asyncio.Event()
        self.lost = False  # the lease is gone: stop without flushing or acknowledging
        self.expect_group = False  # its worker made the stream's groups: gone means Redis lost them
        self.stats = ShardStats()
        self.telemetry: Telemetry | None = None  # ops: set by the worker when measuring
        self.lead = 0.0  # how long a flush may take (seconds): windows close that early
        self._flushes: deque[float] = deque(maxlen=8)  # the last flushes' durations
        self._where = {"group": reader.group, "stream": stream, "shard": lease.shard}
        self._redis = {**self._where, "redis": server(reader.client)}  # Redis retries' lines
        self._keys = Keys(config.prefix)
        self._unpack = unpacker(
            config.default_table(stream),
            config.validator(stream),
            config.max_data_bytes,
            shard=(lease.shard, config.streams[stream].shards),
            calls=_sends_calls(sinks.values()),
            tables=config.tables,
        )
        self._stash: Read | None = None  # entries read but left for the next window
        # Every sink may be stopped mid-window on a drain (the HTTP sink: it marks what it
        # delivered), so a slow endpoint does not keep the shard from its next owner.
        self._interruptible = all(getattr(s, "interruptible", False) for s in sinks.values())
        attempts = {name: sink_attempts(config, name, settings.max_attempts) for name in sinks}
        self.writer = SinkWriter(reader, lease, config, stream, attempts, self.stats)

    @property
    def state(self) -> RunState:
        """What the shard is doing: running, retrying (a sink away) or stopped."""
        return self.writer.state

    @property
    def state_since(self) -> float:
        """Since when (Unix seconds)."""
        return self.writer.state_since

    @property
    def last_error(self) -> str:
        """The last error of a write, while retrying or stopped."""
        return self.writer.last_error

    async def run(self) -> None:
        """Read and flush until draining, then flush what is open and return.

        Returns early, acknowledging nothing more, when a sink or Redis says a newer owner
        has fenced the shard: the lease loop then finds the lease gone. Raises
        SinkMisconfigured, or RedisDataLost when Redis is behind what the sinks committed
        (the group stops), with nothing of the window acknowledged.
        """
        try:
            await self.writer.publish(RunState.RUNNING)
            await self._check_redis()
            try:
                await self._run()
            except (Fenced, RedisDataLost) as exc:
                await self._diagnose(exc)
                log.warning(
                    "shard fenced by a newer owner", extra={**self._where, "error": str(exc)}
                )
        except (SinkMisconfigured, RedisDataLost) as exc:
            self.writer.stopped(str(exc))
            await self.writer.publish(RunState.STOPPED, str(exc))
            raise

    async def _check_redis(self) -> None:
        """RedisDataLost if Redis is behind what the group's sinks committed on the shard."""
        group, shard = self.reader.group, self.lease.shard
        commits = on_shard(await committed(self.sinks, group, self.stream), shard)
        client, keys, stream = self.reader.client, self._keys, self.stream
        await check_shard(client, keys, stream, shard, group, commits, self.expect_group)

    async def _diagnose(self, exc: Fenced | RedisDataLost) -> None:
        """A newer owner, or Redis that lost data? RedisDataLost, naming the fix, if the
        latter (a fenced shard whose lease epoch Redis forgot, a group gone under it)."""
        await self._check_redis()
        if isinstance(exc, RedisDataLost):
            message = lost_message(self.stream, self.reader.group, self.lease.shard, str(exc))
            raise RedisDataLost(message) from exc

    async def _run(self) -> None:
        await retrying(self.reader.ensure_group, "create group", where=self._redis)
        window, flushing = Window(), cast(asyncio.Task[None] | None, None)
        interrupted = False
        settings = self.settings
        try:
            while not self.draining.is_set() and not self.lost:
                if cancelling():  # a cancellation turned into a timeout on the way
                    raise asyncio.CancelledError
                if flushing is not None and flushing.done():
                    done, flushing = flushing, None
                    done.result()  # a flush that failed (fenced, misconfigured) ends the shard
                now = time.monotonic()
                if window.due(settings, now, self.lead):
                    if flushing is not None:
                        await flushing  # one flush at a time; a full window waits here
                    flushing = asyncio.create_task(self.flush(window))
                    window = Window()
                    continue
                block, due_at = settings.block_ms, math.inf
                if window:
                    due_at = window.due_at(settings, self.lead)
                    block = max(0, min(block, int((due_at - now) * 1000)))
                count = min(settings.read_count, settings.max_events - len(window))
                read, self._stash = self._stash or await self._read(count, block, due_at), None
                await self._take(window, read, count)
            if flushing is not None and not self.lost:
                if not self._interruptible:
                    await flushing
                elif (await asyncio.wait([flushing], timeout=HANDOVER_S))[0]:
                    flushing.result()  # a flush that failed (fenced, misconfigured) ends it
                else:
                    interrupted = True  # cancelled below, its window left to the next owner
        finally:
            # Cancelled (lease lost) or crashed: the flush in flight must not write or
            # acknowledge on behalf of an owner that is gone; the next owner claims it.
            if flushing is not None:
                if not flushing.done():
                    flushing.cancel()
                    await asyncio.wait([flushing])
                if not flushing.cancelled():
                    flushing.exception()  # seen: whatever it was, this shard is done
        if self.lost:
            return
        if window and not interrupted:
            try:
                async with asyncio.timeout(HANDOVER_S if self._interruptible else None):
                    await self.flush(window)
            except TimeoutError:
                interrupted = True
        if interrupted:  # what was delivered is marked: the next owner sends the rest
            log.info("shard handed over mid-window", extra=self._where)
            return
        log.info("shard drained", extra=self._where)

    async def _read(self, count: int, block: int, until: float = math.inf) -> Read:
        """Read, riding out Redis restarts; a reply lost in one is claimed back afterwards.

        While reads fail: one `read failed` warning, the later attempts at debug level, one
        `read recovered` line (attempts, `after_s`) when one goes through. With a window open,
        the attempts go on until it is due (`until`, monotonic seconds), then stop with
        nothing read, so that what the window holds is flushed meanwhile: a node the reads
        need may be away while the sinks and the acknowledgement are not (issue 18: a shard
        whose reads kept failing held its last window back from PostgreSQL for good).
        """
        backoff, spell = Backoff(), Spell("read failed", "read recovered", self._redis, log)
        while True:
            try:
                read = await self.reader.next(count, block)
            except TRANSIENT as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                self.reader.recover()
                now, delay = time.monotonic(), backoff.next()
                spell.failed(exc, delay, backoff.attempt)
                if now + delay >= until:  # the window is due first: flush it, then read on
                    await asyncio.sleep(max(0.0, until - now))
                    log.info("read failing: flushing the due window first", extra=self._redis)
                    return Read([], {})
                await asyncio.sleep(delay)
                continue
            spell.succeeded(backoff.attempt + 1)
            return read

    async def _take(self, window: Window, read: Read, asked: int) -> None:
        """Decode and check what was read into the window; dead-letter what cannot be applied.

        `asked`: how many entries the read asked for. Fewer came: the shard is read to its
        newest entry, and a window opened now counts its age from when its first entry
        was added. As many came: there is a backlog, and windows fill as large as they may.

        An entry delivered more than `max_deliveries` times (its owners died or lost the
        lease while applying it) is a suspect: it gets a window of its own, so that only
        it is blamed if that happens again. The entries after it wait in `_stash`.

        The hot loop of a worker (every entry passes here once): locals only, no call per
        entry beyond decoding it, its Entry and two list appends.
        """
        unpack, deliveries, most = self._unpack, read.deliveries, self.settings.max_deliveries
        entries, ids = window.entries, window.ids
        taken, size = len(entries), 0
        new_entry = tuple.__new__  # Entry(...) without its Python-level __new__
        for n, (entry_id, fields) in enumerate(read.entries):
            times = deliveries.get(entry_id, 1) if deliveries else 1  # only claims have them
            if times > most and not window.suspect:
                if entries:  # the window so far closes first; the suspect opens the next
                    self._stash = Read(read.entries[n:], deliveries, read.newest)
                    window.closing = True
                    break
                window.suspect = window.closing = True
                self._stash = Read(read.entries[n + 1 :], deliveries, read.newest)
            elif window.suspect:  # the suspect stays alone; the rest wait for the next window
                self._stash = Read(read.entries[n:], deliveries, read.newest)
                break
            route = replayed(fields) if len(fields) != PLAIN_ENTRY else None
            if route is not None and route.group != self.reader.group:
                await self._skip(entry_id)  # another group's replay: not ours to apply
                self.stats.skipped += 1
                continue
            try:
                event, table = unpack(fields)
            except EventError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                entries.append(new_entry(Entry, (entry_id.decode(), event, table)))
                ids.append(entry_id)
                size += (
                    len(fields[DATA_VALUE]) if len(fields) == PLAIN_ENTRY else sum(map(len, fields))
                )
                if route is not None:
                    window.origins[entries[-1].id] = route.origin
                    if route.sinks:
                        window.only[entries[-1].id] = route.sinks
                continue
            raw = Raw(entry_id.decode(), fields, times)
            if route is None:
                await self._dead_letter(raw, reason)
            else:  # a replay stays addressed to the sinks it was for
                await self._dead_letter(raw, reason, route.sinks, route.origin)
        self.stats.read += len(read.entries) - (len(self._stash.entries) if self._stash else 0)
        if len(entries) > taken:
            if deliveries:
                window.deliveries.update(deliveries)
            caught_up = not taken and len(read.entries) < asked
            waited = self._waited(ids[taken], read.newest) if caught_up else 0.0
            window.grew(size + 64 * (len(entries) - taken), time.monotonic(), waited)

    async def _skip(self, entry_id: bytes) -> None:
        await retrying(lambda: self.reader.ack([entry_id]), "ack", where=self._redis)

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
        """Merge the window, write it to every sink, dead-letter rejects, then acknowledge.

        A suspect's window waits for the worker's other suspects (`alone`): if the process
        dies meanwhile, the one suspect in flight is the one to blame.
        """
        if not window.suspect:
            return await self._flush(window)
        async with self.alone:
            if await self._may_try_alone(window):
                first = window.entries[0].id
                await self._flush(window, written=lambda: self._tried_alone(first, done=True))
        return None

    async def _flush(
        self, window: Window, written: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        """`written`: called once every sink has returned, before dead letters and the ack
        (a suspect is forgiven as soon as its write went through: a worker that stops
        after that, before acknowledging, was not stopped by it)."""
        started, retries = time.monotonic(), self.stats.sink_retries
        entries = window.entries
        refused: dict[str, list[str]] = {}  # entry ID -> the sinks that refused it
        reasons: dict[str, str] = {}
        merged = merge(entries) if len(self.sinks) > 1 and not window.only else None
        for name, sink in self.sinks.items():
            mine = window.for_sink(name)
            if not mine:
                continue
            batch = self.writer.batch(mine, window.origins, merged if mine is entries else None)
            merged = batch.merged if mine is entries else merged  # the window's, for the next
            for reject in await self.writer.write(name, sink, batch):
                refused.setdefault(reject.entry_id, []).append(name)
                reasons.setdefault(reject.entry_id, f"sink {name!r}: {reject.reason}")
        if self.stats.sink_retries == retries:  # a retried write says nothing of the next
            self._took(time.monotonic() - started)
        if written is not None:
            await written()
        ids = window.ids
        if refused:
            await self._dead_letter_refused(window, refused, reasons)
            ids = [i for i, entry in zip(ids, entries, strict=True) if entry.id not in refused]
        await retrying(lambda: self.reader.ack(ids, entries[-1].id), "ack", where=self._redis)
        self.stats.flushed_windows += 1
        self.stats.applied += len(ids)
        if self.telemetry is not None:  # ops: one note per committed window
            whole = merged if merged is not None else merge(entries)
            self.telemetry.flushed(whole, ids, time.monotonic() - started)

    async def _dead_letter_refused(
        self, window: Window, refused: Mapping[str, list[str]], reasons: Mapping[str, str]
    ) -> None:
        """Dead-letter what sinks refused, naming the refusing sinks when others applied it."""
        entries, ids = window.entries, window.ids
        picked = [n for n, entry in enumerate(entries) if entry.id in refused]
        stored = await retrying(
            lambda: self.reader.fields([ids[n] for n in picked]), "read", where=self._redis
        )
        everyone = set(self.sinks)
        for n, fields in zip(picked, stored, strict=True):
            entry = entries[n]
            # Deleted from the stream since it was read: its event, encoded again.
            raw = Raw(entry.id, fields or encode(entry.event), window.delivered(n))
            sinks = refused[entry.id]
            await self._dead_letter(
                raw,
                reasons[entry.id],
                sinks=() if set(sinks) == everyone else sinks,
                origin=window.origins.get(entry.id, ""),
            )

    async def _may_try_alone(self, window: Window) -> bool:
        """For a suspect's window: count this try; dead-letter it once it has had its tries."""
        entry = window.entries[0]
        tries = await self._tried_alone(entry.id)
        if tries <= SUSPECT_TRIES:
            log.warning(
                "entry delivered too often: trying it alone",
                extra={**self._where, "entry": entry.id, "try": tries},
            )
            return True
        fields = (
            await retrying(lambda: self.reader.fields(window.ids), "read", where=self._redis)
        )[0]
        times = window.delivered(0)
        reason = (
            f"delivered {times} times (max_deliveries={self.settings.max_deliveries}); its "
            f"worker stopped or lost the shard {tries - 1} times while applying it alone"
        )
        raw = Raw(entry.id, fields or encode(entry.event), times)
        sinks, origin = window.only.get(entry.id, ()), window.origins.get(entry.id, "")
        await self._dead_letter(raw, reason, sinks, origin)
        await self._tried_alone(entry.id, done=True)
        return False

    async def _tried_alone(self, entry_id: str, done: bool = False) -> int:
        """Count a try of a suspect entry (its tries so far), or forget it once `done`."""
        key = self._keys.suspects(self.stream, self.lease.shard, self.reader.group)
        client = self.reader.client
        if done:
            await retrying(lambda: client.hdel(key, entry_id), "forget suspect", where=self._redis)
            return 0
        return int(
            await retrying(
                lambda: client.hincrby(key, entry_id, 1), "count suspect", where=self._redis
            )
        )

    def _took(self, seconds: float) -> None:
        """Note a flush's merge-and-write time: `lead` is the longest of the last eight
        (the slow ones make the latency's tail), at most half the max age."""
        self._flushes.append(seconds)
        self.lead = min(max(self._flushes), self.settings.max_age_ms / 2000)

    async def _dead_letter(
        self, raw: Raw, reason: str, sinks: Sequence[str] = (), origin: str = ""
    ) -> None:
        await retrying(
            lambda: self.reader.dead_letter(raw, reason, sinks, origin),
            "dead-letter",
            where=self._redis,
        )
        self.stats.dead_lettered += 1
        log.warning("dead-lettered", extra={**self._where, "entry": raw.id, "reason": reason})
