"""The harness gives real servers: prove it, so a broken fixture cannot pass silently."""

from __future__ import annotations

import psycopg2
import redis

from streamsink.sinks.postgres.schema import OFFSETS, REJECTED
from tests.conftest import RedisServer, leaked_into


def test_redis_is_real(r: redis.Redis) -> None:
    assert r.ping()
    assert r.info("server")["redis_version"]


def test_database_is_fresh(database_url: str) -> None:
    """The run's own database: nothing in `public` but what the run's sinks create there."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        (name,) = cur.fetchone()
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {row[0] for row in cur.fetchall()}
    assert name.startswith("streamsink_test_")
    assert tables <= {OFFSETS, REJECTED}


def test_throwaway_redis_survives_a_kill_with_aof(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.xadd("s", {"a": "1"})
    redis_server.kill()
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen("s") == 1


def test_the_end_of_run_check_finds_a_prefix_of_the_run_in_database_0(
    redis_server: RedisServer,
) -> None:
    """What fails a REDIS_URL=.../5 run that wrote to database 0 (a throwaway server here,
    so the shared database 0 stays as it is)."""
    zero = redis.Redis.from_url(redis_server.url)
    five = redis.Redis.from_url(redis_server.url.removesuffix("/0") + "/5")
    zero.set("tabc:{s:0}:events", 1)
    zero.set("tother:x", 1)  # another run's prefix
    five.set("tabc:in-five", 1)  # where the run should write
    url = redis_server.url.removesuffix("/0") + "/5"
    assert leaked_into(url, {"tabc", "tdef"}) == ["tabc:{s:0}:events"]
    zero.delete("tabc:{s:0}:events")
    assert leaked_into(url, {"tabc", "tdef"}) == []
