"""streamsink: a write-behind stream processor from Redis Streams to PostgreSQL and HTTP."""

from streamsink.errors import (
    Backpressure,
    ConfigError,
    DecodeError,
    EventError,
    NotYetApplied,
    PayloadTooLarge,
    ProducerClosed,
    PublishError,
    ShardCountMismatch,
    StreamError,
    StreamNotFound,
    StreamsinkError,
    ValidationError,
)
from streamsink.schemas import Column, ColumnType, Config, Event, Mode, Op, Policy, Table, load
from streamsink.streams import (
    Admission,
    AsyncProducer,
    AsyncRateLimiter,
    Keys,
    Producer,
    ProducerSettings,
    RateLimiter,
    Rows,
    create_stream,
)
from streamsink.streams.applied import Receipt

__version__ = "0.1.0"

__all__ = [
    "Admission",
    "AsyncProducer",
    "AsyncRateLimiter",
    "Backpressure",
    "Column",
    "ColumnType",
    "Config",
    "ConfigError",
    "DecodeError",
    "Event",
    "EventError",
    "Keys",
    "Mode",
    "NotYetApplied",
    "Op",
    "PayloadTooLarge",
    "Policy",
    "Producer",
    "ProducerClosed",
    "ProducerSettings",
    "PublishError",
    "RateLimiter",
    "Receipt",
    "Rows",
    "ShardCountMismatch",
    "StreamError",
    "StreamNotFound",
    "StreamsinkError",
    "Table",
    "ValidationError",
    "create_stream",
    "load",
]
