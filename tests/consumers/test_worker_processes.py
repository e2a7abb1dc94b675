"""Workers as real processes (`python -m streamsink.cli ... worker`), real signals, real Redis.

Each worker feeds the function sink `tests.consumers.recording:record`, which records every
delivered entry in the test's Redis; the tests compare that with what they published, and
look at leases, heartbeats and pending entries in Redis. Short leases keep them quick.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from streamsink.schemas import Config, Event, from_dict, shard_of
from streamsink.streams import Keys, Producer, create_stream
from tests.conftest import RedisServer
from tests.consumers import recording

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 6
STREAM = "items"
GROUP = "g"
LEASE_TTL = 1.5  # seconds, as lease_ttl_ms below


def config_toml(keys: Keys, redis_url: str) -> str:
    """A worker config: `items` (SHARDS shards) into table items, group g -> the recording sink."""
    return f"""
[redis]
url = "{redis_url}"
prefix = "{keys.prefix}"

[tables.items]
key = ["id"]
columns = {{ id = {{ type = "text", nullable = false }}, seq = "int", poison = "bool" }}

[streams.items]
shards = {SHARDS}
table = "items"

[sinks.rec]
type = "function"
function = "tests.consumers.recording:record"

[groups.g]
stream = "items"
sinks = ["rec"]
lease_ttl_ms = {int(LEASE_TTL * 1000)}
linger_ms = 20
max_age_ms = 100
block_ms = 100
maintenance_ms = 500
"""


@dataclass
class WorkerProcess:
    """One `streamsink worker` subprocess, its output kept in files."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        return [orjson.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)


@dataclass
class Cluster:
    """The test's workers, their config file and environment."""

    directory: Path
    keys: Keys
    record_url: str
    started: list[WorkerProcess] = field(default_factory=list)

    def config(self, redis_url: str) -> Path:
        path = self.directory / "streamsink.toml"
        path.write_text(config_toml(self.keys, redis_url))
        return path

    def start(
        self,
        config: Path,
        sleep_ms: int = 0,
        config_first: bool = True,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
    ) -> WorkerProcess:
        """Start a worker; `config_first` picks `--config F worker` or `worker --config F`;
        `env` adds to its environment (see recording.py), `options` to its command line."""
        number = len(self.started)
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            recording.REDIS_ENV: self.record_url,
            recording.PREFIX_ENV: self.keys.prefix,
            recording.SLEEP_ENV: str(sleep_ms),
            **(env or {}),
        }
        args = ["--config", str(config), "worker", *options]
        if not config_first:
            args = ["worker", "--config", str(config), *options]
        stdout = self.directory / f"worker-{number}.out"
        stderr = self.directory / f"worker-{number}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "streamsink.cli", *args],
                cwd=ROOT,
                env=environment,
                stdout=out,
                stderr=err,
            )
        worker = WorkerProcess(process, stdout, stderr)
        self.started.append(worker)
        return worker

    def dump(self) -> None:
        """Print every worker's output (pytest shows it when the test fails)."""
        for number, worker in enumerate(self.started):
            print(f"----- worker {number} (pid {worker.pid}, exit {worker.process.poll()})")
            print(worker.stdout.read_text(errors="replace"), end="")
            print(worker.log()[-20_000:])


def eventually(
    check: Callable[[], bool],
    what: str,
    timeout: float = 15,
    workers: list[WorkerProcess] | None = None,
) -> float:
    """Poll `check` until true; the seconds it took. Fails at `timeout` or if a worker died."""
    start = time.monotonic()
    while not check():
        for worker in workers or []:
            if not worker.alive():
                raise AssertionError(f"worker {worker.pid} exited ({worker.process.poll()})")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def owners(client: redis.Redis, keys: Keys) -> list[int | None]:
    """The pid of the worker owning each shard's lease (worker ids are host-pid-suffix)."""
    values = client.mget([keys.lease(STREAM, shard, GROUP) for shard in range(SHARDS)])
    return [None if v is None else int(v.decode().rsplit("-", 2)[1]) for v in values]


def shares(client: redis.Redis, keys: Keys) -> dict[int | None, int]:
    counts: dict[int | None, int] = {}
    for owner in owners(client, keys):
        counts[owner] = counts.get(owner, 0) + 1
    return counts


def live_pids(client: redis.Redis, keys: Keys) -> set[int]:
    """Pids of the workers with a heartbeat in the group."""
    members = client.zrange(keys.workers(STREAM, GROUP), 0, -1)
    return {int(m.decode().rsplit("-", 2)[1]) for m in members}


def pending(client: redis.Redis, keys: Keys) -> list[int]:
    return [
        int(client.xpending(keys.shard(STREAM, shard), GROUP)["pending"]) for shard in range(SHARDS)
    ]


def epochs(client: redis.Redis, keys: Keys) -> list[int]:
    return [int(client.get(keys.epoch(STREAM, shard, GROUP)) or 0) for shard in range(SHARDS)]


class Publisher:
    """Publishes events of 60 keys, in order per key; remembers every (shard, entry ID)."""

    def __init__(self, client: redis.Redis, config: Config) -> None:
        self.producer = Producer(client, config)
        self.positions: list[str] = []  # "<shard>:<entry id>", as the recording sink keys them
        self.seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, count: int) -> None:
        events = []
        for _ in range(count):
            key = f"key-{self.seq % 60}"
            events.append(Event.make(key, "set", {"id": key, "seq": self.seq}))
            self.seq += 1
        ids = self.producer.publish_many(STREAM, events)
        for event, entry_id in zip(events, ids, strict=True):
            self.positions.append(f"{shard_of(event.key, SHARDS)}:{entry_id}")

    def __enter__(self) -> Publisher:
        """Publish 12 events every 20 ms in a thread until the block ends."""

        def run() -> None:
            while not self._stop.wait(0.02):
                self.publish(12)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)


def config_of(path: Path) -> Config:
    return from_dict(tomllib.loads(path.read_text()))


def all_delivered(client: redis.Redis, keys: Keys, positions: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        return set(recording.delivered(client, keys.prefix)) >= set(positions)

    return check


def test_workers_share_the_shards_and_a_newcomer_takes_its_share_within_a_lease(
    r: redis.Redis, keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    path = cluster.config(redis_url)
    create_stream(r, keys, STREAM, SHARDS)
    first = cluster.start(path)
    second = cluster.start(path, config_first=False)
    both = [first, second]
    eventually(
        lambda: shares(r, keys) == {first.pid: 3, second.pid: 3}, "3 shards each", workers=both
    )

    third = cluster.start(path)
    three = [*both, third]
    eventually(lambda: third.pid in live_pids(r, keys), "the third worker's heartbeat", 10, three)
    took = eventually(
        lambda: shares(r, keys) == {first.pid: 2, second.pid: 2, third.pid: 2},
        "2 shards each",
        LEASE_TTL,  # "within one lease period"
        three,
    )
    print(f"the newcomer had its share {took:.2f} s after its first heartbeat")
    handed = [s for s, owner in enumerate(owners(r, keys)) if owner == third.pid]
    assert all(epochs(r, keys)[s] >= 2 for s in handed), "a new owner means a new epoch"

    publisher = Publisher(r, config_of(path))
    publisher.publish(240)
    eventually(all_delivered(r, keys, publisher.positions), "delivered", workers=three)
    eventually(lambda: pending(r, keys) == [0] * SHARDS, "acknowledged", workers=three)
    by = recording.deliverers(r, keys.prefix)
    assert {by[p] for p in publisher.positions} == {w.pid for w in three}
    for worker in three:
        worker.signal(signal.SIGTERM)
    assert [worker.wait(15) for worker in three] == [0, 0, 0]
    assert recording.delivered(r, keys.prefix) == dict.fromkeys(publisher.positions, 1)


def test_a_killed_workers_shards_and_pending_entries_are_taken_over(
    r: redis.Redis, keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    path = cluster.config(redis_url)
    create_stream(r, keys, STREAM, SHARDS)
    workers = [cluster.start(path, sleep_ms=150) for _ in range(3)]
    eventually(
        lambda: sorted(shares(r, keys).values()) == [2, 2, 2] and None not in shares(r, keys),
        "2 shards each",
        workers=workers,
    )
    victim, survivors = workers[0], workers[1:]
    with Publisher(r, config_of(path)) as publisher:
        victim_shards = [s for s, owner in enumerate(owners(r, keys)) if owner == victim.pid]
        assert len(victim_shards) == 2

        def victim_pending() -> list[str]:
            found = []
            for shard in victim_shards:
                for entry in r.xpending_range(keys.shard(STREAM, shard), GROUP, "-", "+", 10_000):
                    if int(entry["consumer"].decode().rsplit("-", 2)[1]) == victim.pid:
                        found.append(f"{shard}:{entry['message_id'].decode()}")
            return found

        eventually(lambda: len(victim_pending()) > 20, "windows in flight", workers=workers)
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        assert victim.wait(5) == -signal.SIGKILL
        held = victim_pending()
        alive = {w.pid for w in survivors}

        def taken_over() -> bool:
            if not {owners(r, keys)[s] for s in victim_shards} <= alive:
                return False
            by = recording.deliverers(r, keys.prefix)
            return all(by.get(position) in alive for position in held)

        eventually(taken_over, "shards and pending entries taken over", 10, survivors)
        took = time.monotonic() - killed
        print(f"{len(held)} entries held by the killed worker re-processed in {took:.2f} s")
        assert took <= LEASE_TTL + 2.0
        time.sleep(0.5)  # the survivors go on under the load

    eventually(all_delivered(r, keys, publisher.positions), "everything delivered", 20, survivors)
    eventually(lambda: pending(r, keys) == [0] * SHARDS, "nothing pending", 10, survivors)
    delivered = recording.delivered(r, keys.prefix)
    assert set(delivered) == set(publisher.positions), "an entry was lost (or invented)"
    assert sorted(shares(r, keys).values()) == [3, 3]
    later = [b for b in recording.batches(r, keys.prefix) if b.shard in victim_shards]
    assert all(b.epoch >= 2 for b in later if b.pid != victim.pid)
    for worker in survivors:
        worker.signal(signal.SIGTERM)
    assert [worker.wait(15) for worker in survivors] == [0, 0]
    assert pending(r, keys) == [0] * SHARDS


def test_sigterm_drains_acknowledges_releases_and_exits_0(
    r: redis.Redis, keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    path = cluster.config(redis_url)
    create_stream(r, keys, STREAM, SHARDS)
    worker = cluster.start(path, sleep_ms=150)
    eventually(lambda: shares(r, keys) == {worker.pid: SHARDS}, "every shard", workers=[worker])
    with Publisher(r, config_of(path)) as publisher:
        eventually(
            lambda: len(recording.batches(r, keys.prefix)) >= 3 and sum(pending(r, keys)) > 0,
            "windows in flight",
            workers=[worker],
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(10) == 0
    messages = [line["msg"] for line in worker.records()]
    assert "shard drained" in messages and messages[-1] == "worker stopped"
    assert pending(r, keys) == [0] * SHARDS, "a drained worker leaves nothing pending"
    assert owners(r, keys) == [None] * SHARDS, "a drained worker releases its leases"
    assert live_pids(r, keys) == set()
    first = recording.delivered(r, keys.prefix)
    assert first and set(first.values()) == {1}
    assert set(first) < set(publisher.positions), "the rest is still to read"

    successor = cluster.start(path, config_first=False)
    eventually(all_delivered(r, keys, publisher.positions), "the rest", workers=[successor])
    eventually(lambda: pending(r, keys) == [0] * SHARDS, "acknowledged", workers=[successor])
    assert epochs(r, keys) == [2] * SHARDS
    successor.signal(signal.SIGTERM)
    assert successor.wait(10) == 0
    assert recording.delivered(r, keys.prefix) == dict.fromkeys(publisher.positions, 1)


def test_workers_ride_out_a_redis_restart(
    r: redis.Redis, keys: Keys, redis_server: RedisServer, cluster: Cluster
) -> None:
    path = cluster.config(redis_server.url)  # the sink records in the other Redis, `r`
    own = redis.Redis.from_url(redis_server.url)
    create_stream(own, keys, STREAM, SHARDS)
    workers = [cluster.start(path, sleep_ms=50) for _ in range(2)]
    eventually(lambda: sorted(shares(own, keys).values()) == [3, 3], "3 each", workers=workers)
    publisher = Publisher(own, config_of(path))
    publisher.publish(600)
    eventually(lambda: len(recording.batches(r, keys.prefix)) >= 2, "windows", workers=workers)

    redis_server.kill()  # mid-run: windows open, flushes in flight
    time.sleep(0.5)
    redis_server.start()
    own = redis.Redis.from_url(redis_server.url)
    publisher.producer = Producer(own, config_of(path))
    publisher.publish(600)
    eventually(all_delivered(r, keys, publisher.positions), "everything", 20, workers)
    eventually(lambda: pending(own, keys) == [0] * SHARDS, "nothing pending", 10, workers)
    assert all(worker.alive() for worker in workers)
    warnings = [line["msg"] for w in workers for line in w.records() if line["level"] == "warning"]
    assert warnings, "the workers should have noticed Redis going away"
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait(15) for worker in workers] == [0, 0]
    assert pending(own, keys) == [0] * SHARDS
    own.close()


def test_a_crashed_loop_ends_the_process_with_exit_1_and_says_why(
    r: redis.Redis, keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    path = cluster.config(redis_url)
    r.rpush(keys.meta(STREAM), "not a hash")  # an error nobody planned for: WRONGTYPE
    worker = cluster.start(path)
    assert worker.wait(15) == 1
    crashes = [line for line in worker.records() if line["msg"] == "worker crashed"]
    assert len(crashes) == 1
    assert crashes[0]["level"] == "error"
    assert "ResponseError" in crashes[0]["error"]
    assert "WRONGTYPE" in crashes[0]["error"]
    assert "Traceback" in crashes[0]["exc"]


def test_a_second_sigterm_stops_a_worker_that_cannot_drain(
    r: redis.Redis, keys: Keys, redis_server: RedisServer, cluster: Cluster
) -> None:
    path = cluster.config(redis_server.url)
    # Leases that outlive the test: with Redis down a worker drops its shards after a whole
    # lease TTL without renewal, and then has nothing left to drain (1.5 s: under load the
    # worker could end so, exit 0, before the second signal came: one failure in a loaded run).
    path.write_text(
        path.read_text().replace(f"lease_ttl_ms = {int(LEASE_TTL * 1000)}", "lease_ttl_ms = 30000")
    )
    assert "lease_ttl_ms = 30000" in path.read_text()
    own = redis.Redis.from_url(redis_server.url)
    create_stream(own, keys, STREAM, SHARDS)
    worker = cluster.start(path, sleep_ms=50)
    eventually(lambda: sorted(shares(own, keys).values()) == [6], "all shards", workers=[worker])
    Publisher(own, config_of(path)).publish(300)
    eventually(lambda: len(recording.batches(r, keys.prefix)) >= 1, "a window", workers=[worker])
    redis_server.kill()  # Redis stays down: the drain cannot acknowledge anything
    worker.signal(signal.SIGTERM)
    draining = lambda: any(line["msg"] == "signal: draining" for line in worker.records())  # noqa: E731
    eventually(draining, "the first signal taken", workers=[worker])
    time.sleep(0.5)
    assert worker.alive()  # still trying to drain
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 1
    assert any(line["msg"].startswith("second signal") for line in worker.records())
