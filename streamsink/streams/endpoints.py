"""Per-endpoint counters and breaker states of an HTTP sink, kept in Redis for `status`.

Every worker adds its counts to one hash per sink (HINCRBY, so workers add up) and
writes its breaker changes there; the last change of any worker is what `status` shows.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass

import redis

from streamsink.streams.connection import AsyncClient, SyncClient
from streamsink.streams.keys import Keys

COUNTERS = ("sent", "failed", "retried", "dead")
"""sent: callbacks delivered (2xx); failed: attempts that failed; retried: attempts
scheduled again; dead: callbacks dead-lettered."""

BREAKER = "breaker"

log = logging.getLogger("streamsink.http")


class EndpointStats:
    """Counts kept in memory by one sink and added to Redis at each `flush`."""

    def __init__(self, client: AsyncClient, keys: Keys, sink: str) -> None:
        self._client = client
        self._key = keys.http_endpoints(sink)
        self._counts: Counter[str] = Counter()
        self._breakers: dict[str, str] = {}
        self._me = f"{socket.gethostname()}-{os.getpid()}"

    def count(self, endpoint: str, counter: str, n: int = 1) -> None:
        """Add `n` to one of COUNTERS of `endpoint`."""
        self._counts[f"{endpoint}|{counter}"] += n

    def breaker(self, endpoint: str, state: str) -> None:
        """Record that the breaker of `endpoint` is now in `state`."""
        self._breakers[f"{endpoint}|{BREAKER}"] = f"{state} {int(time.time() * 1000)} {self._me}"

    async def flush(self) -> None:
        """Add what was counted since the last flush; kept for the next one if Redis fails."""
        counts, breakers = self._counts, self._breakers
        if not counts and not breakers:
            return
        self._counts, self._breakers = Counter(), {}
        async with self._client.pipeline(
            transaction=False
        ) as pipe:  # reset on exit: never left holding a connection
            for field, n in counts.items():
                pipe.hincrby(self._key, field, n)
            if breakers:
                pipe.hset(self._key, mapping=breakers)  # type: ignore[arg-type]
            try:
                await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                log.warning("endpoint stats not saved", extra={"error": repr(exc)})
                self._counts.update(counts)
                self._breakers = {**breakers, **self._breakers}


@dataclass(frozen=True, slots=True)
class EndpointRow:
    """What `status` shows of one endpoint of an HTTP sink."""

    endpoint: str
    sent: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0
    breaker: str = "closed"
    breaker_since_ms: int = 0
    breaker_by: str = ""


def endpoint_rows(client: SyncClient, keys: Keys, sink: str) -> list[EndpointRow]:
    """Every endpoint an HTTP sink has seen, by name, with its counts and breaker state."""
    raw: dict[bytes, bytes] = client.hgetall(keys.http_endpoints(sink))  # type: ignore[assignment]
    fields: dict[str, dict[str, str]] = {}
    for name, value in raw.items():
        endpoint, _, what = name.decode("utf-8", "replace").rpartition("|")
        fields.setdefault(endpoint, {})[what] = value.decode("utf-8", "replace")
    rows = []
    for endpoint, values in sorted(fields.items()):
        state, since, by = [*values.get(BREAKER, "").split(" ", 2), "", "", ""][:3]
        counts = {counter: int(values.get(counter, 0)) for counter in COUNTERS}
        rows.append(
            EndpointRow(
                endpoint,
                **counts,
                breaker=state or "closed",
                breaker_since_ms=int(since or 0),
                breaker_by=by,
            )
        )
    return rows
