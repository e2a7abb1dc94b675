"""Refusing hostile callback URLs before any connection, and connecting only where vetted.

A call's URL is checked twice before a request: its text (length, syntax, http or
https, no credentials, the host allowlist), then every address its host resolves to
(no loopback, private, link-local, multicast, reserved or cloud metadata address,
unless `allow_private` lets the first three through for development; metadata
addresses never). The `Vetter` is also the HTTP client's DNS resolver, so the
connection goes to the addresses that were vetted, never to a second answer of the
DNS (no rebinding window between the check and the connect).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack instance metadata
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS DNS resolver
        "100.100.100.200",  # Alibaba Cloud metadata
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "fd00:ec2::253",
    )
)
"""Cloud metadata services: refused even when `allow_private` is on."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")

GetAddrInfo = Callable[[str, int], Awaitable[Sequence[tuple[Any, ...]]]]
"""`(host, port) -> getaddrinfo() tuples`; the loop's by default, a fake in tests."""


class Refused(ValueError):
    """A URL the sink will not call: `reason` says why (it goes to the dead letter).

    Never leaves the HTTP sink: it becomes a Rejected entry.
    """


_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def check_url(text: str, max_bytes: int, allowed_hosts: Sequence[str]) -> URL:
    """The parsed URL if its text is acceptable, else Refused (no DNS, no connection)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise Refused(f"the URL is {size} bytes long; the limit is {max_bytes}")
    if _CONTROL.search(text):
        raise Refused("malformed URL: it contains spaces or control characters")
    try:
        url = URL(text)
    except (ValueError, UnicodeError) as exc:
        raise Refused(f"malformed URL: {exc}") from None
    if url.scheme not in ("http", "https"):
        scheme = url.scheme or "(none)"
        raise Refused(f"scheme {scheme!r} is not allowed; only http and https")
    host = (url.raw_host or "").lower()
    if not url.is_absolute() or not host:
        raise Refused("malformed URL: it has no host")
    if url.raw_user is not None or url.raw_password is not None:
        raise Refused("credentials in the URL are not allowed; send them as headers")
    if "%" in host:
        raise Refused(f"malformed URL: {host!r} has a zone index (scoped addresses are refused)")
    if not (_ip_literal(host) or _hostname(host)):
        raise Refused(f"malformed URL: {host!r} is not a host name or IP address")
    if allowed_hosts and not _allowed(host.rstrip("."), allowed_hosts):
        raise Refused(f"host {host!r} is not in allowed_hosts")
    return url


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _hostname(host: str) -> bool:
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def _allowed(host: str, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


def address_refusal(address: IPAddress, allow_private: bool) -> str | None:
    """Why `address` may not be called, or None if it may."""
    for inner in _embedded(address):
        reason = address_refusal(inner, allow_private)
        if reason is not None:
            return f"{reason} (inside {address})"
    if address in METADATA:
        return f"{address} is a cloud metadata address"
    for refused, what in (
        (address.is_unspecified, "an unspecified"),
        (address.is_multicast, "a multicast"),
        (address.is_loopback, "a loopback"),
        (address.is_reserved, "a reserved"),
        (address.is_link_local, "a link-local"),
        (address.is_private, "a private"),
        (not address.is_global, "a non-public"),
    ):
        if not refused:
            continue
        if what not in _LOCAL:
            return f"{address} is {what} address"
        return None if allow_private else f"{address} is {what} address (allow_private is off)"
    return None


_LOCAL = frozenset({"a loopback", "a link-local", "a private", "a non-public"})
"""What `allow_private` lets through (loopback first: ::1 also counts as reserved)."""


def _embedded(address: IPAddress) -> Iterator[IPAddress]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return
    if address.ipv4_mapped is not None:
        yield address.ipv4_mapped
    if address.sixtofour is not None:
        yield address.sixtofour
    if address.teredo is not None:
        yield address.teredo[1]
    if address in _NAT64:
        yield ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)


class Vetter(AbstractResolver):
    """Resolves a host, vets every address, and hands only vetted addresses to the client.

    Answers are kept `cache_s` seconds, so the check before a request and the
    connection it makes use the same addresses.
    """

    def __init__(
        self,
        allow_private: bool = False,
        cache_s: float = 10.0,
        getaddrinfo: GetAddrInfo | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.cache_s = cache_s
        self._getaddrinfo = getaddrinfo
        self._cache: dict[tuple[str, int], tuple[float, list[ResolveResult]]] = {}

    def vetted(self, host: str, port: int) -> bool:
        """Whether `host` was vetted lately (its addresses cached): then `vet` is not needed."""
        cached = self._cache.get((host.lower(), port))
        return cached is not None and cached[0] > time.monotonic()

    async def vet(self, host: str, port: int) -> list[ResolveResult]:
        """The vetted addresses of `host`; Refused if any is forbidden, OSError if none."""
        host = host.lower()
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]  # before any parsing: this runs before every request
        literal = _ip_literal(host)
        if literal:
            infos: Sequence[tuple[Any, ...]] = [_literal_info(host, port)]
        else:
            infos = await self._resolve(host, port)
        results = []
        for family, _, proto, _, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0].split("%")[0])
            reason = address_refusal(address, self.allow_private)
            if reason is not None:
                said = "" if literal else f"{host} resolves to {address}: "
                raise Refused(said + reason)
            results.append(_result(host, str(address), sockaddr[1], family, proto))
        if not results:
            raise OSError(f"{host} has no address")
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[(host, port)] = (time.monotonic() + self.cache_s, results)
        return results

    async def _resolve(self, host: str, port: int) -> Sequence[tuple[Any, ...]]:
        if self._getaddrinfo is not None:
            return await self._getaddrinfo(host, port)
        loop = asyncio.get_running_loop()
        return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """aiohttp's resolver hook: the vetted addresses, or an OSError (no connection)."""
        try:
            results = await self.vet(host, port)
        except Refused as exc:
            raise OSError(f"refused: {exc}") from None
        if family not in (socket.AF_UNSPEC, 0):
            results = [r for r in results if r["family"] == family]
        return results

    async def close(self) -> None:
        """Nothing to release."""


def _literal_info(host: str, port: int) -> tuple[Any, ...]:
    address = ipaddress.ip_address(host)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))


def _result(hostname: str, host: str, port: int, family: int, proto: int) -> ResolveResult:
    return ResolveResult(
        hostname=hostname,
        host=host,
        port=port,
        family=family,
        proto=proto,
        flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
    )
