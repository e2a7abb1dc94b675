"""PostgreSQL away, or not as declared, under a real worker process (issue 11).

- unreachable for 30 s (a TCP proxy the test cuts): every shard *retrying* in status with
  the error within seconds, one log line when it starts and one when it ends, nothing
  acknowledged meanwhile, then every counter exact and nothing dead-lettered;
- a declared table missing: the group stops at its first window (status *stopped* with the
  fix, exit 3), nothing acknowledged or dead-lettered;
- a database that does not exist: the worker says so at start-up and exits 3.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import make_dsn, parse_dsn

from streamsink.schemas import Event
from streamsink.schemas.event import Op
from streamsink.streams import Producer
from streamsink.streams.state import ShardState
from tests.consumers.test_worker_processes import Cluster, eventually
from tests.proxy import Proxy
from tests.sinks.postgres import test_faults
from tests.sinks.postgres.test_faults import Setup, logged

setup_for = test_faults.setup_for  # the fixture, shared

COUNTERS = """
[tables.items]
schema = SCHEMA
key = ["id"]
columns.id = "int"
columns.n = { type = "int", policy = "sum" }
"""

GROUP = """
lease_ttl_ms = 5000
linger_ms = 20
max_age_ms = 200
"""

SHARDS = 3


def via(proxy: Proxy, database_url: str) -> str:
    """`database_url` (a URL or key=value DSN) through the proxy."""
    return make_dsn(database_url, host="127.0.0.1", port=proxy.port)


def elsewhere(database_url: str, name: str) -> str:
    """`database_url` naming another database."""
    return make_dsn(database_url, dbname=name)


def incr(setup: Setup, rounds: int) -> None:
    events = [Event(f"k{i}", Op.INCR, {"id": i, "n": 1}) for _ in range(rounds) for i in range(30)]
    Producer(setup.client, setup.config).publish_many("items", events)


def counters(setup: Setup, pg: Connection) -> dict[int, int]:
    return dict(setup.rows(pg, "items"))  # type: ignore[arg-type]


def test_postgres_unreachable_for_30_s_is_retried_visibly_and_nothing_is_lost_or_doubled(
    setup_for: Callable[..., Setup], cluster: Cluster, pg: Connection, database_url: str
) -> None:
    target = parse_dsn(database_url)
    with Proxy(target.get("host", "127.0.0.1"), int(target.get("port", 5432))) as proxy:
        setup = setup_for(COUNTERS, GROUP, SHARDS, dsn=via(proxy, database_url))
        worker = cluster.start(setup.path)
        incr(setup, 5)
        setup.wait_drained([worker], 30)
        assert counters(setup, pg) == {i: 5 for i in range(30)}

        proxy.cut()
        cut_at = time.monotonic()
        incr(setup, 3)

        def all_retrying() -> bool:
            return all(row.state is ShardState.RETRYING for row in setup.status())

        took = eventually(all_retrying, "every shard retrying in status", 10, [worker])
        assert took < 10
        for row in setup.status():
            assert "postgres sink 'pg'" in row.error, row.error
            assert row.pending > 0, "nothing acknowledged while the database is away"
        time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
        assert all_retrying()
        assert counters(setup, pg) == {i: 5 for i in range(30)}
        proxy.restore()
        setup.wait_drained([worker], 60)

    assert counters(setup, pg) == {i: 8 for i in range(30)}, "nothing lost, nothing doubled"
    assert setup.dead() == []
    assert all(row.state is ShardState.RUNNING for row in setup.status())
    assert len(logged([worker], "sink write failed: retrying")) == SHARDS, "one line a shard"
    assert len(logged([worker], "sink recovered")) == SHARDS
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0


def test_a_missing_table_stops_the_group_loudly_and_acknowledges_nothing(
    setup_for: Callable[..., Setup], cluster: Cluster, pg: Connection
) -> None:
    setup = setup_for(COUNTERS, GROUP, SHARDS)
    with pg.cursor() as cur:
        cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(setup.schema, "items")))
    incr(setup, 2)
    worker = cluster.start(setup.path)
    assert worker.wait(30) == 3
    stopped = logged([worker], "group stopped: fix the cause and restart the worker")
    assert len(stopped) == 1
    error = stopped[0]["error"]
    assert f"{setup.schema}.items" in error and "streamsink tables create" in error, error
    rows = setup.status()
    assert sum(row.pending for row in rows) + sum(row.lag or 0 for row in rows) == 60
    assert setup.dead() == [], "a configuration error dead-letters nothing"
    assert any(row.state is ShardState.STOPPED and "tables create" in row.error for row in rows)
    assert "Traceback" not in worker.log()


def test_a_database_that_does_not_exist_ends_start_up_with_the_fix(
    setup_for: Callable[..., Setup], cluster: Cluster, database_url: str
) -> None:
    missing = elsewhere(database_url, "streamsink_no_such_database")
    setup = setup_for(COUNTERS, GROUP, SHARDS, dsn=missing)
    started = time.monotonic()
    worker = cluster.start(setup.path)
    assert worker.wait(30) == 3
    assert time.monotonic() - started < 20
    stopped = logged([worker], "group stopped: fix the cause and restart the worker")
    assert len(stopped) == 1
    assert "streamsink_no_such_database" in stopped[0]["error"]
    assert not logged([worker], "retrying"), "no endless warnings"
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
