"""The PostgreSQL sink under faults, end to end (issue 4's "done when").

Real `streamsink worker` processes (started as in tests/consumers/test_worker_processes.py),
real Redis and PostgreSQL:

- workers SIGKILLed at random moments while events flow: once everything is acknowledged,
  the tables equal the events applied one by one (nothing lost, nothing applied twice);
- the sink's database connections terminated mid-flush: retried, every counter exact;
- a row the database refuses: its entry is dead-lettered with the database's message and
  the rest of its window commits.

Each test has its own Redis prefix and its own PostgreSQL schema (tables and offsets).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.schemas import Config, Event, encode, from_dict
from streamsink.schemas.event import Op
from streamsink.schemas.merge import Row, apply_event
from streamsink.schemas.table import Table
from streamsink.sinks.postgres.schema import OFFSETS, create_tables
from streamsink.streams import Keys, Producer, create_stream
from streamsink.streams.admin import ShardStatus, group_status
from streamsink.streams.dead import DeadLetter, dead_letters
from tests.consumers.test_worker_processes import ROOT, Cluster, WorkerProcess, eventually
from tests.sinks.conftest import schema_of

STREAM, GROUP, SINK = "items", "pg-writer", "pg"


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text)


@dataclass
class Setup:
    """One test's config file and parsed config, and what it checks the outcome with."""

    path: Path
    config: Config
    keys: Keys
    client: redis.Redis
    schema: str

    def table(self, name: str) -> Table:
        return self.config.tables[name]

    def status(self) -> list[ShardStatus]:
        return group_status(self.client, self.keys, STREAM, GROUP)

    def dead(self) -> list[DeadLetter]:
        return list(dead_letters(self.client, self.keys, STREAM, GROUP, 10_000))

    def rows(self, pg: Connection, name: str) -> list[tuple[Any, ...]]:
        """Every row of a declared table, as tuples of its declared columns."""
        table = self.table(name)
        with pg.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT {} FROM {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, table.columns)),
                    sql.Identifier(self.schema, table.name),
                )
            )
            return list(cur.fetchall())

    def wait_drained(self, workers: list[WorkerProcess], timeout: float) -> float:
        """Wait until every shard is acknowledged to its end (pending 0, lag 0); seconds."""
        seen: list[ShardStatus] = []

        def drained() -> bool:
            seen[:] = self.status()
            return all(row.pending == 0 and row.lag == 0 for row in seen)

        try:
            return eventually(
                drained, "every shard acknowledged (pending 0, lag 0)", timeout, workers
            )
        except AssertionError:
            print(*seen, sep="\n")
            raise


@pytest.fixture
def setup_for(
    tmp_path: Path, keys: Keys, redis_url: str, database_url: str, pg: Connection, r: redis.Redis
) -> Callable[..., Setup]:
    """Makes a test's config (tables in its own schema), its tables and its stream."""

    def make(tables: str, group: str, shards: int, dsn: str | None = None) -> Setup:
        """`dsn`: where the sink connects (default: the test database)."""
        schema = schema_of(pg)
        text = f"""
[redis]
url = {_q(redis_url)}
prefix = {_q(keys.prefix)}

[postgres]
dsn = {_q(dsn or database_url)}

{tables.replace("SCHEMA", _q(schema))}

[streams.{STREAM}]
shards = {shards}
table = "items"

[sinks.{SINK}]
type = "postgres"
pool_size = 2
statement_timeout_ms = 10000
offsets_schema = {_q(schema)}

[groups.{GROUP}]
stream = "{STREAM}"
sinks = ["{SINK}"]
{group}
"""
        path = tmp_path / "streamsink.toml"
        path.write_text(text)
        config = from_dict(tomllib.loads(text))
        create_tables(pg, config, offsets_schema=schema)
        create_stream(r, keys, STREAM, shards)
        return Setup(path, config, keys, r, schema)

    return make


def logged(workers: Sequence[WorkerProcess], message: str) -> list[dict[str, Any]]:
    """The JSON log lines with this message, of the given workers."""
    return [line for w in workers for line in w.records() if line["msg"] == message]


class FlowPublisher:
    """Publishes events with the sync producer from a thread, in chunks spread over
    `seconds`. One thread and one producer: publication order is stream order per key."""

    def __init__(
        self, client: redis.Redis, config: Config, events: list[Event], seconds: float
    ) -> None:
        self.producer = Producer(client, config)
        self.events, self.seconds = events, seconds
        self.published = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        chunk = 500
        pause = self.seconds * chunk / len(self.events)
        start = time.monotonic()
        try:
            for number, first in enumerate(range(0, len(self.events), chunk)):
                self.producer.publish_many(STREAM, self.events[first : first + chunk])
                self.published = min(len(self.events), first + chunk)
                time.sleep(max(0.0, start + (number + 1) * pause - time.monotonic()))
        except BaseException as exc:  # the test reports it
            self.error = exc

    def start(self) -> FlowPublisher:
        self._thread.start()
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join(60)
        assert self.error is None, f"publishing failed: {self.error!r}"
        assert self.published == len(self.events)


# --- workers killed at random moments -------------------------------------------------------

CRASH_TABLES = """
[tables.items]
schema = SCHEMA
key = ["id"]
columns.id = "int"
columns.name = "text"
columns.n = { type = "int", policy = "sum" }
columns.best = { type = "int", policy = "max" }

[tables.log]
schema = SCHEMA
key = []
columns = { item = "int", seq = "int", note = "text" }
"""

# Short leases, so that takeovers are quick. A shard may change hands several times before
# the entries claimed from a dead owner are flushed, and each claim counts as a delivery:
# max_deliveries is raised so that only a real fault dead-letters (the test asserts none).
CRASH_GROUP = """
lease_ttl_ms = 1500
max_deliveries = 1000
linger_ms = 50
max_age_ms = 300
block_ms = 100
maintenance_ms = 1000
"""

EVENTS, KEYS, SHARDS, WORKERS, MIN_KILLS = 200_000, 5_000, 6, 3, 10
NOTES = ["plain", "tab\there", "new\nline", "back\\slash \\N", "é中文🎉", ""]


def crash_events(seed: int) -> list[Event]:
    """EVENTS events over KEYS keys: incr, set (lww text, max, and a sum via set), del,
    and appends to the log table."""
    rng = random.Random(seed)
    events = []
    for seq in range(EVENTS):
        item = rng.randrange(KEYS)
        key, roll = f"k{item}", rng.random()
        if roll < 0.40:
            events.append(Event(key, Op.INCR, {"id": item, "n": rng.randint(-3, 9)}))
        elif roll < 0.55:
            data: dict[str, Any] = {"id": item, "name": f"{rng.choice(NOTES)}{seq}"}
            if rng.random() < 0.5:
                data["best"] = rng.randrange(1_000_000)
            events.append(Event(key, Op.SET, data))
        elif roll < 0.62:
            events.append(Event(key, Op.SET, {"id": item, "n": rng.randint(0, 50)}))
        elif roll < 0.66:
            events.append(Event(key, Op.DEL, {"id": item}))
        else:
            data = {"item": item, "seq": seq, "note": rng.choice(NOTES)}
            events.append(Event(key, Op.APPEND, data, table="log"))
    return events


def reference(items: Table, events: list[Event]) -> tuple[dict[int, Row], Counter[tuple[Any, ...]]]:
    """The tables the events make applied one by one in order per key (merge.apply_event):
    the rows of `items` by id, and the appended rows as a multiset."""
    state: dict[int, Row | None] = {}
    appended: Counter[tuple[Any, ...]] = Counter()
    for event in events:
        if event.op is Op.APPEND:
            appended[(event.data["item"], event.data["seq"], event.data["note"])] += 1
        else:
            item = event.data["id"]
            state[item] = apply_event(state.get(item), event, items)
    return {item: row for item, row in state.items() if row is not None}, appended


def owning_pids(setup: Setup) -> set[int]:
    """Pids of the workers holding a lease now (worker ids are host-pid-suffix)."""
    return {int(row.owner.rsplit("-", 2)[1]) for row in setup.status() if row.owner}


def test_workers_killed_at_random_leave_the_tables_exactly_as_the_events_say(
    setup_for: Callable[..., Setup], cluster: Cluster, pg: Connection
) -> None:
    setup = setup_for(CRASH_TABLES, CRASH_GROUP, SHARDS)
    events = crash_events(seed=4)
    rng = random.Random()
    workers = [cluster.start(setup.path) for _ in range(WORKERS)]
    eventually(lambda: len(owning_pids(setup)) == WORKERS, "every worker owns shards", 20, workers)

    started = time.monotonic()
    publisher = FlowPublisher(setup.client, setup.config, events, seconds=18).start()
    kills = 0
    while publisher.running() or kills < MIN_KILLS:
        time.sleep(rng.uniform(0.5, 2.0))
        owning = owning_pids(setup)
        victim = rng.choice([w for w in workers if w.pid in owning] or workers)
        victim.signal(signal.SIGKILL)
        assert victim.wait(5) == -signal.SIGKILL
        kills += 1
        for worker in workers:
            assert worker is victim or worker.alive(), f"worker {worker.pid} exited by itself"
        workers[workers.index(victim)] = cluster.start(setup.path)
    publisher.join()
    published = time.monotonic() - started
    drained = setup.wait_drained(workers, 60)

    items = setup.table("items")
    rows, appended = reference(items, events)
    found = {row[0]: dict(zip(items.columns, row, strict=True)) for row in setup.rows(pg, "items")}
    missing, extra = sorted(rows.keys() - found.keys()), sorted(found.keys() - rows.keys())
    wrong = sorted(k for k in rows.keys() & found.keys() if rows[k] != found[k])
    assert (missing, extra, wrong) == ([], [], []), (
        f"{len(missing)} rows missing, {len(extra)} extra, {len(wrong)} differ, e.g. "
        + "; ".join(f"expected {rows[k]}, found {found[k]}" for k in wrong[:3])
    )
    stored = Counter(setup.rows(pg, "log"))
    assert stored == appended, (
        f"appended rows: {(appended - stored).total()} missing, {(stored - appended).total()} extra"
    )
    assert setup.dead() == [], "a healthy entry was dead-lettered"

    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait(15) for worker in workers] == [0] * WORKERS
    everyone = cluster.started
    skipped = sum(line["entries"] for line in logged(everyone, "skipping entries applied before"))
    new_owners = sum(row.epoch for row in setup.status()) - SHARDS
    print(
        f"\n{len(events)} events, {kills} SIGKILLs, {len(everyone)} workers started, "
        f"{new_owners} takeovers (new lease owners after the first), {skipped} entries "
        f"skipped as already applied, {len(logged(everyone, 'sink write failed: retrying'))} "
        f"sink retries; published in {published:.1f} s, drained {drained:.1f} s later; "
        f"{len(rows)} rows, {appended.total()} appended rows"
    )
    assert kills >= MIN_KILLS
    assert new_owners >= kills, "each kill hands the victim's shards to new owners"


# --- connections killed mid-flush -----------------------------------------------------------

COUNTER_TABLES = """
[tables.items]
schema = SCHEMA
key = ["id"]
columns = { id = "int", n = { type = "int", policy = "sum" } }
"""

COUNTER_GROUP = """
lease_ttl_ms = 5000
linger_ms = 20
max_age_ms = 100
block_ms = 100
"""

TERMINATE = (
    "SELECT state, pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE application_name = 'streamsink' AND datname = current_database()"
)


def slow_down(pg: Connection, setup: Setup) -> None:
    """Each statement writing the table sleeps 50 ms: flushes stay open long enough for a
    termination to land inside their transaction."""
    schema = sql.Identifier(setup.schema)
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL(
                "CREATE FUNCTION {}.slow() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$"
            ).format(schema)
        )
        cur.execute(
            sql.SQL(
                "CREATE TRIGGER slow AFTER INSERT OR UPDATE ON {} FOR EACH STATEMENT"
                " EXECUTE FUNCTION {}.slow()"
            ).format(sql.Identifier(setup.schema, "items"), schema)
        )


def test_connections_terminated_mid_flush_are_retried_and_every_counter_is_exact(
    setup_for: Callable[..., Setup], cluster: Cluster, pg: Connection
) -> None:
    setup = setup_for(COUNTER_TABLES, COUNTER_GROUP, 2)
    slow_down(pg, setup)
    rng = random.Random(7)
    events = [
        Event(f"c{item}", Op.INCR, {"id": item, "n": 1})
        for item in (rng.randrange(300) for _ in range(20_000))
    ]
    worker = cluster.start(setup.path)
    eventually(
        lambda: owning_pids(setup) == {worker.pid}, "the worker owns the shards", 20, [worker]
    )

    publisher = FlowPublisher(setup.client, setup.config, events, seconds=5).start()
    states: Counter[str] = Counter()
    deadline = time.monotonic() + 40
    while publisher.running() or states["active"] + states["idle in transaction"] < 5:
        assert time.monotonic() < deadline, f"no termination landed in a flush: {states}"
        with pg.cursor() as cur:
            cur.execute(TERMINATE)
            for state, _ in cur.fetchall():
                states[state or "?"] += 1
        time.sleep(rng.uniform(0.01, 0.2))
        assert worker.alive(), "the worker died"
    publisher.join()
    drained = setup.wait_drained([worker], 60)

    expected = Counter(event.data["id"] for event in events)
    assert dict(setup.rows(pg, "items")) == dict(expected)
    assert setup.dead() == []
    retries = logged([worker], "sink write failed: retrying")  # once per retrying spell
    errors = Counter(line["error"].split(": ")[1] for line in retries)  # "sink: Class: text"
    print(
        f"\nbackends terminated, by state: {dict(states)}; {len(retries)} spells of retries "
        f"{dict(errors)}; "
        f"{len(logged([worker], 'skipping entries applied before'))} windows partly applied "
        f"before; drained {drained:.1f} s after the last termination"
    )
    assert retries, "the worker should have retried the windows whose connection died"
    assert set(errors) == {"SinkUnavailable"}, "only lost connections should fail a write"
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0


# --- a row the database refuses -------------------------------------------------------------

CHECKED_TABLES = """
[tables.items]
schema = SCHEMA
key = ["id"]
columns = { id = "int", best = "int", name = "text" }
"""

# One long window: every entry is published before the worker starts, and the window
# closes only after 1 s without new entries.
CHECKED_GROUP = """
lease_ttl_ms = 5000
linger_ms = 1000
max_age_ms = 5000
"""


def test_a_row_the_database_refuses_is_dead_lettered_with_its_reason_and_the_rest_commits(
    setup_for: Callable[..., Setup], cluster: Cluster, pg: Connection
) -> None:
    setup = setup_for(CHECKED_TABLES, CHECKED_GROUP, 1)
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT best_small CHECK (best < 1000)").format(
                sql.Identifier(setup.schema, "items")
            )
        )
    events = [Event(f"i{i}", Op.SET, {"id": i, "best": i, "name": f"n{i}"}) for i in range(300)]
    events[150] = Event("i150", Op.SET, {"id": 150, "best": 5000, "name": "poison"})
    events += [Event(f"i{i}", Op.SET, {"id": i, "name": f"again{i}"}) for i in range(0, 300, 7)]
    ids = Producer(setup.client, setup.config).publish_many(STREAM, events)
    worker = cluster.start(setup.path)
    setup.wait_drained([worker], 30)

    letters = setup.dead()
    assert len(letters) == 1
    letter = letters[0]
    assert letter.entry == ids[150]
    assert letter.reason.startswith("sink 'pg': postgres 23514:")
    assert "best_small" in letter.reason
    assert json.loads(letter.fields[b"data"]) == {"id": 150, "best": 5000, "name": "poison"}

    expected = {i: (i, f"again{i}" if i % 7 == 0 else f"n{i}") for i in range(300) if i != 150}
    assert {row[0]: row[1:] for row in setup.rows(pg, "items")} == expected
    refused = logged([worker], "rows refused, isolating them")
    assert len(refused) == 1, "one window held every entry, the poison one among them"
    where = {"sink": SINK, "group": GROUP, "stream": STREAM}  # config names, on every line
    assert where.items() <= refused[0].items()
    offsets_read = logged([worker], "offset read")
    assert offsets_read and all(where.items() <= line.items() for line in offsets_read)
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT last_id FROM {} WHERE sink = %s").format(
                sql.Identifier(setup.schema, OFFSETS)
            ),
            (SINK,),
        )
        assert cur.fetchall() == [(ids[-1],)]

    command = ["--config", str(setup.path), "dead", "list", STREAM, GROUP]
    listed = subprocess.run(
        [sys.executable, "-m", "streamsink.cli", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(listed) == 1
    assert f"entry {ids[150]}" in listed[0] and "23514" in listed[0] and "best_small" in listed[0]
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0


# --- a value the encoder refuses ------------------------------------------------------------

DOCS_TABLES = """
[tables.items]
schema = SCHEMA
key = ["id"]
columns = { id = "int", doc = "json" }
"""


def test_json_too_deep_for_copy_is_dead_lettered_alone_and_the_rest_commits(
    setup_for: Callable[..., Setup], cluster: Cluster, pg: Connection
) -> None:
    """Issue 11's wedge: JSON nested 300 deep decodes (orjson reads 1024 levels) but
    `orjson.dumps` in the COPY path refuses it. Raw XADD, as a foreign producer would."""
    setup = setup_for(DOCS_TABLES, CHECKED_GROUP, 1)
    producer = Producer(setup.client, setup.config)
    before = [Event(f"d{i}", Op.SET, {"id": i, "doc": {"i": i}}) for i in range(100)]
    after = [Event(f"d{i}", Op.SET, {"id": i, "doc": [i]}) for i in range(101, 200)]
    producer.publish_many(STREAM, before)
    deep = b'{"id":100,"doc":' + b"[" * 300 + b"]" * 300 + b"}"
    fields = dict(zip(*[iter(encode(Event("d100", Op.SET, {"id": 100})))] * 2, strict=True))
    fields[b"data"] = deep
    poison = setup.client.xadd(setup.keys.shard(STREAM, 0), fields).decode()  # type: ignore[arg-type]
    producer.publish_many(STREAM, after)
    worker = cluster.start(setup.path)
    setup.wait_drained([worker], 30)

    letters = setup.dead()
    assert [letter.entry for letter in letters] == [poison]
    assert "Recursion limit" in letters[0].reason or "deep" in letters[0].reason
    assert sorted(row[0] for row in setup.rows(pg, "items")) == [i for i in range(200) if i != 100]
    # Decoding refuses it (deeper than COPY can write) before it enters a window: no sink
    # sees it, nothing is retried or taken for a bug. (The sink's own isolation of a value
    # it cannot encode is tested in tests/sinks/postgres/test_errors.py.)
    assert "DecodeError" in letters[0].reason
    assert logged([worker], "rows refused, isolating them") == []
    assert logged([worker], "sink write failed: retrying") == []
    assert logged([worker], "sink fails on an entry: dead-lettering it") == []
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0
