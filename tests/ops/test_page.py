"""The status page in a real headless browser (Debian's chromium, driven by playwright):
a `streamsink worker --http` subprocess drains a mix with a dead letter; the page shows
the same lag, applied count, hot keys and dead-letter reason as `streamsink status --json`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from streamsink.cli import main
from streamsink.ops.status import status_document
from streamsink.streams.telemetry import read_telemetry
from tests.conftest import free_port, unavailable
from tests.ops.conftest import GROUP, KEYS, PER_KEY, SHARDS, STREAM, Setup, publish_mix

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT_ENV = "STREAMSINK_PAGE_SCREENSHOT"
"""Set to a path to keep a copy of the screenshot (docs/status-page.png is made so)."""


def browser_or_skip() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        unavailable("playwright with Debian's chromium (apt-get install chromium)")
    return sync_playwright


@pytest.fixture
def worker(setup: Setup, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`streamsink worker --http`; stopped with SIGTERM (it must exit 0), its log kept."""
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        command = [sys.executable, "-m", "streamsink.cli", "--config", str(setup.path)]
        process = subprocess.Popen(
            [*command, "worker", "--http", address],
            stdout=out,
            stderr=out,
        )
    try:
        yield f"http://{address}", log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert code == 0, log.read_text()
        for line in log.read_text().splitlines():  # JSON lines, always
            orjson.loads(line)


def wait_for(check: Any, what: str, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return result


def test_page_shows_what_status_json_says(
    setup: Setup,
    r: redis.Redis,
    worker: tuple[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sync_playwright = browser_or_skip()
    url, log = worker
    publish_mix(r, setup)
    applied = KEYS * PER_KEY

    def settled() -> bool:
        group = status_document(r, setup.keys, setup.config)["groups"][0]
        return group["totals"]["applied"] == applied and group["totals"]["dead"] == 1

    wait_for(settled, f"the worker to apply {applied} entries\n{log.read_text()[-3000:]}")
    settled_ms = time.time() * 1000

    def telemetry_after_settling() -> bool:  # written each second: from now on it is the last
        documents = read_telemetry(r, setup.keys, STREAM, GROUP, SHARDS)
        return all(doc is not None and doc["updated_ms"] > settled_ms for doc in documents)

    wait_for(telemetry_after_settling, "every shard's telemetry written after it settled")
    capsys.readouterr()
    assert main(["--config", str(setup.path), "status", "--json"]) == 0
    document = orjson.loads(capsys.readouterr().out)
    group = document["groups"][0]
    assert document["schema"] == 1
    assert group["totals"]["applied"] == applied and group["totals"]["lag"] == 0
    assert group["hot_keys"] and group["dead_letters"]
    reason = group["dead_letters"][0]["reason"]
    assert "colour" in reason

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            # The page has drawn a document made after the one status --json printed.
            page.wait_for_function(
                f"Number(document.getElementById('updated').dataset.generated || 0)"
                f" > {document['generated_ms']}",
                timeout=15_000,
            )
            section = page.locator(f"section.group[data-group='{group['name']}']")
            assert section.locator("[data-test=lag]").inner_text() == f"{group['totals']['lag']:,}"
            assert section.locator("[data-test=applied]").inner_text() == f"{applied:,}"
            shown_hot = section.locator(".hot tbody tr").evaluate_all(
                "rows => rows.map(r => [r.dataset.key, r.cells[1].textContent])"
            )
            assert shown_hot == [[h["key"], f"{h['count']:,}"] for h in group["hot_keys"]]
            dead_text = section.locator(".dead tbody").inner_text()
            assert reason in dead_text
            shot = tmp_path / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copy(shot, os.environ[SCREENSHOT_ENV])
        finally:
            browser.close()
