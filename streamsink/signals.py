"""The signals that stop a worker, and those that came before it listened.

`streamsink worker` calls `catch_early` first thing; `serve` then acts on what `early`
gives as on a signal of its own. Without it a SIGTERM that comes while the worker starts
(config, imports, sinks) kills it with the signal's default action instead of stopping it
cleanly (exit 0): a deploy that stops a worker it just started, or a test that does.
Dependency-free, so it is in place before anything heavy is imported.
"""

from __future__ import annotations

import signal

STOPS = (signal.SIGTERM, signal.SIGINT)
"""First one: drain and stop; a second: stop at once (`serve`)."""

_caught: list[int] = []


def catch_early() -> None:
    """Remember STOPS from now until `serve` listens. Main thread only, as any handler."""
    for signum in STOPS:
        signal.signal(signum, lambda signum, frame: _caught.append(signum))


def early() -> list[int]:
    """The signals caught before now, oldest first, forgotten once given."""
    given = _caught[:]
    del _caught[: len(given)]
    return given
