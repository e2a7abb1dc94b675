"""The HTTP callback sink: a window's `call` events, delivered per endpoint, at least once.

Each window is planned into requests (plan.py), whose chains run concurrently: every
endpoint at once, each within its own concurrency (that many tasks take its chains),
breaker and shared rate limit (deliver.py). `write` returns when every request was
delivered or given up; what was given up (hostile URL, a status not retried, last attempt
failed with the breaker closed) comes back as Rejected and goes to the dead-letter
stream, so the window is acknowledged either way. While an endpoint's breaker is open its
calls wait, and so does the window (the lease kept, nothing acknowledged).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from streamsink.schemas.config import Config
from streamsink.sinks.base import Batch, Rejected
from streamsink.sinks.http.deliver import DeliveredThenStopped, Endpoint, Sender
from streamsink.sinks.http.plan import Request, plan
from streamsink.sinks.http.settings import HttpSettings
from streamsink.sinks.http.transport import AiohttpTransport, Transport
from streamsink.sinks.http.urls import Vetter
from streamsink.streams.connection import AsyncClient, connect_async
from streamsink.streams.endpoints import DeliveredMarks, EndpointGates, EndpointStats
from streamsink.streams.keys import Keys
from streamsink.streams.ratelimit import AsyncRateLimiter
from streamsink.streams.retry import retrying

log = logging.getLogger("streamsink.http")


class HttpSink:
    """Delivers the calls of each window; see the module docstring."""

    interruptible = True
    """A write may be cancelled when the shard is handed over: what it delivered is marked,
    and the next owner sends only the rest (consumers/shard.py)."""

    def __init__(
        self,
        name: str,
        settings: HttpSettings,
        secrets: Mapping[str, bytes],
        sender: Sender,
        on_close: Sequence[Callable[[], Awaitable[Any]]] = (),
        marks: Callable[[Batch], DeliveredMarks] | None = None,
    ) -> None:
        self.name, self.settings, self.sender = name, settings, sender
        self._marks = marks
        self._secrets = dict(secrets)
        self._on_close = list(on_close)
        self._endpoints: dict[str, Endpoint] = {}

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, Any], config: Config) -> HttpSink:
        """Build from `[sinks.<name>]`: its own Redis client (limits, counts) and HTTP pool."""
        settings = HttpSettings.from_options(name, options)
        secrets = settings.secrets(name)
        client = connect_async(config.redis_url, 5)  # no retry: a retried permit takes two
        keys = Keys(config.prefix)
        return cls.with_client(name, settings, secrets, client, keys, on_close=[client.aclose])

    @classmethod
    def with_client(
        cls,
        name: str,
        settings: HttpSettings,
        secrets: Mapping[str, bytes],
        client: AsyncClient,
        keys: Keys,
        *,
        vetter: Vetter | None = None,
        transport: Transport | None = None,
        on_close: Sequence[Callable[[], Awaitable[Any]]] = (),
    ) -> HttpSink:
        """A sink whose rate limits, breakers, counts and delivered marks live on `client`
        under `keys`, as `from_options` wires them (tests and benchmarks use this seam).

        `vetter` defaults to the settings' (allow_private, dns_cache_s); `transport` to an
        aiohttp pool resolving through it (one given should resolve through `vetter` too).
        `close()` closes the transport, then runs `on_close`: the client stays the
        caller's unless closing it is there.
        """
        vetter = vetter or Vetter(settings.allow_private, settings.dns_cache_s)
        transport = transport or AiohttpTransport(vetter)
        stats = EndpointStats(client, keys, name)
        gates = EndpointGates(client, keys, name)
        sender = Sender(transport, vetter, AsyncRateLimiter(client, keys), stats, gates, sink=name)

        def marks(batch: Batch) -> DeliveredMarks:
            key = keys.http_delivered(batch.stream, batch.shard, batch.group, name)
            return DeliveredMarks(client, key)

        closing = [transport.close, *on_close]
        return cls(name, settings, secrets, sender, on_close=closing, marks=marks)

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        """Deliver every call of the window; return those given up, with why.

        Calls an earlier owner of the shard delivered before it died (marked in Redis,
        the window not acknowledged) are not sent again.
        """
        marks = self._marks(batch) if self._marks is not None else None
        delivered: set[str] = set()
        if marks is not None:
            delivered = await retrying(lambda: marks.start(batch.first_id), "delivered marks")
        work = plan(batch, self.settings)
        rejected = [Rejected(refusal.entry_id, refusal.reason) for refusal in work.refused]
        for refusal in work.refused:
            self.sender.stats.count(refusal.endpoint, "dead")
            log.warning(
                "callback refused",
                extra={"sink": self.name, "entry": refusal.entry_id, "reason": refusal.reason},
            )
        chains = _unsent(work.chains, delivered) if delivered else work.chains
        skipped = sum(map(len, work.chains)) - sum(map(len, chains)) if delivered else 0
        if skipped:
            log.info(
                "callbacks delivered before the shard changed owner: not sent again",
                extra={"sink": self.name, "shard": batch.shard, "requests": skipped},
            )
        queues: dict[str, deque[list[Request]]] = {}  # endpoint -> its chains
        for chain in chains:
            queues.setdefault(chain[0].endpoint, deque()).append(chain)
        try:
            if queues:
                async with asyncio.TaskGroup() as tasks:
                    runs = [
                        tasks.create_task(self._chains(queue, marks, rejected))
                        for queue in queues.values()
                        for _ in range(min(len(queue), queue[0][0].settings.concurrency))
                    ]
                for run in runs:
                    run.result()
        finally:
            if marks is not None:
                await marks.drain()
        await self.sender.stats.flush()
        return rejected

    async def _chains(
        self,
        queue: deque[list[Request]],
        marks: DeliveredMarks | None,
        rejected: list[Rejected],
    ) -> None:
        """Take chains of one endpoint until none is left, delivering each chain's requests
        one after the other (one event key's, or one batch's parts). An endpoint runs
        `concurrency` of these: a task per chain would cost more than its request."""
        while queue:
            for request in queue.popleft():
                try:
                    refused = await self.sender.deliver(self.endpoint(request), request)
                except DeliveredThenStopped:  # stopped, but this one went through
                    if marks is not None:
                        marks.add(request.entry_ids)
                    raise
                if not refused and marks is not None:
                    marks.add(request.entry_ids)
                rejected.extend(refused)

    def endpoint(self, request: Request) -> Endpoint:
        """The endpoint a request goes to, made on its first request."""
        endpoint = self._endpoints.get(request.endpoint)
        if endpoint is None:
            secret = self._secrets[request.settings.secret_env]
            sender = self.sender
            endpoint = Endpoint(
                self.name, request.endpoint, request.settings, secret, sender.stats, sender.gates
            )
            self._endpoints[request.endpoint] = endpoint
        return endpoint

    async def close(self) -> None:
        """Save the last counts, close the HTTP pool and the Redis client."""
        await self.sender.stats.flush()
        for close in self._on_close:
            await close()


def _unsent(chains: list[list[Request]], delivered: set[str]) -> list[list[Request]]:
    """The chains without the requests whose every entry was delivered already."""
    left = [[r for r in chain if not delivered.issuperset(r.entry_ids)] for chain in chains]
    return [chain for chain in left if chain]
