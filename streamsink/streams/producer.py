"""The synchronous producer: validate, then publish one event or many in one round trip."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import redis

from streamsink.errors import ProducerClosed, PublishError
from streamsink.schemas.config import Config
from streamsink.schemas.event import Event
from streamsink.streams.keys import META_SHARDS
from streamsink.streams.publish import Preparer, ProducerSettings

_UNREACHABLE = "cannot reach Redis ({}); nothing was published, so publishing again is safe"


class Producer:
    """Publishes events from synchronous code.

    Never retries on its own: a failed round trip raises PublishError and the caller
    decides; events with an `id` are safe to publish again. The client's own retry
    policy is bypassed for the same reason (a retried XADD would publish twice).
    """

    def __init__(
        self,
        client: redis.Redis,
        config: Config | None = None,
        settings: ProducerSettings | None = None,
    ) -> None:
        self._client = client
        self._prep = Preparer(config or Config(), settings or ProducerSettings())
        self._closed = False

    def publish(self, stream: str, event: Event) -> str:
        """Publish one event; return its entry ID."""
        return self.publish_many(stream, (event,))[0]

    def publish_many(self, stream: str, events: Iterable[Event]) -> list[str]:
        """Publish events in order in one round trip; nothing is sent if any is invalid."""
        if self._closed:
            raise ProducerClosed("this producer is closed")
        if stream not in self._prep.shards:
            try:
                recorded = self._client.hget(self._prep.keys.meta(stream), META_SHARDS)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise PublishError(_UNREACHABLE.format(exc)) from exc
            self._prep.check_shards(stream, recorded)
        prepared = self._prep.encode(stream, events)
        if not prepared:
            return []
        commands = self._prep.commands([(stream, prepared, None)])
        replies = self._send([c.args for c in commands])
        ids: list[str] = [""] * len(prepared)
        for command, reply in zip(commands, replies, strict=True):
            for slot, entry in zip(command.slots, command.entry_ids(reply), strict=True):
                ids[slot] = entry
        return ids

    def _send(self, commands: list[list[Any]]) -> list[list[bytes | str]]:
        pool = self._client.connection_pool
        try:
            conn = pool.get_connection()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise PublishError(_UNREACHABLE.format(exc)) from exc
        try:
            packed = conn.pack_commands(commands)  # type: ignore[no-untyped-call]
            conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
            replies: list[Any] = []
            failure: redis.ResponseError | None = None
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    failure = failure or exc
            if failure is not None:
                raise PublishError(
                    f"Redis refused part of the publish ({failure}); events of other shards "
                    "may be in the stream: publish again only events with an idempotency id"
                ) from failure
            return replies
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise PublishError(
                f"lost Redis while publishing ({exc}); the events may or may not be in the "
                "stream: publish again only events that carry an idempotency id"
            ) from exc
        except PublishError:
            raise
        except BaseException:  # interrupted mid-read: unread replies must not reach others
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            pool.release(conn)

    def close(self) -> None:
        """Refuse further publishes (the client belongs to the caller and stays open)."""
        self._closed = True

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
