"""The HTTP callback sink: `call` events to endpoints, rate-limited, signed, retried, vetted."""

from streamsink.sinks.http.settings import EndpointSettings, HttpSettings
from streamsink.sinks.http.signing import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    signature,
)
from streamsink.sinks.http.sink import HttpSink
from streamsink.sinks.http.transport import AiohttpTransport, Reply, Transport
from streamsink.sinks.http.urls import Vetter

__all__ = [
    "IDEMPOTENCY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AiohttpTransport",
    "EndpointSettings",
    "HttpSettings",
    "HttpSink",
    "Reply",
    "Transport",
    "Vetter",
    "signature",
]
