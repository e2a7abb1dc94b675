"""One worker process: what `streamsink worker` runs, signals, shutdown timeout and exit code.

`serve(config)` builds the sinks of the config (or takes yours), runs a `Worker` until
SIGTERM or SIGINT, drains for at most the shutdown timeout, closes the sinks and the client,
and says how it ended as an exit code. The CLI's wiring, above the worker it runs: the
worker's HTTP endpoint comes in through `around`, so this module needs no `ops` import.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Iterable, Mapping

from streamsink.consumers.worker import Worker, worker_client
from streamsink.schemas.config import Config
from streamsink.signals import STOPS, early
from streamsink.sinks import build_sinks
from streamsink.sinks.base import Sink
from streamsink.streams.connection import AsyncClient

log = logging.getLogger("streamsink.worker")  # its lines are the worker process's, as before

EXIT_STOPPED = 3
"""Exit code of a worker one of whose groups stopped on an error only an operator can fix."""

SHUTDOWN_TIMEOUT_S = 30.0
"""How long a stop may drain (flush, acknowledge, release) before the worker gives up and
exits anyway; what was not committed stays pending for the next owner."""


async def serve(
    config: Config,
    *,
    sinks: Mapping[str, Sink] | None = None,
    shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
    around: Callable[[Worker], contextlib.AbstractAsyncContextManager[object]] | None = None,
) -> int:
    """Run a worker until SIGTERM or SIGINT, or until every group has stopped.

    0 after a stop (drained, or given up after `shutdown_timeout_s`), 3 when a group
    stopped on a configuration error, 1 after a crash or a second signal. `around(worker)`,
    when given, is entered before the worker runs and left after it stopped (the CLI serves
    the HTTP endpoint in it; the worker then measures windows). `sinks` replaces those the
    config would build (this function closes them). Every option is a keyword: a hook
    passed by position once landed in `shutdown_timeout_s`.
    """
    built = dict(sinks) if sinks is not None else build_sinks(config)
    # Open windows hold hundreds of thousands of small objects, all alive until their flush.
    # A young collection every 50,000 allocations walked them (and again when they aged):
    # a quarter of the worker's CPU. After a million, most of them have died with their
    # window, freed by reference counting; cyclic garbage (rare here) waits a little longer.
    # bench/pipeline.py hot keys: 9.5 -> 6.5 µs CPU an event. What exists now is never garbage.
    gc.freeze()
    gc.set_threshold(1_000_000, 20, 100)
    client = worker_client(config.redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    worker = Worker(client, config, built, telemetry=around is not None)
    ops = contextlib.AsyncExitStack()  # ops: the HTTP endpoint, when asked for
    if around is not None:
        await ops.enter_async_context(around(worker))
    running = asyncio.ensure_future(worker.run(stop))
    gave_up: list[asyncio.TimerHandle] = []
    forced = False

    def give_up() -> None:
        log.warning(
            "shutdown timeout: stopping without draining the rest",
            extra={"shutdown_timeout_s": shutdown_timeout_s},
        )
        running.cancel()

    def on_signal(signum: int) -> None:
        """First signal: drain, for at most the shutdown timeout. Second: stop at once."""
        nonlocal forced
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second signal: stopping without draining", extra={"signal": name})
            forced = True
            running.cancel()
            return
        log.info("signal: draining", extra={"signal": name, "timeout_s": shutdown_timeout_s})
        stop.set()
        gave_up.append(loop.call_later(shutdown_timeout_s, give_up))

    for signum in STOPS:
        loop.add_signal_handler(signum, on_signal, signum)
    for caught in early():  # before the loop listened (`signals.catch_early`)
        on_signal(caught)
    try:
        await running
        return EXIT_STOPPED if worker.stopped else 0
    except asyncio.CancelledError:
        if not running.cancelled():
            raise
        return 1 if forced else (EXIT_STOPPED if worker.stopped else 0)
    except Exception as exc:  # an ExceptionGroup from the TaskGroup, most often
        errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
        for error in errors:
            what = f"{type(error).__name__}: {error}"
            log.error("worker crashed", exc_info=error, extra={"error": what})
        return 1
    finally:
        for handle in gave_up:
            handle.cancel()
        for signum in STOPS:
            loop.remove_signal_handler(signum)
        await ops.aclose()
        await _close(built.values(), client)


async def _close(sinks: Iterable[Sink], client: AsyncClient, timeout_s: float = 10.0) -> None:
    """Close the sinks and the client; a sink stuck in a write is left after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            for sink in sinks:
                await sink.close()
    except TimeoutError:
        log.warning("sinks did not close in time", extra={"timeout_s": timeout_s})
    await client.aclose()
