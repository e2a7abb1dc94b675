"""Every error streamsink raises, in one tree.

    StreamsinkError
    ├── ConfigError            a config file or declaration is wrong; fix it and restart
    ├── EventError             one event is bad; it was not published (or was dead-lettered)
    │   ├── DecodeError        the bytes of a stream entry are not a valid event
    │   ├── ValidationError    a well-formed event does not fit its table
    │   └── PayloadTooLarge    the encoded data exceeds the configured limit
    ├── StreamError            a stream is missing or declared differently in Redis
    │   ├── StreamNotFound     create it first (`streamsink streams create`)
    │   ├── GroupNotFound      no shard of the stream knows the consumer group
    │   ├── ShardCountMismatch the shard count recorded in Redis differs from the one given
    │   └── RedisDataLost      Redis holds less than a sink committed (restarted without
    │                          persistence, restored from an older backup, keys deleted): the
    │                          group stops; `streamsink offsets reset` lines them up again
    ├── SinkError              a sink failed to write a window (any other exception from a
    │   │                      sink is a bug: tried `max_attempts` times, then isolated)
    │   ├── Fenced             a newer owner holds the shard: this worker stops it
    │   ├── SinkUnavailable    transient (connection lost, timeout, deadlock): retried with
    │   │                      backoff as long as it takes, lease kept, nothing acknowledged
    │   └── SinkMisconfigured  the sink's target is wrong (missing table or column, permission,
    │                          credentials, no such database): the group stops until fixed
    ├── PublishError           Redis failed mid-publish; the events may or may not be in the
    │                          stream, so retry only events that carry an idempotency id
    ├── Backpressure           a shard is over its stream's `max_lag` (or Redis over its
    │                          memory ceiling): nothing of the refused shards was published;
    │                          slow down, or publish with a timeout to wait for room
    ├── NotYetApplied          wait-until-applied timed out: the event IS published and will
    │                          be applied; only the wait is over (do not publish it again)
    └── ProducerClosed         publish after close(), or pending when close() gave up

EventError names the field at fault and the reason, so a dead-letter entry or a
log line says exactly what to fix.
"""

from __future__ import annotations


class StreamsinkError(Exception):
    """Base of every streamsink error."""


class ConfigError(StreamsinkError):
    """A config file, table declaration or setting is invalid."""


class EventError(StreamsinkError):
    """One event is bad: `field` names where, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class DecodeError(EventError):
    """The fields of a stream entry do not decode to an event."""


class ValidationError(EventError):
    """The event does not fit the declaration of its table."""


class PayloadTooLarge(EventError):
    """The encoded data of an event exceeds the configured maximum."""


class StreamError(StreamsinkError):
    """A stream is not as expected in Redis."""


class StreamNotFound(StreamError):
    """The stream has not been created (its shard count is not recorded in Redis)."""


class GroupNotFound(StreamError):
    """No shard of the stream has the consumer group (nor dead letters of it)."""


class ShardCountMismatch(StreamError):
    """The stream exists in Redis with another shard count."""


class RedisDataLost(StreamError):
    """Redis no longer holds what the group's sinks committed: its stream, consumer group
    or lease epochs are behind the offsets stored with the data. The group stops; an
    operator runs `streamsink offsets reset` (README, "Recovery"), then restarts it."""


class PublishError(StreamsinkError):
    """Redis failed while publishing; the outcome of the events is unknown."""


class Backpressure(StreamsinkError):
    """A shard's lag (or Redis' memory) is over its limit: the publish was refused.

    `what` is "lag" (entries the slowest group has not committed) or "memory" (bytes);
    `lag` the value measured, `limit` the configured limit. `ids` has, per event of the
    refused publish, its entry ID if its shard took it, or "" if it was not published
    (only those are to be published again).
    """

    def __init__(self, what: str, lag: int, limit: int, ids: list[str] | None = None) -> None:
        unit = "entries not yet committed" if what == "lag" else "bytes of Redis memory used"
        super().__init__(
            f"backpressure: {lag} {unit}, limit {limit}; nothing of the refused shards was "
            "published: slow down, or publish with a timeout to wait for room"
        )
        self.what = what
        self.lag = lag
        self.limit = limit
        self.ids = ids or []


class NotYetApplied(StreamsinkError):
    """Waiting until an event is applied timed out. The event is published and will be
    applied when the groups catch up; publishing it again would apply it twice."""


class ProducerClosed(StreamsinkError):
    """The producer is closed, or closed before this publish could be sent."""


class SinkError(StreamsinkError):
    """A sink could not write a window; the worker retries it, keeping its lease."""


class SinkUnavailable(SinkError):
    """The sink's service is away for now (connection lost, timeout, deadlock, restarting):
    the worker retries the window with backoff for as long as it takes, keeping its lease."""


class SinkMisconfigured(SinkError):
    """The sink cannot work until an operator fixes something (a missing table or column,
    a permission, credentials, a database that does not exist): the group stops, nothing
    is acknowledged or dead-lettered, and the message names the fix."""


class Fenced(SinkError):
    """A newer owner of the shard has claimed its offset: this worker lost the shard
    (its lease expired while it was paused or cut off) and must not commit for it."""
