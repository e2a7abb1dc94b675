"""Shard leases in Redis: exclusive ownership of (group, shard) with a fencing epoch.

A lease is a key holding the owner's id, expiring after the lease TTL unless renewed.
Its epoch counter never expires and grows by one at each new owner, so work read under
an older lease can be told apart (and refused) by a sink that stores the epoch.
Workers of a group also keep a heartbeat in a sorted set, to count who is alive.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamsink.streams.connection import AsyncClient
from streamsink.streams.keys import Keys
from streamsink.streams.scripts import lua, pipelined


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease: which shard, under which epoch."""

    shard: int
    epoch: int


class Leases:
    """The lease and heartbeat operations of one worker in one group of one stream."""

    def __init__(
        self,
        client: AsyncClient,
        keys: Keys,
        stream: str,
        group: str,
        worker: str,
        ttl_ms: int,
    ) -> None:
        self._client = client
        self._keys = keys
        self.stream, self.group, self.worker, self.ttl_ms = stream, group, worker, ttl_ms
        self._acquire = client.register_script(lua("leases.acquire").text)
        self._renew = client.register_script(lua("leases.renew").text)
        self._release = client.register_script(lua("leases.release").text)

    def _lease_keys(self, shard: int) -> list[str]:
        keys = self._keys
        return [
            keys.lease(self.stream, shard, self.group),
            keys.epoch(self.stream, shard, self.group),
        ]

    async def acquire(self, shard: int) -> Lease | None:
        """Take the lease of `shard` if it is free (or already ours) under a new epoch; None if
        another worker owns it."""
        epoch = await self._acquire(self._lease_keys(shard), [self.worker, self.ttl_ms])
        return Lease(shard, int(epoch)) if int(epoch) else None

    async def renew(self, shard: int) -> bool:
        """Extend our lease of `shard`; False if it expired or another worker has it now."""
        return bool(await self._renew(self._lease_keys(shard)[:1], [self.worker, self.ttl_ms]))

    async def release(self, shard: int) -> bool:
        """Give the lease of `shard` up at once (after flushing and acknowledging)."""
        return bool(await self._release(self._lease_keys(shard)[:1], [self.worker]))

    async def owners(self, shards: int) -> list[str | None]:
        """Current owner of every shard (None where free), for balancing and status."""
        keys = [self._keys.lease(self.stream, s, self.group) for s in range(shards)]
        async with self._client.pipeline(transaction=False) as pipe:  # not MGET: many slots
            for key in keys:
                pipe.get(key)
            values = await pipe.execute()
        return [v.decode() if isinstance(v, bytes) else v for v in values]

    async def heartbeat(self) -> int:
        """Say this worker is alive for one TTL, forget the dead; return the live count."""
        live, _ = await self.heartbeat_and_renew(())
        return live

    async def heartbeat_and_renew(self, shards: Sequence[int]) -> tuple[int, list[bool]]:
        """`heartbeat` and `renew` of every shard in `shards`, in one round trip."""
        now = int(time.time() * 1000)
        key = self._keys.workers(self.stream, self.group)
        renew = lua("leases.renew")

        def build(pipe: Any) -> None:  # every command may run twice (see `pipelined`)
            pipe.zadd(key, {self.worker: now + self.ttl_ms})
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zcard(key)
            pipe.pexpire(key, self.ttl_ms * 10)
            for shard in shards:  # execute_command: a cluster pipeline blocks evalsha()
                pipe.execute_command(
                    "EVALSHA", renew.sha, 1, self._lease_keys(shard)[0], self.worker, self.ttl_ms
                )

        replies = await pipelined(self._client, build, renew)
        return int(replies[2]), [bool(reply) for reply in replies[4:]]

    async def live_workers(self) -> set[str]:
        """Ids of the workers whose heartbeat has not expired."""
        now = int(time.time() * 1000)
        members = await self._client.zrangebyscore(
            self._keys.workers(self.stream, self.group), now, "+inf"
        )
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def leave(self) -> None:
        """Remove this worker's heartbeat (on a clean stop), so others rebalance at once."""
        await self._client.zrem(self._keys.workers(self.stream, self.group), self.worker)
