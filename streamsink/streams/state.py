"""How each owned shard runs, kept in Redis for `status`: running, retrying or stopped.

The owner writes its shard's state when it changes (taken, a retry starts or ends, the
group stops); `status` trusts a state only while the worker that wrote it holds the
lease, so a dead worker's "retrying" never outlives its lease.
"""

from __future__ import annotations

import time
from enum import StrEnum

import redis.asyncio as aredis

from streamsink.streams.keys import Keys


class RunState(StrEnum):
    """What the owner of a shard is doing."""

    RUNNING = "running"  # reading and flushing
    RETRYING = "retrying"  # a sink or Redis is away; the window waits, nothing acknowledged
    STOPPED = "stopped"  # the group stopped on a configuration error; see `error`


STATE_TTL_S = 7 * 24 * 3600
"""A state outlives its worker this long at most (status ignores it once the lease moved)."""


async def publish_state(
    client: aredis.Redis,
    keys: Keys,
    stream: str,
    shard: int,
    group: str,
    *,
    state: RunState,
    worker: str,
    epoch: int,
    error: str = "",
) -> None:
    """Record the shard's state as of now (`since_ms`), by `worker` under `epoch`."""
    key = keys.state(stream, shard, group)
    fields = {
        "state": state.value,
        "since_ms": int(time.time() * 1000),
        "error": error[:1000],
        "worker": worker,
        "epoch": epoch,
    }
    async with client.pipeline(
        transaction=True
    ) as pipe:  # reset on exit: never left holding a connection
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.expire(key, STATE_TTL_S)
        await pipe.execute()
