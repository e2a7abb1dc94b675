"""Logs are JSON lines always: warnings, uncaught exceptions and asyncio loop errors too."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import warnings
from collections.abc import Iterator

import orjson
import pytest

from streamsink.logs import configure, route_loop_errors


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Put back every hook and handler `configure` replaces."""
    for name in ("excepthook", "unraisablehook"):
        monkeypatch.setattr(sys, name, getattr(sys, name))
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    loggers = [logging.getLogger(), logging.getLogger("streamsink")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    logging.captureWarnings(False)
    for lg, handlers, level, propagate in saved:
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def lines(err: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in err.splitlines()]


def test_warnings_and_uncaught_exceptions_are_json_lines(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Unclosed Pipeline client", ResourceWarning, stacklevel=1)
    try:
        raise SystemError("returned a result with an exception set")
    except SystemError:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
    thread = threading.Thread(target=lambda: 1 / 0, name="pg-db_0")
    thread.start()
    thread.join()
    logging.getLogger("some.library").warning("a library speaks")
    got = lines(capsys.readouterr().err)
    assert [line["logger"] for line in got] == [
        "py.warnings",
        "streamsink.uncaught",
        "streamsink.uncaught",
        "some.library",
    ]
    assert "Unclosed Pipeline client" in str(got[0]["msg"])
    assert "SystemError" in str(got[1]["exc"]) and got[1]["level"] == "critical"
    assert got[2]["thread_name"] == "pg-db_0" and "ZeroDivisionError" in str(got[2]["exc"])


def test_loop_errors_are_json_lines(restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO")

    async def main() -> None:
        route_loop_errors(asyncio.get_running_loop())
        asyncio.get_running_loop().call_exception_handler(
            {"message": "Unclosed client session", "client": object()}
        )

    asyncio.run(main())
    (line,) = lines(capsys.readouterr().err)
    assert line["msg"] == "Unclosed client session" and "client" in line


def test_text_format_for_a_terminal(restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO", "text")
    logging.getLogger("streamsink.shard").warning("read failed", extra={"shard": 3})
    err = capsys.readouterr().err
    assert "WARNING streamsink.shard: read failed  shard=3" in err
    with pytest.raises(ValueError, match="log format"):
        configure("INFO", "xml")
