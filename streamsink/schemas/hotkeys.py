"""Hot keys: the busiest keys of a shard in bounded memory (a batched Space-Saving summary).

Fed once per window with the window's exact counts per key (the merge already made them),
never per event. Each window keeps only its `2 * capacity` busiest keys; the summary then
keeps `capacity` counters. A key that comes in, or comes back, starts at `floor`: the most
any key outside the summary can have had (a key dropped from the summary, plus every
window's cut-off). So every `count` is an upper bound of the key's true count and
`count - error` a lower bound; a key whose share of the events exceeds about 1/capacity
of them is always in the summary (Metwally et al., "Efficient computation of frequent and
top-k elements in data streams", 2005; batched as in Agarwal et al., "Mergeable
summaries", 2012).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Generic, TypeVar

DEFAULT_CAPACITY = 32

_count = itemgetter(1)

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class HotKey(Generic[K]):
    """One key of the summary: `count` events at most, `count - error` at least."""

    key: K
    count: int
    error: int


class HotKeys(Generic[K]):
    """The `capacity` busiest keys seen, with their counts; `add` takes a window's counts."""

    __slots__ = ("_counts", "_errors", "capacity", "floor", "total")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.floor = 0  # no key outside the summary has had more events than this
        self.total = 0  # events counted, in all
        self._counts: dict[K, int] = {}
        self._errors: dict[K, int] = {}

    def add(self, window: Iterable[tuple[K, int]], cut: int = 0, total: int | None = None) -> None:
        """Count one window: (key, events) pairs, each key once.

        A caller that kept only the window's busiest keys says so: `cut`, the most events
        of a key it left out, and `total`, the events of the whole window.
        """
        pairs = list(window)
        self.total += sum(map(_count, pairs)) if total is None else total
        wanted = 2 * self.capacity
        if len(pairs) > wanted:
            top = heapq.nlargest(wanted + 1, pairs, key=_count)
            pairs, cut = top[:wanted], max(cut, top[wanted][1])
        counts, errors, floor = self._counts, self._errors, self.floor
        for key, events in pairs:
            if key in counts:
                counts[key] += events
            else:
                counts[key] = floor + events
                errors[key] = floor
        if cut:
            # The keys cut from this window were not counted: outside the summary, a key
            # may now be that much more than the floor says; inside it, its error grows.
            self.floor += cut
            for key in counts.keys() - {key for key, _ in pairs}:
                counts[key] += cut
                errors[key] += cut
        if len(counts) > self.capacity:
            ranked = sorted(counts.items(), key=_count, reverse=True)
            self.floor = max(self.floor, ranked[self.capacity][1])
            for key, _ in ranked[self.capacity :]:
                del counts[key], errors[key]

    def top(self, n: int | None = None) -> list[HotKey[K]]:
        """The busiest keys first (at most `n`)."""
        ranked = sorted(self._counts.items(), key=_count, reverse=True)[:n]
        return [HotKey(key, count, self._errors[key]) for key, count in ranked]

    def __len__(self) -> int:
        return len(self._counts)
