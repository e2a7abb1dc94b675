"""How a group reads, windows and recovers: read from the group's options in the config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from streamsink.errors import ConfigError
from streamsink.streams.connection import check_block


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """Per-group settings; every one can be set under `[groups.<name>]` in the config."""

    max_events: int = 5000
    """A window closes when it holds this many entries."""
    max_bytes: int = 4 * 1024 * 1024
    """... or this many bytes of event data."""
    linger_ms: int = 50
    """... or when no entry came for this long (the seeds' "10 items or 100 ms")."""
    max_age_ms: int = 250
    """... and at the latest this long after its first entry (the hard bound on latency)."""
    read_count: int = 1000
    """Most entries one read asks for."""
    block_ms: int = 500
    """Longest a read waits for new entries; at most `connection.MAX_BLOCK_MS` (10 s), far
    below the clients' socket timeout."""
    lease_ttl_ms: int = 10_000
    """A lease not renewed for this long is free; renewals come every third of it."""
    max_deliveries: int = 5
    """An entry delivered more often than this goes to the dead-letter stream (>= 2: a
    takeover's claim counts as a delivery)."""
    max_attempts: int = 3
    """A sink raising an unexpected exception (a bug, not `SinkUnavailable`) gets this many
    tries at a window; then the window is split to find the entries it fails on, which go
    to the dead-letter stream. A sink's own `max_attempts` option overrides it."""
    retention_ms: int = 0
    """Keep acknowledged entries this long for replays (0: trim once every group has them)."""
    maintenance_ms: int = 5000
    """How often owned shards are trimmed and gone consumers removed."""

    @classmethod
    def from_options(cls, group: str, options: Mapping[str, Any]) -> GroupSettings:
        """Settings from a group's config options; ConfigError names a bad one."""
        known = {f.name for f in fields(cls)}
        values: dict[str, int] = {}
        for name, value in options.items():
            if name not in known:
                raise ConfigError(
                    f"group {group!r}: unknown setting {name!r}; known: {sorted(known)}"
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"group {group!r}: {name} must be a non-negative integer")
            values[name] = value
        settings = cls(**values)
        # read_count 0 is refused by Redis (XAUTOCLAIM COUNT 0); block_ms 0 reads without
        # waiting, so an idle shard would poll Redis in a busy loop.
        at_least_one = ("max_events", "max_deliveries", "read_count", "block_ms", "max_attempts")
        if settings.lease_ttl_ms < 300 or any(getattr(settings, n) < 1 for n in at_least_one):
            raise ConfigError(
                f"group {group!r}: {', '.join(at_least_one)} must be >= 1, lease_ttl_ms >= 300"
            )
        check_block(settings.block_ms)
        if settings.max_deliveries < 2:  # a takeover's claim is a delivery too
            raise ConfigError(
                f"group {group!r}: max_deliveries must be >= 2: the claim that follows a "
                "failover counts as a delivery, so 1 would dead-letter healthy entries"
            )
        return settings
