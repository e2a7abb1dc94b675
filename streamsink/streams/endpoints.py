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


_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
"""

# KEYS: gate hash. ARGV: how long a probe may be out (µs). Returns {what, µs to wait,
# failures in a row, last failure}: what is `hold` (a Retry-After runs), `open` (cool-down),
# `half-open` (another's probe is out), `probe` (this request is the probe) or `closed`.
_ASK = (
    _NOW
    + """
local g = redis.call('HMGET', KEYS[1], 'hold', 'until', 'probe', 'failures', 'last')
local hold, till, probe = tonumber(g[1]), tonumber(g[2]), tonumber(g[3])
local failures, last = tonumber(g[4]) or 0, g[5] or ''
if hold and hold > now then return {'hold', hold - now, failures, last} end
if not till then return {'closed', 0, failures, last} end
if now < till then return {'open', till - now, failures, last} end
if probe and probe > now then return {'half-open', probe - now, failures, last} end
redis.call('HSET', KEYS[1], 'probe', now + tonumber(ARGV[1]))
return {'probe', 0, failures, last}
"""
)

# KEYS: gate hash. A request succeeded: the breaker closes. Returns 1 if it was open.
_SUCCEEDED = """
local was = redis.call('HEXISTS', KEYS[1], 'until')
redis.call('HDEL', KEYS[1], 'until', 'probe', 'failures', 'last')
return was
"""

# KEYS: gate hash. ARGV: failures that open it, cool-down µs, the failure, 1 if it was the
# probe. Returns {1 if this failure opened it (again), 1 if it is open (or half-open)}.
_FAILED = (
    _NOW
    + """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'last', ARGV[3])
local till = redis.call('HGET', KEYS[1], 'until')
local opened = 0
if (till and ARGV[4] == '1') or (not till and failures >= tonumber(ARGV[1])) then
  redis.call('HSET', KEYS[1], 'until', now + tonumber(ARGV[2]))
  redis.call('HDEL', KEYS[1], 'probe')
  opened = 1
end
redis.call('PEXPIRE', KEYS[1], 86400000)
return {opened, (till or opened == 1) and 1 or 0}
"""
)

# KEYS: gate hash. ARGV: µs from now. Nothing is sent before then (a Retry-After).
_HOLD = (
    _NOW
    + """
local hold = now + tonumber(ARGV[1])
local held = tonumber(redis.call('HGET', KEYS[1], 'hold'))
if held == nil or held < hold then redis.call('HSET', KEYS[1], 'hold', hold) end
redis.call('PEXPIRE', KEYS[1], 86400000)
return 0
"""
)


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
        self._ask = client.register_script(_ASK)
        self._succeeded = client.register_script(_SUCCEEDED)
        self._failed = client.register_script(_FAILED)
        self._hold = client.register_script(_HOLD)
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
                log.warning("delivered callbacks not marked", extra={"error": repr(exc)})
