"""A worker paused past its lease (a zombie) wakes up and touches nothing (issue 12).

A SIGSTOPped worker, resumed after its lease passed to another: it dead-letters and
acknowledges nothing, and the tables equal the model.

Real `streamsink worker` processes, real Redis and PostgreSQL. The group has two sinks, in
this order: the PostgreSQL sink `pg` (counters: an `incr` applied twice shows) and the
recording function sink `rec` (tests/consumers/recording.py), which sleeps before it
records. Worker A is stopped while its first windows are inside `rec`'s sleep: `pg` has
committed them, and neither the refused entries' dead letters nor the acknowledgement have
been written. Some of those entries are refused: by PostgreSQL (a CHECK constraint) and by
`rec` (`"poison": true`). Worker B takes the shards over (a new epoch), claims A's entries,
skips in PostgreSQL what A committed, dead-letters the refused entries and acknowledges.
Then A is resumed: the sleep ends, `rec` returns its refusals, and A would dead-letter and
acknowledge them on B's behalf if the fence let it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.consumers.settings import GroupSettings
from streamsink.consumers.shard import ShardRunner
from streamsink.consumers.window import Window
from streamsink.errors import Fenced
from streamsink.schemas import (
    Column,
    ColumnType,
    Config,
    Event,
    StreamSpec,
    Table,
    from_dict,
    shard_of,
)
from streamsink.schemas.event import Op
from streamsink.schemas.wire import parse_id
from streamsink.sinks import Batch, Rejected
from streamsink.sinks.postgres.schema import OFFSETS, create_tables
from streamsink.streams import Keys, Producer, create_stream
from streamsink.streams.leases import Leases
from streamsink.streams.reader import ShardReader
from tests.consumers import recording
from tests.consumers.test_worker_processes import Cluster, eventually
from tests.sinks.conftest import pg as pg  # the fixture, from tests/sinks
from tests.sinks.conftest import schema_of
from tests.sinks.postgres.test_faults import GROUP, STREAM, Setup, _q, logged, reference

SHARDS = 2
SLEEP_MS = 3000  # rec's sleep per batch: the window in which A is stopped
LEASE_TTL_MS = 1500
CAP = 1000  # the table's CHECK: counters above it are refused
LOST = ("shard fenced by a newer owner", "lease lost", "lease expired unrenewed")

GROUP_SETTINGS = f"""
lease_ttl_ms = {LEASE_TTL_MS}
linger_ms = 50
max_age_ms = 200
block_ms = 100
maintenance_ms = 500
"""


@pytest.fixture
def zombie_setup(
    tmp_path: Path, keys: Keys, redis_url: str, database_url: str, pg: Connection, r: redis.Redis
) -> Setup:
    """Stream `items` (2 shards) into `counters`; group pg-writer -> sinks pg, then rec."""
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

[groups.{GROUP}]
stream = "{STREAM}"
sinks = ["pg", "rec"]
{GROUP_SETTINGS}
"""
    path = tmp_path / "streamsink.toml"
    path.write_text(text)
    config = from_dict(tomllib.loads(text))
    create_tables(pg, config, offsets_schema=schema)
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT n_cap CHECK (n <= %s)").format(
                sql.Identifier(schema, "counters")
            ),
            (CAP,),
        )
    create_stream(r, keys, STREAM, SHARDS)
    return Setup(path, config, keys, r, schema)


def one_per_shard(candidates: Iterable[int]) -> list[int]:
    """The first id of `candidates` whose key falls in each shard."""
    found: dict[int, int] = {}
    for item in candidates:
        found.setdefault(shard_of(f"k{item}", SHARDS), item)
    assert len(found) == SHARDS
    return [found[shard] for shard in range(SHARDS)]


def incr(item: int, n: int) -> Event:
    return Event(f"k{item}", Op.INCR, {"id": item, "n": n})


def poisoned(item: int) -> Event:
    """An event PostgreSQL takes and rec refuses."""
    return Event(f"k{item}", Op.SET, {"id": item, "poison": True})


def offsets(pg: Connection, schema: str) -> dict[int, tuple[str, int]]:
    """Shard -> (last entry ID applied, epoch) of the sink pg."""
    with pg.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT shard, last_id, epoch FROM {} WHERE sink = 'pg'").format(
                sql.Identifier(schema, OFFSETS)
            )
        )
        return {shard: (last_id, int(epoch)) for shard, last_id, epoch in cur.fetchall()}


def at(event: Event, entry_id: str) -> str:
    """Where an entry is: "<shard>:<entry ID>"."""
    return f"{shard_of(event.key, SHARDS)}:{entry_id}"


def pending_by(r: redis.Redis, keys: Keys) -> dict[str, list[str]]:
    """Consumer -> the entries pending on it ("<shard>:<entry ID>"), every shard."""
    found: dict[str, list[str]] = {}
    for shard in range(SHARDS):
        rows: Any = r.xpending_range(keys.shard(STREAM, shard), GROUP, "-", "+", 100_000)
        for row in rows:
            position = f"{shard}:{row['message_id'].decode()}"
            found.setdefault(row["consumer"].decode(), []).append(position)
    return found


def pid_of(worker_id: str | None) -> int | None:
    return None if worker_id is None else int(worker_id.rsplit("-", 2)[1])


def since(records: list[dict[str, Any]], moment: float) -> list[dict[str, Any]]:
    return [line for line in records if line["ts"] >= moment]


def test_a_sigstopped_worker_resumed_after_its_lease_passed_dead_letters_and_acks_nothing(
    zombie_setup: Setup, cluster: Cluster, pg: Connection
) -> None:
    setup, r, keys = zombie_setup, zombie_setup.client, zombie_setup.keys
    producer = Producer(r, setup.config)
    refused_by_pg = [incr(item, 5000) for item in one_per_shard(range(80, 90))]
    refused_by_rec = [poisoned(item) for item in one_per_shard(range(90, 100))]
    first = [incr(1 + n % 20, 1 + n % 9) for n in range(300)]
    first[40:40] = refused_by_pg[:1] + refused_by_rec[:1]
    first[200:200] = refused_by_pg[1:] + refused_by_rec[1:]
    first_ids = producer.publish_many(STREAM, first)
    # Entry IDs are unique within a shard only: entries are named by "<shard>:<ID>".
    where = {at(e, i): e for e, i in zip(first, first_ids, strict=True)}
    refused = {p for p, e in where.items() if e in refused_by_pg or e in refused_by_rec}
    assert len(refused) == 4

    a = cluster.start(setup.path, sleep_ms=SLEEP_MS)
    last = {
        shard: max(
            (i for e, i in zip(first, first_ids, strict=True) if shard_of(e.key, SHARDS) == shard),
            key=parse_id,
        )
        for shard in range(SHARDS)
    }

    def committed_not_recorded() -> bool:
        done = offsets(pg, setup.schema)
        return all(done.get(s, ("0-0", 0))[0] == last[s] for s in range(SHARDS))

    eventually(committed_not_recorded, "pg committed A's first windows", 15, [a])
    assert recording.batches(r, keys.prefix) == [], "rec slept less than expected"
    # The next windows fill while the first ones are in rec's sleep.
    second = [incr(1 + n % 20, 1 + n % 7) for n in range(100)]
    second_ids = producer.publish_many(STREAM, second)
    where.update({at(e, i): e for e, i in zip(second, second_ids, strict=True)})

    def a_holds_everything() -> bool:
        held = list(pending_by(r, keys).values())
        return len(held) == 1 and set(held[0]) == set(where)

    eventually(a_holds_everything, "A read every entry", 5, [a])
    a.signal(signal.SIGSTOP)

    assert recording.batches(r, keys.prefix) == [], "A left rec's sleep before it was stopped"
    (a_id,) = pending_by(r, keys)
    assert pid_of(a_id) == a.pid
    assert [row.epoch for row in setup.status()] == [1] * SHARDS
    assert r.xlen(keys.dead(STREAM, 0, GROUP)) + r.xlen(keys.dead(STREAM, 1, GROUP)) == 0

    b = cluster.start(setup.path)

    def b_took_over_and_drained() -> bool:
        rows = setup.status()
        return all(
            pid_of(row.owner) == b.pid and row.epoch >= 2 and row.pending == 0 and row.lag == 0
            for row in rows
        )

    took = eventually(b_took_over_and_drained, "B owns every shard and drained", 30, [b])
    assert {row.dead for row in setup.status()} != {0}
    print(f"\nB took every shard over and drained {took:.1f} s after A was stopped")

    resumed = time.time()  # before the signal: A may log its losses before this test runs on
    a.signal(signal.SIGCONT)

    def a_lost_every_shard() -> bool:  # A's sleep ended, its refusals came back, its lease
        lines = since(a.records(), resumed)  # loop ran
        return all(
            any(line.get("shard") == shard and line["msg"] in LOST for line in lines)
            for shard in range(SHARDS)
        )

    eventually(a_lost_every_shard, "A says it lost every shard", 30, [a, b])
    both = [a, b]
    setup.wait_drained(both, 30)

    a_after = since(a.records(), resumed)
    for shard in range(SHARDS):
        stops = [
            line["msg"] for line in a_after if line.get("shard") == shard and line["msg"] in LOST
        ]
        assert stops, f"A said nothing about losing shard {shard}"
    print("A after resuming: " + "; ".join(f"{x['msg']} {x.get('shard', '')}" for x in a_after))
    assert [line for line in a.records() if line["msg"] == "dead-lettered"] == [], (
        "the zombie dead-lettered entries"
    )

    letters = setup.dead()
    assert sorted(f"{x.shard}:{x.entry}" for x in letters) == sorted(refused), (
        "each refused entry is dead-lettered exactly once"
    )
    for letter in letters:
        event = where[f"{letter.shard}:{letter.entry}"]
        assert letter.sinks == (("pg",) if event in refused_by_pg else ("rec",)), letter
    b_letters = logged([b], "dead-lettered")
    assert sorted(f"{x['shard']}:{x['entry']}" for x in b_letters) == sorted(refused)

    table = setup.table("counters")
    applied = [e for e in [*first, *second] if e not in refused_by_pg]
    expected, _ = reference(table, applied)
    found = [dict(zip(table.columns, row, strict=True)) for row in setup.rows(pg, "counters")]
    assert {row["id"]: row for row in found} == expected, "the table is not the events applied once"
    assert all(row.pending == 0 for row in setup.status())
    assert logged([b], "skipping entries applied before"), "B should skip what A committed"
    delivered = recording.delivered(r, keys.prefix)
    positions = {p for p, e in where.items() if e not in refused_by_rec}
    assert set(delivered) == positions, "rec (at least once) missed an entry"
    repeated = sum(1 for times in delivered.values() if times > 1)
    print(f"rec recorded {repeated} entries more than once (at least once: A's late batch)")

    for worker in both:
        worker.signal(signal.SIGTERM)
    codes = [worker.wait(20) for worker in both]
    assert codes == [0, 0], f"exit codes A, B: {codes}"
    assert all(row.pending == 0 for row in setup.status())


# --- the same, in this process: the zombie's flush gets to its dead letters and ack ----------
#
# Above, the resumed worker's lease loop usually notices the lost lease first and cancels the
# flush before it reaches Redis. Here the shard runner runs alone (no lease loop), so the
# flush started under the old epoch does reach its dead-letter and acknowledge calls.


class HeldSink:
    """Holds each write until `gate` is set, then refuses the entries marked poison."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.batches: list[Batch] = []

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        self.started.set()
        await self.gate.wait()
        self.batches.append(batch)
        return [
            Rejected(entry.id, "poisoned on purpose")
            for entry in batch.entries
            if entry.event.data.get("poison") is True
        ]

    async def close(self) -> None:
        pass


ITEMS = Table(
    "items",
    ("id",),
    {"id": Column(ColumnType.INT), "n": Column(ColumnType.INT), "poison": Column(ColumnType.BOOL)},
)


async def held_shard(
    ar: aredis.Redis, r: redis.Redis, keys: Keys, sink: HeldSink, refusing: bool
) -> ShardRunner:
    """A runner of shard 0 under epoch 1 of worker w1, five entries published (one poison
    when `refusing`), not started."""
    config = Config(
        prefix=keys.prefix,
        streams={STREAM: StreamSpec(STREAM, 1, table="items")},
        tables={"items": ITEMS},
    )
    create_stream(r, keys, STREAM, 1)
    events = [Event(f"k{n}", Op.SET, {"id": n, "n": n}) for n in range(5)]
    if refusing:
        events[2] = Event("k2", Op.SET, {"id": 2, "poison": True})
    Producer(r, config).publish_many(STREAM, events)
    lease = await Leases(ar, keys, STREAM, GROUP, "w1", 60_000).acquire(0)
    assert lease is not None and lease.epoch == 1
    reader = ShardReader(ar, keys, STREAM, 0, GROUP, "w1", lease.epoch)
    settings = GroupSettings(linger_ms=20, max_age_ms=50, block_ms=50)
    return ShardRunner(reader, lease, config, STREAM, {"held": sink}, settings)


async def take_over(ar: aredis.Redis, r: redis.Redis, keys: Keys, taker: str) -> None:
    """The shard gets a new owner under epoch 2, as if w1 had been paused past its lease."""
    if taker == "another worker":
        r.delete(keys.lease(STREAM, 0, GROUP))
        newer = await Leases(ar, keys, STREAM, GROUP, "w2", 60_000).acquire(0)
    else:  # its shard task cancelled and started again while the lease key still existed
        newer = await Leases(ar, keys, STREAM, GROUP, "w1", 60_000).acquire(0)
    assert newer is not None and newer.epoch == 2


def untouched(r: redis.Redis, keys: Keys) -> None:
    """Nothing dead-lettered, nothing acknowledged, no watermark: as the zombie found it."""
    assert r.exists(keys.dead(STREAM, 0, GROUP)) == 0, "the zombie dead-lettered"
    assert int(r.xpending(keys.shard(STREAM, 0), GROUP)["pending"]) == 5, "the zombie acked"
    assert r.exists(keys.applied(STREAM, 0, GROUP)) == 0, "the zombie moved the watermark"


TAKERS = ["another worker", "the same worker"]


@pytest.mark.parametrize("refusing", [True, False], ids=["dead-letter", "ack"])
@pytest.mark.parametrize("taker", TAKERS)
async def test_a_flush_begun_under_an_old_epoch_neither_dead_letters_nor_acknowledges(
    ar: aredis.Redis, r: redis.Redis, keys: Keys, taker: str, refusing: bool
) -> None:
    """The window read under epoch 1 is flushed after the takeover: the sink's write
    returns (with a refusal when `refusing`), then dead-lettering / acknowledging is
    refused with Fenced."""
    sink = HeldSink()
    sink.gate.set()
    runner = await held_shard(ar, r, keys, sink, refusing)
    await runner.reader.ensure_group()
    window = Window()
    await runner._take(window, await runner.reader.next(10, 0), 10)
    assert len(window) == 5
    await take_over(ar, r, keys, taker)
    with pytest.raises(Fenced):
        await runner.flush(window)
    assert len(sink.batches) == 1, "the sink's write returned before the fence"
    untouched(r, keys)


@pytest.mark.parametrize("taker", TAKERS)
async def test_a_shard_runner_paused_in_a_write_past_its_lease_stops_and_touches_nothing(
    ar: aredis.Redis, r: redis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture, taker: str
) -> None:
    """The runner on its own (no lease loop to cancel it): its write is held, the shard is
    taken over, the write returns with a refusal. Whichever notices first (the next read
    or the flush's dead letter), the runner stops by itself, touching nothing."""
    sink = HeldSink()
    runner = await held_shard(ar, r, keys, sink, refusing=True)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(sink.started.wait(), 5)
    await take_over(ar, r, keys, taker)
    with caplog.at_level(logging.WARNING, logger="streamsink.shard"):
        sink.gate.set()  # the zombie's write returns
        await asyncio.wait_for(task, 5)  # and its runner stops by itself
    messages = [record.getMessage() for record in caplog.records]
    assert "shard fenced by a newer owner" in messages, messages
    assert "dead-lettered" not in messages
    untouched(r, keys)
