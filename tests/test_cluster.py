"""streamsink on a real Redis Cluster: publish, drain into PostgreSQL, fail masters over.

A session-wide cluster of six loopback redis-servers (tests/redis_cluster.py); each test has
its own key prefix and PostgreSQL schema. Workers run as real `streamsink worker` processes
given the `redis+cluster://` URL, so the CLI's client goes through the cluster too.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson
import psycopg2
import pytest
import redis
import redis.asyncio as aredis
from psycopg2 import sql

from streamsink.errors import PublishError
from streamsink.schemas import Config, Event, from_dict
from streamsink.sinks.postgres.schema import create_tables
from streamsink.streams import Keys, Producer, RateLimiter, Rows, create_stream
from streamsink.streams.aio import AsyncProducer
from streamsink.streams.connection import AsyncClient, SyncClient, connect, connect_async
from streamsink.streams.reader import ShardReader
from streamsink.streams.retry import describe
from tests.conftest import unavailable
from tests.consumers.test_worker_processes import ROOT, Cluster, WorkerProcess
from tests.redis_cluster import LocalCluster, Node, free_ports

STREAM = "items"
GROUP = "pg"
SHARDS = 8
KEYS = 40


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """Three masters and three replicas on loopback ports, for the whole run."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        unavailable("redis-server and redis-cli (for a local Redis Cluster)")
    with tempfile.TemporaryDirectory(prefix="streamsink-cluster-") as directory:
        local = LocalCluster(Path(directory), [Node(port) for port in free_ports(6)])
        try:
            local.start()
            yield local
        finally:
            local.stop()


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    """A PostgreSQL schema of the test's own."""
    name = f"c_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
        conn.close()


def config_text(url: str, keys: Keys, database_url: str, schema: str) -> str:
    """`items` (SHARDS shards) into table counters (n adds up), group pg -> PostgreSQL."""
    return f"""
[redis]
url = "{url}"
prefix = "{keys.prefix}"

[postgres]
dsn = "{database_url}"

[tables.counters]
schema = "{schema}"
key = ["id"]
columns = {{ id = "text", n = {{ type = "int", policy = "sum" }} }}
read_model = true

[streams.{STREAM}]
shards = {SHARDS}
table = "counters"

[sinks.pg]
type = "postgres"
pool_size = 2
statement_timeout_ms = 10000
offsets_schema = "{schema}"

[groups.{GROUP}]
stream = "{STREAM}"
sinks = ["pg"]
lease_ttl_ms = 1500
linger_ms = 20
max_age_ms = 100
block_ms = 100
maintenance_ms = 500
"""


class Setup:
    """The test's config on the cluster, its client, and what PostgreSQL holds."""

    def __init__(
        self, local: LocalCluster, keys: Keys, database_url: str, schema: str, directory: Path
    ) -> None:
        text = config_text(local.url, keys, database_url, schema)
        self.path = directory / "streamsink.toml"
        self.path.write_text(text)
        self.config: Config = from_dict(tomllib.loads(text))
        self.local, self.keys, self.schema, self.database_url = local, keys, schema, database_url
        self.client: SyncClient = connect(local.url)
        with psycopg2.connect(database_url) as conn:
            create_tables(conn, self.config, offsets_schema=schema)
        create_stream(self.client, keys, STREAM, SHARDS)

    def counters(self) -> dict[str, int]:
        """id -> n of every row."""
        with psycopg2.connect(self.database_url) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT id, n FROM {}").format(sql.Identifier(self.schema, "counters"))
            )
            return dict(cur.fetchall())

    def _get_all(self, names: list[str]) -> list[bytes | None]:
        """GET each key; read again while the cluster fails over (the client, like
        streamsink's, does not retry, and reads the slot map again after an error)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.get(name)
                return list(pipe.execute())
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def owners(self) -> list[str | None]:
        """The worker id holding each shard's lease."""
        leases = [self.keys.lease(STREAM, shard, GROUP) for shard in range(SHARDS)]
        return [None if v is None else v.decode() for v in self._get_all(leases)]

    def epochs(self) -> list[int]:
        epochs = [self.keys.epoch(STREAM, shard, GROUP) for shard in range(SHARDS)]
        return [int(v or 0) for v in self._get_all(epochs)]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamsink.cli", "--config", str(self.path), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def setup(
    redis_cluster: LocalCluster, keys: Keys, database_url: str, schema: str, tmp_path: Path
) -> Iterator[Setup]:
    made = Setup(redis_cluster, keys, database_url, schema, tmp_path)
    try:
        yield made
    finally:
        for key in made.client.scan_iter(match=f"{keys.prefix}:*", count=1000):
            made.client.delete(key)
        made.client.close()


def event(n: int, unique: bool = False) -> Event:
    """The n-th event: +1 on key `n % KEYS` (with an idempotency id if `unique`)."""
    key = f"k{n % KEYS}"
    return Event.make(key, "incr", {"id": key, "n": 1}, id=f"e{n}" if unique else None)


def expected(numbers: Iterable[int]) -> dict[str, int]:
    """Rows after the events numbered `numbers`, each applied once: n = events of the key."""
    return dict(Counter(f"k{n % KEYS}" for n in numbers))


def logs(workers: list[WorkerProcess], lines: int = 60) -> str:
    """Where each worker's log is, and its last warnings and errors (a CI run keeps only
    what the failure says: enough to tell which node, which command, since when)."""
    parts = []
    for worker in workers:
        text = worker.log().splitlines()
        loud = [
            line for line in text if '"level":"info"' not in line and '"level":"debug"' not in line
        ]
        parts.append(
            f"--- worker {worker.pid} ({worker.stderr}, {len(text)} lines), its last "
            f"{min(lines, len(loud))} warnings/errors:\n" + "\n".join(loud[-lines:])
        )
    return "\n".join(parts)


def wait_for(check: object, what: str, timeout: float, workers: list[WorkerProcess]) -> None:
    """Poll `check()` until true; fail after `timeout` s, or at once if a worker died (with
    the workers' logs)."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        for worker in workers:
            if not worker.alive():
                raise AssertionError(
                    f"worker {worker.pid} exited ({worker.process.poll()})\n{logs(workers)}"
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}\n{logs(workers)}")
        time.sleep(0.05)


def test_shards_spread_over_the_masters_and_drain_into_postgres(
    setup: Setup, cluster: Cluster
) -> None:
    assert isinstance(setup.client, redis.RedisCluster)
    assert setup.client.retry.get_retries() == 0, "no silent retries, on a cluster too"
    masters = {setup.local.master_of(setup.keys.shard(STREAM, s)).port for s in range(SHARDS)}
    assert len(masters) == 3, f"{SHARDS} shards on masters {masters}"

    producer = Producer(setup.client, setup.config)
    first = producer.publish_many(STREAM, [event(n, unique=True) for n in range(600)])
    again = producer.publish_many(STREAM, [event(n, unique=True) for n in range(600)])
    assert again == first, "an idempotent publish repeated returns the first entry IDs"

    async def publish_async() -> None:
        client = connect_async(setup.local.url)
        try:
            async with AsyncProducer(client, setup.config) as aproducer:
                await asyncio.gather(
                    *(aproducer.publish(STREAM, event(n)) for n in range(600, 1100))
                )
                await aproducer.publish_many(STREAM, [event(n) for n in range(1100, 1200)])
        finally:
            await client.aclose()

    asyncio.run(publish_async())
    lengths = [int(setup.client.xlen(setup.keys.shard(STREAM, s))) for s in range(SHARDS)]
    assert sum(lengths) == 1200, lengths

    workers = [cluster.start(setup.path), cluster.start(setup.path)]
    want = expected(range(1200))
    wait_for(lambda: setup.counters() == want, "every event applied once", 60, workers)
    wait_for(lambda: len(set(setup.owners()) - {None}) == 2, "both own shards", 30, workers)

    # Around the pipeline, through the cluster: wait until applied, the read model (written
    # by the publish script in the shard's slot), the rate limiter.
    producer.publish(STREAM, event(1200, unique=True), wait=True, timeout=30)
    want["k0"] += 1
    assert setup.counters() == want
    assert Rows(setup.client, setup.config).read_many("counters", ["k0", "k1", "nope"]) == [
        {"id": "k0", "n": want["k0"]},
        {"id": "k1", "n": want["k1"]},
        None,
    ]
    limiter = RateLimiter(setup.client, setup.keys)
    assert [limiter.allow("user:1", rate=1, burst=2).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]

    status = setup.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    (group,) = orjson.loads(status.stdout)["groups"]  # read from all three masters
    assert group["totals"]["outstanding"] == 0 and len(group["shards"]) == SHARDS, group
    owners = {shard["owner"] for shard in group["shards"]} - {None}  # (a shard may be between
    assert owners and all(any(f"-{w.pid}-" in o for w in workers) for o in owners)  # workers)

    for worker in workers:
        worker.signal(15)
    for worker in workers:
        assert worker.wait(30) == 0, worker.log()[-3000:]
    assert setup.counters() == want


ASYNC_FIRST = 1_000_000
"""The asyncio publisher's events are numbered from here (the sync one's from 0)."""


class Publisher:
    """Publishes events with idempotency ids in a thread, 20 at a time, retrying a batch
    (same ids) after any error until Redis took it, the way a careful service would: the
    sync producer's publish_many, or (`asyncio`) 20 concurrent publishes of the asyncio
    producer, which it gathers into pipelined round trips."""

    def __init__(self, setup: Setup, asyncio_: bool = False) -> None:
        self.setup, self.asyncio = setup, asyncio_
        self.first = ASYNC_FIRST if asyncio_ else 0
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def numbers(self) -> range:
        """The numbers of the events published."""
        return range(self.first, self.first + self.sent)

    def _batch(self) -> list[Event]:
        start = self.first + self.sent
        return [event(n, unique=True) for n in range(start, start + 20)]

    def _run(self) -> None:
        if self.asyncio:
            asyncio.run(self._run_async())
            return
        producer = Producer(connect(self.setup.local.url), self.setup.config)
        while not self._stop.is_set():
            batch, pause, deadline = self._batch(), 0.01, time.monotonic() + 60
            while True:
                try:
                    producer.publish_many(STREAM, batch)
                    break
                except PublishError as exc:
                    self.errors.append(str(exc))
                    assert time.monotonic() < deadline, "publishing failed for a minute"
                    time.sleep(pause)
                    pause = min(pause * 2, 0.3)
            self.sent += len(batch)
            time.sleep(0.01)

    async def _run_async(self) -> None:
        client = connect_async(self.setup.local.url)
        try:
            async with AsyncProducer(client, self.setup.config) as producer:
                while not self._stop.is_set():
                    batch, pause, deadline = self._batch(), 0.01, time.monotonic() + 60
                    while True:
                        replies = await asyncio.gather(
                            *(producer.publish(STREAM, e) for e in batch), return_exceptions=True
                        )
                        failed = [r for r in replies if isinstance(r, BaseException)]
                        if not failed:
                            break
                        assert all(isinstance(r, PublishError) for r in failed), failed
                        self.errors.append(str(failed[0]))
                        assert time.monotonic() < deadline, "publishing failed for a minute"
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, 0.3)
                    self.sent += len(batch)
                    await asyncio.sleep(0.01)
        finally:
            await client.aclose()

    def start(self) -> None:
        self._thread.start()

    def wait_past(self, count: int, timeout: float = 60) -> None:
        """Return once at least `count` events were published."""
        LocalCluster.wait(
            lambda: self.sent >= count or not self._thread.is_alive(), "publishes", timeout
        )
        assert self._thread.is_alive(), "the publisher gave up"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)
        assert not self._thread.is_alive(), "the publisher did not stop"


@contextlib.contextmanager
def publishing(setup: Setup) -> Iterator[tuple[Publisher, Publisher]]:
    """A sync and an asyncio publisher, running for the block."""
    both = (Publisher(setup), Publisher(setup, asyncio_=True))
    for publisher in both:
        publisher.start()
    try:
        yield both
    finally:
        for publisher in both:
            publisher.stop()


@pytest.fixture
def restored(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The cluster, whole again afterwards (killed nodes back as replicas)."""
    try:
        yield redis_cluster
    finally:
        redis_cluster.restore()


def test_failover_and_a_killed_master_lose_and_double_nothing(
    setup: Setup, cluster: Cluster, restored: LocalCluster
) -> None:
    local = setup.local
    workers = [cluster.start(setup.path), cluster.start(setup.path)]
    wait_for(lambda: len(set(setup.owners()) - {None}) == 2, "both workers own shards", 30, workers)

    with publishing(setup) as (publisher, apublisher):
        publisher.wait_past(400)
        apublisher.wait_past(400)

        # A planned failover: the replica of shard 0's master takes over, losing nothing.
        old = local.master_of(setup.keys.shard(STREAM, 0))
        replica = local.replica_of(old)
        with replica.client() as client:
            assert client.execute_command("CLUSTER", "FAILOVER") in (b"OK", "OK", True)
        local.wait(lambda: replica in local.masters() and local.healthy(), "the replica promoted")
        publisher.wait_past(publisher.sent + 400)
        apublisher.wait_past(apublisher.sent + 400)

        # A crash: the master of shard 1 is killed while publishes to it are in flight (held
        # until its replica had every write it took: see LocalCluster.quiesce).
        victim = local.master_of(setup.keys.shard(STREAM, 1))
        heir = local.replica_of(victim)
        local.quiesce(victim)
        local.kill(victim)
        local.wait(lambda: heir in local.masters(), "the killed master's replica promoted")
        # ... and a worker dies too, holding leases: they must move to the other one. The
        # failover may have cost both workers their leases (a 1.5 s TTL) and the survivor
        # may have taken every shard: wait until the victim holds some again.
        victim_worker, survivor = workers
        held: dict[int, int] = {}  # shard -> epoch, of the victim's leases

        def victim_holds() -> bool:
            epochs = setup.epochs()  # first: an owner read after it is as new or newer
            owners = setup.owners()
            held.clear()
            for shard, (owner, epoch) in enumerate(zip(owners, epochs, strict=True)):
                if owner is not None and f"-{victim_worker.pid}-" in owner:
                    held[shard] = epoch
            return bool(held)

        wait_for(victim_holds, "the worker to be killed holds leases", 30, workers)
        victim_worker.process.kill()
        victim_worker.process.wait()
        publisher.wait_past(publisher.sent + 400)
        apublisher.wait_past(apublisher.sent + 400)
    numbers = [*publisher.numbers(), *apublisher.numbers()]

    want = expected(numbers)
    wait_for(lambda: setup.counters() == want, f"{len(numbers)} events once", 90, [survivor])
    owners = setup.owners()
    assert all(o is not None and f"-{survivor.pid}-" in o for o in owners), owners
    epochs = setup.epochs()
    moved = all(epochs[shard] > epoch for shard, epoch in held.items())
    assert moved, f"the killed worker's leases {held} moved under a new epoch: {epochs}"
    assert publisher.errors, "the sync producer saw the failover (else it tested nothing)"
    assert apublisher.errors, "the asyncio producer saw the failover"


# The node a cluster client asks where a command's keys are (XREAD, XREADGROUP: COMMAND
# GETKEYS) dying: the worker's reads must go on (issue 18: after the killed master was that
# node, a worker failed to read every shard for good while its other commands went through).


def asked_node(client: aredis.RedisCluster) -> int:
    """The port of the node `client` asks COMMAND GETKEYS of (redis-py's internals: the
    default node of its last full initialisation)."""
    return int(client.commands_parser.node.port)


def hold_every_lease(setup: Setup) -> None:
    """The group on every shard and its lease held by `reader` (epoch 1), as a worker would."""
    for shard in range(SHARDS):
        setup.client.xgroup_create(setup.keys.shard(STREAM, shard), GROUP, id="0", mkstream=True)
        setup.client.set(setup.keys.lease(STREAM, shard, GROUP), "reader")
        setup.client.set(setup.keys.epoch(STREAM, shard, GROUP), 1)


async def reading_client(setup: Setup) -> tuple[aredis.RedisCluster, Node]:
    """A cluster client that has read every shard once, and the node it asks for keys."""
    client = connect_async(setup.local.url)
    assert isinstance(client, aredis.RedisCluster)
    try:
        await client.initialize()
        assert await read_every_shard(client, setup.keys, 1) == {}
        return client, next(n for n in setup.local.nodes if n.port == asked_node(client))
    except BaseException:
        await client.aclose()
        raise


async def read_every_shard(client: AsyncClient, keys: Keys, tries: int) -> dict[int, str]:
    """Read every shard to its end and wait for more (XREAD), as a worker does, each up to
    `tries` times 0.2 s apart; the last errors of the shards that never got through."""
    failing: dict[int, str] = {}
    for shard in range(SHARDS):
        reader = ShardReader(client, keys, STREAM, shard, GROUP, "reader", 1)
        for _ in range(tries):
            try:
                while (await reader.next(10, block_ms=10)).entries:
                    pass
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failing[shard] = describe(exc)
                reader.recover()
                await asyncio.sleep(0.2)
                continue
            failing.pop(shard, None)
            break
    return failing


async def lease_round(client: AsyncClient, keys: Keys, tries: int) -> None:
    """GET every shard's lease in one pipeline, as the lease loop does, until it goes through."""
    for attempt in range(tries):
        try:
            async with client.pipeline(transaction=False) as pipe:
                for shard in range(SHARDS):
                    pipe.get(keys.lease(STREAM, shard, GROUP))
                await pipe.execute()
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.2)


def test_reads_go_on_after_a_killed_master_was_the_node_asked_for_keys(
    setup: Setup, restored: LocalCluster
) -> None:
    """The master killed is the node asked for keys; the client learns the new slot map from
    the lease loop's pipeline first (the worker's order: its leases span every master)."""
    local = setup.local
    hold_every_lease(setup)

    async def run() -> dict[int, str]:
        client, victim = await reading_client(setup)
        try:
            shards = [
                s for s in range(SHARDS) if local.master_of(setup.keys.shard(STREAM, s)) is victim
            ]
            assert shards, "the node asked for keys serves some of the shards"
            heir = local.replica_of(victim)
            local.quiesce(victim)  # (nothing in flight: the replica has the groups)
            local.kill(victim)
            local.wait(lambda: heir in local.masters(), "the killed master's replica promoted")
            await lease_round(client, setup.keys, 150)
            return await read_every_shard(client, setup.keys, 50)
        finally:
            await client.aclose()

    failing = asyncio.run(run())
    assert failing == {}, f"shards never read again: {failing}"


def test_reads_go_on_after_the_node_asked_for_keys_was_failed_over_and_died(
    setup: Setup, restored: LocalCluster
) -> None:
    """The node asked for keys hands its slots over (CLUSTER FAILOVER: the client follows
    MOVED, reading nothing again), then dies as a replica: no slot moves, and only the
    question where keys are reaches it."""
    local = setup.local
    hold_every_lease(setup)

    async def run() -> dict[int, str]:
        client, old = await reading_client(setup)
        try:
            replica = local.replica_of(old)
            with replica.client() as direct:
                assert direct.execute_command("CLUSTER", "FAILOVER") in (b"OK", "OK", True)
            local.wait(lambda: replica in local.masters() and local.healthy(), "replica promoted")
            local.wait(lambda: local.in_sync(replica), "the old master caught up")
            assert await read_every_shard(client, setup.keys, 50) == {}  # MOVED, followed
            assert asked_node(client) == old.port, "nothing read the cluster again"
            local.kill(old)
            return await read_every_shard(client, setup.keys, 50)
        finally:
            await client.aclose()

    failing = asyncio.run(run())
    assert failing == {}, f"shards never read again: {failing}"
