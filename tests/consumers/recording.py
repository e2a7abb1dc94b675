"""A sink function for worker subprocesses that records every delivery in Redis.

Configure it as `[sinks.rec] type = "function"`, `function = "tests.consumers.recording:record"`
and set, in the worker's environment:

    STREAMSINK_TEST_REDIS     URL of the Redis that keeps the records (the test's own Redis,
                              so a test that restarts the workers' Redis keeps its records)
    STREAMSINK_TEST_PREFIX    key prefix of the records (the test's `keys.prefix`)
    STREAMSINK_TEST_SLEEP_MS  optional: sleep this long per batch before recording it, so
                              windows stay in flight (a SIGKILL then catches them unacknowledged)
    STREAMSINK_TEST_CRASH_SEQ optional: a batch holding an entry whose `seq` is this kills
                              the worker process at once (exit 70), as a segfault would
    STREAMSINK_TEST_DOWN      optional: "1" makes every write raise SinkUnavailable (a sink
                              that never comes back)

Per batch, in one MULTI: `HINCRBY <prefix>:rec:delivered <shard>:<entry id> 1` and
`HSET <prefix>:rec:by <shard>:<entry id> <pid>` for every entry (entry IDs are unique
within a shard only), and one line
`<shard> <epoch> <first id> <last id> <pid> <entries>` pushed on `<prefix>:rec:batches`.
Entries whose data holds `"poison": true` come back as Rejected (and are not recorded).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.asyncio as aredis

from streamsink.errors import SinkUnavailable
from streamsink.sinks.base import Batch, Rejected

REDIS_ENV = "STREAMSINK_TEST_REDIS"
PREFIX_ENV = "STREAMSINK_TEST_PREFIX"
SLEEP_ENV = "STREAMSINK_TEST_SLEEP_MS"
CRASH_ENV = "STREAMSINK_TEST_CRASH_SEQ"
DOWN_ENV = "STREAMSINK_TEST_DOWN"

_clients: dict[int, aredis.Redis] = {}  # one client per event loop (a subprocess has one)


def delivered_key(prefix: str) -> str:
    """HASH `<shard>:<entry id>` -> times delivered to the sink."""
    return f"{prefix}:rec:delivered"


def by_key(prefix: str) -> str:
    """HASH `<shard>:<entry id>` -> pid of the worker that delivered it last."""
    return f"{prefix}:rec:by"


def batches_key(prefix: str) -> str:
    """LIST of `<shard> <epoch> <first id> <last id> <pid> <entries>`, one per batch."""
    return f"{prefix}:rec:batches"


def _client() -> aredis.Redis:
    loop = id(asyncio.get_running_loop())
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = aredis.Redis.from_url(os.environ[REDIS_ENV])
    return client


async def record(batch: Batch) -> list[Rejected]:
    """Record the batch's entries in Redis; reject the poisoned ones."""
    if os.environ.get(DOWN_ENV) == "1":
        raise SinkUnavailable("the recording sink is down on purpose")
    pause = int(os.environ.get(SLEEP_ENV, "0") or 0)
    if pause:
        await asyncio.sleep(pause / 1000)
    crash = os.environ.get(CRASH_ENV)
    if crash and any(str(entry.event.data.get("seq")) == crash for entry in batch.entries):
        os._exit(70)
    prefix = os.environ[PREFIX_ENV]
    rejected = [
        Rejected(entry.id, "poisoned on purpose")
        for entry in batch.entries
        if entry.event.data.get("poison") is True
    ]
    refused = {r.entry_id for r in rejected}
    pid = os.getpid()
    pipe = _client().pipeline(transaction=True)
    for entry in batch.entries:
        if entry.id not in refused:
            position = f"{batch.shard}:{entry.id}"
            pipe.hincrby(delivered_key(prefix), position, 1)
            pipe.hset(by_key(prefix), position, pid)
    line = (
        f"{batch.shard} {batch.epoch} {batch.first_id} {batch.last_id} {pid} {len(batch.entries)}"
    )
    pipe.rpush(batches_key(prefix), line)
    await pipe.execute()
    return rejected


@dataclass(frozen=True)
class BatchLine:
    """One recorded batch."""

    shard: int
    epoch: int
    first_id: str
    last_id: str
    pid: int
    entries: int


def delivered(client: redis.Redis, prefix: str) -> dict[str, int]:
    """`<shard>:<entry id>` -> times delivered, as recorded so far."""
    raw = client.hgetall(delivered_key(prefix))
    return {k.decode(): int(v) for k, v in raw.items()}


def deliverers(client: redis.Redis, prefix: str) -> dict[str, int]:
    """`<shard>:<entry id>` -> pid of its last deliverer."""
    raw = client.hgetall(by_key(prefix))
    return {k.decode(): int(v) for k, v in raw.items()}


def batches(client: redis.Redis, prefix: str) -> Sequence[BatchLine]:
    """Every recorded batch, in recording order."""
    lines = []
    for raw in client.lrange(batches_key(prefix), 0, -1):
        shard, epoch, first, last, pid, count = raw.decode().split()
        lines.append(BatchLine(int(shard), int(epoch), first, last, int(pid), int(count)))
    return lines
