"""The options of an HTTP sink: what applies to the sink, and what to each endpoint.

An endpoint is a URL prefix (`"https://api.example.com/hooks/"`) or a host
(`"api.example.com"`) under `[sinks.<name>.endpoints."<key>"]`; a call goes to the
endpoint with the longest matching URL prefix, else to its host's, else to its origin
(`scheme://host:port`), which gets the sink-level values. Rate limits, concurrency,
breakers and the counts of `status` are per endpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from yarl import URL

from streamsink.errors import ConfigError

MODES = ("each", "batch")


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """How calls to one endpoint are sent; every field is an option (sink or endpoint)."""

    mode: str = "each"
    """"each": one request per call; "batch": one JSON array of the window's calls."""
    rate: float = 0.0
    """Requests per second to this endpoint across all workers (0: no limit)."""
    burst: int = 1
    """Requests that may go back to back; a receiver sees <= rate + burst - 1 in any second."""
    min_interval_ms: float = 0.0
    """Least time between two requests to this endpoint, across all workers."""
    concurrency: int = 4
    """Requests in flight to this endpoint, per worker."""
    timeout_s: float = 10.0
    """A request taking longer (connect to last byte) fails and is retried."""
    max_attempts: int = 5
    """Attempts per request before its callbacks are dead-lettered."""
    backoff_ms: float = 200.0
    """First retry delay bound; doubles each attempt up to max_backoff_ms (full jitter)."""
    max_backoff_ms: float = 10_000.0
    max_retry_after_s: float = 60.0
    """A 429 asking for a longer wait is not retried (its callbacks are dead-lettered)."""
    breaker_failures: int = 5
    """Consecutive failures (errors, timeouts, 5xx) that open the endpoint's breaker."""
    breaker_cooldown_s: float = 30.0
    """Time an open breaker fails fast before one probe request may try again."""
    max_body_bytes: int = 256 * 1024
    """Largest request body; a call whose payload alone is larger is dead-lettered."""
    max_batch_items: int = 100
    """Most calls in one batch request (a window with more sends several)."""
    secret_env: str = ""
    """Name of the environment variable holding the HMAC-SHA256 signing secret."""

    def check(self, where: str) -> None:
        """ConfigError unless every value is in range."""
        if self.mode not in MODES:
            raise ConfigError(f"{where}: mode must be one of {MODES}, not {self.mode!r}")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{where}: {name} must be > 0")
        for name in _NOT_NEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: {name} must be >= 0")


_POSITIVE = (
    "concurrency",
    "timeout_s",
    "max_attempts",
    "breaker_failures",
    "burst",
    "max_body_bytes",
    "max_batch_items",
)
_NOT_NEGATIVE = (
    "rate",
    "min_interval_ms",
    "backoff_ms",
    "max_backoff_ms",
    "max_retry_after_s",
    "breaker_cooldown_s",
)


ENDPOINT_OPTIONS = frozenset(f.name for f in fields(EndpointSettings))
SINK_OPTIONS = frozenset({"allow_private", "allowed_hosts", "max_url_bytes", "dns_cache_s"})


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """An HTTP sink's settings: URL safety for the sink, the rest per endpoint."""

    defaults: EndpointSettings = field(default_factory=EndpointSettings)
    endpoints: Mapping[str, EndpointSettings] = field(default_factory=dict)
    allow_private: bool = False
    """Development only: allow loopback, private and link-local targets (never metadata)."""
    allowed_hosts: tuple[str, ...] = ()
    """If given, the only hosts called: exact names, or `*.example.com` for subdomains."""
    max_url_bytes: int = 2048
    dns_cache_s: float = 10.0
    """How long a host's vetted addresses are used before it is resolved (and vetted) again."""

    @classmethod
    def from_options(cls, sink: str, options: Mapping[str, Any]) -> HttpSettings:
        """Settings from `[sinks.<sink>]`; ConfigError names the option at fault."""
        where = f"sink {sink!r}"
        values = dict(options)
        raw_endpoints = values.pop("endpoints", {})
        unknown = set(values) - ENDPOINT_OPTIONS - SINK_OPTIONS
        if unknown:
            known = sorted(ENDPOINT_OPTIONS | SINK_OPTIONS | {"endpoints"})
            raise ConfigError(f"{where}: unknown options {sorted(unknown)}; known: {known}")
        defaults = _endpoint(EndpointSettings(), values, where)
        if not isinstance(raw_endpoints, Mapping):
            raise ConfigError(f"{where}: endpoints must be a table of URL prefixes or hosts")
        endpoints = {}
        for key, spec in raw_endpoints.items():
            at = f"{where}, endpoint {key!r}"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{at}: must be a table of options")
            unknown = set(spec) - ENDPOINT_OPTIONS
            if unknown:
                raise ConfigError(f"{at}: unknown options {sorted(unknown)}")
            endpoints[_endpoint_key(key, at)] = _endpoint(defaults, spec, at)
        hosts = values.get("allowed_hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
            raise ConfigError(f"{where}: allowed_hosts must be a list of host names")
        settings = cls(
            defaults=defaults,
            endpoints=endpoints,
            allow_private=_typed(values, "allow_private", False, where),
            allowed_hosts=tuple(h.lower().rstrip(".") for h in hosts),
            max_url_bytes=_typed(values, "max_url_bytes", 2048, where),
            dns_cache_s=_typed(values, "dns_cache_s", 10.0, where),
        )
        if settings.max_url_bytes < 16 or settings.dns_cache_s < 0:
            raise ConfigError(f"{where}: max_url_bytes must be >= 16, dns_cache_s >= 0")
        return settings

    def endpoint_for(self, url: URL) -> tuple[str, EndpointSettings]:
        """The endpoint of a (checked, absolute) URL: its name and settings."""
        text = str(url)
        best = ""
        for key in self.endpoints:
            if "://" in key and len(key) > len(best) and _under(text, key):
                best = key
        if best:
            return best, self.endpoints[best]
        host = (url.raw_host or "").lower()
        for key in (f"{host}:{url.port}", host):
            if key in self.endpoints:
                return key, self.endpoints[key]
        return f"{url.scheme}://{host}:{url.port}", self.defaults

    def secrets(self, sink: str, environ: Mapping[str, str] = os.environ) -> dict[str, bytes]:
        """Every signing secret the endpoints name, read from the environment, by variable."""
        found = {}
        for key, settings in {"(sink)": self.defaults, **self.endpoints}.items():
            name = settings.secret_env
            where = f"sink {sink!r}" + ("" if key == "(sink)" else f", endpoint {key!r}")
            if not name:
                raise ConfigError(
                    f"{where}: set secret_env to the name of the environment variable that "
                    "holds the signing secret (every request is signed)"
                )
            secret = environ.get(name, "")
            if not secret:
                raise ConfigError(f"{where}: environment variable {name} is not set or empty")
            found[name] = secret.encode("utf-8")
        return found


def _under(text: str, prefix: str) -> bool:
    """Whether URL `text` is `prefix` or below it (not merely sharing its first characters)."""
    if not text.startswith(prefix):
        return False
    return len(text) == len(prefix) or prefix.endswith("/") or text[len(prefix)] in "/?#"


def _endpoint_key(key: str, where: str) -> str:
    if "://" not in key:
        return key.lower().rstrip(".")
    try:
        url = URL(key)
    except ValueError as exc:
        raise ConfigError(f"{where}: not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ConfigError(f"{where}: an endpoint URL prefix must be http(s)://host...")
    return str(url)


def _endpoint(base: EndpointSettings, spec: Mapping[str, Any], where: str) -> EndpointSettings:
    changes = {
        name: _typed(spec, name, getattr(base, name), where)
        for name in ENDPOINT_OPTIONS
        if name in spec
    }
    settings = replace(base, **changes)
    settings.check(where)
    return settings


def _typed(spec: Mapping[str, Any], name: str, default: Any, where: str) -> Any:
    """`spec[name]` if of the type of `default` (an int does for a float), else ConfigError."""
    value = spec.get(name, default)
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind or (kind is float and not math.isfinite(value)):
        raise ConfigError(f"{where}: {name} must be a {kind.__name__}, got {value!r}")
    return value
