"""The HTTP callback sink: a window's `call` events, delivered per endpoint, at least once.

Each window is planned into requests (plan.py), whose chains run concurrently: every
endpoint at once, each within its own concurrency, breaker and shared rate limit
(deliver.py). `write` returns when every request was delivered or given up; what was
given up (hostile URL, last attempt failed, breaker open) comes back as Rejected and
goes to the dead-letter stream, so the window is acknowledged either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from streamsink.schemas.config import Config
from streamsink.sinks.base import Batch, Rejected
from streamsink.sinks.http.deliver import Endpoint, Sender
from streamsink.sinks.http.plan import Request, plan
from streamsink.sinks.http.settings import HttpSettings
from streamsink.sinks.http.transport import AiohttpTransport
from streamsink.sinks.http.urls import Vetter
from streamsink.streams.connection import connect_async
from streamsink.streams.endpoints import EndpointStats
from streamsink.streams.keys import Keys
from streamsink.streams.ratelimit import AsyncRateLimiter

log = logging.getLogger("streamsink.http")


class HttpSink:
    """Delivers the calls of each window; see the module docstring."""

    def __init__(
        self,
        name: str,
        settings: HttpSettings,
        secrets: Mapping[str, bytes],
        sender: Sender,
        on_close: Sequence[Callable[[], Awaitable[Any]]] = (),
    ) -> None:
        self.name, self.settings, self.sender = name, settings, sender
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
        vetter = Vetter(settings.allow_private, settings.dns_cache_s)
        transport = AiohttpTransport(vetter)
        stats = EndpointStats(client, keys, name)
        sender = Sender(transport, vetter, AsyncRateLimiter(client, keys), stats)
        return cls(name, settings, secrets, sender, on_close=[transport.close, client.aclose])

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        """Deliver every call of the window; return those given up, with why."""
        work = plan(batch, self.settings)
        rejected = [Rejected(refusal.entry_id, refusal.reason) for refusal in work.refused]
        for refusal in work.refused:
            self.sender.stats.count(refusal.endpoint, "dead")
            log.warning(
                "callback refused",
                extra={"sink": self.name, "entry": refusal.entry_id, "reason": refusal.reason},
            )
        if work.chains:
            async with asyncio.TaskGroup() as tasks:
                runs = [tasks.create_task(self._chain(chain)) for chain in work.chains]
            for run in runs:
                rejected.extend(run.result())
        await self.sender.stats.flush()
        return rejected

    async def _chain(self, chain: Sequence[Request]) -> list[Rejected]:
        """Deliver requests one after the other (one event key's, or one batch's parts)."""
        rejected: list[Rejected] = []
        for request in chain:
            rejected.extend(await self.sender.deliver(self.endpoint(request), request))
        return rejected

    def endpoint(self, request: Request) -> Endpoint:
        """The endpoint a request goes to, made on its first request."""
        endpoint = self._endpoints.get(request.endpoint)
        if endpoint is None:
            secret = self._secrets[request.settings.secret_env]
            endpoint = Endpoint(
                self.name, request.endpoint, request.settings, secret, self.sender.stats
            )
            self._endpoints[request.endpoint] = endpoint
        return endpoint

    async def close(self) -> None:
        """Save the last counts, close the HTTP pool and the Redis client."""
        await self.sender.stats.flush()
        for close in self._on_close:
            await close()
