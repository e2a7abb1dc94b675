"""Delivering one request: vet, pass the endpoint's gate, wait for a permit, send, retry.

    2xx                         delivered
    connection error, timeout   retried (backoff, full jitter); counts for the breaker
    5xx, 408                    retried (backoff, full jitter); counts for the breaker
    429                         retried after Retry-After (seconds or HTTP date), else
                                backoff; every worker holds that endpoint as long
    other status (3xx, 4xx)     not retried: the request itself is wrong
    refused URL                 not sent at all

Before each attempt a request passes its endpoint's gate (breaker.py): while the breaker
is open or a Retry-After runs, it waits there. A request is given up (its callbacks
dead-lettered) only when it can never succeed (refused URL, a status not retried, a
Retry-After over `max_retry_after_s`) or after `max_attempts` attempts, the last one
failing while the breaker is closed: while the breaker is open its calls wait instead,
however many attempts they made. The reason has the last status and body excerpt (or
error) and the attempt count.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import random
import time
from collections import Counter
from datetime import UTC

from streamsink.sinks.base import Rejected
from streamsink.sinks.http.breaker import Breaker
from streamsink.sinks.http.plan import Request
from streamsink.sinks.http.settings import EndpointSettings
from streamsink.sinks.http.signing import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Signer,
)
from streamsink.sinks.http.transport import Reply, Transport
from streamsink.sinks.http.urls import Refused, Vetter
from streamsink.streams.endpoints import EndpointGates, EndpointStats
from streamsink.streams.ratelimit import AsyncRateLimiter, Permit, Rate
from streamsink.streams.retry import TRANSIENT, backoff_bound, describe, retrying

log = logging.getLogger("streamsink.http")


class DeliveredThenStopped(asyncio.CancelledError):
    """The delivering task was cancelled, but its request on the wire was delivered (2xx):
    a cancellation still, which the sink catches on the way to mark the call delivered."""


async def _ended(sending: asyncio.Future[Reply]) -> Reply | None:
    """The reply of a request already sent, once it ends; None if it failed."""
    try:
        return await sending
    except asyncio.CancelledError:
        raise
    except Exception:
        return None


RETRIED = (0, 408, 429)
"""Statuses below 500 that are retried: no reply (0), Request Timeout, Too Many Requests."""

FREE = Permit(0.0)
"""The permit of an endpoint without a rate limit."""

STATS_EVERY_S = 1.0
"""How often the endpoint counts reach Redis while callbacks flow (and at each window's end)."""


class Endpoint:
    """One endpoint as one sink drives it: settings, signer, slots, breaker, rate limit."""

    def __init__(
        self,
        sink: str,
        name: str,
        settings: EndpointSettings,
        secret: bytes,
        stats: EndpointStats,
        gates: EndpointGates,
    ) -> None:
        self.name, self.settings = name, settings
        self.signer = Signer(secret)
        self.slots = asyncio.Semaphore(settings.concurrency)
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
        self.breaker = Breaker(
            gates,
            name,
            digest,
            settings.breaker_failures,
            settings.breaker_cooldown_s,
            probe_s=settings.timeout_s + 1.0,
            on_change=lambda state: stats.breaker(name, state),
        )
        self.rate = Rate(settings.rate, settings.burst, settings.min_interval_ms)
        self.limit = f"http:{sink}:{digest}"  # the shared limit's name in Redis


def backoff_delay(attempt: int, settings: EndpointSettings) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempt - 1))] seconds."""
    bound = backoff_bound(attempt - 1, settings.backoff_ms, settings.max_backoff_ms)
    return random.uniform(0, bound / 1000)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a Retry-After header asks for (delay-seconds or HTTP-date), None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


class Sender:
    """Delivers requests with retries, honouring each endpoint's breaker and limits."""

    def __init__(
        self,
        transport: Transport,
        vetter: Vetter,
        limiter: AsyncRateLimiter,
        stats: EndpointStats,
        gates: EndpointGates,
        sink: str = "",
    ) -> None:
        self.transport, self.vetter, self.limiter, self.stats = transport, vetter, limiter, stats
        self.gates = gates
        self.sink = sink  # the config's name, for log lines
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status class): sent
        # Per endpoint: time requests waited for a permit, a Retry-After or an open breaker.
        self.permit_wait_s: dict[str, float] = {}

    async def deliver(self, endpoint: Endpoint, request: Request) -> list[Rejected]:
        """Send until delivered or given up; the entries given up come back as Rejected."""
        attempts = 0
        while True:
            async with endpoint.slots:
                if endpoint.breaker.clear():
                    probe = False
                else:  # the breaker is open or a Retry-After runs: the wait is measured
                    started = time.monotonic()
                    probe = await endpoint.breaker.enter()
                    self._waited(endpoint, time.monotonic() - started)
                attempts += 1
                try:
                    reply = await self._attempt(endpoint, request)
                except Refused as exc:
                    await endpoint.breaker.neutral(probe)  # nothing was sent
                    return self._dead(endpoint, request, f"URL refused: {exc}")
                except DeliveredThenStopped:
                    self.stats.count(endpoint.name, "sent", len(request.entry_ids))
                    raise
            if 200 <= reply.status < 300:
                self.stats.count(endpoint.name, "sent", len(request.entry_ids))
                try:  # delivered: a stop from here on must still mark it
                    if endpoint.breaker.is_news(probe):  # else a success changes nothing
                        await endpoint.breaker.succeeded(probe)
                    if self.stats.due(STATS_EVERY_S):
                        await self.stats.flush()
                except asyncio.CancelledError:
                    raise DeliveredThenStopped from None
                return []
            outcome = await self._failed(endpoint, request, reply, attempts, probe)
            if self.stats.due(STATS_EVERY_S):
                await self.stats.flush()
            if isinstance(outcome, str):
                return self._dead(endpoint, request, outcome)
            self.stats.count(endpoint.name, "retried")
            log.info(
                "callback attempt failed, retrying",
                extra={
                    "sink": self.sink,
                    "endpoint": endpoint.name,
                    "key": request.key,
                    "attempt": attempts,
                    "error": reply.describe(),
                    "in_s": round(outcome, 3),
                },
            )
            await asyncio.sleep(outcome)

    async def _failed(
        self, endpoint: Endpoint, request: Request, reply: Reply, attempts: int, probe: bool
    ) -> float | str:
        """After a failed attempt: the delay before the next, or why to give up."""
        settings = endpoint.settings
        self.stats.count(endpoint.name, "failed")
        retry = not reply.final and (reply.status in RETRIED or reply.status >= 500)
        held = False  # the breaker is open: the call waits at the gate, whatever its attempts
        if reply.status == 429 or reply.final:
            await endpoint.breaker.neutral(probe)  # says nothing of the endpoint's health
        elif retry:
            held = await endpoint.breaker.failed(reply.describe(), probe)
        else:
            await endpoint.breaker.succeeded(probe)  # it answers; this request is wrong
        if not retry:
            return f"{reply.describe()}; not retried; {_attempts(attempts)}"
        if attempts >= settings.max_attempts and not held:
            return f"{reply.describe()}; {_attempts(attempts)}"
        if reply.status != 429:
            return 0.0 if held else backoff_delay(attempts, settings)
        asked = retry_after_seconds(reply.retry_after, time.time())
        if asked is None:
            return backoff_delay(attempts, settings)
        if asked > settings.max_retry_after_s:
            return (
                f"{reply.describe()}; Retry-After {asked:g} s is over max_retry_after_s "
                f"({settings.max_retry_after_s:g}); {_attempts(attempts)}"
            )
        await self._hold(endpoint, asked)
        return 0.0  # the gate holds it (and every other call to the endpoint) as long

    async def _attempt(self, endpoint: Endpoint, request: Request) -> Reply:
        """Vet the host, wait for a permit, send. Refused if the host may not be called."""
        url = request.url
        host, port = url.raw_host or "", url.port or 0
        if not self.vetter.vetted(host, port):  # else vetted lately: no coroutine to await
            try:
                await self.vetter.vet(host, port)
            except OSError as exc:  # the host does not resolve (now): worth another attempt
                return Reply(0, f"cannot resolve {url.raw_host}: {exc}")
        timeout = endpoint.settings.timeout_s
        permit = await self._permit(endpoint, timeout + 1.0) if endpoint.rate.limited else FREE
        delivered = False
        try:
            now, body = int(time.time()), request.body
            headers = {
                **request.headers,
                "Content-Type": "application/json",
                IDEMPOTENCY_HEADER: request.key,
                TIMESTAMP_HEADER: str(now),
                SIGNATURE_HEADER: endpoint.signer.sign(now, body),
            }
            sending = asyncio.ensure_future(self.transport.post(url, body, headers, timeout))
            try:
                reply = await asyncio.shield(sending)
            except asyncio.CancelledError:
                # Stopped (a handover, a shutdown) with the request maybe on the wire: let it
                # end (its timeout bounds the wait; a second cancel ends it at once), so a
                # delivered call is marked and the next owner does not send it again.
                ended = await _ended(sending)
                if ended is None or not 200 <= ended.status < 300:
                    raise
                self.requests[endpoint.name, status_class(ended.status)] += 1
                delivered = True
                raise DeliveredThenStopped from None
            self.requests[endpoint.name, status_class(reply.status)] += 1
            delivered = 200 <= reply.status < 300
            return reply
        finally:
            if permit.member:
                try:
                    await self._done(endpoint, permit)
                except asyncio.CancelledError:
                    if delivered:  # stopped after the call went through: still marked
                        raise DeliveredThenStopped from None
                    raise

    async def _permit(self, endpoint: Endpoint, busy_s: float) -> Permit:
        """Wait for a start under the endpoint's shared limit."""
        started = time.monotonic()
        try:
            return await self._wait_permit(endpoint, busy_s)
        finally:
            self._waited(endpoint, time.monotonic() - started)

    def _waited(self, endpoint: Endpoint, seconds: float) -> None:
        """Count time a request waited (rate limit, Retry-After hold, open breaker)."""
        self.permit_wait_s[endpoint.name] = self.permit_wait_s.get(endpoint.name, 0.0) + seconds

    async def _wait_permit(self, endpoint: Endpoint, busy_s: float) -> Permit:
        if not endpoint.rate.limited:
            return Permit(0.0)
        limit, rate = endpoint.limit, endpoint.rate
        return await retrying(
            lambda: self.limiter.acquire(limit, rate, busy_s),
            "permit",
            where={"sink": self.sink, "endpoint": endpoint.name},
        )

    async def _done(self, endpoint: Endpoint, permit: Permit) -> None:
        """Tell the limit the send is over; if Redis fails, it counts until its busy time."""
        try:
            await self.limiter.done(endpoint.limit, permit)
        except TRANSIENT as exc:
            log.warning(
                "rate limit not told",
                extra={"sink": self.sink, "endpoint": endpoint.name, "error": describe(exc)},
            )

    async def _hold(self, endpoint: Endpoint, seconds: float) -> None:
        """Send nothing to the endpoint for `seconds`, from any worker: the gate holds the
        calls, and (if limited) the shared limit books no start before then."""
        await endpoint.breaker.hold(seconds)
        if endpoint.rate.limited:
            await retrying(
                lambda: self.limiter.defer(endpoint.limit, seconds),
                "hold",
                where={"sink": self.sink, "endpoint": endpoint.name},
            )

    def _dead(self, endpoint: Endpoint, request: Request, reason: str) -> list[Rejected]:
        self.stats.count(endpoint.name, "dead", len(request.entry_ids))
        log.warning(
            "callback given up",
            extra={
                "sink": self.sink,
                "endpoint": endpoint.name,
                "key": request.key,
                "reason": reason,
            },
        )
        return [Rejected(entry_id, reason) for entry_id in request.entry_ids]


def status_class(status: int) -> str:
    """`2xx` … `5xx` of an HTTP status, `error` when no reply came (0)."""
    return _CLASSES[status // 100] if 100 <= status < 600 else "error"


_CLASSES = ("", "1xx", "2xx", "3xx", "4xx", "5xx")  # made once: this runs for every request


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"
