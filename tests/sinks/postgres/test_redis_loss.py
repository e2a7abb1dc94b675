"""Redis loses its data under a running worker (issue 15 item 5).

A throwaway redis-server without persistence (`--save "" --appendonly no`) is restarted
while a `streamsink worker` process runs a PostgreSQL group: the worker stops the group
with one line naming `streamsink offsets reset` (exit 3, no traceback), the reset prints
what it changes and makes the changes with --yes, and a new worker then applies every
event published since (during the outage and after the reset) exactly once.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.cli import main
from streamsink.schemas import Event, shard_of
from streamsink.schemas.event import Op
from streamsink.sinks.postgres.schema import OFFSETS
from streamsink.streams import Producer
from tests.conftest import RedisServer, free_port
from tests.consumers.test_worker_processes import Cluster
from tests.sinks.postgres import test_faults
from tests.sinks.postgres.test_faults import Setup, logged
from tests.sinks.postgres.test_outages import COUNTERS

setup_for = test_faults.setup_for  # the fixture, shared


GROUP = """
lease_ttl_ms = 1500
linger_ms = 20
max_age_ms = 200
block_ms = 100
maintenance_ms = 500
"""

SHARDS = 3
KEYS = 30
RESET = "streamsink offsets reset --config FILE --stream items --group pg-writer"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server that forgets everything when it restarts."""
    with tempfile.TemporaryDirectory(prefix="streamsink-redis-") as directory:
        made = RedisServer(free_port(), Path(directory), appendonly=False)
        made.start()
        try:
            yield made
        finally:
            made.kill()


@pytest.fixture
def redis_url(server: RedisServer) -> str:
    """This test's Redis is the throwaway one (setup_for, cluster and keys use it)."""
    return server.url


def incr(producer: Producer) -> None:
    """One round: +1 to every counter."""
    producer.publish_many(
        "items", [Event(f"k{i}", Op.INCR, {"id": i, "n": 1}) for i in range(KEYS)]
    )


def counters(setup: Setup, pg: Connection) -> dict[int, int]:
    return dict(setup.rows(pg, "items"))  # type: ignore[arg-type]


def offsets(setup: Setup, pg: Connection) -> dict[int, tuple[str, int]]:
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT shard, last_id, epoch FROM {}").format(
                sql.Identifier(setup.schema, OFFSETS)
            )
        )
        return {shard: (last_id, epoch) for shard, last_id, epoch in cur.fetchall()}


def reset(setup: Setup, capsys: pytest.CaptureFixture[str], *more: str) -> tuple[int, str]:
    """`streamsink offsets reset` on the test's config: exit code and what it printed."""
    argv = ["offsets", "reset", "--config", str(setup.path), "--stream", "items"]
    code = main([*argv, "--group", "pg-writer", *more])
    out, err = capsys.readouterr()
    return code, out + err


def test_redis_restarted_empty_stops_the_group_then_the_reset_resumes_exactly_once(
    setup_for: Callable[..., Setup],
    cluster: Cluster,
    pg: Connection,
    server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup = setup_for(COUNTERS, GROUP, SHARDS)
    producer = Producer(setup.client, setup.config)  # keeps publishing through the restart
    first = cluster.start(setup.path)
    incr(producer)
    setup.wait_drained([first], 30)
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    second = cluster.start(setup.path)  # a second owner: epochs 2 are stored
    incr(producer)
    setup.wait_drained([second], 30)
    assert counters(setup, pg) == {i: 2 for i in range(KEYS)}
    before = offsets(setup, pg)
    assert sorted(before) == list(range(SHARDS))
    assert {epoch for _, epoch in before.values()} == {2}

    server.kill()
    server.start()  # empty: no AOF, no RDB
    incr(producer)  # published while the group is down: new entries in new shard streams
    assert second.wait(30) == 3, "the only group stopped"
    stopped = logged([second], "group stopped: fix the cause and restart the worker")
    assert len(stopped) == 1, stopped
    error = stopped[0]["error"]
    assert "Redis lost data of group 'pg-writer' on stream 'items'" in error, error
    assert RESET in error, error
    assert "Traceback" not in second.log()
    assert not logged([second], "worker crashed")
    assert not logged([second], "shard fenced by a newer owner")
    assert counters(setup, pg) == {i: 2 for i in range(KEYS)}, "nothing applied meanwhile"

    code, printed = reset(setup, capsys)
    assert code == 0, printed
    assert "stream items: record it again with 3 shards" in printed
    for shard in range(SHARDS):
        assert f"shard {shard}: lease epoch counter 0 -> 3, above the stored" in printed
        assert f"shard {shard}: sink 'pg': stored epoch 2 -> 3" in printed, printed
    assert "dry run: nothing changed" in printed
    assert setup.client.exists(setup.keys.meta("items")) == 0, "a dry run changes nothing"

    code, printed = reset(setup, capsys, "--yes")
    assert (code, "done") == (0, printed.strip().splitlines()[-1][:4]), printed
    code, printed = reset(setup, capsys)
    assert code == 0 and "nothing to change" in printed, printed
    now = offsets(setup, pg)
    assert now == {shard: (last_id, 3) for shard, (last_id, _) in before.items()}, now

    third = cluster.start(setup.path)
    incr(producer)
    setup.wait_drained([third], 30)
    assert counters(setup, pg) == {i: 4 for i in range(KEYS)}, "each round applied once"
    after = offsets(setup, pg)
    assert all(epoch >= 4 for _, epoch in after.values()), after
    third.signal(signal.SIGTERM)
    assert third.wait(15) == 0
    assert not logged([third], "group stopped: fix the cause and restart the worker")


def test_entries_below_the_offsets_wait_for_the_operator_to_say_what_they_are(
    setup_for: Callable[..., Setup],
    cluster: Cluster,
    pg: Connection,
    server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Redis back on a clock behind the old one: its new entries sort below the offsets. The
    reset refuses to guess; told they are new (`apply`), it rewinds those offsets."""
    setup = setup_for(COUNTERS, GROUP, SHARDS)
    producer = Producer(setup.client, setup.config)
    worker = cluster.start(setup.path)
    incr(producer)
    setup.wait_drained([worker], 30)
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0

    server.kill()
    server.start()
    client = redis.Redis.from_url(server.url)
    key = next(f"k{i}" for i in range(KEYS) if shard_of(f"k{i}", SHARDS) == 1)
    number = int(key[1:])
    for seq in (1, 2):  # IDs from a clock at 1970: below every offset
        fields = {"key": key, "op": "incr", "data": f'{{"id": {number}, "n": 10}}'}
        client.xadd(setup.keys.shard("items", 1), fields, id=f"1000-{seq}")  # type: ignore[arg-type]

    starting = cluster.start(setup.path)  # a worker started now stops the group at once
    assert starting.wait(30) == 3
    [line] = logged([starting], "group stopped: fix the cause and restart the worker")
    assert "the stream's shard count is gone from Redis" in line["error"], line
    assert RESET in line["error"] and "Traceback" not in starting.log()

    code, printed = reset(setup, capsys, "--yes")
    assert code == 1, printed
    assert "shard 1: 2 entries in the shard are at or below the committed offset" in printed
    assert "--below-offset apply" in printed and "nothing changed" in printed
    assert client.exists(setup.keys.meta("items")) == 0

    code, printed = reset(setup, capsys, "--below-offset", "apply", "--yes")
    assert code == 0, printed
    assert "shard 1: sink 'pg': offset" in printed and "-> 0-0" in printed, printed
    assert offsets(setup, pg)[1][0] == "0-0"

    worker = cluster.start(setup.path)
    incr(producer)
    setup.wait_drained([worker], 30)
    expected = {i: 2 for i in range(KEYS)}
    expected[number] += 20
    assert counters(setup, pg) == expected, "the two entries applied once, nothing else twice"
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0


def test_redis_restored_from_an_older_backup_skips_what_was_applied_when_told_so(
    setup_for: Callable[..., Setup],
    cluster: Cluster,
    pg: Connection,
    server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A snapshot taken before the worker applied a round comes back: that round is in the
    shards again, below the offsets. `--below-offset skip` takes it as applied."""
    setup = setup_for(COUNTERS, GROUP, SHARDS)
    producer = Producer(setup.client, setup.config)
    incr(producer)
    setup.client.save()  # the backup: round one published, nothing applied
    worker = cluster.start(setup.path)
    incr(producer)
    setup.wait_drained([worker], 30)
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert counters(setup, pg) == {i: 2 for i in range(KEYS)}

    server.kill()
    server.start()  # loads the backup
    assert setup.client.xlen(setup.keys.shard("items", 0)) > 0
    starting = cluster.start(setup.path)
    assert starting.wait(30) == 3
    [line] = logged([starting], "group stopped: fix the cause and restart the worker")
    assert "below epoch 1 stored with it" in line["error"] and RESET in line["error"], line
    code, printed = reset(setup, capsys, "--yes")
    assert code == 1 and "entries in the shard are at or below" in printed, printed
    code, printed = reset(setup, capsys, "--below-offset", "skip", "--yes")
    assert code == 0, printed
    assert "entries at or below" in printed and "are taken as applied" in printed, printed
    assert offsets(setup, pg) and all(e == 2 for _, e in offsets(setup, pg).values()), "1 + 1"

    worker = cluster.start(setup.path)
    incr(producer)
    setup.wait_drained([worker], 30)
    assert counters(setup, pg) == {i: 3 for i in range(KEYS)}, "round one not applied again"
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0


def test_the_reset_names_what_it_cannot_find_and_changes_nothing(
    setup_for: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    setup = setup_for(COUNTERS, GROUP, SHARDS)
    argv = ["offsets", "reset", "--config", str(setup.path), "--stream"]
    assert main([*argv, "items", "--group", "nobody", "--yes"]) == 2
    assert "the config has no group 'nobody' reading stream 'items'" in capsys.readouterr().err
    assert main([*argv, "items", "--group", "pg-writer"]) == 0, "nothing lost: nothing to do"
    assert "nothing to change" in capsys.readouterr().out
    setup.client.delete(setup.keys.meta("items"))
    setup.client.hset(setup.keys.meta("items"), "shards", 5)
    assert main([*argv, "items", "--group", "pg-writer", "--yes"]) == 2
    assert "has 5 shards in Redis, the config says 3" in capsys.readouterr().err
