"""docker-compose.yml's commands, run here as the containers would run them (no engine).

`make lint` validates the file itself (`docker compose config`); these run what its
services run: init's command line, and the worker's healthcheck against a worker started
as the worker service starts it (its port on loopback instead of 0.0.0.0).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import RedisServer, free_port
from tests.test_readme import database  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")


def service(name: str) -> str:
    """The text of one service of the compose file."""
    found = re.search(rf"^  {name}:\n(.*?)(?=^  \w|^\S)", COMPOSE, flags=re.M | re.S)
    assert found is not None, name
    return found.group(1)


def environment(tmp_path: Path, redis_url: str, database_url: str) -> dict[str, str]:
    """The containers' environment, pointed at the test's servers and the mounted example."""
    mounted = tmp_path / "streamsink.toml"
    default = re.search(r"\$\{STREAMSINK_FILE:-\./([^}]+)\}:(\S+):ro", COMPOSE)
    assert default is not None and default.group(2) == "/etc/streamsink/streamsink.toml"
    shutil.copy(ROOT / default.group(1), mounted)
    env = dict(os.environ)
    env |= {"REDIS_URL": redis_url, "DATABASE_URL": database_url}
    env |= {"STREAMSINK_CONFIG": str(mounted)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def healthcheck(port: int) -> list[str]:
    """The worker's healthcheck command, asking `port`."""
    text = service("worker")
    [script] = re.findall(r"^\s+- (import urllib.*)$", text, flags=re.M)
    assert "/readyz" in script and ":9464/" in script
    return [sys.executable, "-c", script.replace(":9464/", f":{port}/")]


def test_init_checks_the_config_and_creates_tables_and_streams_again_and_again(
    tmp_path: Path,
    redis_server: RedisServer,
    database: str,  # noqa: F811
) -> None:
    text = service("init")
    assert 'entrypoint: ["sh", "-c"]' in text
    [line] = re.findall(r'^    command: \["(.*)"\]$', text, flags=re.M)
    assert line == "streamsink check && streamsink tables create && streamsink streams create"
    env = environment(tmp_path, redis_server.url, database)
    for _ in range(2):  # a restart of the project runs it again: nothing to do, exit 0
        done = subprocess.run(["sh", "-c", line], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert "orders: 4 shards (already there)" in done.stdout
    (tmp_path / "streamsink.toml").write_text(
        (tmp_path / "streamsink.toml").read_text().replace("[groups.pg-writer]", "[group.pg]")
    )
    broken = subprocess.run(["sh", "-c", line], env=env, capture_output=True, text=True)
    assert broken.returncode == 1, "a typo stops init, and so the workers"
    assert "unknown setting 'group'" in broken.stderr


def test_the_worker_healthcheck_passes_once_the_worker_is_ready(
    tmp_path: Path,
    redis_server: RedisServer,
    database: str,  # noqa: F811
) -> None:
    text = service("worker")
    assert "condition: service_completed_successfully" in text.split("init:", 1)[1]
    [command] = re.findall(r"^    command: (\[.*\])$", text, flags=re.M)
    assert command == '["worker", "--http", "0.0.0.0:9464"]'
    env = environment(tmp_path, redis_server.url, database)
    setup = "streamsink tables create && streamsink streams create"
    subprocess.run(["sh", "-c", setup], env=env, check=True, capture_output=True)
    port = free_port()
    assert subprocess.run(healthcheck(port), capture_output=True).returncode != 0, "nobody there"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            ["streamsink", "worker", "--http", f"127.0.0.1:{port}"],
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(healthcheck(port), capture_output=True).returncode != 0:
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"never healthy: {log.read_text()}"
            time.sleep(0.2)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
