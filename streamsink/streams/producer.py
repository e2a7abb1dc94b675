"""The synchronous producer: validate, then publish one event or many in one round trip."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import hiredis
import redis
from redis.exceptions import NoScriptError

from streamsink.errors import Backpressure, ProducerClosed, PublishError
from streamsink.schemas.config import Config
from streamsink.schemas.event import Event
from streamsink.streams.applied import (
    DEFAULT_TIMEOUT,
    Receipt,
    configured_groups,
    wait_applied,
)
from streamsink.streams.connection import (
    REDIRECTED,
    SyncClient,
    refresh_sync,
    shard_count,
    sync_pool,
)
from streamsink.streams.publish import (
    FIRST_RETRY,
    LAST_RETRY,
    Command,
    Prepared,
    Preparer,
    ProducerSettings,
    refusal,
)

_NOSCRIPT = object()
"""A call's reply when Redis did not know the script by its SHA1 (it ran nothing)."""

_UNREACHABLE = "cannot reach Redis ({}); nothing was published, so publishing again is safe"
_LOST = (
    "lost Redis while publishing ({}); the events may or may not be in the stream: "
    "publish again only events that carry an idempotency id"
)


class Producer:
    """Publishes events from synchronous code.

    Never retries on its own: a failed round trip raises PublishError and the caller
    decides; events with an `id` are safe to publish again. The client's own retry
    policy is bypassed for the same reason (a retried XADD would publish twice).
    """

    def __init__(
        self,
        client: SyncClient,
        config: Config | None = None,
        settings: ProducerSettings | None = None,
    ) -> None:
        self._client = client
        self._prep = Preparer(config or Config(), settings or ProducerSettings())
        self._closed = False

    def publish(
        self, stream: str, event: Event, *, wait: bool = False, timeout: float | None = None
    ) -> str:
        """Publish one event; return its entry ID (see `publish_many` for wait and timeout)."""
        return self.publish_many(stream, (event,), wait=wait, timeout=timeout)[0]

    def publish_many(
        self,
        stream: str,
        events: Iterable[Event],
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> list[str]:
        """Publish events in order in one round trip; nothing is sent if any is invalid.

        Under backpressure, raises Backpressure at once, or with `timeout` (seconds) keeps
        trying the refused shards until then. With `wait`, returns only once every group
        of the stream has applied the events (NotYetApplied after `timeout`, 30 s if None).
        """
        if self._closed:
            raise ProducerClosed("this producer is closed")
        if stream not in self._prep.shards:
            try:
                shards = shard_count(self._client, self._prep.keys, stream)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise PublishError(_UNREACHABLE.format(exc)) from exc
            self._prep.check_shards(stream, shards)
        prepared = self._prep.encode(stream, events)
        if not prepared:
            return []
        started = time.monotonic()
        ids = self._publish(stream, prepared, started + (timeout or 0.0))
        if wait:
            limit = DEFAULT_TIMEOUT if timeout is None else timeout
            left = max(0.0, started + limit - time.monotonic())
            receipts = self._prep.receipts(stream, prepared, ids)
            self.wait_applied(receipts, timeout=left)
        return ids

    def _publish(self, stream: str, prepared: list[Prepared], deadline: float) -> list[str]:
        """Send, and send the shards refused under backpressure again until `deadline`."""
        ids = [""] * len(prepared)
        todo = list(range(len(prepared)))
        pause = FIRST_RETRY
        while True:
            request = (stream, [prepared[i] for i in todo], None)
            commands = self._prep.commands([request], by_sha=True)  # one call a shard in flight
            replies = self._send(commands)
            unknown = [i for i, reply in enumerate(replies) if reply is _NOSCRIPT]
            if unknown:  # Redis lost its scripts: those calls wrote nothing, sent as text
                for i in unknown:
                    commands[i].by_text()
                again = self._send([commands[i] for i in unknown])
                for i, reply in zip(unknown, again, strict=True):
                    replies[i] = reply
            refused: Backpressure | None = None
            for command, reply in zip(commands, replies, strict=True):
                if isinstance(reply, Backpressure):
                    refused = reply
                    continue
                for slot, entry in zip(command.slots, command.entry_ids(reply), strict=True):
                    ids[todo[slot]] = entry
            if refused is None:
                return ids
            todo = [i for i in todo if not ids[i]]
            left = deadline - time.monotonic()
            if left <= 0:
                raise Backpressure(refused.what, refused.lag, refused.limit, ids)
            time.sleep(min(pause, left))
            pause = min(pause * 2, LAST_RETRY)

    def receipt(self, stream: str, key: str, entry_id: str) -> Receipt:
        """The receipt of an event of `key` published on `stream` as `entry_id`."""
        return Receipt.of(stream, self._prep.shards[stream], key, entry_id)

    def wait_applied(
        self,
        receipts: Receipt | Sequence[Receipt],
        groups: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Return once every group of the stream (or the named ones) applied the receipts'
        entries; NotYetApplied after `timeout` seconds (the events stay published)."""
        if isinstance(receipts, Receipt):
            receipts = [receipts]
        if not groups and receipts:
            groups = configured_groups(self._prep.config, receipts[0].stream)
        wait_applied(self._client, self._prep.keys, receipts, groups, timeout)

    def _send(self, commands: list[Command]) -> list[Any]:
        """Each command's reply, the Backpressure that refused it, or _NOSCRIPT (one
        pipelined round trip per server: a cluster's shards live on several)."""
        by_pool: dict[int, tuple[redis.ConnectionPool, list[int]]] = {}
        try:
            for i, command in enumerate(commands):
                pool = sync_pool(self._client, command.key)
                by_pool.setdefault(id(pool), (pool, []))[1].append(i)
        except (redis.RedisError, OSError) as exc:  # a cluster's slot map could not be read
            refresh_sync(self._client)
            raise PublishError(_UNREACHABLE.format(exc)) from exc
        replies: list[Any] = [None] * len(commands)
        failure: redis.ResponseError | None = None
        taken: list[tuple[redis.ConnectionPool, Any, list[int]]] = []
        try:
            for pool, indices in by_pool.values():  # every server's share goes out first ...
                try:
                    conn = pool.get_connection()
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    said = _LOST if taken else _UNREACHABLE  # earlier servers may have them
                    raise PublishError(said.format(exc)) from exc
                taken.append((pool, conn, indices))
                packed = [hiredis.pack_command(tuple(commands[i].args)) for i in indices]  # type: ignore[arg-type]
                conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
            for _, conn, indices in taken:  # ... then the replies are read: one wait in all
                for i in indices:
                    try:
                        replies[i] = conn.read_response()
                    except NoScriptError:
                        replies[i] = _NOSCRIPT
                    except redis.ResponseError as exc:
                        refused = refusal(exc)  # the script wrote nothing: the caller may retry
                        if refused is None:
                            failure = failure or exc
                        replies[i] = refused
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._drop(taken)
            raise PublishError(_LOST.format(exc)) from exc
        except PublishError:
            self._drop(taken)
            raise
        except BaseException:  # interrupted mid-read: unread replies must not reach others
            self._drop(taken)
            raise
        finally:
            for pool, conn, _ in taken:
                pool.release(conn)
        if failure is not None:
            if isinstance(failure, REDIRECTED):
                refresh_sync(self._client)
            raise PublishError(
                f"Redis refused part of the publish ({failure}); events of other shards "
                "may be in the stream: publish again only events with an idempotency id"
            ) from failure
        return replies

    def _drop(self, taken: list[tuple[redis.ConnectionPool, Any, list[int]]]) -> None:
        """Disconnect connections whose replies may be unread; read the slot map again."""
        for _, conn, _ in taken:
            conn.disconnect()
        refresh_sync(self._client)

    def close(self) -> None:
        """Refuse further publishes (the client belongs to the caller and stays open)."""
        self._closed = True

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
