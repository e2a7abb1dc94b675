"""A window: the entries of one shard since its last flush, and when it must close."""

from __future__ import annotations

import math

from streamsink.consumers.merge import Entry
from streamsink.consumers.settings import GroupSettings
from streamsink.streams.reader import Raw


class Window:
    """Entries in stream order; closes on count, bytes, quiet time or age, whichever first."""

    __slots__ = ("entries", "last", "opened", "raws", "size")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.raws: dict[str, Raw] = {}
        self.size = 0
        self.opened = self.last = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: Entry, raw: Raw, size: int, now: float) -> None:
        """Take an entry read at `now` (seconds, monotonic)."""
        if not self.entries:
            self.opened = now
        self.entries.append(entry)
        self.raws[entry.id] = raw
        self.size += size
        self.last = now

    def full(self, settings: GroupSettings) -> bool:
        """Whether the count or byte bound is reached (reading must wait for a flush)."""
        return len(self.entries) >= settings.max_events or self.size >= settings.max_bytes

    def due_at(self, settings: GroupSettings) -> float:
        """When the window closes by time alone (infinity while empty)."""
        if not self.entries:
            return math.inf
        return min(self.last + settings.linger_ms / 1000, self.opened + settings.max_age_ms / 1000)

    def due(self, settings: GroupSettings, now: float) -> bool:
        """Whether the window should close now."""
        return bool(self.entries) and (self.full(settings) or now >= self.due_at(settings))
