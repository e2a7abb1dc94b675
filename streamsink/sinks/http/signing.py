"""What every callback request carries so that receivers can trust it and drop repeats.

    Idempotency-Key          <stream>:<shard>:<entry ID>; for a batch request
                             <stream>:<shard>:<first ID>..<last ID>, and each item of
                             its body carries its own key
    X-Streamsink-Timestamp   Unix time in seconds when the request was signed
    X-Streamsink-Signature   v1=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed by the secret>

A retried request keeps its idempotency key and body and is signed again (new timestamp).
"""

from __future__ import annotations

import hashlib
import hmac

IDEMPOTENCY_HEADER = "Idempotency-Key"
TIMESTAMP_HEADER = "X-Streamsink-Timestamp"
SIGNATURE_HEADER = "X-Streamsink-Signature"
SIGNATURE_VERSION = "v1"

RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        IDEMPOTENCY_HEADER.lower(),
    }
)
"""Headers a call may not set: the sink sets them, or they belong to the connection.
Any `X-Streamsink-*` header is the sink's too."""


def idempotency_key(stream: str, shard: int, entry_id: str) -> str:
    """The key of one callback: where its event sits, the same on every delivery."""
    return f"{stream}:{shard}:{entry_id}"


def batch_key(stream: str, shard: int, first_id: str, last_id: str) -> str:
    """The key of a batch request: the entry IDs of its first and last items."""
    return f"{stream}:{shard}:{first_id}..{last_id}"


class Signer:
    """Signs bodies with one secret: the keyed HMAC is made once and copied per request
    (cheaper than keying a new one each time)."""

    __slots__ = ("_keyed",)

    def __init__(self, secret: bytes) -> None:
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def sign(self, timestamp: int, body: bytes) -> str:
        """The value of the signature header for `body` signed at `timestamp`."""
        mac = self._keyed.copy()
        mac.update(b"%d." % timestamp)
        mac.update(body)
        return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The value of the signature header for `body` signed at `timestamp`."""
    return Signer(secret).sign(timestamp, body)


def header_refusal(headers: dict[str, str]) -> str | None:
    """Why a call's own headers cannot be sent, or None."""
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith("x-streamsink-"):
            return f"header {name!r} is set by the sink and may not be given by a call"
        if not name.isascii() or not all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in name):
            return f"header name {name!r} is not a valid HTTP token"
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            return f"header {name!r} has a line break or control character in its value"
    return None
