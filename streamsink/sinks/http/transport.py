"""The HTTP client seam: one `post` that answers a Reply, never raises for the network.

`AiohttpTransport` keeps a pool of keep-alive connections (per host, `limit` in all),
resolves hosts only through the sink's `Vetter`, follows no redirect (a redirect could
point anywhere), ignores proxy variables (a proxy would connect for us, unvetted) and asks
for no compression.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver
from yarl import URL

MAX_READ = 64 * 1024
"""Bytes of a response body read (for the dead-letter excerpt); the rest is dropped."""

USER_AGENT = "streamsink-http-sink"


@dataclass(slots=True)  # not frozen: one is made per request, and a frozen one costs 5x
class Reply:
    """What came back: a status (0 when no response came, then `error` says why; `final`
    when the request cannot be sent at all, so trying again would not help). Never changed
    once made."""

    status: int
    error: str = ""
    retry_after: str | None = None
    body: bytes = b""
    final: bool = False

    def describe(self) -> str:
        """One line for a log or a dead letter: the status and a body excerpt, or the error."""
        if not self.status:
            return self.error
        excerpt = self.body[:200].decode("utf-8", "replace")
        return f"HTTP {self.status}, body {excerpt!r}"


class _Request(aiohttp.ClientRequest):
    """aiohttp's request without its automatic Accept-Encoding: only a body excerpt is read,
    no compression is asked for. (`skip_auto_headers` would send the same, but it copies
    every request's headers to do so.)"""

    DEFAULT_HEADERS = {hdrs.ACCEPT: "*/*"}  # noqa: RUF012 (aiohttp reads it, never changes it)


class Transport(Protocol):
    """Sends one POST."""

    async def post(
        self, url: URL, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Reply:
        """POST `body`; a connection error or timeout is a Reply with status 0."""
        ...

    async def close(self) -> None:
        """Close the pooled connections."""
        ...


class AiohttpTransport:
    """Transport over one aiohttp session, made on first use (it needs the running loop)."""

    def __init__(self, resolver: AbstractResolver, limit: int = 100) -> None:
        self._resolver = resolver
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=self._resolver, use_dns_cache=False, limit=self._limit
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
                request_class=_Request,
            )
        return self._session

    async def post(
        self, url: URL, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Reply:
        """POST with a total timeout; the Reply holds at most MAX_READ bytes of the body."""
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._client().post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                content = await response.content.read(MAX_READ)
                return Reply(response.status, "", response.headers.get("Retry-After"), content)
        except TimeoutError:
            return Reply(0, f"timed out after {timeout_s:g} s")
        except aiohttp.ClientError as exc:
            return Reply(0, f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            return Reply(0, f"{type(exc).__name__}: {exc}")
        except (ValueError, TypeError) as exc:  # the client refuses to build this request
            return Reply(0, f"the HTTP client refused the request: {exc}", final=True)

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
