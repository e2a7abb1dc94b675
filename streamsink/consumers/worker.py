"""The worker: every group of the config, its shard leases balanced with the other workers.

Each group runs a lease loop that heartbeats, renews the leases it holds, hands extras
over (flush, acknowledge, release) and takes free shards up to its fair share: the
shard count divided by the live workers, rounded up. Every loop and shard runs under
one TaskGroup, so a crash anywhere stops the process loudly instead of leaving a zombie
that holds leases. Setting `stop` drains: flush open windows, acknowledge, release.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from streamsink.consumers.recovery import check_shard, committed, lost_message, on_shard
from streamsink.consumers.settings import GroupSettings
from streamsink.consumers.shard import SINK_TRANSIENT, ShardRunner
from streamsink.consumers.telemetry import Telemetry
from streamsink.errors import (
    ConfigError,
    RedisDataLost,
    ShardCountMismatch,
    SinkMisconfigured,
    StreamError,
    StreamNotFound,
)
from streamsink.schemas.config import Config, GroupSpec
from streamsink.sinks.base import Sink
from streamsink.streams.connection import AsyncClient, connect_async, shard_count_async
from streamsink.streams.keys import Keys
from streamsink.streams.leases import Leases
from streamsink.streams.reader import ShardReader, create_group
from streamsink.streams.retry import TRANSIENT, cancelling, describe, retrying, server

log = logging.getLogger("streamsink.worker")

LEASE_LOOP_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT, TimeoutError)
"""What a lease loop round rides out: Redis away, or a round that took too long."""


def worker_id() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class GroupRunner:
    """One group in one worker: leases, balancing, and a ShardRunner per owned shard."""

    def __init__(
        self,
        client: AsyncClient,
        config: Config,
        group: GroupSpec,
        sinks: Mapping[str, Sink],
        worker: str,
        alone: asyncio.Lock | None = None,
    ) -> None:
        self.client, self.config, self.group, self.sinks = client, config, group, sinks
        self.alone = alone or asyncio.Lock()  # one suspect entry at a time in this worker
        self.settings = GroupSettings.from_options(group.name, group.options)
        self.keys = Keys(config.prefix)
        self.stream = group.stream
        self.shards = config.streams[group.stream].shards
        self.worker = worker
        self.leases = Leases(
            client, self.keys, self.stream, group.name, worker, self.settings.lease_ttl_ms
        )
        self.runners: dict[int, tuple[ShardRunner, asyncio.Task[None]]] = {}
        self.stopped: str | None = None  # why the group stopped (a configuration error)
        self.telemetry: dict[int, Telemetry] | None = None  # ops: per shard, when measuring
        self._renewed: dict[int, float] = {}
        self._releasing: set[int] = set()  # drained shards whose lease is being given back
        self._maintained = 0.0
        self._redis = {"group": group.name, "stream": self.stream, "redis": server(client)}

    async def run(self, stop: asyncio.Event) -> None:
        """Balance leases until `stop` is set, then drain every shard and leave.

        Returns early, with `stopped` saying why, when the group cannot work until an
        operator fixes something (its stream missing, a sink misconfigured).
        """
        if not await self._prepared(stop):
            return
        interval = self.settings.lease_ttl_ms / 3000
        stopped = asyncio.ensure_future(stop.wait())
        try:
            async with asyncio.TaskGroup() as tasks:
                try:
                    await self._loop(tasks, stop, stopped, interval)
                except BaseException:
                    # Crashed or cancelled: every shard stops where it is, flushing and
                    # acknowledging nothing, even one whose cancellation a library
                    # swallowed (it sees `lost` at its next read).
                    for shard in list(self.runners):
                        self._stop_lost(shard)
                    raise
        finally:
            stopped.cancel()
        with contextlib.suppress(*TRANSIENT, TimeoutError):  # best effort: heartbeats expire
            async with asyncio.timeout(self.settings.lease_ttl_ms / 1000):
                await self.leases.leave()
        log.info("group stopped", extra={"group": self.group.name, "worker": self.worker})

    async def _prepared(self, stop: asyncio.Event) -> bool:
        """Check the sinks, the stream and what Redis holds of it against what the sinks
        committed, and create the groups, riding out Redis or a sink being away, until done
        (True), `stop` (False), or an error that waiting cannot clear (False, the group
        stopped: sink misconfigured, stream missing, Redis lost data)."""
        try:
            for name, sink in self.sinks.items():
                check = getattr(sink, "check", None)
                if check is not None and not await self._until(stop, check, f"check {name}"):
                    return False
            if not await self._until(stop, self._prepare, "prepare streams", self._redis):
                return False
        except RedisDataLost as exc:
            self._stop_group(str(exc))
            return False
        except StreamError as exc:
            self._stop_group(f"{exc}; run `streamsink streams create --config FILE`, then restart")
            return False
        except (SinkMisconfigured, ConfigError) as exc:  # ConfigError: e.g. no cluster there
            self._stop_group(str(exc))
            return False
        return True

    async def _until(
        self,
        stop: asyncio.Event,
        operation: Callable[[], Awaitable[object]],
        what: str,
        where: Mapping[str, object] | None = None,
    ) -> bool:
        """`operation`, retried while transient; False if `stop` came first."""
        transient = (*SINK_TRANSIENT,)
        where = where or {"group": self.group.name, "stream": self.stream}
        doing = asyncio.ensure_future(retrying(operation, what, transient, where))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([doing, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when cancelled: neither may outlive the group
            stopping.cancel()
            given_up = doing.cancel()  # False once it is done
        if given_up:
            log.info("start-up given up: stopping", extra={"group": self.group.name, "at": what})
            return False
        doing.result()
        return True

    def _stop_group(self, reason: str) -> None:
        """Stop the group on an error only an operator can fix: loudly, acknowledging nothing."""
        if self.stopped is None:
            self.stopped = reason
            log.error(
                "group stopped: fix the cause and restart the worker",
                extra={"group": self.group.name, "stream": self.stream, "error": reason},
            )
        for shard in list(self.runners):
            self._stop_lost(shard)

    async def _loop(
        self,
        tasks: asyncio.TaskGroup,
        stop: asyncio.Event,
        stopped: asyncio.Future[Any],
        interval: float,
    ) -> None:
        while not (stop.is_set() and not self.runners) and self.stopped is None:
            if cancelling():  # a cancellation turned into a timeout on the way: honour it
                raise asyncio.CancelledError
            for shard in [s for s, (_, task) in self.runners.items() if task.done()]:
                del self.runners[shard]  # drained and released, or fenced
                self._renewed.pop(shard, None)
                self._releasing.discard(shard)
            if stop.is_set():  # drain, still renewing the leases until every shard is done
                for runner, _ in self.runners.values():
                    runner.draining.set()
            try:
                # Bounded, so that one stuck reply cannot hold every renewal back
                # until the leases expire under shards that are still running.
                async with asyncio.timeout(interval):
                    await self._balance(tasks, acquire=not stop.is_set())
            except LEASE_LOOP_ERRORS as exc:
                log.warning(
                    "lease loop: Redis unavailable", extra={**self._redis, "error": describe(exc)}
                )
            self._drop_stale_leases()
            pause = interval * random.uniform(0.8, 1.0)
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as its timeout fires, and the loop would never end.
            waiting = [task for _, task in self.runners.values()] if stop.is_set() else []
            await asyncio.wait(waiting or [stopped], timeout=pause)

    async def _prepare(self) -> None:
        """Check the stream, and create every group of the config that reads it on every shard.

        Creating the other groups too means trimming never outruns a group whose workers
        have not started yet. First, Redis must hold what the group's sinks committed: a
        group created again from the first entry would be behind its offsets.
        """
        commits = await committed(self.sinks, self.group.name, self.stream)
        try:
            recorded = await shard_count_async(self.client, self.keys, self.stream)
        except StreamNotFound:
            if any(commits.values()):
                shard = min(s for rows in commits.values() for s in rows)
                reason = "the stream's shard count is gone from Redis"
                raise RedisDataLost(
                    lost_message(self.stream, self.group.name, shard, reason)
                ) from None
            raise
        if recorded != self.shards:
            raise ShardCountMismatch(
                f"stream {self.stream!r} has {recorded} shards in Redis, config says {self.shards}"
            )
        for shard in range(self.shards):
            mine = on_shard(commits, shard)
            await check_shard(self.client, self.keys, self.stream, shard, self.group.name, mine)
        readers = [g.name for g in self.config.groups.values() if g.stream == self.stream]
        for shard in range(self.shards):
            for name in readers:
                await create_group(self.client, self.keys.shard(self.stream, shard), name)

    async def _balance(self, tasks: asyncio.TaskGroup, acquire: bool) -> None:
        # Heartbeat and every renewal in one round trip: on a loop busy with shards, each
        # await waits its turn, and renewals must not queue behind each other.
        owned = list(self.runners)
        live, renewed = await self.leases.heartbeat_and_renew(owned)
        now = time.monotonic()
        for shard, ours in zip(owned, renewed, strict=True):
            if ours:
                self._renewed[shard] = now
            elif shard in self._releasing:  # given back while renewing: not lost
                continue
            else:
                log.warning("lease lost", extra=self._where(shard))
                self._stop_lost(shard)
        target = math.ceil(self.shards / max(live, 1))
        active = [s for s, (r, _) in self.runners.items() if not r.draining.is_set()]
        for shard in sorted(active, reverse=True)[: max(0, len(active) - target)]:
            log.info("handing shard over", extra={**self._where(shard), "target": target})
            self.runners[shard][0].draining.set()
        if acquire and len(active) < target:
            await self._acquire(tasks, target - len(active))
        if time.monotonic() - self._maintained > self.settings.maintenance_ms / 1000:
            await self._maintain()

    async def _acquire(self, tasks: asyncio.TaskGroup, wanted: int) -> None:
        owners = await self.leases.owners(self.shards)
        free = [s for s, owner in enumerate(owners) if owner is None and s not in self.runners]
        random.shuffle(free)
        for shard in free[:wanted]:
            lease = await self.leases.acquire(shard)
            if lease is None:
                continue
            reader = ShardReader(
                self.client,
                self.keys,
                self.stream,
                shard,
                self.group.name,
                self.worker,
                lease.epoch,
            )
            runner = ShardRunner(
                reader, lease, self.config, self.stream, self.sinks, self.settings, self.alone
            )
            runner.expect_group = True  # _prepare made it: gone later means Redis lost it
            if self.telemetry is not None:  # ops: kept across owners of the shard in this process
                runner.telemetry = self.telemetry.setdefault(shard, Telemetry())
            task = tasks.create_task(self._run_shard(runner), name=f"shard-{shard}")
            self.runners[shard] = (runner, task)
            self._renewed[shard] = time.monotonic()
            log.info("shard taken", extra={**self._where(shard), "epoch": lease.epoch})

    async def _run_shard(self, runner: ShardRunner) -> None:
        """Run a shard; once it has drained (flushed, acknowledged), give its lease back.

        A sink misconfigured, or Redis found behind what the sinks committed, stops the
        whole group: its other shards stop where they are.
        """
        try:
            await runner.run()
        except (SinkMisconfigured, RedisDataLost) as exc:
            self._stop_group(str(exc))
        if runner.lost:
            return
        self._releasing.add(runner.lease.shard)
        with contextlib.suppress(TimeoutError):  # an unreleased lease simply expires
            async with asyncio.timeout(self.settings.lease_ttl_ms / 1000):
                await retrying(
                    lambda: self.leases.release(runner.lease.shard),
                    "release lease",
                    where={**self._where(runner.lease.shard), "redis": server(self.client)},
                )
        log.info("shard released", extra=self._where(runner.lease.shard))

    def _drop_stale_leases(self) -> None:
        """Stop shards whose lease could not be renewed for a whole TTL: it may be another's."""
        limit = self.settings.lease_ttl_ms / 1000
        now = time.monotonic()
        for shard in list(self.runners):
            if now - self._renewed.get(shard, now) > limit:
                log.warning("lease expired unrenewed", extra=self._where(shard))
                self._stop_lost(shard)

    def _stop_lost(self, shard: int) -> None:
        """Stop a shard whose lease is gone: nothing more is flushed or acknowledged."""
        runner, task = self.runners.pop(shard)
        self._renewed.pop(shard, None)
        runner.lost = True
        if task is not asyncio.current_task():
            task.cancel()

    async def _maintain(self) -> None:
        """Trim owned shards below what every group acknowledged; remove gone consumers."""
        self._maintained = time.monotonic()
        live = await self.leases.live_workers()
        for shard in list(self.runners):
            reader = self.runners[shard][0].reader
            removed = await reader.trim(self.settings.retention_ms)
            gone = await reader.remove_gone_consumers(live)
            if removed or gone:
                log.info(
                    "maintained",
                    extra={**self._where(shard), "trimmed": removed, "consumers_removed": gone},
                )

    def _where(self, shard: int) -> dict[str, object]:
        return {
            "group": self.group.name,
            "stream": self.stream,
            "shard": shard,
            "worker": self.worker,
        }


class Worker:
    """Runs every group of a config in this process until `stop` is set."""

    def __init__(
        self,
        client: AsyncClient,
        config: Config,
        sinks: Mapping[str, Sink],
        worker: str | None = None,
        telemetry: bool = False,
    ) -> None:
        self.client, self.config, self.sinks = client, config, sinks
        self.id = worker or worker_id()
        alone = asyncio.Lock()
        self.groups = [
            GroupRunner(
                client, config, group, {name: sinks[name] for name in group.sinks}, self.id, alone
            )
            for group in config.groups.values()
        ]
        for group in self.groups if telemetry else ():  # ops: measure windows for the endpoint
            group.telemetry = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop`; a crash in any group or shard ends it with that error."""
        log.info("worker started", extra={"worker": self.id, "groups": len(self.groups)})
        async with asyncio.TaskGroup() as tasks:
            for group in self.groups:
                tasks.create_task(group.run(stop), name=f"group-{group.group.name}")
        log.info("worker stopped", extra={"worker": self.id})

    @property
    def stopped(self) -> dict[str, str]:
        """The groups stopped by an error only an operator can fix, with why."""
        return {g.group.name: g.stopped for g in self.groups if g.stopped is not None}


def worker_client(url: str) -> AsyncClient:
    """A client for workers (streams.connection: no silent retries, a socket timeout well
    above BLOCK; one server or a cluster)."""
    return connect_async(url)
