"""Real servers for every test.

By default the machine's Redis and PostgreSQL (REDIS_URL / DATABASE_URL override them);
each test gets its own key prefix and the run its own database, so runs and tests can
go in parallel (pytest-xdist's workers are separate runs of this kind). Where neither
answers and a Docker engine does, testcontainers starts them. Under CI=true a missing server
fails the test; elsewhere it skips it.

When REDIS_URL names another database than 0, the run checks at its end that none of its key
prefixes reached database 0 (`leaked_into`): a test that ignores REDIS_URL fails the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import redis.asyncio as aredis
from hypothesis import HealthCheck, settings
from psycopg2 import sql
from redis.connection import parse_url

from streamsink.streams.keys import Keys

# Hypothesis judges no example by its speed: a per-example deadline and the too-slow health
# check are timed assertions, and fail on a loaded machine (tests may still set their own).
settings.register_profile("streamsink", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("streamsink")

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, so that under xdist the long ones overlap the rest of the run
    instead of running alone at its end (the order of the others is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def unavailable(what: str) -> None:
    """Fail under CI (a missing server is a broken CI), skip on a developer's machine."""
    message = f"{what} is not reachable; start it (see README) or set the URL variable"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def _postgres_answers(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg2.Error:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a live Redis: the machine's, or a testcontainers one where Docker answers."""
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if _redis_answers(url):
        yield url
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    unavailable(f"Redis at {url}")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """DSN of a fresh PostgreSQL database for this run, dropped at the end."""
    base = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    container: Any = None
    if not _postgres_answers(base):
        if not _docker_answers():
            unavailable(f"PostgreSQL at {base}")
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15").start()
        base = container.get_connection_url(driver=None)
    try:
        with fresh_database(base, f"streamsink_test_{os.getpid()}_{uuid.uuid4().hex[:8]}") as dsn:
            yield dsn
    finally:
        if container is not None:
            container.stop()


@contextlib.contextmanager
def fresh_database(base: str, name: str) -> Iterator[str]:
    """The DSN of a new database `name` on the server of `base`, dropped afterwards."""
    admin = psycopg2.connect(base)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = psycopg2.extensions.parse_dsn(base)
    params["dbname"] = name
    try:
        yield psycopg2.extensions.make_dsn(**params)
    finally:
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


PREFIXES: set[str] = set()  # every key prefix this run (this xdist worker) handed out


def fresh_keys(letter: str = "t") -> Keys:
    """A key prefix nobody else uses, remembered for the end-of-run check of database 0."""
    prefix = f"{letter}{uuid.uuid4().hex[:12]}"
    PREFIXES.add(prefix)
    return Keys(prefix)


def leaked_into(url: str, prefixes: set[str]) -> list[str]:
    """Keys of database 0 at `url`'s server that start with one of `prefixes` and a colon."""
    options = parse_url(url)
    client = redis.Redis(
        host=options.get("host", "127.0.0.1"),
        port=options.get("port", 6379),
        username=options.get("username"),
        password=options.get("password"),
        db=0,
    )
    try:
        return sorted(
            key.decode(errors="replace")
            for key in client.scan_iter(count=10_000)
            if key.partition(b":")[0].decode(errors="replace") in prefixes
        )
    finally:
        client.close()


@pytest.fixture(scope="session", autouse=True)
def database_0_untouched() -> Iterator[None]:
    """With REDIS_URL on another database, fail the run if one of its prefixes reached db 0.

    Other runs share database 0 at the same time, so its size or a hash of its keys proves
    nothing; the prefixes this run handed out are its own and name what it wrote.
    """
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    yield
    if not url.startswith("redis") or int(parse_url(url).get("db", 0)) == 0:
        return
    if not PREFIXES or not _redis_answers(url):
        return
    leaked = leaked_into(url, PREFIXES)
    assert not leaked, (
        f"REDIS_URL is {url}, yet the run wrote to database 0: {leaked[:20]}"
        f" ({len(leaked)} keys); a test builds a client or a Config that ignores REDIS_URL"
    )


@pytest.fixture
def keys(redis_url: str) -> Iterator[Keys]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    made = fresh_keys()
    prefix = made.prefix
    yield made
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A sync client of the test Redis (bytes replies)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def ar(redis_url: str) -> AsyncIterator[aredis.Redis]:
    """An asyncio client of the test Redis (bytes replies)."""
    client = aredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A throwaway redis-server on a free loopback port, for tests that kill or restart it."""

    port: int
    directory: Path
    appendonly: bool = True
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, keeping its AOF) and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server binary")
        assert binary is not None
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def _answers(self) -> bool:
        """Our server answers on the port (not another run's that took it first)."""
        assert self.process is not None
        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=2)
            try:
                return int(client.info("server")["process_id"]) == self.process.pid
            finally:
                client.close()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """SIGTERM and wait, as a clean shutdown would."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A throwaway redis-server with AOF, killed at the end of the test."""
    with tempfile.TemporaryDirectory(prefix="streamsink-redis-") as directory:
        for attempt in range(5):  # a free port may be taken before the server binds it
            server = RedisServer(free_port(), Path(directory))
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture
def cluster(tmp_path: Path, keys: Keys, redis_url: str) -> Iterator[Any]:
    """`streamsink worker` subprocesses for the test (tests.consumers.test_worker_processes.
    Cluster); the ones still running are killed at the end, and their logs printed."""
    from tests.consumers.test_worker_processes import Cluster

    cluster = Cluster(tmp_path, keys, redis_url)
    try:
        yield cluster
    finally:
        for worker in cluster.started:
            if worker.alive():
                worker.process.kill()
                worker.process.wait(10)
        cluster.dump()
