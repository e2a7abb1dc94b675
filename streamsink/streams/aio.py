"""The asyncio producer: many coroutines' publishes gathered into pipelined round trips."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import hiredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamsink.errors import Backpressure, ProducerClosed, PublishError
from streamsink.schemas.config import Config
from streamsink.schemas.event import Event
from streamsink.streams.applied import (
    DEFAULT_TIMEOUT,
    Receipt,
    configured_groups,
    wait_applied_async,
)
from streamsink.streams.connection import REDIRECTED, AsyncClient, AsyncLinks, shard_count_async
from streamsink.streams.publish import (
    FIRST_RETRY,
    LAST_RETRY,
    Command,
    Prepared,
    Preparer,
    ProducerSettings,
    refusal,
)
from streamsink.streams.retry import cancelling

_LOST = (
    "lost Redis while publishing ({}); the events may or may not be in the stream: "
    "publish again only events that carry an idempotency id"
)
_UNREACHABLE = "cannot reach Redis ({}); nothing was published, so publishing again is safe"


_Request = tuple[str, list[Prepared], "asyncio.Future[list[str]]"]
"""A publish call: its stream, its events and the future its caller awaits (a tuple, not
a class: concurrent publishers make one an event)."""


Plan = list[tuple[Connection, list[Command]]]
"""Where a batch's commands went: per server (several in a cluster), its connection and
its commands in order (its replies come back in that order)."""


@dataclass(slots=True)
class _InFlight:
    batch: list[_Request]
    plan: Plan
    links: AsyncLinks


def _stopped() -> PublishError:
    """A new error each time: one instance raised in many tasks would pile up their
    tracebacks and contexts, and every caller would hold (and could change) the same one."""
    return PublishError("the producer was stopped while sending these events")


class AsyncProducer:
    """Publishes events from asyncio code, batching concurrent publishes.

    While one round trip is in flight the next batch gathers (up to `max_batch` events,
    or `max_wait` seconds when set), so one coroutine pays one round trip per publish
    and a thousand pay a few. At most `queue_size` publishes wait; more wait for room.
    `close()` sends what is pending, and fails what it could not send: no publish is
    ever left hanging. Like the sync producer it never retries on its own.
    """

    def __init__(
        self,
        client: AsyncClient,
        config: Config | None = None,
        settings: ProducerSettings | None = None,
    ) -> None:
        self._client = client
        self._prep = Preparer(config or Config(), settings or ProducerSettings())
        self._settings = self._prep.settings
        self._gathers = self._settings.max_wait > 0  # never sends from the caller
        self._pending: list[_Request] = []
        self._pending_events = 0
        self._room = asyncio.Event()  # set when a publish left the queue
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._links: AsyncLinks | None = None
        self._stale = False  # a cluster moved a slot or lost a node: read its slot map again
        self._closing = False
        self._failure: BaseException | None = None
        self._lookups: dict[str, asyncio.Future[Any]] = {}
        self._busy = False
        self._inflight: deque[_InFlight] = deque()
        self._replied = asyncio.Event()

    async def publish(
        self,
        stream: str,
        event: Event,
        *,
        wait: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (the same API as the sync producer)
    ) -> str:
        """Publish one event; return its entry ID once Redis has it (with `wait`, once every
        group applied it; see `publish_many`)."""
        if wait or timeout is not None:
            return (await self.publish_many(stream, (event,), wait=wait, timeout=timeout))[0]
        pack = self._prep.packers.get(stream)
        if pack is None:
            pack = await self._load_shards(stream)
        if self._closing or self._failure is not None:
            self._check_open()
        return (await self._submit(self._request(stream, [pack(event)])))[0]

    async def publish_many(
        self,
        stream: str,
        events: Iterable[Event],
        *,
        wait: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 (the same API as the sync producer)
    ) -> list[str]:
        """Publish events in order, together; nothing is sent if any is invalid.

        Under backpressure, raises Backpressure at once, or with `timeout` (seconds) keeps
        trying the refused shards until then. With `wait`, returns only once every group
        of the stream has applied the events (NotYetApplied after `timeout`, 30 s if None).
        """
        if stream not in self._prep.packers:
            await self._load_shards(stream)
        self._check_open()
        prepared = self._prep.encode(stream, events)
        if not prepared:
            return []
        if not wait and timeout is None:
            return await self._submit(self._request(stream, prepared))
        loop = asyncio.get_running_loop()
        started = loop.time()
        ids = await self._publish_until(stream, prepared, started + (timeout or 0.0))
        if wait:
            limit = DEFAULT_TIMEOUT if timeout is None else timeout
            left = max(0.0, started + limit - loop.time())
            await self.wait_applied(self._prep.receipts(stream, prepared, ids), timeout=left)
        return ids

    async def _publish_until(
        self, stream: str, prepared: list[Prepared], deadline: float
    ) -> list[str]:
        """Publish, and publish the shards refused under backpressure again until `deadline`."""
        ids = [""] * len(prepared)
        todo = list(range(len(prepared)))
        pause = FIRST_RETRY
        loop = asyncio.get_running_loop()
        while True:
            self._check_open()
            try:
                got = await self._submit(self._request(stream, [prepared[i] for i in todo]))
            except Backpressure as refused:
                got = refused.ids
                for i, entry in zip(todo, got, strict=True):
                    ids[i] = entry
                todo = [i for i in todo if not ids[i]]
                left = deadline - loop.time()
                if left <= 0:
                    raise Backpressure(refused.what, refused.lag, refused.limit, ids) from None
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, LAST_RETRY)
                continue
            for i, entry in zip(todo, got, strict=True):
                ids[i] = entry
            return ids

    def receipt(self, stream: str, key: str, entry_id: str) -> Receipt:
        """The receipt of an event of `key` published on `stream` as `entry_id`."""
        return Receipt.of(stream, self._prep.shards[stream], key, entry_id)

    async def wait_applied(
        self,
        receipts: Receipt | Sequence[Receipt],
        groups: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (the same API as the sync producer)
    ) -> None:
        """Return once every group of the stream (or the named ones) applied the receipts'
        entries; NotYetApplied after `timeout` seconds (the events stay published)."""
        if isinstance(receipts, Receipt):
            receipts = [receipts]
        if not groups and receipts:
            groups = configured_groups(self._prep.config, receipts[0].stream)
        await wait_applied_async(self._client, self._prep.keys, receipts, groups, timeout)

    def _request(self, stream: str, prepared: list[Prepared]) -> _Request:
        """A pending publish of validated events (the sender starts with the first)."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._run(), name="streamsink-producer")
        return stream, prepared, loop.create_future()

    def _submit(self, request: _Request) -> Awaitable[list[str]]:
        """Send at once from the caller when idle; else queue, waiting for room if full."""
        if self._pending or self._busy or self._inflight or self._gathers:
            if len(self._pending) >= self._settings.queue_size:
                return self._wait_for_room(request)
            self._enqueue(request)
            return request[2]
        return self._send_inline(request)  # spares the hop through the sender task

    async def _send_inline(self, request: _Request) -> list[str]:
        try:
            await self._send([request])
        except BaseException:
            future = request[2]  # settled by _send for nobody but this caller, who gets
            if future.done() and not future.cancelled():  # the exception raised here:
                future.exception()  # retrieved, so asyncio does not report it as lost
            raise
        return request[2].result()

    async def _wait_for_room(self, request: _Request) -> list[str]:
        while len(self._pending) >= self._settings.queue_size:
            self._room.clear()
            await self._room.wait()  # a publish that began before close() is still sent
            if self._failure is not None:
                self._check_open()
        self._enqueue(request)
        return await request[2]

    def _enqueue(self, request: _Request) -> None:
        self._pending.append(request)
        self._pending_events += len(request[1])
        if self._pending_events >= self._settings.max_batch:
            self._full.set()
        self._wakeup.set()

    async def _load_shards(self, stream: str) -> Callable[[Event], Prepared]:
        """Read the stream's shard count once, however many publishers ask at the same time;
        return the stream's packer."""
        lookup = self._lookups.get(stream)
        if lookup is None:
            lookup = asyncio.ensure_future(shard_count_async(self._client, self._prep.keys, stream))
            self._lookups[stream] = lookup
            lookup.add_done_callback(lambda done: self._forget_lookup(stream, done))
        try:
            shards = await asyncio.shield(lookup)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise PublishError(_UNREACHABLE.format(exc)) from exc
        pack = self._prep.packers.get(stream)
        if pack is None:  # the first of the publishers that waited for the lookup
            self._prep.check_shards(stream, shards)
            pack = self._prep.packers[stream]
        return pack

    def _forget_lookup(self, stream: str, lookup: asyncio.Future[Any]) -> None:
        """A finished lookup is not reused: its failure belongs to those who waited for it."""
        if self._lookups.get(stream) is lookup:
            del self._lookups[stream]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: no "never retrieved" warning if nobody waited

    def _check_open(self) -> None:
        if self._failure is not None:
            raise ProducerClosed(f"the producer stopped after an error: {self._failure!r}")
        if self._closing:
            raise ProducerClosed("this producer is closed")

    async def _run(self) -> None:
        """The sender: write batches without waiting for the replies of earlier ones.

        Up to `max_in_flight` batches are in flight on the one connection; the reply
        reader settles them in order (Redis answers in order), so Python prepares the
        next batch while Redis runs the last, and per-key order holds.
        """
        replies = asyncio.get_running_loop().create_task(self._read_replies())
        try:
            while self._pending or self._busy or self._inflight or not self._closing:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self._settings.max_wait > 0 and not self._closing and not self._full.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self._settings.max_wait)
                    if cancelling():  # a cancel landing as the wait timed out: stop anyway
                        raise asyncio.CancelledError
                while (
                    self._pending
                    and not self._busy
                    and len(self._inflight) < self._settings.max_in_flight
                ):
                    await self._dispatch(self._take())
        except BaseException as exc:
            self._failure = exc
            self._fail_pending(ProducerClosed(f"the producer stopped: {exc!r}"))
            raise
        finally:
            replies.cancel()
            await asyncio.gather(replies, return_exceptions=True)
            if self._inflight:
                await self._drop_connection(_stopped())

    def _take(self) -> list[_Request]:
        pending, most = self._pending, self._settings.max_batch
        if self._pending_events == len(pending):  # one event each (publish): slice
            batch, count = pending[:most], min(most, len(pending))
        else:
            batch, count = [], 0
            while len(batch) < len(pending) and (not batch or count < most):
                batch.append(pending[len(batch)])
                count += len(batch[-1][1])
        del pending[: len(batch)]
        self._room.set()
        self._pending_events -= count
        if self._pending_events < self._settings.max_batch:
            self._full.clear()
        return batch

    async def _dispatch(self, batch: list[_Request]) -> None:
        """Write a batch and hand it to the reply reader."""
        commands = self._prep.commands(batch)
        self._busy = True
        try:
            plan = await self._write(commands)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await self._drop_connection(PublishError(_LOST.format(exc)))
            for _, _, future in batch:
                _settle(future, PublishError(_LOST.format(exc)))
            return
        except BaseException:
            await self._drop_connection(_stopped())
            for _, _, future in batch:
                _settle(future, _stopped())
            raise
        finally:
            self._busy = False
        assert self._links is not None
        self._inflight.append(_InFlight(batch, plan, self._links))
        self._replied.set()

    async def _read_replies(self) -> None:
        """Settle in-flight batches in order as their replies arrive."""
        while True:
            while not self._inflight:
                self._replied.clear()
                await self._replied.wait()
            sent = self._inflight[0]
            results = [""] * sum(len(c.slots) for _, commands in sent.plan for c in commands)
            errors: dict[int, Exception] = {}
            try:
                await self._read(sent.plan, results, errors)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                await self._drop_connection(PublishError(_LOST.format(exc)), sent.links)
                self._wakeup.set()  # the sender may wait for room in flight: there is some now
                continue
            if self._inflight and self._inflight[0] is sent:
                self._inflight.popleft()
            _settle_all(sent.batch, results, errors)
            self._wakeup.set()

    async def _send(self, batch: list[_Request]) -> None:
        """One round trip for `batch` from the caller (`_busy` keeps the sender out)."""
        self._busy = True
        try:
            await self._send_batch(batch)
        finally:
            self._busy = False
            if self._pending or self._closing:
                self._wakeup.set()

    async def _send_batch(self, batch: list[_Request]) -> None:
        """Nothing else is in flight (`_busy`, nothing in `_inflight`), so the calls name the
        script by its SHA1 and a call Redis refuses with NOSCRIPT goes again as text, with
        nothing of its shard sent in between (`streams.publish`)."""
        commands = self._prep.commands(batch, by_sha=True)
        results = [""] * sum(len(command.slots) for command in commands)
        errors: dict[int, Exception] = {}
        try:
            unknown: list[Command] = []
            await self._read(await self._write(commands), results, errors, unknown)
            if unknown:  # Redis lost its scripts: those calls wrote nothing
                for command in unknown:
                    command.by_text()
                await self._read(await self._write(unknown), results, errors)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await self._drop_connection()
            errors = dict.fromkeys(range(len(results)), PublishError(_LOST.format(exc)))
        except BaseException:
            await self._drop_connection()
            for _, _, future in batch:
                _settle(future, _stopped())
            raise
        _settle_all(batch, results, errors)

    async def _write(self, commands: list[Command]) -> Plan:
        """Send the commands, each to the server of its shard; where they went."""
        if self._stale and self._links is not None and not self._inflight:
            links, self._links = self._links, None  # every reply read: reconnect by the map
            await links.close(drop=False)
        if self._links is None:
            links = AsyncLinks(self._client)
            await links.open(refresh=self._stale)
            self._links, self._stale = links, False
        by_conn: dict[Connection, list[Command]] = {}
        for command in commands:
            by_conn.setdefault(await self._links.connection(command.key), []).append(command)
        for conn, some in by_conn.items():
            packed = [hiredis.pack_command(tuple(c.args)) for c in some]  # type: ignore[arg-type]
            await conn.send_packed_command(packed, check_health=False)
        return list(by_conn.items())

    async def _read(
        self,
        plan: Plan,
        results: list[str],
        errors: dict[int, Exception],
        unknown: list[Command] | None = None,
    ) -> None:
        """Read each command's reply into `results` (or `errors`), by slot; with `unknown`,
        the commands Redis refused with NOSCRIPT go there instead."""
        for conn, commands in plan:
            for command in commands:
                try:
                    reply = await conn.read_response()
                except ResponseError as exc:
                    if unknown is not None and isinstance(exc, NoScriptError):
                        unknown.append(command)  # it ran nothing
                        continue
                    refused: Exception | None = refusal(exc)  # then the script wrote nothing
                    if refused is None:
                        if isinstance(exc, REDIRECTED):
                            self._stale = True  # the next connections follow the new map
                        refused = PublishError(f"Redis refused the publish: {exc}")
                    errors.update(dict.fromkeys(command.slots, refused))
                    continue
                for slot, entry in zip(command.slots, command.entry_ids(reply), strict=True):
                    results[slot] = entry

    async def _drop_connection(
        self, error: Exception | None = None, links: AsyncLinks | None = None
    ) -> None:
        """Close the connections (or only `links`, if still current); fail what was in
        flight on them: their replies are lost with them."""
        if links is not None and links is not self._links:
            return
        dropped, self._links = self._links, None
        lost = [sent for sent in self._inflight if sent.links is dropped]
        self._inflight = deque(sent for sent in self._inflight if sent.links is not dropped)
        for sent in lost:
            for _, _, future in sent.batch:
                _settle(future, error or _stopped())
        if dropped is not None:
            if error is not None:
                self._stale = True  # a node may be gone: read a cluster's slot map again
            await dropped.close(drop=True)

    def _fail_pending(self, error: Exception) -> None:
        for _, _, future in self._pending:
            _settle(future, error)
        self._pending.clear()
        self._room.set()
        self._pending_events = 0

    async def close(self, grace: float | None = 10.0) -> None:
        """Send what is pending (waiting at most `grace` seconds), then stop.

        Publishes still pending when the time is up fail with ProducerClosed.
        The Redis client belongs to the caller and stays open.
        """
        self._closing = True
        self._wakeup.set()
        self._full.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), grace)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if self._busy:  # a caller's inline send still waits for Redis: cut it off
                    await self._drop_connection()
            except Exception:  # the failure already reached every pending publish
                pass
        self._fail_pending(ProducerClosed("the producer closed before this publish was sent"))
        if self._links is not None:
            links, self._links = self._links, None
            await links.close(drop=False)

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _settle(future: asyncio.Future[list[str]], error: Exception) -> None:
    """Fail a publish unless its caller gave up waiting (cancelled it)."""
    if not future.done():
        future.set_exception(_own(error))


def _own(error: Exception) -> Exception:
    """A copy of `error` for one caller: the same failure often settles many publishes,
    and one instance raised in each of their tasks would gather all their tracebacks."""
    try:
        copy = type(error)(*error.args)
    except TypeError:  # a constructor of its own (not one of the errors settled here)
        return error
    copy.__cause__ = error.__cause__
    copy.__suppress_context__ = error.__suppress_context__
    return copy


def _settle_all(batch: list[_Request], results: list[str], errors: dict[int, Exception]) -> None:
    """Resolve each publish of `batch` with its entry IDs, or with the error of the first of
    its events that failed (results and errors by slot: the batch's events in order)."""
    start = 0
    for _, prepared, future in batch:
        end = start + len(prepared)
        if not future.done():  # else its caller gave up waiting (cancelled it)
            error = _first_error(errors, start, end) if errors else None
            if error is None:
                future.set_result(results[start:end])
            elif isinstance(error, Backpressure):  # with what the other shards took
                future.set_exception(
                    Backpressure(error.what, error.lag, error.limit, results[start:end])
                )
            else:
                future.set_exception(_own(error))
        start = end


def _first_error(errors: dict[int, Exception], start: int, end: int) -> Exception | None:
    return next((errors[slot] for slot in range(start, end) if slot in errors), None)
