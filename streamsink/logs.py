"""Structured logs: one JSON object per line on stderr, with each record's extra fields.

JSON lines always: library warnings (`warnings`), uncaught exceptions (of the main
thread, of other threads, of `__del__` methods and callbacks) and errors the asyncio
loop reports (an unclosed client, a task's exception never retrieved) all go through
the logger, never as a bare traceback. `--log-format text` is for people at a terminal.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from types import TracebackType
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
FORMATS = ("json", "text")

log = logging.getLogger("streamsink.uncaught")


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """`{"ts": ..., "level": ..., "logger": ..., "msg": ..., <extra fields>}`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extra(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """`12:00:01 WARNING streamsink.shard: msg  key=value ...`, for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = _extra(record)
        if extra:
            first, _, rest = text.partition("\n")
            pairs = " ".join(f"{k}={v}" for k, v in extra.items())
            text = f"{first}  {pairs}" + (f"\n{rest}" if rest else "")
        return text


def configure(level: str = "INFO", format: str = "json") -> None:
    """Send every log line to stderr as JSON (or text): streamsink's at `level`, other
    libraries' at WARNING; route warnings and uncaught exceptions through them too."""
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger("streamsink")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    everything = logging.getLogger()
    everything.handlers[:] = [handler]
    everything.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger
    sys.excepthook = _uncaught
    threading.excepthook = _thread_uncaught
    sys.unraisablehook = _unraisable


def route_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Errors the loop reports (unclosed clients, lost task exceptions) go to the logger."""
    loop.set_exception_handler(_loop_error)


def _uncaught(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    log.critical("uncaught exception", exc_info=(kind, error, trace), extra={"error": repr(error)})


def _thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    error = args.exc_value
    log.error(
        "uncaught exception in a thread",
        exc_info=(args.exc_type, error, args.exc_traceback) if error is not None else None,
        extra={"thread_name": getattr(args.thread, "name", None), "error": repr(error)},
    )


def _unraisable(args: Any) -> None:
    error = args.exc_value
    log.error(
        args.err_msg or "exception ignored",
        exc_info=(args.exc_type, error, args.exc_traceback) if error is not None else None,
        extra={"object": repr(args.object)[:200], "error": repr(error)},
    )


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    error = context.get("exception")
    extra = {k: repr(v)[:200] for k, v in context.items() if k not in ("message", "exception")}
    if error is not None:
        extra["error"] = repr(error)
    log.error(
        str(context.get("message") or "asyncio loop error"),
        exc_info=(type(error), error, error.__traceback__) if error is not None else None,
        extra=extra,
    )
