"""What the workers of an HTTP sink share of each endpoint, in Redis.

- Counters and breaker states for `status`: every worker adds its counts to one hash per
  sink (HINCRBY, so workers add up) and writes its breaker changes there; the last change
  of any worker is what `status` shows.
- The callbacks delivered of a window not yet acknowledged (`DeliveredMarks`), so that a
  new owner of the shard sends again only what was in flight when its owner died.
- The gate (`EndpointGates`): each endpoint's circuit breaker and Retry-After hold, one
  hash per endpoint changed by small scripts on Redis' clock, so one worker's discovery
  (the endpoint is down, or asked for a pause) holds every worker's calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from streamsink.schemas.wire import parse_id
from streamsink.streams.connection import AsyncClient, SyncClient
from streamsink.streams.keys import Keys
from streamsink.streams.retry import describe
from streamsink.streams.scripts import lua

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
        self._flushed = time.monotonic()

    def due(self, seconds: float) -> bool:
        """Whether to `flush` now: the last flush is `seconds` old or a breaker changed (so
        counts and states show while a window is in flight)."""
        return bool(self._breakers) or time.monotonic() - self._flushed >= seconds

    def count(self, endpoint: str, counter: str, n: int = 1) -> None:
        """Add `n` to one of COUNTERS of `endpoint`."""
        self._counts[f"{endpoint}|{counter}"] += n

    def breaker(self, endpoint: str, state: str) -> None:
        """Record that the breaker of `endpoint` is now in `state`."""
        self._breakers[f"{endpoint}|{BREAKER}"] = f"{state} {int(time.time() * 1000)} {self._me}"

    async def flush(self) -> None:
        """Add what was counted since the last flush; kept for the next one if Redis fails."""
        counts, breakers = self._counts, self._breakers
        self._flushed = time.monotonic()
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
                log.warning("endpoint stats not saved", extra={"error": describe(exc)})
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


@dataclass(frozen=True, slots=True)
class Passage:
    """The gate's answer: `what` (see `EndpointGates.ask`), seconds to wait, and the
    breaker's failures in a row and last failure (for the log line of a hold)."""

    what: str
    wait_s: float
    failures: int
    last: str

    @property
    def goes(self) -> bool:
        """Whether the request may be sent now."""
        return self.what in ("closed", "probe")


class EndpointGates:
    """The shared gate of each endpoint of one HTTP sink: breaker and Retry-After hold.

    Endpoints are named by a digest of their name (a key stays short whatever the URL).
    """

    def __init__(self, client: AsyncClient, keys: Keys, sink: str) -> None:
        self._keys, self._sink = keys, sink
        self._ask = client.register_script(lua("endpoints.now", "endpoints.ask").text)
        self._succeeded = client.register_script(lua("endpoints.succeeded").text)
        self._failed = client.register_script(lua("endpoints.now", "endpoints.failed").text)
        self._hold = client.register_script(lua("endpoints.now", "endpoints.hold").text)
        self._client = client

    def _key(self, endpoint: str) -> str:
        return self._keys.http_gate(self._sink, endpoint)

    async def ask(self, endpoint: str, probe_s: float) -> Passage:
        """May a request go? `closed`: yes; `probe`: yes, as the half-open breaker's one
        probe (out for at most `probe_s`); `hold`, `open`, `half-open`: wait."""
        reply: Any = await self._ask([self._key(endpoint)], [_us(probe_s)])
        what, wait, failures, last = reply
        text = last.decode("utf-8", "replace") if isinstance(last, bytes) else str(last)
        name = what.decode() if isinstance(what, bytes) else str(what)
        return Passage(name, int(wait) / 1_000_000, int(failures), text)

    async def succeeded(self, endpoint: str) -> bool:
        """A request got an answer that shows the endpoint works; True if that closed it."""
        return bool(await self._succeeded([self._key(endpoint)]))

    async def failed(
        self, endpoint: str, failures: int, cooldown_s: float, what: str, probe: bool
    ) -> tuple[bool, bool]:
        """A request failed (error, timeout, 5xx): (whether this opened the breaker, whether
        it is open now). `failures` in a row open it; a failed probe opens it again."""
        args: list[int | str] = [failures, _us(cooldown_s), what[:300], int(probe)]
        opened, is_open = await self._failed([self._key(endpoint)], args)
        return bool(opened), bool(is_open)

    async def probe_over(self, endpoint: str) -> None:
        """The probe ended telling nothing of the endpoint: another may go."""
        await self._client.hdel(self._key(endpoint), "probe")

    async def hold(self, endpoint: str, seconds: float) -> None:
        """Send nothing to `endpoint` for `seconds`, from any worker (a Retry-After)."""
        await self._hold([self._key(endpoint)], [_us(seconds)])


def _us(seconds: float) -> int:
    return max(0, int(seconds * 1_000_000))


MARKS_EVERY_S = 0.01
"""Delivered marks are written at most this often (one SADD for all made meanwhile)."""


class DeliveredMarks:
    """The entries of one shard whose callbacks one sink delivered, kept until acknowledged.

    `start(first_id)` at each window: the marks below it are of acknowledged (or
    dead-lettered) windows and are removed; those left were delivered by an owner that
    died before its acknowledgement, and are skipped. `add` marks as deliveries succeed:
    one write at a time, at most every MARKS_EVERY_S, so a success costs no round trip of
    its own (a crash repeats the deliveries of that last moment too); `drain` waits for
    the last.
    """

    def __init__(self, client: AsyncClient, key: str) -> None:
        self._client, self._key = client, key
        self._pending: list[str] = []
        self._writing: asyncio.Task[None] | None = None

    async def start(self, first_id: str) -> set[str]:
        """The entries already delivered, after dropping the marks below `first_id`."""
        members: Any = await self._client.smembers(self._key)
        marked = {m.decode() if isinstance(m, bytes) else str(m) for m in members}
        first = parse_id(first_id)
        done = [m for m in marked if parse_id(m) < first]
        if done:
            await self._client.srem(self._key, *done)
        return marked.difference(done)

    def add(self, entry_ids: tuple[str, ...]) -> None:
        """Mark entries as delivered (written in the background, in order)."""
        self._pending.extend(entry_ids)
        if self._writing is None or self._writing.done():
            self._writing = asyncio.ensure_future(self._write())

    async def drain(self) -> None:
        """Wait until every mark added was written (or given up on)."""
        if self._writing is not None:
            await self._writing
            self._writing = None

    async def _write(self) -> None:
        while self._pending:
            await asyncio.sleep(MARKS_EVERY_S)  # the marks made meanwhile go in one write
            ids, self._pending = self._pending, []
            try:
                await self._client.sadd(self._key, *ids)
            except (redis.RedisError, OSError) as exc:  # a crash now repeats them: allowed
                log.warning("delivered callbacks not marked", extra={"error": describe(exc)})
