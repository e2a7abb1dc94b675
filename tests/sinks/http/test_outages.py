"""Callbacks ride out an endpoint's outage: real worker processes, a receiver the test controls.

The breaker holds calls while the endpoint is down (nothing dead-lettered, nothing
acknowledged) and releases them once a probe succeeds; calls dead-lettered for a reason
that a fix on the receiver's side ends are delivered by `dead replay`, with the
Idempotency-Key of their first publish.
"""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from streamsink.cli import main
from streamsink.schemas import Event, from_dict, shard_of
from streamsink.streams import Keys, Producer, create_stream
from tests.sinks.http.receiver import SECRET_ENV, Answer, Receiver, Record
from tests.sinks.http.test_workers import start_worker

SHARDS, CALLS, WORKERS = 4, 120, 2


def config_toml(keys: Keys, redis_url: str) -> str:
    return f"""
[redis]
url = "{redis_url}"
prefix = "{keys.prefix}"

[streams.hooks]
shards = {SHARDS}

[sinks.hooks]
type = "http"
secret_env = "{SECRET_ENV}"
allow_private = true   # the receiver is on loopback
concurrency = 4
timeout_s = 2.0
max_attempts = 5
backoff_ms = 100
max_backoff_ms = 1000
breaker_failures = 5
breaker_cooldown_s = 1.0

[groups.g]
stream = "hooks"
sinks = ["hooks"]
lease_ttl_ms = 3000
linger_ms = 20
max_age_ms = 200
"""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


class Run:
    """A config, a stream with CALLS published calls to `url`, and the worker processes."""

    def __init__(self, tmp_path: Path, keys: Keys, redis_url: str, r: redis.Redis) -> None:
        self.tmp_path, self.keys, self.r = tmp_path, keys, r
        self.path = tmp_path / "streamsink.toml"
        self.path.write_text(config_toml(keys, redis_url))
        self.config = from_dict(tomllib.loads(self.path.read_text()))
        create_stream(r, keys, "hooks", SHARDS)
        self.workers: list[subprocess.Popen[bytes]] = []

    def publish(self, url: str, n: int = CALLS) -> set[str]:
        """Publish `n` calls; their idempotency keys."""
        names = [f"order-{i % 30}" for i in range(n)]
        events = [
            Event.make(name, "call", {"url": url, "payload": i}) for i, name in enumerate(names)
        ]
        ids = Producer(self.r, self.config).publish_many("hooks", events)
        return {
            f"hooks:{shard_of(name, SHARDS)}:{entry_id}"
            for name, entry_id in zip(names, ids, strict=True)
        }

    def start(self, n: int = WORKERS) -> None:
        """Start `n` workers; return once each runs (its SIGTERM handler is in place)."""
        for _ in range(n):
            log = self.tmp_path / f"worker-{len(self.workers)}.err"
            self.workers.append(start_worker(self.path, log))
        running = len(self.workers)
        self.wait("the workers start", lambda: self.logged("worker started") >= running)

    def wait(self, what: str, done: Callable[[], bool], within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not done():
            assert time.monotonic() < deadline, f"not within {within} s: {what}"
            assert all(w.poll() is None for w in self.workers), "a worker died"
            time.sleep(0.1)

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(30) for worker in self.workers]
        assert codes == [0] * len(codes)

    def kill(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)

    def dead_letters(self) -> int:
        return sum(int(self.r.xlen(self.keys.dead("hooks", s, "g"))) for s in range(SHARDS))

    def pending(self) -> int:
        return sum(
            int(self.r.xpending(self.keys.shard("hooks", s), "g")["pending"]) for s in range(SHARDS)
        )

    def breaker(self, endpoint: str) -> str:
        value = self.r.hget(self.keys.http_endpoints("hooks"), f"{endpoint}|breaker")
        return value.decode().split(" ")[0] if value else ""

    def logged(self, message: str) -> int:
        text = "".join(p.read_text() for p in self.tmp_path.glob("worker-*.err"))
        return text.count(f'"msg": "{message}"') + text.count(f'"msg":"{message}"')

    def cli(self, *args: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--config", str(self.path), *args]) == 0
        return out.getvalue()


@pytest.fixture
def run(tmp_path: Path, keys: Keys, redis_url: str, r: redis.Redis) -> Iterator[Run]:
    started = Run(tmp_path, keys, redis_url, r)
    try:
        yield started
    finally:
        started.kill()


def delivered(receiver: Receiver) -> set[str]:
    return {record.key for record in receiver.accepted()}


def test_500s_for_3_s_then_healthy_deliver_every_call_and_dead_letter_none(
    run: Run, receiver: Receiver
) -> None:
    first: list[float] = []

    def down_for_3_s(record: Record, server: Receiver) -> Answer:
        first.append(record.at)
        return Answer(500, body=b"down") if record.at - first[0] < 3.0 else Answer(200)

    receiver.answer = down_for_3_s
    expected = run.publish(receiver.url("/o"))
    run.start()
    endpoint = f"http://127.0.0.1:{receiver.port}"
    run.wait("the breaker opens", lambda: run.breaker(endpoint) in ("open", "half-open"))
    run.wait("every call delivered", lambda: delivered(receiver) == expected)
    run.wait("every entry acknowledged", lambda: run.pending() == 0)
    run.stop()
    failed = [record for record in receiver.records if record.status == 500]
    print(
        f"\n500s for 3 s: {len(failed)} requests failed, {len(receiver.records)} in all, "
        f"{len(expected)} callbacks delivered, {run.dead_letters()} dead-lettered"
    )
    assert failed, "the outage should have been seen"
    assert run.dead_letters() == 0
    assert run.breaker(endpoint) == "closed"
    assert run.logged("callbacks wait") >= 1 and run.logged("callbacks go on") >= 1


def test_a_port_closed_for_10_s_delivers_every_call_and_dead_letters_none(
    run: Run, receiver: Receiver
) -> None:
    port = receiver.port
    endpoint = f"http://127.0.0.1:{port}"
    receiver.stop()  # connections refused from now on
    closed_at = time.monotonic()
    expected = run.publish(receiver.url("/o"))
    run.start()
    run.wait("the breaker opens", lambda: run.breaker(endpoint) in ("open", "half-open"))
    run.wait("10 s of outage", lambda: time.monotonic() - closed_at >= 10.0)
    assert run.dead_letters() == 0 and run.pending() > 0  # held: nothing acknowledged
    receiver.start(port)
    run.wait("every call delivered", lambda: delivered(receiver) == expected)
    run.wait("every entry acknowledged", lambda: run.pending() == 0)
    run.stop()
    print(f"\nport closed 10 s: {len(receiver.records)} requests after it opened again")
    assert run.dead_letters() == 0
    assert run.breaker(endpoint) == "closed"


def test_after_recovery_dead_replay_delivers_every_letter_with_its_first_key(
    run: Run, receiver: Receiver
) -> None:
    fixed = False

    def refusing_until_fixed(record: Record, server: Receiver) -> Answer:
        return Answer(200) if fixed else Answer(422, body=b"unknown order (receiver bug)")

    receiver.answer = refusing_until_fixed
    expected = run.publish(receiver.url("/o"), 40)
    run.start()
    run.wait("every call dead-lettered", lambda: run.dead_letters() == 40)
    run.wait("every entry acknowledged", lambda: run.pending() == 0)
    assert not receiver.accepted()

    fixed = True  # the receiver is fixed: replay
    out = run.cli("dead", "replay", "hooks", "g", "--all")
    assert out.count(" -> ") == 40, out
    run.wait("every replay delivered", lambda: delivered(receiver) == expected)
    run.wait("every replay acknowledged", lambda: run.pending() == 0)
    run.stop()
    assert run.dead_letters() == 0
    replays = receiver.accepted()
    assert len(replays) == 40  # each once, with the key of its first publish
    assert {record.key for record in replays} == expected
