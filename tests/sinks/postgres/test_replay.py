"""`streamsink dead replay` reaches only the group whose dead letter it is (issue 12).

The measured case of the issue, end to end with a real `streamsink worker` process, real
Redis and two PostgreSQL databases: one stream `items`, two groups, each with its own
PostgreSQL sink writing its own database. The second database's table refuses large
counters (a CHECK constraint), so group g2 dead-letters an `incr n=500` that group g1
applied. Once the constraint is dropped and the letter replayed with the CLI, g2 applies
it and g1 acknowledges the replayed entry without applying it again: both hold 500,
not g1 1000. A replay of the same letter again changes nothing, and `--data` replays a
letter with fixed data instead of its own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.schemas import Event, from_dict, shard_of
from streamsink.schemas.event import Op
from streamsink.sinks.postgres.schema import create_tables
from streamsink.streams import Keys, Producer, create_stream
from streamsink.streams.admin import ShardStatus, group_status
from streamsink.streams.dead import DeadLetter, dead_letters, replay
from tests.consumers import recording
from tests.consumers.test_worker_processes import ROOT, Cluster, WorkerProcess
from tests.sinks.conftest import schema_of
from tests.sinks.postgres.test_faults import STREAM, Setup, _q

G1, G2 = "g1", "g2"
SHARDS = 2
CONSTRAINT = "n_small"


@dataclass
class TwoGroups(Setup):
    """`Setup` for several groups: drained means every group acknowledged every shard."""

    groups: tuple[str, ...] = (G1, G2)

    def status(self) -> list[ShardStatus]:
        return [row for g in self.groups for row in group_status(self.client, self.keys, STREAM, g)]

    def letters(self, group: str) -> list[DeadLetter]:
        return list(dead_letters(self.client, self.keys, STREAM, group, 10_000))

    def counters(self, conn: Connection) -> dict[int, int]:
        return {row[0]: row[1] for row in self.rows(conn, "counters")}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`streamsink --config FILE <args>` as an operator runs it."""
        return subprocess.run(
            [sys.executable, "-m", "streamsink.cli", "--config", str(self.path), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def entry(self, shard: int, entry_id: str) -> dict[bytes, bytes]:
        found: Any = self.client.xrange(self.keys.shard(STREAM, shard), entry_id, entry_id)
        assert found, f"entry {entry_id} is not in shard {shard}"
        return dict(found[0][1])

    def newest(self, shard: int) -> str:
        """The ID of the last entry ever added to the shard (trimming does not change it)."""
        info: Any = self.client.xinfo_stream(self.keys.shard(STREAM, shard))
        return str(info["last-generated-id"].decode())

    def group_info(self, shard: int, group: str) -> dict[str, Any]:
        groups: Any = self.client.xinfo_groups(self.keys.shard(STREAM, shard))
        return next(g for g in groups if g["name"].decode() == group)


@pytest.fixture
def second_database(database_url: str, pg: Connection) -> Iterator[tuple[str, Connection]]:
    """A database of this test's own (group g2 writes there): its DSN and an autocommit
    connection; dropped at the end."""
    name = f"streamsink_replay_{uuid.uuid4().hex[:10]}"
    with pg.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = psycopg2.extensions.parse_dsn(database_url)
    params["dbname"] = name
    dsn = psycopg2.extensions.make_dsn(**params)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        yield dsn, conn
    finally:
        conn.close()
        with pg.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def two_groups(
    tmp_path: Path,
    keys: Keys,
    redis_url: str,
    database_url: str,
    pg: Connection,
    r: redis.Redis,
    second_database: tuple[str, Connection],
) -> TwoGroups:
    """Stream `items` into table `counters`; g1 -> sink pg1 (the test's database), g2 ->
    sink pg2 (the second database, its table refusing n > 100). Same schema name in both."""
    schema = schema_of(pg)
    second_dsn, second = second_database
    # retention: the replayed entries stay in the shards for the test to look at.
    group = """
lease_ttl_ms = 5000
retention_ms = 600000
linger_ms = 50
max_age_ms = 200
block_ms = 100
"""
    text = f"""
[redis]
url = {_q(redis_url)}
prefix = {_q(keys.prefix)}

[postgres]
dsn = {_q(database_url)}

[tables.counters]
schema = {_q(schema)}
key = ["id"]
columns = {{ id = "int", n = {{ type = "int", policy = "sum" }} }}

[streams.{STREAM}]
shards = {SHARDS}
table = "counters"

[sinks.pg1]
type = "postgres"
pool_size = 2
statement_timeout_ms = 10000
offsets_schema = {_q(schema)}

[sinks.pg2]
type = "postgres"
dsn = {_q(second_dsn)}
pool_size = 2
statement_timeout_ms = 10000
offsets_schema = {_q(schema)}

[groups.{G1}]
stream = "{STREAM}"
sinks = ["pg1"]
{group}
[groups.{G2}]
stream = "{STREAM}"
sinks = ["pg2"]
{group}
"""
    path = tmp_path / "streamsink.toml"
    path.write_text(text)
    config = from_dict(tomllib.loads(text))
    create_tables(pg, config, offsets_schema=schema)
    create_tables(second, config, offsets_schema=schema)
    constrain(second, schema)
    create_stream(r, keys, STREAM, SHARDS)
    return TwoGroups(path, config, keys, r, schema)


def constrain(conn: Connection, schema: str, not_valid: bool = False) -> None:
    """The second database's table refuses counters above 100 (NOT VALID: rows already
    above it stay; only new values are checked)."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (n <= 100){}").format(
                sql.Identifier(schema, "counters"),
                sql.Identifier(CONSTRAINT),
                sql.SQL(" NOT VALID" if not_valid else ""),
            )
        )


def unconstrain(conn: Connection, schema: str) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(schema, "counters"), sql.Identifier(CONSTRAINT)
            )
        )


def incr(item: int, n: int) -> Event:
    return Event(f"k{item}", Op.INCR, {"id": item, "n": n})


def publish(setup: TwoGroups, workers: list[WorkerProcess], events: list[Event]) -> list[str]:
    """Publish the events together, and wait until both groups acknowledged them."""
    ids = Producer(setup.client, setup.config).publish_many(STREAM, events)
    setup.wait_drained(workers, 30)
    return ids


def replayed_ids(stdout: str) -> dict[str, str]:
    """`<shard>/<letter id> -> <new entry id>` lines of `dead replay`, as a dict by letter ID."""
    pairs = [line.split(" -> ") for line in stdout.splitlines() if " -> " in line]
    return {address.partition("/")[2]: new for address, new in pairs}


def test_a_replay_reaches_only_the_group_that_dead_lettered_the_entry(
    two_groups: TwoGroups,
    cluster: Cluster,
    pg: Connection,
    second_database: tuple[str, Connection],
) -> None:
    setup, second = two_groups, second_database[1]
    worker = cluster.start(setup.path)
    # Three rounds, each drained before the next: the 500 is alone in its window for k1
    # (a refused row dead-letters every entry merged into it).
    ids = publish(setup, [worker], [incr(i, 5) for i in (1, 2, 3, 4)])
    ids += publish(setup, [worker], [incr(1, 500)])
    ids += publish(setup, [worker], [incr(i, 7) for i in (1, 2, 3, 4)])

    # g2's database refused the 500: dead-lettered with the constraint named; g1 applied it.
    assert setup.letters(G1) == []
    (letter,) = setup.letters(G2)
    assert letter.entry == ids[4]
    assert letter.shard == shard_of("k1", SHARDS)
    assert "23514" in letter.reason and CONSTRAINT in letter.reason, letter.reason
    assert json.loads(letter.fields[b"data"]) == {"id": 1, "n": 500}
    assert setup.counters(pg) == {1: 512, 2: 12, 3: 12, 4: 12}
    assert setup.counters(second) == {1: 12, 2: 12, 3: 12, 4: 12}

    # Fixed the cause; the operator replays every dead letter of g2.
    unconstrain(second, setup.schema)
    done = setup.cli("dead", "replay", STREAM, G2, "--all")
    assert done.returncode == 0, done.stderr
    new_ids = replayed_ids(done.stdout)
    assert list(new_ids) == [letter.id], done.stdout
    new_id = new_ids[letter.id]
    assert new_id.count("-") == 1, f"no entry published: {done.stdout!r}"
    fields = setup.entry(letter.shard, new_id)
    assert fields[b"for"] == G2.encode()
    assert fields[b"origin"] == ids[4].encode()
    assert b"sinks" not in fields  # every sink of g2 refused it
    assert fields[b"key"] == b"k1" and json.loads(fields[b"data"]) == {"id": 1, "n": 500}
    assert setup.newest(letter.shard) == new_id, "the replay goes after the entries that followed"
    setup.wait_drained([worker], 30)

    assert setup.counters(second) == {1: 512, 2: 12, 3: 12, 4: 12}, "g2 applies the replay"
    assert setup.counters(pg) == {1: 512, 2: 12, 3: 12, 4: 12}, "g1 applied the 500 twice"
    assert setup.letters(G2) == [] and setup.letters(G1) == []
    g1 = setup.group_info(letter.shard, G1)
    assert g1["pending"] == 0, "g1 left the replayed entry pending"
    assert g1["last-delivered-id"].decode() == new_id, "g1 should have read (and skipped) it"

    # The same letter again: from the CLI it is gone; a terminal that listed it before the
    # first replay (a stale letter) publishes nothing.
    newest_before = setup.newest(letter.shard)
    again = setup.cli("dead", "replay", STREAM, G2, letter.id)
    assert (again.returncode, again.stdout) == (2, ""), again.stdout
    assert f"no such dead letter: {letter.id}" in again.stderr
    assert replay(setup.client, setup.keys, STREAM, G2, letter) is None
    everything = setup.cli("dead", "replay", STREAM, G2, "--all")
    assert everything.returncode == 0 and replayed_ids(everything.stdout) == {}
    assert setup.newest(letter.shard) == newest_before, "a second replay published"
    setup.wait_drained([worker], 30)
    assert setup.counters(second) == {1: 512, 2: 12, 3: 12, 4: 12}
    assert setup.counters(pg) == {1: 512, 2: 12, 3: 12, 4: 12}

    # Fix and replay: g2 refuses an incr of 300 again; the operator replays it as 50.
    constrain(second, setup.schema, not_valid=True)  # k1's 512 stays
    more = publish(setup, [worker], [incr(2, 300)])
    more += publish(setup, [worker], [incr(2, 1)])
    (fixable,) = setup.letters(G2)
    assert fixable.entry == more[0] and CONSTRAINT in fixable.reason
    assert setup.counters(pg)[2] == 313
    assert setup.counters(second)[2] == 13

    bad = setup.cli("dead", "replay", STREAM, G2, fixable.id, "--data", '{"id": 2, "n": "x"}')
    assert bad.returncode != 0, "data that does not fit the table is refused before replaying"
    assert [x.id for x in setup.letters(G2)] == [fixable.id]
    fixed = setup.cli("dead", "replay", STREAM, G2, fixable.id, "--data", '{"id": 2, "n": 50}')
    assert fixed.returncode == 0, fixed.stderr
    fixed_id = replayed_ids(fixed.stdout)[fixable.id]
    fields = setup.entry(fixable.shard, fixed_id)
    assert json.loads(fields[b"data"]) == {"id": 2, "n": 50}
    assert fields[b"for"] == G2.encode() and fields[b"origin"] == more[0].encode()
    setup.wait_drained([worker], 30)

    assert setup.counters(second) == {1: 512, 2: 63, 3: 12, 4: 12}, "the fixed data, not 300"
    assert setup.counters(pg) == {1: 512, 2: 313, 3: 12, 4: 12}, "g1 applied the fix too"
    assert setup.letters(G2) == [] and setup.letters(G1) == []
    assert setup.group_info(fixable.shard, G1)["pending"] == 0

    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0


# --- a group of two sinks: a replay reaches only the sinks that refused the entry ----------


@pytest.fixture
def two_sinks(
    tmp_path: Path, keys: Keys, redis_url: str, database_url: str, pg: Connection, r: redis.Redis
) -> TwoGroups:
    """Group g: sinks pg (its table refusing n > 100) then rec (refusing `"poison": true`)."""
    schema = schema_of(pg)
    text = f"""
[redis]
url = {_q(redis_url)}
prefix = {_q(keys.prefix)}

[postgres]
dsn = {_q(database_url)}

[tables.counters]
schema = {_q(schema)}
key = ["id"]
columns = {{ id = "int", n = {{ type = "int", policy = "sum" }}, poison = "bool" }}

[streams.{STREAM}]
shards = {SHARDS}
table = "counters"

[sinks.pg]
type = "postgres"
pool_size = 2
statement_timeout_ms = 10000
offsets_schema = {_q(schema)}

[sinks.rec]
type = "function"
function = "tests.consumers.recording:record"

[groups.g]
stream = "{STREAM}"
sinks = ["pg", "rec"]
lease_ttl_ms = 5000
retention_ms = 600000
linger_ms = 50
max_age_ms = 200
block_ms = 100
"""
    path = tmp_path / "streamsink.toml"
    path.write_text(text)
    config = from_dict(tomllib.loads(text))
    create_tables(pg, config, offsets_schema=schema)
    constrain(pg, schema)
    create_stream(r, keys, STREAM, SHARDS)
    return TwoGroups(path, config, keys, r, schema, groups=("g",))


def test_a_replay_reaches_only_the_sinks_that_refused_and_keeps_the_first_identity(
    two_sinks: TwoGroups, cluster: Cluster, pg: Connection
) -> None:
    setup, r, keys = two_sinks, two_sinks.client, two_sinks.keys
    worker = cluster.start(setup.path)
    ids = publish(setup, [worker], [incr(1, 5), incr(3, 4)])
    poison = Event("k2", Op.SET, {"id": 2, "poison": True})
    ids += publish(setup, [worker], [incr(1, 500), poison])  # pg refuses one, rec the other
    letters = {x.entry: x for x in setup.letters("g")}
    assert sorted(letters) == sorted(ids[2:])
    too_big, poisoned = letters[ids[2]], letters[ids[3]]
    assert too_big.sinks == ("pg",) and CONSTRAINT in too_big.reason
    assert poisoned.sinks == ("rec",) and "poisoned on purpose" in poisoned.reason
    assert setup.counters(pg) == {1: 5, 2: None, 3: 4}
    rec = recording.delivered(r, keys.prefix)
    assert rec[f"{too_big.shard}:{ids[2]}"] == 1 and f"{poisoned.shard}:{ids[3]}" not in rec

    unconstrain(pg, setup.schema)
    # Two terminals replay the same letter at once: one publishes.
    start = threading.Barrier(2)

    def race() -> str | None:
        start.wait()
        return replay(r, keys, STREAM, "g", too_big)

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: race(), range(2)))
    published = [x for x in outcomes if x is not None]
    assert len(published) == 1, outcomes
    fields = setup.entry(too_big.shard, published[0])
    assert (fields[b"for"], fields[b"sinks"], fields[b"origin"]) == (b"g", b"pg", ids[2].encode())
    again = setup.cli("dead", "replay", STREAM, "g", poisoned.id)
    assert again.returncode == 0, again.stderr
    poison_replay = replayed_ids(again.stdout)[poisoned.id]
    assert setup.entry(poisoned.shard, poison_replay)[b"sinks"] == b"rec"
    setup.wait_drained([worker], 30)

    assert setup.counters(pg) == {1: 505, 2: None, 3: 4}, "pg applies its refused entry once"
    rec = recording.delivered(r, keys.prefix)
    assert f"{too_big.shard}:{published[0]}" not in rec, "rec got an entry it had applied"
    # rec refuses the poison again: its new letter keeps the event's first identity.
    (letter,) = setup.letters("g")
    assert letter.entry == poison_replay and letter.sinks == ("rec",)
    assert letter.origin == ids[3] and letter.identity == ids[3]
    assert all(row.pending == 0 for row in setup.status())
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0
