"""Pipeline benchmark: one worker drains Redis Streams into PostgreSQL, baselines in the same run.

    python bench/pipeline.py [--runs 3]
                             [--scenarios hot,metrics,naive,read,unique,latency,backlog]
                             [--hot-events 500000] [--set max_events=20000] ...
    python bench/pipeline.py --scenarios latency-default [--default-rates 1000,20000]
    python bench/pipeline.py --scenarios scale [--scale-shards 8] [--scale-events 200000]

Rows (median of --runs runs; every run reads the events afresh, into new tables):
  hot keys        worker: 500,000 events over 10,000 rows of tasks(id, status text lww,
                  progress int max, views int sum), half `set` (status, progress), half
                  `incr` (views); events/s, worker CPU µs/event, peak RSS
  metrics on      worker: the hot-keys run again on the same stream with the HTTP endpoint on
                  (`[worker] http`: telemetry per window, hot keys, its Redis writes each
                  second) and /metrics scraped each second by the bench; "metrics cost" is
                  the throughput lost against the run without, in % (each run does both),
                  "metrics CPU cost" the worker CPU per event added (steadier on a busy machine)
  naive           baseline: psycopg2, XREADGROUP COUNT 1000, orjson.loads, one upsert per
                  event, commit, XACK; on the first 20,000 events of the same stream. The
                  target's ratio is taken against it. For context, the same consumer
                  committing each event (autocommit, as hand-made consumers often run) on
                  a quarter of that: "commit each event" and its ratio
  plain read      baseline: redis-py, XREADGROUP COUNT 1000 + orjson.loads + XACK, no
                  database (the ceiling of reading); the whole hot-keys stream. Divided by
                  naive, it is the most "hot keys / naive" a reader on redis-py can show
  unique keys     worker: 200,000 events of the same mix, each on a new row
  latency         a producer paced at 20,000 events/s for 10 s (hot-keys mix) stamps the
                  publish time in each event's `ts`; publish-to-commit p50 and p99, ms
  backlog         worker: a backlog of 1,000,000 unique-key events (the largest windows,
                  nothing merges away); its peak RSS
  / plain read    hot keys and unique keys as % of the plain read of the same run (issue 18),
                  with two ceilings from CPU per event: "no core to spare" (the plain read's
                  client + Redis CPU over the worker + Redis + PostgreSQL CPU: what a machine
                  with every core busy allows) and "a core of its own" (over the worker's CPU
                  alone: what a worker whose servers run on other cores allows)
  latency-default (when named) the latency scenario with the default group settings
                  (max_age_ms 250) at each of --default-rates; per window also how long its
                  oldest entry took to reach the sink's write, and the write itself
  scale           (when named) 1, 2 and 4 worker processes of one group over 8 shards, hot
                  keys and unique keys (200,000 events): events/s, and CPU per event of the
                  workers, Redis and the workers' PostgreSQL backends. The workers start on
                  the group moved to the end of each shard, and once they share the shards
                  evenly it is moved back to 0: the clock sees no rebalancing. Then, on an
                  idle shard set, the seconds until the leases are spread again when a
                  worker joins one holding all 8 (from its process start, imports included),
                  leaves (SIGTERM) and is killed (SIGKILL: its leases expire first)
The issue's targets are printed with the table.

How it measures:
  The worker is a subprocess running what `streamsink worker` runs (`serve(config)` with the
  config's sinks, JSON logs at WARNING) on a TOML config this script writes, with the group
  settings printed above the table (defaults: BULK below; `--set name=value` changes one).
  Each scenario publishes its events once (Producer.publish_many, 1,000 a call, fixed seed)
  and gives every run its own consumer groups (all created before the first run, so the
  worker's retention trim keeps every entry) and its own PostgreSQL schema (tables and
  offsets), so runs read the same entries and start from empty tables.
  Throughput is from the first read to the last acknowledgement: the bench polls XINFO
  GROUPS of every shard each 5 ms; the clock starts when a shard's last-delivered-id leaves
  0-0 and stops when every shard has delivered its last entry and has nothing pending. The
  worker acknowledges a window only after its transaction committed, so that is the last
  commit (to within one poll). Worker startup (imports, leases) is outside the clock.
  Worker CPU is utime + stime of its process (/proc/PID/stat, every thread) over the same
  interval; peak RSS is its VmHWM (/proc/PID/status) once drained. Redis CPU is the whole
  server's (its process_id from INFO, on this machine): point --redis-url at a Redis of the
  bench's own, or other clients' commands count too. PostgreSQL CPU is that of the backends
  serving the workers' connections (matched by client port); the server's background
  processes (WAL writer, checkpointer) are not counted.
  Latency: in that scenario the worker's PostgreSQL sink is wrapped (CommitClock) so that,
  when the sink's write returns (its transaction committed), every entry of the window
  gets `now - ts`; `ts` is the producer's wall clock in whole ms, taken just before the
  publish, and both processes read the same clock. Truncating ts to the ms and noting the
  time after the sink's thread hands back both make the figure a little longer, never
  shorter. Nothing is sampled: every event published in the scenario is counted.
  Every worker run is checked: the rows in PostgreSQL are compared with applying every
  event one by one (streamsink.schemas.merge.apply_event), or counted for unique keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import redis
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink import Event, Op, Producer, create_stream
from streamsink.consumers.settings import GroupSettings
from streamsink.schemas import Column, ColumnType, Config, Policy, StreamSpec, Table, load
from streamsink.schemas.merge import Row, apply_event
from streamsink.sinks.base import Batch, Rejected, Sink
from streamsink.streams import Keys

STREAM = "tasks"
STATUSES = ("queued", "running", "rendering", "uploading", "done")
TASKS = Table(
    "tasks",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "status": Column(ColumnType.TEXT),
        "progress": Column(ColumnType.INT, Policy.MAX),
        "views": Column(ColumnType.INT, Policy.SUM),
    },
)
TASKS_TOML = (
    'key = ["id"]\ncolumns = { id = "int", status = "text", '
    'progress = { type = "int", policy = "max" }, views = { type = "int", policy = "sum" } }'
)

BULK = {
    "max_events": 20_000,
    "max_bytes": 8 * 1024 * 1024,
    "linger_ms": 50,
    "max_age_ms": 1000,
    "read_count": 5_000,
    "block_ms": 500,
}
"""Group settings for bulk throughput: windows of up to 20,000 events (more merging per row,
fewer transactions) and 1 s, reads of 5,000. With the default 250 ms a window closes by age
before it fills (a worker busy with four shards reads each every few hundred ms), so fewer
events merge per row: measured 31k events/s at 250 ms, 37k at 1 s, 43k at 2 s (hot keys)."""

SCENARIOS = ("hot", "metrics", "naive", "read", "unique", "latency", "backlog")
"""What runs by default; `latency-default` and `scale` run when named."""

POLL_S = 0.005
"""How often the bench looks at the consumer groups while a worker drains."""

STALL_S = 60.0
"""A worker that does not move for this long fails the benchmark instead of hanging it."""


def events(count: int, keys: int, seed: int) -> Iterator[Event]:
    """Half sets of status and progress, half incrs of views; tasks drawn uniformly from
    `keys` ids, or each event on a new task when `keys` is 0."""
    rng = random.Random(seed)
    for i in range(count):
        task = rng.randrange(keys) if keys else i
        if rng.random() < 0.5:
            data = {
                "id": task,
                "status": STATUSES[rng.randrange(5)],
                "progress": rng.randrange(101),
            }
            yield Event(f"task:{task}", Op.SET, data)
        else:
            yield Event(f"task:{task}", Op.INCR, {"id": task, "views": 1})


@dataclass
class Setup:
    """What every scenario shares: servers, shard count, group settings, scratch directory."""

    redis_url: str
    dsn: str
    shards: int
    settings: dict[str, int]
    directory: Path
    verbose: bool
    client: redis.Redis = field(init=False)

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(self.redis_url)

    def say(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr, flush=True)

    def connect(self) -> Connection:
        return psycopg2.connect(self.dsn, connect_timeout=10)


@dataclass
class Stream:
    """One scenario's stream in Redis: its keys, entries, and the last entry of each shard."""

    setup: Setup
    keys: Keys
    count: int = 0
    expected: dict[Any, Row] = field(default_factory=dict)  # row key -> row (hot keys only)
    schemas: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, setup: Setup) -> Stream:
        keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
        create_stream(setup.client, keys, STREAM, setup.shards)
        return cls(setup, keys)

    def config(self) -> Config:
        spec = StreamSpec(STREAM, self.setup.shards, "tasks")
        return Config(streams={STREAM: spec}, tables={"tasks": TASKS}, prefix=self.keys.prefix)

    def shard_keys(self) -> list[str]:
        return [self.keys.shard(STREAM, s) for s in range(self.setup.shards)]

    def publish(self, source: Iterator[Event], expect: bool) -> None:
        """Publish every event of `source`, 1,000 a call; fold them into `expected` if asked."""
        producer = Producer(self.setup.client, self.config())
        started = time.perf_counter()
        while chunk := list(islice(source, 1000)):
            producer.publish_many(STREAM, chunk)
            self.count += len(chunk)
            if expect:
                for event in chunk:
                    key = event.data["id"]
                    row = apply_event(self.expected.get(key), event, TASKS)
                    assert row is not None
                    self.expected[key] = row
        seconds = time.perf_counter() - started
        self.setup.say(f"published {self.count:,} events in {seconds:.1f} s")

    def add_groups(self, *names: str) -> None:
        for key in self.shard_keys():
            for name in names:
                self.setup.client.xgroup_create(key, name, id="0", mkstream=True)

    def last_ids(self) -> list[bytes]:
        """The last entry ID of each shard (b"0-0" for an empty one)."""
        pipe = self.setup.client.pipeline(transaction=False)
        for key in self.shard_keys():
            pipe.xrevrange(key, count=1)
        return [reply[0][0] if reply else b"0-0" for reply in pipe.execute()]

    def progress(self, group: str, last: Sequence[bytes]) -> tuple[bool, bool, list[Any]]:
        """Of `group`: whether it has read anything, whether it has read and acknowledged
        everything, and where it is (changes whenever it moves)."""
        pipe = self.setup.client.pipeline(transaction=False)
        for key in self.shard_keys():
            pipe.xinfo_groups(key)
        started, done, where = False, True, list[Any]()
        for shard, groups in enumerate(pipe.execute()):
            mine = next(g for g in groups if _text(g["name"]) == group)
            delivered, pending = _text(mine["last-delivered-id"]), int(mine["pending"])
            started = started or delivered != "0-0"
            done = done and delivered == _text(last[shard]) and pending == 0
            where += (delivered, pending)
        return started, done, where

    def new_schema(self, conn: Connection) -> str:
        schema = f"{self.keys.prefix}_{len(self.schemas)}"
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.commit()
        self.schemas.append(schema)
        return schema

    def clean(self) -> None:
        """Unlink the stream's Redis keys and drop its PostgreSQL schemas."""
        for key in self.setup.client.scan_iter(match=f"{self.keys.prefix}:*", count=1000):
            self.setup.client.unlink(key)
        with contextlib.closing(self.setup.connect()) as conn, conn.cursor() as cur:
            for schema in self.schemas:
                cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            conn.commit()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (every thread); 0 once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    parts = stat[stat.rindex(")") + 2 :].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def client_ports(pid: int) -> set[int]:
    """The local TCP ports of process `pid`'s connected sockets (to find its PostgreSQL
    backends by their client_port)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[9] in inodes:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


class ServerCpu:
    """CPU of the servers on this machine: Redis (the whole server: run the bench on a
    Redis of its own to count nothing else) and the PostgreSQL backends serving the
    processes `pids` (found by their client ports; PostgreSQL's background writers are
    not counted)."""

    def __init__(self, setup: Setup, pids: Sequence[int]) -> None:
        self.setup, self.pids = setup, list(pids)
        self.redis_pid = int(setup.client.info("server")["process_id"])
        if not Path(f"/proc/{self.redis_pid}").exists():
            self.redis_pid = 0  # not on this machine (or another PID namespace)
        self.start: tuple[float, dict[int, float]] = self.sample()

    def backends(self) -> list[int]:
        ports = set().union(*(client_ports(pid) for pid in self.pids)) if self.pids else set()
        if not ports:
            return []
        with contextlib.closing(self.setup.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", (list(ports),)
            )
            return [row[0] for row in cur.fetchall()]

    def sample(self) -> tuple[float, dict[int, float]]:
        redis_s = process_cpu_s(self.redis_pid) if self.redis_pid else 0.0
        return redis_s, {pid: process_cpu_s(pid) for pid in self.backends()}

    def used(self) -> tuple[float, float]:
        """Redis and PostgreSQL CPU seconds since this meter (or `restart`) started; a
        backend that appeared meanwhile counts from its start."""
        redis_s, backends = self.sample()
        pg = sum(cpu - self.start[1].get(pid, 0.0) for pid, cpu in backends.items())
        return redis_s - self.start[0], pg

    def restart(self) -> None:
        self.start = self.sample()


# ---- the worker, as a subprocess ----------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for a worker's endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_config(stream: Stream, group: str, schema: str, http: str = "") -> str:
    """The TOML a user would write for this worker (`http`: its endpoint's address)."""
    setup = stream.setup
    options = "\n".join(f"{name} = {value}" for name, value in setup.settings.items())
    endpoint = f'[worker]\nhttp = "{http}"' if http else ""
    return f"""{endpoint}
[redis]
url = "{setup.redis_url}"
prefix = "{stream.keys.prefix}"

[postgres]
dsn = "{setup.dsn}"

[tables.tasks]
schema = "{schema}"
{TASKS_TOML}

[streams.{STREAM}]
shards = {setup.shards}
table = "tasks"

[sinks.db]
type = "postgres"
offsets_schema = "{schema}"

[groups.{group}]
stream = "{STREAM}"
sinks = ["db"]
{options}
"""


@dataclass
class Drained:
    """What one worker run measured."""

    events_per_s: float
    cpu_us: float  # worker CPU per event (every worker process)
    rss_mb: float  # worker peak RSS (the largest)
    redis_us: float = 0.0  # Redis server CPU per event (the whole server, every client)
    pg_us: float = 0.0  # CPU per event of the PostgreSQL backends serving the workers


class WorkerProcess:
    """A worker subprocess (this script in --child mode) on its own config and schema."""

    def __init__(
        self,
        stream: Stream,
        group: str,
        timings: Path | None = None,
        http: str = "",
        schema: str = "",
    ) -> None:
        """`schema`: another worker's, to work on the same group and tables with it."""
        setup = stream.setup
        self.stream, self.group, self.http = stream, group, http
        path = setup.directory / f"{group}-{schema}.toml"
        if not schema:
            with contextlib.closing(setup.connect()) as conn:
                schema = stream.new_schema(conn)
                path = setup.directory / f"{group}-{schema}.toml"
                path.write_text(worker_config(stream, group, schema, http))
                from streamsink.sinks.postgres.schema import create_tables

                create_tables(conn, load(path), offsets_schema=schema)
        self.schema = schema
        self.stderr = setup.directory / f"{group}-{schema}-{uuid.uuid4().hex[:6]}.err"
        args = [sys.executable, str(Path(__file__).resolve()), "--child", str(path)]
        if timings is not None:
            args += ["--timings", str(timings)]
        with self.stderr.open("wb") as err:
            self.process = subprocess.Popen(args, stdout=err, stderr=err)
        setup.say(f"worker pid {self.process.pid} on group {group}, schema {self.schema}")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the worker exited ({self.process.returncode}):\n{self.log()}")

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")[-5000:]

    def cpu_s(self) -> float:
        """User + system CPU seconds of the worker so far (every thread)."""
        return process_cpu_s(self.process.pid)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc")

    def wait_for_leases(self, timeout: float = 15) -> None:
        """Until the worker holds every shard (so a paced producer's first events wait for
        no startup)."""
        client, keys = self.stream.setup.client, self.stream.keys
        leases = [keys.lease(STREAM, s, self.group) for s in range(self.stream.setup.shards)]
        deadline = time.monotonic() + timeout
        while None in client.mget(leases):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker took no leases within {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        time.sleep(0.3)  # the shard runners reach their first blocking read

    def drain(self) -> Drained:
        """Wait until the worker has acknowledged the whole stream; measure it."""
        return drain([self])

    def stop(self) -> None:
        """SIGTERM (drain and leave); it must exit 0."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise RuntimeError(f"the worker did not stop within 30 s:\n{self.log()}") from None
        if code != 0:
            raise RuntimeError(f"the worker exited {code}:\n{self.log()}")

    def rows(self) -> list[tuple[Any, ...]]:
        with contextlib.closing(self.stream.setup.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT id, status, progress, views FROM {}").format(
                    sql.Identifier(self.schema, "tasks")
                )
            )
            return list(cur.fetchall())


def drain(workers: Sequence[WorkerProcess]) -> Drained:
    """Wait until the workers (of one group) have acknowledged the whole stream; measure
    them, and the servers' CPU over the same interval."""
    first = workers[0]
    stream, group, http = first.stream, first.group, first.http
    last = stream.last_ids()
    servers = ServerCpu(stream.setup, [w.process.pid for w in workers])
    started = cpu = 0.0
    seen, moved = None, time.monotonic()
    scraped = time.monotonic()
    while True:
        for worker in workers:
            worker.check_alive()
        if http and time.monotonic() - scraped >= 1.0:  # as Prometheus would, often
            scraped = time.monotonic()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://{http}/metrics", timeout=2).read()
        read, done, where = stream.progress(group, last)
        now = time.perf_counter()
        if read and not started:
            started, cpu = now, sum(w.cpu_s() for w in workers)
            servers.restart()
        if done:
            redis_s, pg_s = servers.used()
            return Drained(
                events_per_s=stream.count / max(now - started, POLL_S),
                cpu_us=(sum(w.cpu_s() for w in workers) - cpu) * 1e6 / stream.count,
                rss_mb=max(w.peak_rss_mb() for w in workers),
                redis_us=redis_s * 1e6 / stream.count,
                pg_us=pg_s * 1e6 / stream.count,
            )
        if where != seen:
            seen, moved = where, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            logs = "\n".join(w.log() for w in workers)
            raise RuntimeError(f"the workers made no progress in {STALL_S:.0f} s:\n{logs}")
        time.sleep(POLL_S)


class CommitClock:
    """A sink wrapper: when the inner sink's write returns (committed), each entry of the
    window gets its publish-to-commit time, now minus the event's `ts`, in ms. Per window
    it also notes where the oldest entry's time went: publish to the sink's write being
    called (XADD, read, the window, merging) and the write itself (the transaction)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.latencies_ms: list[float] = []
        self.windows: list[tuple[float, float, int]] = []  # (to the write, in it, entries)

    async def write(self, batch: Batch) -> Sequence[Rejected]:
        called_ms = time.time() * 1000
        rejected = await self.inner.write(batch)
        now_ms = time.time() * 1000
        stamps = [e.event.ts for e in batch.entries if e.event.ts is not None]
        self.latencies_ms.extend(now_ms - ts for ts in stamps)
        if stamps:
            self.windows.append((called_ms - min(stamps), now_ms - called_ms, len(stamps)))
        return rejected

    async def close(self) -> None:
        await self.inner.close()


def child(config_path: str, timings: str | None) -> int:
    """The worker: what `streamsink worker` runs, its sink timed when `timings` is given."""
    from streamsink.consumers.worker import Worker
    from streamsink.logs import configure
    from streamsink.ops.http import endpoint
    from streamsink.serve import serve
    from streamsink.sinks import build_sinks

    configure("WARNING")
    config = load(config_path)
    address = config.http

    def around(worker: Worker) -> contextlib.AbstractAsyncContextManager[object]:
        return endpoint(worker, address or "")

    sinks = build_sinks(config)
    clock = None
    if timings is not None:
        clock = CommitClock(sinks["db"])
        sinks["db"] = clock
    code = asyncio.run(serve(config, sinks=sinks, around=around if address else None))
    if clock is not None:
        Path(timings or "").write_bytes(orjson.dumps(clock.latencies_ms))
        Path(f"{timings}.windows").write_bytes(orjson.dumps(clock.windows))
    return code


# ---- scenarios ----------------------------------------------------------------------------

Results = dict[str, float]


def worker_run(stream: Stream, group: str, expect_rows: bool, http: str = "") -> Drained:
    """One worker drains the whole stream into new tables; the rows are checked."""
    worker = WorkerProcess(stream, group, http=http)
    try:
        drained = worker.drain()
    finally:
        with contextlib.suppress(RuntimeError):
            worker.stop()
    check_rows(stream, worker, expect_rows)
    return drained


def check_rows(stream: Stream, worker: WorkerProcess, expect_rows: bool) -> None:
    """The rows of the worker's tables equal the events applied one by one (hot keys), or
    one row an event (unique keys)."""
    rows = worker.rows()
    if expect_rows:
        expected = stream.expected
        got = {row[0]: row for row in rows}
        assert len(got) == len(expected), f"{len(got)} rows, expected {len(expected)}"
        for key, row in expected.items():
            want = (row["id"], row["status"], row["progress"], row["views"])
            assert got[key] == want, f"row {key}: {got[key]} != {want}"
    else:
        assert len(rows) == stream.count, f"{len(rows)} rows, expected {stream.count}"


def plain_read(stream: Stream, group: str) -> Results:
    """Baseline: XREADGROUP COUNT 1000, orjson.loads of each data, XACK; events/s, and
    the CPU per event of this process and of Redis."""
    client, read = stream.setup.client, 0
    servers = ServerCpu(stream.setup, [])
    cpu = time.process_time()
    started = time.perf_counter()
    for key in stream.shard_keys():
        while reply := client.xreadgroup(group, "plain", {key: ">"}, count=1000):
            entries: Any = reply[0][1]  # type: ignore[index]
            for _, fields in entries:
                orjson.loads(fields[b"data"])
            client.xack(key, group, *[entry_id for entry_id, _ in entries])
            read += len(entries)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    redis_s, _ = servers.used()
    assert read == stream.count, f"read {read} of {stream.count}"
    return {
        "plain read": read / seconds,
        "plain read cpu": cpu * 1e6 / read,
        "plain read redis cpu": redis_s * 1e6 / read,
    }


def naive(stream: Stream, group: str, sample: int, commit_each: bool = False) -> float:
    """Baseline: one upsert per event, a commit per read of 1,000 (`commit_each`: per
    event, as a hand-made consumer in autocommit does), then XACK; events/s."""
    setup = stream.setup
    with contextlib.closing(setup.connect()) as conn:
        schema = stream.new_schema(conn)
        table = sql.Identifier(schema, "tasks_naive")
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "CREATE TABLE {} (id bigint PRIMARY KEY, status text, progress bigint,"
                    " views bigint)"
                ).format(table)
            )
        conn.commit()
        upsert_set = sql.SQL(
            "INSERT INTO {} AS t (id, status, progress) VALUES (%s, %s, %s) ON CONFLICT (id)"
            " DO UPDATE SET status = excluded.status,"
            " progress = GREATEST(t.progress, excluded.progress)"
        ).format(table)
        upsert_incr = sql.SQL(
            "INSERT INTO {} AS t (id, views) VALUES (%s, %s) ON CONFLICT (id)"
            " DO UPDATE SET views = COALESCE(t.views, 0) + excluded.views"
        ).format(table)
        done, keys = 0, stream.shard_keys()
        started = time.perf_counter()
        while done < sample:
            key = keys[done // 1000 % len(keys)]  # round robin over the shards
            reply: Any = setup.client.xreadgroup(
                group, "naive", {key: ">"}, count=min(1000, sample - done)
            )
            entries = reply[0][1]
            with conn.cursor() as cur:
                for _, fields in entries:
                    data = orjson.loads(fields[b"data"])
                    if fields[b"op"] == b"set":
                        cur.execute(upsert_set, (data["id"], data["status"], data["progress"]))
                    else:
                        cur.execute(upsert_incr, (data["id"], data["views"]))
                    if commit_each:
                        conn.commit()
            conn.commit()
            setup.client.xack(key, group, *[entry_id for entry_id, _ in entries])
            done += len(entries)
        return done / (time.perf_counter() - started)


def hot_scenario(setup: Setup, args: argparse.Namespace, chosen: set[str]) -> list[Results]:
    """Hot keys with the worker, and on the same stream the two baselines."""
    stream = Stream.create(setup)
    runs = range(args.runs)
    try:
        kinds = ("pg", "pgm", "plain", "naive", "each")
        stream.add_groups(*(f"{kind}-{r}" for r in runs for kind in kinds))
        stream.publish(events(args.hot_events, args.hot_keys, seed=1), expect="hot" in chosen)
        results = []
        for run in runs:
            result: Results = {}
            if "read" in chosen:
                result.update(plain_read(stream, f"plain-{run}"))
            if "naive" in chosen:
                result["naive"] = naive(stream, f"naive-{run}", args.naive_events)
                each = max(1000, args.naive_events // 4)
                result["naive each"] = naive(stream, f"each-{run}", each, commit_each=True)
            if "plain read" in result and "naive" in result:
                result["read / naive"] = result["plain read"] / result["naive"]
            if "hot" in chosen:
                drained = worker_run(stream, f"pg-{run}", expect_rows=True)
                result["hot keys"] = drained.events_per_s
                result["hot keys cpu"] = drained.cpu_us
                result["hot keys rss"] = drained.rss_mb
                result["hot keys redis cpu"] = drained.redis_us
                result["hot keys pg cpu"] = drained.pg_us
                if "naive" in result:
                    result["hot / naive"] = drained.events_per_s / result["naive"]
                    result["hot / naive each"] = drained.events_per_s / result["naive each"]
            if "metrics" in chosen:
                http = f"127.0.0.1:{free_port()}"
                drained = worker_run(stream, f"pgm-{run}", expect_rows=True, http=http)
                result["hot keys metrics"] = drained.events_per_s
                result["hot keys metrics cpu"] = drained.cpu_us
                if "hot keys" in result:
                    result["metrics cost"] = 100 * (1 - drained.events_per_s / result["hot keys"])
                    result["metrics cpu cost"] = 100 * (drained.cpu_us / result["hot keys cpu"] - 1)
            setup.say(f"hot run {run}: " + ", ".join(f"{k} {v:,.1f}" for k, v in result.items()))
            results.append(result)
        return results
    finally:
        stream.clean()


def unique_scenario(setup: Setup, args: argparse.Namespace, count: int, name: str) -> list[Results]:
    """Every event on a new row (`name`: the row's label)."""
    stream = Stream.create(setup)
    runs = range(args.runs)
    try:
        stream.add_groups(*(f"pg-{r}" for r in runs))
        stream.publish(events(count, 0, seed=2), expect=False)
        results = []
        for run in runs:
            drained = worker_run(stream, f"pg-{run}", expect_rows=False)
            result = {
                name: drained.events_per_s,
                f"{name} cpu": drained.cpu_us,
                f"{name} rss": drained.rss_mb,
                f"{name} redis cpu": drained.redis_us,
                f"{name} pg cpu": drained.pg_us,
            }
            setup.say(f"{name} run {run}: " + ", ".join(f"{k} {v:,.1f}" for k, v in result.items()))
            results.append(result)
        return results
    finally:
        stream.clean()


def latency_scenario(setup: Setup, args: argparse.Namespace) -> list[Results]:
    """A paced producer; publish-to-commit of every event, per run on a fresh stream."""
    results = []
    for run in range(args.runs):
        stream = Stream.create(setup)
        try:
            timings = setup.directory / f"latency-{run}.json"
            worker = WorkerProcess(stream, "pg", timings)
            try:
                worker.wait_for_leases()
                rate = paced(stream, args.rate, args.latency_seconds)
                worker.drain()
            finally:
                with contextlib.suppress(RuntimeError):
                    worker.stop()
            latencies = sorted(orjson.loads(timings.read_bytes()))
            assert len(latencies) == stream.count, f"{len(latencies)} timed of {stream.count}"
            windows = orjson.loads(Path(f"{timings}.windows").read_bytes())
            result = {
                "latency p50": _percentile(latencies, 0.50),
                "latency p99": _percentile(latencies, 0.99),
                "latency max": latencies[-1],
                "latency to write p99": _percentile(sorted(w[0] for w in windows), 0.99),
                "latency write p99": _percentile(sorted(w[1] for w in windows), 0.99),
                "latency window events": statistics.median(w[2] for w in windows),
                "paced rate": rate,
            }
            setup.say(
                f"latency run {run}: " + ", ".join(f"{k} {v:,.1f}" for k, v in result.items())
            )
            results.append(result)
        finally:
            stream.clean()
    return results


def default_latency_scenario(setup: Setup, args: argparse.Namespace) -> list[Results]:
    """The latency scenario at each of `--default-rates`, with the default group settings
    (no `--set`, no BULK): what a user gets without tuning."""
    plain = replace(setup, settings={})
    results: list[Results] = [{} for _ in range(args.runs)]
    for rate in args.default_rates:
        one = argparse.Namespace(**{**vars(args), "rate": rate})
        for result, measured in zip(results, latency_scenario(plain, one), strict=True):
            for name, value in measured.items():
                result[f"default {rate} {name.removeprefix('latency ')}"] = value
    return results


SCALE_WORKERS = (1, 2, 4)


def scale_scenario(setup: Setup, args: argparse.Namespace) -> list[Results]:
    """1, 2 and 4 worker processes on one group over `--scale-shards` shards, hot keys and
    unique keys; then how long a worker joining, leaving, and dying takes to rebalance."""
    wide = replace(setup, shards=args.scale_shards)
    results: list[Results] = [{} for _ in range(args.runs)]
    for kind, keys in (("hot", args.hot_keys), ("unique", 0)):
        stream = Stream.create(wide)
        try:
            groups = [f"w{n}-{run}" for run in range(args.runs) for n in SCALE_WORKERS]
            stream.add_groups("guard", *groups)  # guard: never read, so nothing is trimmed
            stream.publish(events(args.scale_events, keys, seed=4), expect=kind == "hot")
            for run, result in enumerate(results):
                for n in SCALE_WORKERS:
                    drained = scaled_run(stream, f"w{n}-{run}", n, expect_rows=kind == "hot")
                    label = f"scale {kind} {n}w"
                    result[label] = drained.events_per_s
                    result[f"{label} cpu"] = drained.cpu_us
                    result[f"{label} redis cpu"] = drained.redis_us
                    result[f"{label} pg cpu"] = drained.pg_us
                    setup.say(
                        f"{label} run {run}: {drained.events_per_s:,.0f} events/s, worker "
                        f"{drained.cpu_us:.1f} redis {drained.redis_us:.1f} pg "
                        f"{drained.pg_us:.1f} µs/event"
                    )
            if kind == "hot":
                for run, result in enumerate(results):
                    result.update(rebalance(stream, f"rebalance-{run}"))
                    setup.say(f"rebalance run {run}: {result}")
        finally:
            stream.clean()
    return results


def scaled_run(stream: Stream, group: str, n: int, expect_rows: bool) -> Drained:
    """`n` workers drain the stream on `group`, started once they share the shards evenly
    (the group is moved to the end of each shard while they start, then back to 0)."""
    client = stream.setup.client
    for key in stream.shard_keys():
        client.xgroup_setid(key, group, "$")
    first = WorkerProcess(stream, group)
    workers = [first] + [WorkerProcess(stream, group, schema=first.schema) for _ in range(n - 1)]
    try:
        wait_balanced(stream, group, workers, n)
        for key in stream.shard_keys():
            client.xgroup_setid(key, group, "0")
        drained = drain(workers)
    finally:
        for worker in workers:
            with contextlib.suppress(RuntimeError):
                worker.stop()
    check_rows(stream, first, expect_rows)
    return drained


def lease_owners(stream: Stream, group: str) -> list[bytes | None]:
    keys = stream.keys
    leases = [keys.lease(STREAM, s, group) for s in range(stream.setup.shards)]
    owners: Any = stream.setup.client.mget(leases)
    return list(owners)


def wait_balanced(
    stream: Stream, group: str, workers: Sequence[WorkerProcess], n: int, timeout: float = 60
) -> float:
    """Until `n` owners hold every shard, as evenly as shards divide; seconds it took."""
    started = time.monotonic()
    most = -(-stream.setup.shards // n)
    while True:
        owners = lease_owners(stream, group)
        held: dict[bytes, int] = {}
        for owner in owners:
            if owner is not None:
                held[owner] = held.get(owner, 0) + 1
        if None not in owners and len(held) == n and max(held.values()) <= most:
            return time.monotonic() - started
        for worker in workers:
            worker.check_alive()
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not balanced over {n} workers in {timeout} s: {held}")
        time.sleep(0.01)


def rebalance(stream: Stream, group: str) -> Results:
    """Seconds until the shards are spread again: a second worker joins one that holds
    them all (from its process start, its imports included), then leaves (SIGTERM: it
    flushes, acknowledges and releases), then a third joins and is killed (SIGKILL: its
    leases expire after lease_ttl_ms). The shards are idle (the group is at their end)."""
    for key in stream.shard_keys():
        stream.setup.client.xgroup_create(key, group, id="$")
    first = WorkerProcess(stream, group)
    try:
        wait_balanced(stream, group, [first], 1)
        joiner = WorkerProcess(stream, group, schema=first.schema)
        joined = wait_balanced(stream, group, [first, joiner], 2)
        started = time.monotonic()
        joiner.stop()
        wait_balanced(stream, group, [first], 1)
        left = time.monotonic() - started
        doomed = WorkerProcess(stream, group, schema=first.schema)
        wait_balanced(stream, group, [first, doomed], 2)
        started = time.monotonic()
        doomed.process.kill()
        doomed.process.wait()
        wait_balanced(stream, group, [first], 1)
        died = time.monotonic() - started
    finally:
        with contextlib.suppress(RuntimeError):
            first.stop()
    return {"rebalance join": joined, "rebalance leave": left, "rebalance kill": died}


def paced(stream: Stream, rate: int, seconds: float) -> float:
    """Publish the hot-keys mix at `rate` events/s for `seconds`, stamping `ts`; the rate
    achieved. Events go every 10 ms in one publish_many each; a late tick catches up."""
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    source = events(int(rate * seconds), 10_000, seed=3)
    producer = Producer(stream.setup.client, stream.config())
    started = time.perf_counter()
    ticks = 0
    while True:
        delay = started + ticks * tick - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        now_ms = int(time.time() * 1000)
        chunk = [replace(event, ts=now_ms) for event in islice(source, per_tick)]
        if not chunk:
            break
        producer.publish_many(STREAM, chunk)
        stream.count += len(chunk)
        ticks += 1
    return stream.count / (time.perf_counter() - started)


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# ---- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """A row of the printed table: which result, its unit, and its target."""

    label: str
    result: str
    unit: str
    target: Callable[[float], bool] | None = None
    target_text: str = ""


def lines(settings: dict[str, int], args: argparse.Namespace) -> list[Line]:
    bound = settings["max_age_ms"] + 150
    return [
        Line("hot keys, worker", "hot keys", "events/s", lambda v: v >= 100_000, ">= 100,000"),
        Line("  / naive baseline", "hot / naive", "x", lambda v: v >= 40, ">= 40x"),
        Line("  / plain read", "hot / read", "%", lambda v: v >= 80, ">= 80%"),
        Line("  ceiling, no core to spare", "hot cpu bound", "%"),
        Line("  ceiling, a core of its own", "hot core bound", "%"),
        Line("  worker CPU", "hot keys cpu", "µs/event"),
        Line("  Redis CPU", "hot keys redis cpu", "µs/event"),
        Line("  PostgreSQL CPU", "hot keys pg cpu", "µs/event"),
        Line("  worker peak RSS", "hot keys rss", "MB"),
        Line("  / naive, commit each", "hot / naive each", "x"),
        Line("hot keys, metrics on", "hot keys metrics", "events/s"),
        Line("  worker CPU", "hot keys metrics cpu", "µs/event"),
        Line("  metrics cost", "metrics cost", "%", lambda v: v < 5, "< 5%"),
        Line("  metrics CPU cost", "metrics cpu cost", "%", lambda v: v < 5, "< 5%"),
        Line("naive baseline", "naive", "events/s"),
        Line("  commit each event", "naive each", "events/s"),
        Line("plain read baseline", "plain read", "events/s"),
        Line("  client CPU", "plain read cpu", "µs/event"),
        Line("  Redis CPU", "plain read redis cpu", "µs/event"),
        Line("  / naive (ceiling of x)", "read / naive", "x"),
        Line("unique keys, worker", "unique keys", "events/s", lambda v: v >= 40_000, ">= 40,000"),
        Line("  / plain read", "unique / read", "%", lambda v: v >= 60, ">= 60%"),
        Line("  ceiling, no core to spare", "unique cpu bound", "%"),
        Line("  ceiling, a core of its own", "unique core bound", "%"),
        Line("  worker CPU", "unique keys cpu", "µs/event"),
        Line("  Redis CPU", "unique keys redis cpu", "µs/event"),
        Line("  PostgreSQL CPU", "unique keys pg cpu", "µs/event"),
        Line("  worker peak RSS", "unique keys rss", "MB"),
        Line("latency p50", "latency p50", "ms"),
        Line("latency p99", "latency p99", "ms", lambda v: v <= bound, f"<= {bound} ms"),
        Line("latency max", "latency max", "ms"),
        Line("  oldest entry to write, p99", "latency to write p99", "ms"),
        Line("  write (transaction), p99", "latency write p99", "ms"),
        Line("  entries a window, median", "latency window events", "events"),
        Line("  paced producer", "paced rate", "events/s"),
        Line("backlog, worker peak RSS", "backlog rss", "MB", lambda v: v < 300, "< 300 MB"),
        Line("  worker", "backlog", "events/s"),
        Line("  worker CPU", "backlog cpu", "µs/event"),
        *default_latency_lines(args.default_rates),
        *scale_lines(),
    ]


def default_latency_lines(rates: Sequence[int]) -> list[Line]:
    bound = GroupSettings().max_age_ms + 150
    out = []
    for rate in rates:
        name = f"default {rate}"
        out += [
            Line(f"latency {rate:,}/s, defaults", f"{name} p50", "ms"),
            Line("  p99", f"{name} p99", "ms", lambda v: v <= bound, f"<= {bound} ms"),
            Line("  max", f"{name} max", "ms"),
            Line("  oldest entry to write, p99", f"{name} to write p99", "ms"),
            Line("  write (transaction), p99", f"{name} write p99", "ms"),
            Line("  entries a window, median", f"{name} window events", "events"),
            Line("  paced producer", f"{name} paced rate", "events/s"),
        ]
    return out


def scale_lines() -> list[Line]:
    out = []
    for kind in ("hot", "unique"):
        for n in SCALE_WORKERS:
            label = f"scale {kind} {n}w"
            out += [
                Line(f"{kind} keys, {n} worker{'s' if n > 1 else ''}", label, "events/s"),
                Line("  workers' CPU", f"{label} cpu", "µs/event"),
                Line("  Redis CPU", f"{label} redis cpu", "µs/event"),
                Line("  PostgreSQL CPU", f"{label} pg cpu", "µs/event"),
            ]
    out.append(Line("rebalance: a worker joins", "rebalance join", "s"))
    out.append(Line("  a worker leaves (SIGTERM)", "rebalance leave", "s"))
    out.append(Line("  a worker dies (SIGKILL)", "rebalance kill", "s"))
    return out


def report(args: argparse.Namespace, settings: dict[str, int], runs: list[Results]) -> None:
    print(
        f"\n{args.shards} shards, one worker, pool_size 4 (default); group settings: "
        + ", ".join(f"{name}={value}" for name, value in settings.items())
    )
    print(
        f"hot keys {args.hot_events:,} events over {args.hot_keys:,} rows; naive on "
        f"{args.naive_events:,}; unique keys {args.unique_events:,}; latency at "
        f"{args.rate:,} events/s for {args.latency_seconds:g} s; backlog "
        f"{args.backlog_events:,} unique-key events. Median of {args.runs} runs.\n"
    )
    if "latency-default" in args.scenarios.split(","):
        print(
            f"latency-default: the default group settings ({GroupSettings()}), at "
            + ", ".join(f"{rate:,}" for rate in args.default_rates)
            + f" events/s for {args.latency_seconds:g} s each.\n"
        )
    if "scale" in args.scenarios.split(","):
        print(
            f"scale: {args.scale_events:,} events over {args.scale_shards} shards (hot keys over "
            f"{args.hot_keys:,} rows, and unique keys), 1, 2 and 4 worker processes.\n"
        )
    print(f"| {'row':<26} | {'median':>10} | {'min':>10} | {'max':>10} | {'unit':<8} | target")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 16}")
    for line in lines(settings, args):
        values = [r[line.result] for r in runs if line.result in r]
        if not values:
            continue
        median = statistics.median(values)
        met = ""
        if line.target is not None:
            met = f"{line.target_text} {'met' if line.target(median) else 'NOT MET'}"
        digits = 1 if line.unit in ("x", "µs/event", "MB", "ms", "%") else 0
        digits = 2 if line.unit == "s" else digits
        cells = [f"{v:>10,.{digits}f}" for v in (median, min(values), max(values))]
        print(f"| {line.label:<26} | {' | '.join(cells)} | {line.unit:<8} | {met}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--scenarios",
        default="hot,metrics,naive,read,unique,latency,backlog",
        help="comma-separated: hot, metrics, naive, read, unique, latency, backlog; "
        "and, when named, latency-default, scale",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--hot-events", type=int, default=500_000)
    parser.add_argument("--hot-keys", type=int, default=10_000)
    parser.add_argument("--naive-events", type=int, default=20_000)
    parser.add_argument("--unique-events", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=20_000, help="latency: events/s published")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--backlog-events", type=int, default=1_000_000)
    parser.add_argument(
        "--default-rates",
        type=lambda text: [int(rate) for rate in text.split(",")],
        default=[1000, 20_000],
        help="latency-default: events/s published, comma-separated",
    )
    parser.add_argument("--scale-shards", type=int, default=8)
    parser.add_argument("--scale-events", type=int, default=200_000)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a group setting instead of the bulk default (e.g. max_events=5000)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--quiet", action="store_true", help="print the table only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--timings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(child(args.child, args.timings))

    chosen = set(args.scenarios.split(","))
    unknown = chosen - {*SCENARIOS, "latency-default", "scale"}
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    settings = dict(BULK)
    for item in args.set:
        name, _, value = item.partition("=")
        settings[name] = int(value)
    runs: list[Results] = [{} for _ in range(args.runs)]
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as directory:
        setup = Setup(
            args.redis_url, args.dsn, args.shards, settings, Path(directory), not args.quiet
        )
        parts: list[list[Results]] = []
        if chosen & {"hot", "metrics", "naive", "read"}:
            parts.append(hot_scenario(setup, args, chosen))
        if "unique" in chosen:
            parts.append(unique_scenario(setup, args, args.unique_events, "unique keys"))
        if "latency" in chosen:
            parts.append(latency_scenario(setup, args))
        if "backlog" in chosen:
            parts.append(unique_scenario(setup, args, args.backlog_events, "backlog"))
        if "latency-default" in chosen:
            parts.append(default_latency_scenario(setup, args))
        if "scale" in chosen:
            parts.append(scale_scenario(setup, args))
        for part in parts:
            for run, result in zip(runs, part, strict=True):
                run.update(result)
    for run in runs:
        ratios(run)
    report(args, settings, runs)


def ratios(run: Results) -> None:
    """The worker's rows against the plain read of the same run (the issue's ratios), and
    the most those could be if CPU alone bounded them: the plain read's CPU per event
    (client and Redis) over the pipeline's (worker, Redis and PostgreSQL backends). On a
    machine with no core to spare, every process waits its turn for one, and throughput
    follows the CPU an event costs in all. With cores to spare, the servers work beside
    the worker, and its own CPU per event on its one core (one interpreter) bounds it."""
    if "plain read" not in run:
        return
    read_cpu = run.get("plain read cpu", 0.0) + run.get("plain read redis cpu", 0.0)
    for name, label in (("hot keys", "hot"), ("unique keys", "unique")):
        if name not in run:
            continue
        run[f"{label} / read"] = 100 * run[name] / run["plain read"]
        spent = sum(run.get(f"{name} {part}", 0.0) for part in ("cpu", "redis cpu", "pg cpu"))
        if read_cpu and spent:
            run[f"{label} cpu bound"] = 100 * read_cpu / spent
        if read_cpu and run.get(f"{name} cpu"):
            run[f"{label} core bound"] = 100 * read_cpu / run[f"{name} cpu"]


if __name__ == "__main__":
    main()
