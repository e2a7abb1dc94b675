"""Every `streamsink` command line of the README's ```sh blocks runs as written.

Against a throwaway redis-server (so the README's default prefix `ss` is safe) and a
PostgreSQL database of this test's own, from a directory holding what the lines name:
`streamsink.toml` (the README's config-file example, less its server URLs and its worker
port: REDIS_URL and DATABASE_URL point at the test's servers instead), `examples/` (the
repository's), `events.jsonl`, and the dead letters the lines address. Lines run in README
order through bash, each must exit 0.

Not run, and why:
- lines that do not start `streamsink` (nor pipe into it): `make demo` / `make test` (CI
  runs those), `redis-cli XADD` (an example for other languages; tests/streams/test_interop.py
  publishes that way), `scripts/torture.py` (tests/test_torture.py);
- `streamsink demo`: it drains 142k events, a minute on a loaded machine; the demo is run
  by tests/test_cli.py::test_demo_drains_the_burst_into_postgresql_exactly;
- ```text blocks: synopses with placeholders, and what the output looks like.
`streamsink worker` lines run until stopped: each is started, waited for until it has taken
its shards, then sent SIGTERM, and must exit 0 having logged no warning.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from streamsink.streams import Keys
from tests.conftest import RedisServer, fresh_database

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SKIPPED = {"streamsink demo": "drains 142k events; tests/test_cli.py runs the demo"}
ADDRESS = re.compile(r"\b(\d+)/(\d+-\d+)\b")


def blocks(language: str) -> list[str]:
    """The README's fenced blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def command_lines() -> list[str]:
    """Every `streamsink` line of the ```sh blocks (comment-only lines dropped)."""
    lines = [line for block in blocks("sh") for line in block.splitlines()]
    return [
        line.strip() for line in lines if line.startswith("streamsink ") or "| streamsink " in line
    ]


def config_file() -> str:
    """The README's config-file example, pointed at the test's servers by the environment."""
    [example] = [b for b in blocks("toml") if b.startswith("[redis]")]
    kept = [
        line
        for line in example.splitlines()
        if not line.startswith(("url = ", "dsn = ", "http = "))
    ]
    return "\n".join(kept) + "\n"


@pytest.fixture
def database(database_url: str) -> Iterator[str]:
    """A database of this test's own (the README's tables live in `public`)."""
    with fresh_database(database_url, f"readme_{uuid.uuid4().hex[:10]}") as dsn:
        yield dsn


def seed_dead_letters(url: str, lines: list[str]) -> None:
    """The dead letters the lines name (`SHARD/ID`), as a worker would have written them."""
    client = redis.Redis.from_url(url)
    for shard, dead_id in {m.groups() for line in lines for m in ADDRESS.finditer(line)}:
        data = orjson.dumps({"id": 42, "status": "failed"})
        fields = {"reason": "sink 'postgres': postgres 23514: check", "entry": "1-1"}
        fields |= {"deliveries": "1", "f:key": "task:42", "f:op": "set", "f:data": data}
        client.xadd(Keys("ss").dead("tasks", int(shard), "pg-writer"), fields, id=dead_id)
    client.close()


def run_worker(line: str, cwd: Path, env: dict[str, str]) -> None:
    """A `streamsink worker` line: until it holds shards, then SIGTERM; exit 0, no warning."""
    log = cwd / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {line}"], cwd=cwd, env=env, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 60
    try:
        while b'"shard taken"' not in log.read_bytes():
            assert process.poll() is None, (
                f"{line!r} exited {process.returncode}: {log.read_text()}"
            )
            assert time.monotonic() < deadline, f"{line!r} took no shard: {log.read_text()}"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    records = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.startswith(b"{")]
    warnings = [r for r in records if r["level"] not in ("debug", "info")]
    assert warnings == [], warnings
    log.unlink()


def test_every_readme_command_line_runs_as_written(
    tmp_path: Path, redis_server: RedisServer, database: str
) -> None:
    lines = command_lines()
    assert len(lines) >= 20, lines  # the extraction still finds the README's commands
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / "streamsink.toml").write_text(config_file())
    events = [{"key": f"task:{n}", "data": {"id": n, "status": "queued"}} for n in range(5)]
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    seed_dead_letters(redis_server.url, lines)
    env = {k: v for k, v in os.environ.items() if k != "STREAMSINK_CONFIG"}
    env |= {"REDIS_URL": redis_server.url, "DATABASE_URL": database}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ran = 0
    for line in lines:
        if any(line.startswith(skipped) for skipped in SKIPPED):
            continue
        if line.startswith("streamsink worker "):
            run_worker(line, tmp_path, env)
        else:
            done = subprocess.run(
                ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, timeout=120
            )
            assert done.returncode == 0, (line, done.stdout, done.stderr)
        ran += 1
    assert ran == len(lines) - 1, "only the demo is left out"
