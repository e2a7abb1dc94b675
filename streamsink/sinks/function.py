"""A sink that hands each merged batch to a function of yours."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from streamsink.errors import ConfigError
from streamsink.sinks.base import Batch, Rejected

BatchFunction = Callable[[Batch], Any]
"""Takes a Batch; returns None or an iterable of Rejected (sync or async)."""


class FunctionSink:
    """Calls `function(batch)`: awaited if async, else run in a thread so the loop goes on.

    Raising makes the worker retry the whole window later; returning Rejected entries
    sends them to the dead-letter stream.
    """

    def __init__(self, function: BatchFunction) -> None:
        self._function = function
        self._is_async = inspect.iscoroutinefunction(function)

    @classmethod
    def from_path(cls, path: str) -> FunctionSink:
        """Build from `"package.module:function"` (as the config's `function` option)."""
        module_name, _, attribute = path.partition(":")
        if not module_name or not attribute:
            raise ConfigError(f"function sink: {path!r} must look like 'package.module:function'")
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"function sink: cannot load {path!r}: {exc}") from None
        if not callable(function):
            raise ConfigError(f"function sink: {path!r} is not callable")
        return cls(function)

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        """Call the function with the batch; pass back what it rejects."""
        if self._is_async:
            result = await self._function(batch)
        else:
            result = await asyncio.to_thread(self._function, batch)
        return list(_rejected(result))

    async def close(self) -> None:
        """Nothing to release."""


def _rejected(result: Any) -> Iterable[Rejected]:
    if result is None:
        return ()
    items = list(result)
    if not all(isinstance(item, Rejected) for item in items):
        raise TypeError("a sink function returns None or an iterable of Rejected")
    return items


class TestingSink:
    """Keeps every batch in memory: a sink for your own tests (`sink.batches`)."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        """Record the batch."""
        self.batches.append(batch)
        return ()

    async def close(self) -> None:
        """Nothing to release."""
