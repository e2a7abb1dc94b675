"""`streamsink status` shows each HTTP endpoint's counts (all workers added up) and breaker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis.asyncio as aredis

from streamsink.cli import main
from streamsink.streams import Keys
from streamsink.streams.endpoints import EndpointStats


async def test_status_shows_counts_of_every_worker_and_the_last_breaker_change(
    tmp_path: Path,
    keys: Keys,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    ar: aredis.Redis,
) -> None:
    one, two = EndpointStats(ar, keys, "hooks"), EndpointStats(ar, keys, "hooks")
    one.count("https://a.example:443", "sent", 7)
    one.count("https://a.example:443", "failed", 2)
    one.count("https://a.example:443", "retried", 2)
    two.count("https://a.example:443", "sent", 3)
    two.count("https://b.example/hooks/", "failed", 5)
    two.count("https://b.example/hooks/", "dead", 4)
    two.breaker("https://b.example/hooks/", "open")
    await one.flush()
    await two.flush()
    await two.flush()  # nothing new: adds nothing

    config = tmp_path / "c.toml"
    config.write_text(
        f"""
[redis]
url = "{redis_url}"
prefix = "{keys.prefix}"

[sinks.hooks]
type = "http"
secret_env = "UNUSED_BY_STATUS"

[sinks.quiet]
type = "http"
secret_env = "UNUSED_BY_STATUS"
"""
    )
    assert main(["--config", str(config), "status"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    a = next(line for line in lines if line.startswith("https://a.example:443"))
    b = next(line for line in lines if line.startswith("https://b.example/hooks/"))
    assert a.split() == ["https://a.example:443", "10", "2", "2", "0", "closed"]
    assert b.split()[:6] == ["https://b.example/hooks/", "0", "5", "0", "4", "open"]
    assert "since" in b and f"-{os.getpid()})" in b  # by which worker
    assert "http sink quiet" in out and "(no callbacks yet)" in out
