"""A worker process always ends when told to, and says why when it cannot start (issue 11).

- SIGTERM while a sink never succeeds: exit 0 within `--shutdown-timeout`, nothing that
  was not committed acknowledged;
- SIGTERM while start-up waits for Redis: exit 0 at once, the signal logged;
- SIGTERM before the worker listens for signals (while it starts): a clean stop, exit 0;
- a stream that was never created: exit 3 with a message naming the command to run;
- an entry that kills its worker every time it is applied: tried alone, then
  dead-lettered, while its window's neighbours are applied (never dead-lettered with it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from urllib.parse import urlsplit

import pytest
import redis

from streamsink import signals
from streamsink.consumers.shard import SUSPECT_TRIES
from streamsink.serve import serve
from streamsink.streams import Keys, create_stream
from tests.conftest import free_port
from tests.consumers import recording
from tests.consumers.test_worker_processes import (
    GROUP,
    SHARDS,
    STREAM,
    Cluster,
    Publisher,
    config_of,
    eventually,
    pending,
)


def test_sigterm_while_a_sink_never_succeeds_exits_0_within_the_shutdown_timeout(
    r: redis.Redis, keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    path = cluster.config(redis_url)
    create_stream(r, keys, STREAM, SHARDS)
    Publisher(r, config_of(path)).publish(60)
    worker = cluster.start(path, env={recording.DOWN_ENV: "1"}, options=["--shutdown-timeout", "2"])
    eventually(
        lambda: (
            sum(1 for line in worker.records() if line["msg"] == "sink write failed: retrying")
            >= SHARDS
        ),
        "every shard retrying",
        workers=[worker],
    )
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    took = time.monotonic() - started
    assert took < 2 + 3, f"{took:.1f} s to stop with a 2 s shutdown timeout"
    messages = [line["msg"] for line in worker.records()]
    assert "signal: draining" in messages
    assert "shutdown timeout: stopping without draining the rest" in messages
    assert sum(pending(r, keys)) == 60, "nothing acknowledged that no sink committed"
    assert recording.delivered(r, keys.prefix) == {}


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_sigterm_while_start_up_waits_for_redis_exits_at_once(
    keys: Keys, cluster: Cluster, scheme: str
) -> None:
    # a cluster none of whose seeds answers is waited for as a single Redis is (it crashed
    # the worker: redis-py's own RedisClusterException is no RedisError)
    port = free_port()
    path = cluster.config(f"{scheme}://127.0.0.1:{port}")  # nobody listens there
    worker = cluster.start(path)
    eventually(
        lambda: any(line.get("what") == "prepare streams" for line in worker.records()),
        "start-up retrying",
        workers=[worker],
    )
    retrying = next(line for line in worker.records() if line.get("what") == "prepare streams")
    assert f"127.0.0.1:{port}" in retrying["redis"], "a retry line says which server is away"
    assert (retrying["group"], retrying["stream"]) == (GROUP, STREAM)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert time.monotonic() - started < 3
    assert "signal: draining" in [line["msg"] for line in worker.records()]


def test_a_cluster_url_at_a_single_server_stops_the_worker_saying_so(
    keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    parts = urlsplit(redis_url)
    worker = cluster.start(cluster.config(f"redis+cluster://{parts.hostname}:{parts.port}"))
    assert worker.wait(15) == 3
    stopped = [line for line in worker.records() if line["msg"].startswith("group stopped")]
    assert len(stopped) == 1 and "not a Redis Cluster" in stopped[0]["error"]
    assert "Traceback" not in worker.log()


def test_a_stream_never_created_stops_the_worker_with_the_command_to_run(
    keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    worker = cluster.start(cluster.config(redis_url))
    assert worker.wait(15) == 3
    stopped = [line for line in worker.records() if line["msg"].startswith("group stopped")]
    assert len(stopped) == 1
    assert "does not exist" in stopped[0]["error"]
    assert "streamsink streams create" in stopped[0]["error"]
    assert "Traceback" not in worker.log()


def test_an_entry_that_kills_its_worker_is_isolated_and_its_neighbours_are_applied(
    r: redis.Redis, keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    path = cluster.config(redis_url)
    text = path.read_text().replace(
        "maintenance_ms = 500", "maintenance_ms = 500\nmax_deliveries = 2"
    )
    path.write_text(text)
    create_stream(r, keys, STREAM, SHARDS)
    for shard in range(SHARDS):
        r.xgroup_create(keys.shard(STREAM, shard), GROUP, id="0", mkstream=True)
    publisher = Publisher(r, config_of(path))
    publisher.publish(120)  # seq 0..119, of 60 keys
    crasher = 77
    crash_position = publisher.positions[crasher]
    env = {recording.CRASH_ENV: str(crasher)}
    deaths = 0
    while True:
        worker = cluster.start(path, env=env)
        while worker.alive() and sum(pending(r, keys)) + _lag(r, keys) > 0:
            time.sleep(0.05)
        if worker.alive():
            break
        assert worker.wait(5) == 70, worker.log()[-2000:]
        deaths += 1
        assert deaths <= 2 + SUSPECT_TRIES + 2, "the crashing entry was never isolated"
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0

    shard, entry_id = crash_position.split(":")
    letters = r.xrange(keys.dead(STREAM, int(shard), GROUP))
    assert [fields[b"entry"].decode() for _, fields in letters] == [entry_id], letters
    reason = letters[0][1][b"reason"].decode()
    assert "max_deliveries=2" in reason and "alone" in reason
    others = [p for p in publisher.positions if p != crash_position]
    delivered = recording.delivered(r, keys.prefix)
    assert set(delivered) == set(others), "every neighbour applied, none dead-lettered"
    dead = sum(r.xlen(keys.dead(STREAM, s, GROUP)) for s in range(SHARDS))
    assert dead == 1


def _lag(r: redis.Redis, keys: Keys) -> int:
    """Entries not yet delivered to the group."""
    total = 0
    for shard in range(SHARDS):
        key = keys.shard(STREAM, shard)
        last = next(g for g in r.xinfo_groups(key) if g["name"] == GROUP.encode())[
            "last-delivered-id"
        ]
        total += len(r.xrange(key, min=b"(" + last, count=1))
    return total


def test_a_signal_that_comes_while_the_worker_starts_stops_it_cleanly(
    r: redis.Redis, keys: Keys, redis_url: str, cluster: Cluster
) -> None:
    # What `streamsink worker` does: catch first, serve later. Without the catch the
    # signal's default action kills the process; without serve acting on what was caught,
    # serve runs on (until this test's timeout).
    path = cluster.config(redis_url)
    create_stream(r, keys, STREAM, SHARDS)
    config = config_of(path)
    before = {signum: signal.getsignal(signum) for signum in signals.STOPS}
    try:
        signals.catch_early()
        os.kill(os.getpid(), signal.SIGTERM)  # while "starting": before serve listens
        assert asyncio.run(serve(config)) == 0
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert signals.early() == []  # taken by that serve, not left for another
