"""Everything that talks to Redis: keys, streams, producers, the shard reader, leases, limits."""

from streamsink.streams.admin import StreamInfo, create_stream, list_streams, stream_info
from streamsink.streams.aio import AsyncProducer
from streamsink.streams.connection import connect, connect_async
from streamsink.streams.keys import Keys
from streamsink.streams.producer import Producer
from streamsink.streams.publish import ProducerSettings
from streamsink.streams.ratelimit import Admission, AsyncRateLimiter, RateLimiter
from streamsink.streams.rows import Rows

__all__ = [
    "Admission",
    "AsyncProducer",
    "AsyncRateLimiter",
    "Keys",
    "Producer",
    "ProducerSettings",
    "RateLimiter",
    "Rows",
    "StreamInfo",
    "connect",
    "connect_async",
    "create_stream",
    "list_streams",
    "stream_info",
]
