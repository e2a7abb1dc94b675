"""A window: the entries of one shard since its last flush, and when it must close."""

from __future__ import annotations

import math

from streamsink.consumers.settings import GroupSettings
from streamsink.schemas.merge import Entry


class Window:
    """Entries in stream order; closes on count, bytes, quiet time or age, whichever first.

    Beside the decoded entries it keeps each entry's ID as read, in the same order, to
    acknowledge them. The shard's read loop appends to both lists itself, then calls `grew`.
    What was read is not kept once decoded: an entry a sink refuses is read again.
    """

    __slots__ = (
        "closing",
        "deliveries",
        "entries",
        "ids",
        "last",
        "only",
        "opened",
        "origins",
        "size",
        "suspect",
    )

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.ids: list[bytes] = []  # entry IDs as read, for XACK
        self.deliveries: dict[bytes, int] = {}  # of claimed entries; absent: once
        self.origins: dict[str, str] = {}  # replayed entries: ID -> their first entry ID
        self.only: dict[str, tuple[str, ...]] = {}  # replayed entries for some sinks only
        self.size = 0
        self.opened = self.last = 0.0
        self.closing = False  # closes now, whatever its size and age
        self.suspect = False  # one entry delivered too often, tried alone

    def __len__(self) -> int:
        return len(self.entries)

    def grew(self, size: int, now: float, waited: float = 0.0) -> None:
        """Entries of `size` bytes in all were appended, read at `now`.

        `waited` (seconds): how long the first of them had been in the stream when read;
        a window that opens with them counts its age from then.
        """
        if self.last == 0.0:
            self.opened = now - waited
        self.size += size
        self.last = now

    def delivered(self, index: int) -> int:
        """How often entry `index` had been delivered when it was read."""
        return self.deliveries.get(self.ids[index], 1)

    def full(self, settings: GroupSettings) -> bool:
        """Whether the count or byte bound is reached (reading must wait for a flush)."""
        return (
            self.closing
            or len(self.entries) >= settings.max_events
            or self.size >= settings.max_bytes
        )

    def for_sink(self, name: str) -> list[Entry]:
        """The entries sink `name` writes: all, but replays addressed to other sinks."""
        if not self.only:
            return self.entries
        only = self.only
        return [e for e in self.entries if e.id not in only or name in only[e.id]]

    def due_at(self, settings: GroupSettings, lead: float = 0.0) -> float:
        """When the window closes by time alone (infinity while empty).

        `lead` (seconds) moves the age bound earlier by how long a flush is expected to
        take, so that the window's first entry is committed by `max_age_ms`, not only
        handed to the sinks then.
        """
        if not self.entries:
            return math.inf
        closes = self.opened + settings.max_age_ms / 1000 - lead
        return min(self.last + settings.linger_ms / 1000, closes)

    def due(self, settings: GroupSettings, now: float, lead: float = 0.0) -> bool:
        """Whether the window should close now."""
        return bool(self.entries) and (self.full(settings) or now >= self.due_at(settings, lead))
