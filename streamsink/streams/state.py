"""How each owned shard runs, kept in Redis for `status`: running, retrying or stopped.

The owner writes its shard's state when it changes (taken, a retry starts or ends, the
group stops); `status` trusts a state only while the worker that wrote it holds the
lease, so a dead worker's "retrying" never outlives its lease.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aredis

from streamsink.streams.connection import AsyncClient
from streamsink.streams.keys import Keys


class RunState(StrEnum):
    """What the owner of a shard is doing."""

    RUNNING = "running"  # reading and flushing
    RETRYING = "retrying"  # a sink or Redis is away; the window waits, nothing acknowledged
    STOPPED = "stopped"  # the group stopped on a configuration error; see `error`


class ShardState(StrEnum):
    """What `status` says of a shard: its owner's run state, or why there is none."""

    RUNNING = "running"
    RETRYING = "retrying"
    STOPPED = "stopped"
    IDLE = "idle"  # no owner holds the lease: nobody reads the shard
    UNKNOWN = "unknown"  # the owner wrote a state this version does not know


@dataclass(frozen=True, slots=True)
class ShownState:
    """A shard's state as status shows it: since when (ms, when known), the last error."""

    state: ShardState
    since_ms: int | None = None
    error: str = ""


STATE_TTL_S = 7 * 24 * 3600
"""A state outlives its worker this long at most (status ignores it once the lease moved)."""


async def publish_state(
    client: AsyncClient,
    keys: Keys,
    stream: str,
    shard: int,
    group: str,
    *,
    state: RunState,
    worker: str,
    epoch: int,
    error: str = "",
    since: float | None = None,
) -> None:
    """Record the shard's state, in it since `since` (Unix seconds; default now), by
    `worker` under `epoch`."""
    key = keys.state(stream, shard, group)
    fields = {
        "state": state.value,
        "since_ms": int((time.time() if since is None else since) * 1000),
        "error": error[:1000],
        "worker": worker,
        "epoch": epoch,
    }
    # MULTI where it is cheap: redis-py runs each command of a cluster transaction on a
    # thread of its own (a lost EXPIRE there leaves the hash until the next state).
    atomic = not isinstance(client, aredis.RedisCluster)
    async with client.pipeline(transaction=atomic) as pipe:  # reset on exit
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.expire(key, STATE_TTL_S)
        await pipe.execute()


def shown_state(stored: Mapping[bytes, bytes], owner: str | None) -> ShownState:
    """The state to show from the stored HASH and the current lease owner.

    A stored state counts only if the lease owner wrote it; an owner that wrote none
    (yet) is running, a shard without owner is idle, whatever a past owner left, except
    when its group stopped on a configuration error: that shows until someone takes it.
    """
    stopped = stored.get(b"state") == RunState.STOPPED.value.encode()
    if owner is None and not stopped:
        return ShownState(ShardState.IDLE)
    if owner is not None and stored.get(b"worker", b"").decode("utf-8", "replace") != owner:
        return ShownState(ShardState.RUNNING)
    since_ms = stored.get(b"since_ms", b"")
    since = int(since_ms) if since_ms.isdigit() else None
    error = stored.get(b"error", b"").decode("utf-8", "replace")
    try:
        state = ShardState(RunState(stored.get(b"state", b"").decode("utf-8", "replace")))
    except ValueError:
        state = ShardState.UNKNOWN
    return ShownState(state, since, error)
