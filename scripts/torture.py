"""Torture run: workers, producers and random faults; then the tables against a model.

    python scripts/torture.py --seconds 60          # what CI runs
    python scripts/torture.py --minutes 60 --seed 7 # an hour

It starts its own `redis-server` (AOF, fsync always) on a free loopback port, creates two fresh
PostgreSQL databases (`..._a`, `..._b`), and runs `--workers` `streamsink worker` processes of
one config with two groups on one stream `events`: `g1` writes database A, `g2` database B.
Two producer threads publish a mix of set / incr / del on hot and cold keys of `items`, incr on
`counters` and appends to `log`, each event with an idempotency id; a publish that fails is
retried with the same ids until it succeeds (Redis restarts!), never with new ones.

Database B's `counters` has `CHECK (n % 10 <> 7)`: some windows of `g2` are refused there and
dead-lettered by `g2` only. Every so often the constraint is dropped, the dead letters replayed
with `streamsink dead replay events g2 --all` and the constraint added again (NOT VALID).
`counters` only takes incr, so the order a replay gives does not matter: both groups must end
with every event applied exactly once.

Faults, at seeded random intervals, until the time is up: SIGKILL of a worker (restarted a moment
later), SIGSTOP of a worker past its lease (then SIGCONT), a Redis restart (SHUTDOWN, then the
same AOF directory), `pg_terminate_backend` of the workers' connections. Then it drains (every
worker running, final replay, lag and pending 0 in both groups), stops the workers with SIGTERM
(each must exit 0) and compares every table of both databases with an independent model that
applies the events one by one in stream order (per key, by the entry IDs the producers got).
Prints PASS or FAIL with up to 20 differing rows; exit code 0 or 1. A worker that exits on its
own (not killed by us) is restarted and fails the run too. On a difference in `counters` it
says whether the replayed letters explain it: g1 off by exactly the replayed deltas (g1 applied
g2's replays), g2 off by the deltas of entries dead-lettered more than once (a zombie's letter).
Worker logs are kept in the work directory when the run fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import redis
from psycopg2 import sql

from streamsink.schemas import Event, load, shard_of
from streamsink.streams import Keys, Producer
from streamsink.streams.admin import group_status, shard_count
from streamsink.streams.dead import dead_letters

ROOT = Path(__file__).resolve().parents[1]
STREAM = "events"
GROUPS = ("g1", "g2")
SHARDS = 6
LEASE_TTL_MS = 2000
PREFIX = "torture"
CHECK_NAME = "torture_refuses_some"
CHECK_SQL = "CHECK (n % 10 <> 7)"
HOT_KEYS, COLD_KEYS, COUNTER_KEYS = 20, 2000, 100
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"

CONFIG = """\
[redis]
url = "{redis_url}"
prefix = "{prefix}"

[postgres]
dsn = "{dsn_a}"

[streams.events]
shards = {shards}
table = "items"

[tables.items]
key = ["id"]

[tables.items.columns]
id = "text"
s = "text"
n = "int"
t = {{ type = "int", policy = "sum" }}
mx = {{ type = "int", policy = "max" }}

[tables.counters]
key = ["id"]
columns = {{ id = "int", n = {{ type = "int", policy = "sum" }} }}

[tables.log]
key = []
columns = {{ p = "int", seq = "int", k = "text" }}

[sinks.db_a]
type = "postgres"
dsn = "{dsn_a}"

[sinks.db_b]
type = "postgres"
dsn = "{dsn_b}"

[groups.g1]
stream = "events"
sinks = ["db_a"]
{group_settings}
[groups.g2]
stream = "events"
sinks = ["db_b"]
{group_settings}"""

GROUP_SETTINGS = f"""\
lease_ttl_ms = {LEASE_TTL_MS}
linger_ms = 20
max_age_ms = 200
block_ms = 200
maintenance_ms = 1000
"""


def now() -> float:
    return time.monotonic()


class Clock:
    """Prints lines stamped with the seconds since the run started."""

    def __init__(self) -> None:
        self.start = now()
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[{now() - self.start:8.2f}s] {text}", flush=True)


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """Our own redis-server with AOF (fsync always), restartable on the same port and dir."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("torture: redis-server is not on PATH")
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                *(binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)),
            ],
            stdout=log,
            stderr=log,
        )
        deadline = now() + 30
        while True:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            if now() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def shutdown(self) -> None:
        """SHUTDOWN (the AOF is fsynced), as an operator's restart would."""
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        with contextlib.suppress(redis.RedisError):
            client.shutdown()
        client.close()
        assert self.process is not None
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def create_databases(base: str, names: list[str]) -> list[str]:
    admin = psycopg2.connect(base)
    admin.autocommit = True
    with admin.cursor() as cur:
        for name in names:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin.close()
    dsns = []
    for name in names:
        params = psycopg2.extensions.parse_dsn(base)
        params["dbname"] = name
        dsns.append(psycopg2.extensions.make_dsn(**params))
    return dsns


def drop_databases(base: str, names: list[str]) -> None:
    admin = psycopg2.connect(base)
    admin.autocommit = True
    with admin.cursor() as cur:
        for name in names:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    admin.close()


@contextlib.contextmanager
def connect(dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def cli(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`streamsink --config CONFIG ARGS` with this interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "streamsink.cli", "--config", str(config), *args],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"streamsink {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done


def worker_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# ----------------------------------------------------------------------------- workers


@dataclass
class Worker:
    """One `streamsink worker` slot: the process now in it, and what was done to it."""

    number: int
    config: Path
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # SIGSTOPped, waiting for its SIGCONT
    starts: int = 0
    unexpected_exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        err = (self.directory / f"worker-{self.number}.log").open("ab")
        err.write(f"----- start {self.starts}\n".encode())
        err.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamsink.cli", "--config", str(self.config), "worker"],
            cwd=ROOT,
            env=worker_env(),
            stdout=err,
            stderr=err,
        )
        self.stopped = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None and not self.stopped

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


class Workers:
    """The worker slots; faults and the drain take `lock` while they touch them."""

    def __init__(self, count: int, config: Path, directory: Path, clock: Clock) -> None:
        self.slots = [Worker(n, config, directory) for n in range(count)]
        self.lock = threading.RLock()
        self.clock = clock
        self.timers: list[threading.Timer] = []

    def start_all(self) -> None:
        with self.lock:
            for worker in self.slots:
                worker.start()

    def check_exits(self) -> None:
        """A worker that exited without being killed by us is a finding: note it, restart it."""
        with self.lock:
            for worker in self.slots:
                if worker.process is None:
                    continue
                code = worker.process.poll()
                if code is not None:
                    worker.unexpected_exits.append(code)
                    self.clock.say(f"!! worker-{worker.number} exited on its own ({code}): restart")
                    worker.start()

    def later(self, delay: float, action: Callable[[], None]) -> None:
        timer = threading.Timer(delay, action)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def kill(self, worker: Worker, down: float) -> str:
        with self.lock:
            assert worker.process is not None
            pid = worker.pid
            worker.process.send_signal(signal.SIGKILL)
            worker.process.wait()
            worker.process = None

        def restart() -> None:
            with self.lock:
                if worker.process is None:
                    worker.start()
                    self.clock.say(f"   worker-{worker.number} restarted (pid {worker.pid})")

        self.later(down, restart)
        return f"SIGKILL worker-{worker.number} (pid {pid}), restart in {down:.1f} s"

    def stop(self, worker: Worker, paused: float) -> str:
        with self.lock:
            assert worker.process is not None
            process = worker.process
            process.send_signal(signal.SIGSTOP)
            worker.stopped = True

        def resume() -> None:
            with self.lock:
                if worker.process is process and worker.stopped:
                    process.send_signal(signal.SIGCONT)
                    worker.stopped = False
                    self.clock.say(f"   worker-{worker.number} SIGCONT (pid {process.pid})")

        self.later(paused, resume)
        return f"SIGSTOP worker-{worker.number} (pid {process.pid}) for {paused:.1f} s"

    def settle(self) -> None:
        """Cancel pending timers; every slot running again (SIGCONT, or started)."""
        for timer in self.timers:
            timer.cancel()
        with self.lock:
            for worker in self.slots:
                if worker.process is None:
                    worker.start()
                elif worker.stopped:
                    worker.process.send_signal(signal.SIGCONT)
                    worker.stopped = False

    def terminate(self, timeout: float = 60) -> dict[int, int | None]:
        """SIGTERM every worker; their exit codes (None: still running after `timeout`)."""
        with self.lock:
            for worker in self.slots:
                if worker.process is not None:
                    worker.process.send_signal(signal.SIGTERM)
            codes: dict[int, int | None] = {}
            deadline = now() + timeout
            for worker in self.slots:
                if worker.process is None:
                    continue
                try:
                    codes[worker.number] = worker.process.wait(max(0.1, deadline - now()))
                except subprocess.TimeoutExpired:
                    codes[worker.number] = None
                    worker.process.kill()
                    worker.process.wait()
            return codes

    def kill_all(self) -> None:
        for timer in self.timers:
            timer.cancel()
        with self.lock:
            for worker in self.slots:
                if worker.process is not None and worker.process.poll() is None:
                    worker.process.kill()
                    worker.process.wait()


# ----------------------------------------------------------------------------- producers


@dataclass
class Published:
    """An event as the model needs it: its stream position and what it does."""

    entry_id: tuple[int, int]
    table: str
    key: Any
    op: str
    data: dict[str, Any]


class ProducerThread(threading.Thread):
    """Publishes a realistic mix with idempotency ids; retries failures with the same ids."""

    def __init__(
        self, number: int, redis_url: str, config: Path, rate: float, seed: int, clock: Clock
    ) -> None:
        super().__init__(name=f"producer-{number}", daemon=True)
        self.number = number
        self.redis_url = redis_url
        self.config = load(config)
        self.rate = rate
        self.random = random.Random(seed)
        self.clock = clock
        self.halt = threading.Event()
        self.published: list[Published] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.retries = 0
        self.seq = 0
        self.failure: BaseException | None = None

    def event(self) -> tuple[Event, Published]:
        rnd, p = self.random, self.number
        self.seq += 1
        ident = f"p{p}-{self.seq}"
        roll = rnd.random()
        if roll < 0.25:  # counters: incr only (order-free, so replays may reorder them)
            key = rnd.randrange(COUNTER_KEYS)
            data: dict[str, Any] = {"id": key, "n": rnd.randint(1, 20)}
            event = Event.make(f"c:{key}", "incr", data, table="counters", id=ident)
            return event, Published((0, 0), "counters", key, "incr", data)
        if roll < 0.35:  # behaviour log lines
            data = {"p": p, "seq": self.seq, "k": rnd.choice("abcdefgh") * rnd.randint(1, 8)}
            event = Event.make(f"log:{p}:{self.seq % 50}", "append", data, table="log", id=ident)
            return event, Published((0, 0), "log", None, "append", data)
        hot = rnd.random() < 0.6
        key = f"h{rnd.randrange(HOT_KEYS)}" if hot else f"c{rnd.randrange(COLD_KEYS)}"
        roll = rnd.random()
        if roll < 0.45:
            op, data = "set", {"id": key}
            for column in rnd.sample(["s", "n", "t", "mx"], rnd.randint(1, 3)):
                if column == "s":
                    data["s"] = f"{p}-{self.seq}"
                else:
                    data[column] = rnd.randint(-50, 1000)
        elif roll < 0.88:
            op, data = "incr", {"id": key, rnd.choice(["n", "t"]): rnd.randint(-5, 30)}
        else:
            op, data = "del", {"id": key}
        event = Event.make(key, op, data, id=ident)
        return event, Published((0, 0), "items", key, op, data)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the main thread
            self.failure = exc
            self.clock.say(f"!! producer-{self.number} crashed: {exc!r}")

    def _run(self) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
        producer = Producer(client, self.config)
        started = now()
        sent = 0
        while not self.halt.is_set():
            batch = [self.event() for _ in range(self.random.choice([1, 1, 2, 5, 10, 20]))]
            ids = self._publish(producer, [event for event, _ in batch])
            for (_, record), entry in zip(batch, ids, strict=True):
                millis, seq = entry.split("-")
                record.entry_id = (int(millis), int(seq))
                self.published.append(record)
            sent += len(batch)
            ahead = sent / self.rate - (now() - started)
            if ahead > 0:
                self.halt.wait(ahead)
        client.close()

    def _publish(self, producer: Producer, events: list[Event]) -> list[str]:
        """Publish until it succeeds; only ever again with the same events (same ids)."""
        delay = 0.05
        while True:
            try:
                return producer.publish_many(STREAM, events)
            except Exception as exc:
                self.errors[type(exc).__name__] += 1
                self.retries += 1
                time.sleep(delay * (0.5 + self.random.random()))
                delay = min(delay * 2, 1.0)


# ----------------------------------------------------------------------------- the model


Row = tuple[Any, ...]


def model(events: list[Published]) -> dict[str, dict[Any, Row]]:
    """Every table as applying the events one by one, per key in stream order, gives."""
    ordered = sorted(events, key=lambda e: e.entry_id)  # per key: one shard, so stream order
    items: dict[Any, dict[str, Any]] = {}
    counters: dict[Any, int] = {}
    log: collections.Counter[Row] = collections.Counter()
    for event in ordered:
        if event.table == "counters":
            counters[event.key] = counters.get(event.key, 0) + event.data["n"]
        elif event.table == "log":
            log[(event.data["p"], event.data["seq"], event.data["k"])] += 1
        elif event.op == "del":
            items.pop(event.key, None)
        else:
            row = items.setdefault(event.key, {"s": None, "n": None, "t": None, "mx": None})
            for column, value in event.data.items():
                if column == "id":
                    continue
                if event.op == "incr" or column == "t":  # incr, or a set of the sum column
                    row[column] = (row[column] or 0) + value
                elif column == "mx":
                    row[column] = value if row[column] is None else max(row[column], value)
                else:
                    row[column] = value
    return {
        "items": {k: (r["s"], r["n"], r["t"], r["mx"]) for k, r in items.items()},
        "counters": {k: (n,) for k, n in counters.items()},
        "log": {k: (count,) for k, count in log.items()},
    }


def tables_of(dsn: str) -> dict[str, dict[Any, Row]]:
    """The same shape as `model`, read from one database."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, s, n, t, mx FROM items")
        items = {row[0]: tuple(row[1:]) for row in cur.fetchall()}
        cur.execute("SELECT id, n FROM counters")
        counters = {row[0]: (row[1],) for row in cur.fetchall()}
        cur.execute("SELECT p, seq, k, count(*) FROM log GROUP BY p, seq, k")
        log = {tuple(row[:3]): (row[3],) for row in cur.fetchall()}
    return {"items": items, "counters": counters, "log": log}


def differences(
    name: str, want: dict[str, dict[Any, Row]], got: dict[str, dict[Any, Row]]
) -> list[str]:
    lines = []
    for table in want:
        expected, actual = want[table], got[table]
        for key in sorted(set(expected) | set(actual), key=repr):
            if expected.get(key) != actual.get(key):
                lines.append(
                    f"{name} {table} {key!r}: "
                    f"model {expected.get(key)!r}, table {actual.get(key)!r}"
                )
    return lines


def spread(lines: list[str], most: int) -> list[str]:
    """Up to `most` lines, taken in turn from each "group table" so every kind shows."""
    kinds: dict[str, collections.deque[str]] = {}
    for line in lines:
        kinds.setdefault(" ".join(line.split()[:2]), collections.deque()).append(line)
    chosen: list[str] = []
    while len(chosen) < most and any(kinds.values()):
        for queue in kinds.values():
            if queue and len(chosen) < most:
                chosen.append(queue.popleft())
    return chosen


# ----------------------------------------------------------------------------- the run


class Torture:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.clock = Clock()
        self.random = random.Random(args.seed)
        self.directory = Path(tempfile.mkdtemp(prefix="streamsink-torture-"))
        self.redis = RedisServer(self.directory / "redis")
        self.redis.directory.mkdir()
        self.base_dsn: str = args.database_url
        tag = f"torture_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.db_names = [f"{tag}_a", f"{tag}_b"]
        self.dsn_a = self.dsn_b = ""
        self.config = self.directory / "streamsink.toml"
        self.faults: list[tuple[float, str, str]] = []
        self.fault_counts: collections.Counter[str] = collections.Counter()
        self.replayed = 0
        self.replayed_fields: list[dict[bytes, bytes]] = []
        self.replayed_entries: list[tuple[int, str]] = []  # (shard, entry ID) of each
        self.diagnosis: list[str] = []
        self.dead_reasons: collections.Counter[str] = collections.Counter()
        self.backlog: dict[str, int] = {}  # group: largest backlog seen (entries)
        self.unlisted = 0  # replayed letters that came after our listing (data unknown)
        self.problems: list[str] = []
        self.workers: Workers | None = None
        self.producers: list[ProducerThread] = []

    def say(self, text: str) -> None:
        self.clock.say(text)

    # --- setup

    def setup(self) -> None:
        self.redis.start()
        self.dsn_a, self.dsn_b = create_databases(self.base_dsn, self.db_names)
        self.config.write_text(
            CONFIG.format(
                redis_url=self.redis.url,
                prefix=PREFIX,
                dsn_a=self.dsn_a,
                dsn_b=self.dsn_b,
                shards=SHARDS,
                group_settings=GROUP_SETTINGS,
            )
        )
        for dsn in (self.dsn_a, self.dsn_b):
            cli(self.config, "--database-url", dsn, "tables", "create")
        self.constraint(add=True)
        cli(self.config, "streams", "create")
        self.say(
            f"redis-server :{self.redis.port} (AOF), databases {', '.join(self.db_names)}, "
            f"{self.args.workers} workers, work dir {self.directory}"
        )
        self.workers = Workers(self.args.workers, self.config, self.directory, self.clock)
        self.workers.start_all()
        for number in range(2):
            thread = ProducerThread(
                number,
                self.redis.url,
                self.config,
                self.args.rate / 2,
                self.random.randrange(2**32),
                self.clock,
            )
            self.producers.append(thread)
            thread.start()

    def constraint(self, add: bool) -> None:
        """Add (NOT VALID: rows already there stay) or drop database B's check on counters."""
        statement = (
            f"ALTER TABLE counters ADD CONSTRAINT {CHECK_NAME} {CHECK_SQL} NOT VALID"
            if add
            else f"ALTER TABLE counters DROP CONSTRAINT IF EXISTS {CHECK_NAME}"
        )
        for attempt in range(20):
            try:
                with connect(self.dsn_b) as conn, conn.cursor() as cur:
                    cur.execute("SET lock_timeout = '3s'")
                    cur.execute(statement)
                return
            except psycopg2.Error as exc:
                if attempt == 19:
                    raise
                self.say(f"   ALTER TABLE counters again ({str(exc).strip()[:80]})")
                time.sleep(0.5)

    # --- faults

    def inject(self) -> None:
        """One random fault; what it was is recorded and printed."""
        assert self.workers is not None
        kinds = ["sigkill", "sigstop", "redis-restart", "pg-terminate"]
        weights = [3, 3, 2, 3]
        kind = self.random.choices(kinds, weights)[0]
        running = [w for w in self.workers.slots if w.running]
        if kind in ("sigkill", "sigstop") and len(running) < 2:
            kind = "pg-terminate"  # keep one worker going: faults, not an outage
        if kind == "sigkill":
            text = self.workers.kill(self.random.choice(running), self.random.uniform(0.3, 3.0))
        elif kind == "sigstop":
            paused = self.random.uniform(1.3, 2.5) * LEASE_TTL_MS / 1000
            text = self.workers.stop(self.random.choice(running), paused)
        elif kind == "redis-restart":
            down = self.random.uniform(0.2, 3.0)
            self.record(kind, f"Redis SHUTDOWN, down for {down:.1f} s")
            self.redis.shutdown()
            time.sleep(down)
            self.redis.start()
            self.say("   Redis back")
            return
        else:
            text = f"pg_terminate_backend: {self.terminate_backends()} connections of the workers"
        self.record(kind, text)

    def record(self, kind: str, text: str) -> None:
        self.faults.append((now() - self.clock.start, kind, text))
        self.fault_counts[kind] += 1
        self.say(f"fault {kind}: {text}")

    def terminate_backends(self) -> int:
        with connect(self.base_dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
                (self.db_names,),
            )
            return int(cur.fetchone()[0])

    def replay(self, final: bool = False) -> int:
        """Drop B's constraint, replay g2's dead letters (CLI), add the constraint again."""
        self.constraint(add=False)
        time.sleep(0.5)
        client = redis.Redis.from_url(self.redis.url, socket_timeout=10)
        listed = list(dead_letters(client, Keys(PREFIX), STREAM, "g2", 1_000_000))
        for letter in listed:
            self.dead_reasons[letter.reason.split(" (")[0][:100]] += 1
        client.close()
        started = now()
        done = cli(
            self.config, "dead", "replay", STREAM, "g2", "--all", "--limit", "1000000", check=False
        )
        pairs = [line.split(" -> ") for line in done.stdout.splitlines() if " -> " in line]
        pairs = [(dead_id, new_id) for dead_id, new_id in pairs if new_id[:1].isdigit()]
        # Which of our letters went (dead-letter IDs repeat across shards, so ask each shard);
        # the CLI's other lines are letters that came after our listing.
        client = redis.Redis.from_url(self.redis.url, socket_timeout=10)
        pipe = client.pipeline(transaction=False)
        for letter in listed:
            pipe.xrange(Keys(PREFIX).dead(STREAM, letter.shard, "g2"), letter.id, letter.id)
        gone = [letter for letter, left in zip(listed, pipe.execute(), strict=True) if not left]
        for letter in gone:
            self.replayed_fields.append(letter.fields)
            self.replayed_entries.append((letter.shard, letter.entry))
        known = collections.Counter(f"{letter.shard}/{letter.id}" for letter in gone)
        for dead_id, new_id in pairs:
            if known[dead_id]:
                known[dead_id] -= 1
            else:
                self.find_replayed(client, new_id)
        client.close()
        count = len(pairs)
        self.say(
            f"   dead replay g2: {count} letters in {now() - started:.1f} s "
            f"({len(gone)} of the {len(listed)} listed before)"
        )
        if done.returncode != 0:
            self.say(f"!! dead replay exited {done.returncode}: {done.stderr.strip()[:200]}")
        self.replayed += count
        if not final:
            time.sleep(2.0)  # let the replayed entries through before refusing again
            self.constraint(add=True)
        return count

    def find_replayed(self, client: redis.Redis, new_id: str) -> None:
        """The fields of a replayed entry, from its shard (unless trimmed already)."""
        for shard in range(SHARDS):
            found: Any = client.xrange(Keys(PREFIX).shard(STREAM, shard), new_id, new_id)
            if found and shard_of(found[0][1][b"key"].decode(), SHARDS) == shard:
                self.replayed_fields.append(found[0][1])
                self.replayed_entries.append((shard, f"unknown {new_id}"))
                break
        else:
            self.unlisted += 1

    def diagnose(
        self, name: str, want: dict[str, dict[Any, Row]], got: dict[str, dict[Any, Row]]
    ) -> list[str]:
        """How a group's counters differ from the model, against what the replays published."""
        replayed: collections.Counter[Any] = collections.Counter()
        times: collections.Counter[bytes] = collections.Counter()
        letters = collections.Counter(self.replayed_entries)
        doubled: collections.Counter[Any] = collections.Counter()  # one entry, several letters
        seen: set[tuple[int, str]] = set()
        for fields, entry in zip(self.replayed_fields, self.replayed_entries, strict=True):
            if fields.get(b"table") == b"counters":
                data = json.loads(fields[b"data"])
                replayed[data["id"]] += data["n"]
                times[fields.get(b"id", b"?")] += 1
                if letters[entry] > 1 and entry not in seen:
                    doubled[data["id"]] += data["n"] * (letters[entry] - 1)
                seen.add(entry)
        excess = {
            key: (got["counters"].get(key, (0,))[0] or 0) - want["counters"].get(key, (0,))[0]
            for key in set(want["counters"]) | set(got["counters"])
        }
        excess = {key: value for key, value in excess.items() if value}
        lines = []
        twice = {ident.decode(): count for ident, count in times.items() if count > 1}
        if twice:
            lines.append(f"events replayed more than once: {len(twice)}")
        several = sum(1 for count in letters.values() if count > 1)
        if several:
            lines.append(
                f"g2 entries dead-lettered more than once (same shard and entry ID, so "
                f"replayed and applied more than once): {several}"
            )
        if self.unlisted:
            lines.append(
                f"{self.unlisted} replayed letters came after the listing: not counted (trimmed)"
            )
        if not excess:
            return lines
        if name.startswith("g1"):
            explained = {k for k, v in excess.items() if v == replayed.get(k)}
            lines.append(
                f"{name} counters: {len(explained)} of {len(excess)} differing rows are off by "
                "exactly the deltas replayed for g2 (g1 applied them a second time)"
            )
            rest = sorted(set(excess) - explained)
        else:
            explained = {k for k, v in excess.items() if v == doubled.get(k)}
            lines.append(
                f"{name} counters: {len(explained)} of {len(excess)} differing rows are off by "
                "exactly the deltas of entries g2 dead-lettered more than once"
            )
            rest = sorted(set(excess) - explained)
        for key in rest[:10]:
            lines.append(
                f"  {name} counters {key}: table - model = {excess[key]}, "
                f"replayed deltas {replayed.get(key, 0)}"
            )
        return lines

    # --- drain and compare

    def drained(self, client: redis.Redis) -> tuple[bool, str]:
        """Every shard: pending 0 and the group's last delivered ID the newest entry's.

        Not XINFO's `lag`: Redis 7.0 keeps counting one after a restart from the AOF (its
        entries-read counter goes stale), though everything was delivered and acknowledged.
        """
        keys = Keys(PREFIX)
        notes = []
        for shard in range(shard_count(client, keys, STREAM)):
            key = keys.shard(STREAM, shard)
            newest = client.xinfo_stream(key)["last-generated-id"]
            for info in client.xinfo_groups(key):
                name = info["name"].decode()
                if name not in GROUPS:
                    continue
                behind = info["last-delivered-id"] != newest
                if info["pending"] or behind:
                    notes.append(
                        f"{name}/{shard}: pending {info['pending']}, "
                        f"delivered up to {info['last-delivered-id'].decode()} "
                        f"of {newest.decode()}"
                    )
        return not notes, "; ".join(notes)

    def sample_backlog(self) -> None:
        """The largest backlog (not yet acknowledged, per group) seen during the run."""
        client = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        try:
            for group in GROUPS:
                rows = group_status(client, Keys(PREFIX), STREAM, group, 100_000)
                backlog = sum(row.outstanding or 0 for row in rows)
                self.backlog[group] = max(self.backlog.get(group, 0), backlog)
        except redis.RedisError:
            pass
        finally:
            client.close()

    def dead_counts(self, client: redis.Redis) -> dict[str, int]:
        keys = Keys(PREFIX)
        return {
            group: sum(int(client.xlen(keys.dead(STREAM, s, group))) for s in range(SHARDS))
            for group in GROUPS
        }

    def drain(self) -> None:
        assert self.workers is not None
        self.workers.settle()
        self.say("drain: every worker running; final replay of g2's dead letters")
        self.constraint(add=False)
        client = redis.Redis.from_url(self.redis.url, socket_timeout=10)
        deadline = now() + self.args.drain_timeout
        quiet_since: float | None = None
        note = ""
        while now() < deadline:
            self.workers.check_exits()
            dead = self.dead_counts(client)
            if dead["g2"]:
                self.say(f"   replayed {self.replay(final=True)} dead letters of g2")
            ok, note = self.drained(client)
            if ok and not self.dead_counts(client)["g2"]:
                quiet_since = quiet_since or now()
                if now() - quiet_since > 2.0:  # and still so two seconds later
                    break
            else:
                quiet_since = None
            time.sleep(0.5)
        else:
            self.problems.append(f"not drained within {self.args.drain_timeout} s: {note}")
        dead = self.dead_counts(client)
        if dead["g1"]:
            self.problems.append(f"g1 has {dead['g1']} dead letters:")
            keys = Keys(PREFIX)
            for shard in range(SHARDS):
                for _, fields in client.xrange(keys.dead(STREAM, shard, "g1"), count=5):
                    self.problems.append(f"  shard {shard}: {fields.get(b'reason', b'').decode()}")
        client.close()
        codes = self.workers.terminate()
        self.say(f"workers stopped with SIGTERM: exit codes {codes}")
        bad = {n: c for n, c in codes.items() if c != 0}
        if bad:
            self.problems.append(f"workers did not exit 0 after SIGTERM: {bad}")
        for worker in self.workers.slots:
            if worker.unexpected_exits:
                self.problems.append(
                    f"worker-{worker.number} exited on its own: codes {worker.unexpected_exits}"
                )

    def compare(self) -> list[str]:
        events = [e for p in self.producers for e in p.published]
        want = model(events)
        lines = []
        for name, dsn in (("g1/db_a", self.dsn_a), ("g2/db_b", self.dsn_b)):
            got = tables_of(dsn)
            lines += differences(name, want, got)
            self.diagnosis += self.diagnose(name, want, got)
        self.say(
            f"model: {len(events)} events -> {len(want['items'])} items, "
            f"{len(want['counters'])} counters, {sum(c for (c,) in want['log'].values())} log rows"
        )
        return lines

    # --- the whole run

    def run(self) -> int:
        end = now() + self.args.seconds
        next_replay = now() + self.args.replay_every
        try:
            self.setup()
            assert self.workers is not None
            time.sleep(2.0)  # workers take their leases
            while now() < end:
                self.workers.check_exits()
                for producer in self.producers:
                    if producer.failure is not None:
                        raise RuntimeError(f"producer-{producer.number}: {producer.failure!r}")
                if now() >= next_replay:
                    count = self.replay()
                    self.record("dead-replay", f"g2: {count} dead letters replayed (CLI)")
                    next_replay = now() + self.args.replay_every
                self.inject()
                self.sample_backlog()
                time.sleep(self.random.uniform(*self.args.gap))
            self.say("time is up: producers stop")
            for producer in self.producers:
                producer.halt.set()
                producer.join(60)
            self.drain()
            diff = self.compare()
        finally:
            if self.workers is not None:
                self.workers.kill_all()
            self.redis.kill()
        self.report(diff)
        return 1 if diff or self.problems else 0

    def report(self, diff: list[str]) -> None:
        print("\nfaults injected:")
        print(f"  {'kind':<15} {'count':>6}")
        for kind, count in sorted(self.fault_counts.items()):
            print(f"  {kind:<15} {count:>6}")
        print(f"  {'all':<15} {sum(self.fault_counts.values()):>6}")
        published = sum(len(p.published) for p in self.producers)
        retries = sum(p.retries for p in self.producers)
        errors: collections.Counter[str] = collections.Counter()
        for producer in self.producers:
            errors.update(producer.errors)
        print(
            f"\npublished {published} events ({retries} publishes retried with the same ids: "
            f"{dict(errors)}); {self.replayed} dead letters of g2 replayed; largest backlog "
            f"seen after a fault: {self.backlog} entries"
        )
        for reason, count in self.dead_reasons.most_common():
            print(f"  g2 dead letters before replays: {count} x {reason}")
        for problem in self.problems:
            print(f"problem: {problem}")
        if diff:
            by_table = collections.Counter(" ".join(line.split()[:2]) for line in diff)
            print(f"\n{len(diff)} rows differ from the model: {dict(by_table)}")
            for line in dict.fromkeys(self.diagnosis):
                print(line)
            print("first rows that differ (up to 20, spread over the tables):")
            for line in spread(diff, 20):
                print(f"  {line}")
        verdict = "FAIL" if diff or self.problems else "PASS"
        print(f"\n{verdict}")

    def cleanup(self, failed: bool) -> None:
        if self.args.keep:
            print(f"kept: databases {', '.join(self.db_names)}, work dir {self.directory}")
            return
        with contextlib.suppress(psycopg2.Error):
            drop_databases(self.base_dsn, self.db_names)
        if failed:
            print(f"worker logs kept in {self.directory}")
        else:
            shutil.rmtree(self.directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, help="how long faults go on (default 60)")
    parser.add_argument("--minutes", type=float, help="the same in minutes")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, help="default: random (printed)")
    parser.add_argument("--rate", type=float, default=400, help="events/s of both producers")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
        help="a PostgreSQL database to create the run's two databases from",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases and work dir")
    parser.add_argument("--replay-every", type=float, help="seconds (default: a quarter of it)")
    parser.add_argument("--drain-timeout", type=float, default=180)
    args = parser.parse_args()
    args.seconds = args.seconds or (args.minutes or 0) * 60 or 60.0
    args.seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    args.replay_every = args.replay_every or max(10.0, min(args.seconds / 4, 120.0))
    args.gap = (1.0, 4.0)
    print(f"torture: {args.seconds:.0f} s, {args.workers} workers, seed {args.seed}", flush=True)
    torture = Torture(args)
    code = 1
    try:
        code = torture.run()
    finally:
        torture.cleanup(failed=code != 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
