"""The worker's HTTP endpoint: /metrics, /healthz, /readyz, /status.json and the page at /.

Off unless `[worker] http = "host:port"` or `streamsink worker --http host:port` is given.
It reads the worker's state (runners, telemetry, sinks) and never changes it; each second
it also writes each owned shard's measurements to Redis, for `status` and other workers'
pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from streamsink.consumers.worker import GroupRunner, Worker
from streamsink.ops.metrics import Facts, WorkerCollector, group_stopped
from streamsink.ops.status import HOT_KEYS, plain, status_document
from streamsink.streams.admin import group_status
from streamsink.streams.connection import SyncClient, connect
from streamsink.streams.endpoints import endpoint_rows
from streamsink.streams.keys import Keys
from streamsink.streams.retry import describe
from streamsink.streams.telemetry import publish_telemetry

log = logging.getLogger("streamsink.ops")

CHECK_TIMEOUT_S = 2.0
"""A readiness check that has not answered by then has failed."""
PUBLISH_EVERY_S = 1.0
"""How often each owned shard's measurements are written to Redis."""
PUBLISH_TIMEOUT_S = 10.0
"""A busy worker's loop may take a while to get to the reply; the next write replaces it."""
PAGE = ("index.html", "page.css", "page.js")


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness check: its name, and the error that failed it (empty when it passed)."""

    name: str
    error: str = ""


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


@contextlib.asynccontextmanager
async def endpoint(worker: Worker, address: str) -> AsyncIterator[web.AppRunner]:
    """Serve the endpoint of `worker` on `address` while inside."""
    ops = Ops(worker)
    runner = web.AppRunner(ops.app(), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = split_address(address)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ValueError(f"cannot serve the HTTP endpoint on {address}: {exc.strerror}") from None
    publisher = asyncio.create_task(ops.publish_loop(), name="ops-publish")
    log.info("http endpoint serving", extra={"address": address, "worker": worker.id})
    try:
        yield runner
    finally:
        publisher.cancel()
        await asyncio.wait([publisher])
        await runner.cleanup()
        ops.close()


class Ops:
    """The handlers, over one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.keys = Keys(worker.config.prefix)
        self.facts = Facts()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WorkerCollector(worker, self.facts))
        self.started = time.time()
        self._sync: SyncClient | None = None  # for the status document, in a thread
        self._checks: dict[str, asyncio.Future[None]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/status.json", self.status)
        app.router.add_get("/", self.page)
        app.router.add_get("/{name:page\\.(css|js)}", self.page)
        return app

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()

    # ---- handlers ---------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus exposition; lag and pending of the owned shards are read just before."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self._read_facts()
        except (redis.RedisError, OSError, TimeoutError):
            self.facts.backlog = {}  # no lag rather than a stale one (/readyz says why)
        body = generate_latest(self.registry)  # on the loop: it reads what the loop changes
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        """The process and its event loop answer (this handler ran)."""
        return _json({"ok": True, "worker": self.worker.id, "uptime_s": self._uptime()})

    async def readyz(self, request: web.Request) -> web.Response:
        """Redis and PostgreSQL reachable, leases held or acquirable, no group stopped."""
        checks = [await self._redis(), *await self._postgres(), *await self._groups()]
        ready = not any(check.error for check in checks)
        failed = [f"{check.name}: {check.error}" for check in checks if check.error]
        body = {
            "ready": ready,
            "failed": failed,
            "checks": {check.name: check.error or "ok" for check in checks},
        }
        return _json(body, status=200 if ready else 503)

    async def status(self, request: web.Request) -> web.Response:
        """The status document (as `streamsink status --json`), with this worker's own part."""
        try:
            document = await asyncio.to_thread(self._document)
        except (redis.RedisError, OSError) as exc:
            return _json({"error": f"Redis: {exc}"}, status=503)
        document["worker"] = {"id": self.worker.id, "uptime_s": self._uptime()}
        return _json(document)

    async def page(self, request: web.Request) -> web.Response:
        """The status page: plain HTML, CSS and a script reading /status.json."""
        name = request.match_info.get("name", "index.html")
        if name not in PAGE:
            raise web.HTTPNotFound()
        body = (resources.files("streamsink.ops") / "page" / name).read_bytes()
        kind = {"html": "text/html", "css": "text/css", "js": "text/javascript"}
        return web.Response(
            body=body,
            content_type=kind[name.rsplit(".", 1)[1]],
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    # ---- readiness --------------------------------------------------------------------------

    async def _redis(self) -> Check:
        return await _check("redis", self.worker.client.ping())

    async def _postgres(self) -> list[Check]:
        """Each PostgreSQL sink: `SELECT 1` through its pool, in a thread, with a timeout.

        A check still hanging from an earlier probe is waited for, not started again.
        """
        from streamsink.sinks.postgres import PostgresSink

        checks = []
        for name, sink in sorted(self.worker.sinks.items()):
            if not isinstance(sink, PostgresSink):
                continue
            running = self._checks.get(name)
            if running is None or running.done():
                running = asyncio.ensure_future(asyncio.to_thread(_select_one, sink))
                self._checks[name] = running
            checks.append(await _check(f"postgresql {name}", asyncio.shield(running)))
        return checks

    async def _groups(self) -> list[Check]:
        checks = []
        for group in self.worker.groups:
            name = f"group {group.group.name}"
            stopped = group_stopped(group)
            if stopped:
                checks.append(Check(name, f"stopped: {stopped}"))
                continue
            checks.append(await _check(f"leases {group.group.name}", _leases(group)))
        return checks

    # ---- Redis reads and writes ------------------------------------------------------------

    async def _read_facts(self) -> None:
        """Lag and pending of the owned shards, as `status` counts them (from entry IDs, not
        XINFO's lag, which a Redis restart from its AOF can leave too high for good)."""
        sync, keys = self._client(), self.keys
        owned = [(g.group.name, g.stream, set(g.runners)) for g in self.worker.groups]

        def read() -> dict[tuple[str, int], tuple[int | None, int]]:
            return {
                (group, row.shard): (row.lag, row.pending)
                for group, stream, shards in owned
                if shards
                for row in group_status(sync, keys, stream, group)
                if row.shard in shards
            }

        self.facts.backlog = await asyncio.to_thread(read)
        http = [s.name for s in self.worker.config.sinks.values() if s.type == "http"]
        if http:
            self.facts.endpoints = await asyncio.to_thread(
                lambda: {name: endpoint_rows(sync, keys, name) for name in http}
            )

    async def publish_loop(self) -> None:
        """Write each owned shard's measurements to Redis every second; never fails the worker."""
        failing = False
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    await self.publish()
                failing = False
            except (redis.RedisError, OSError, TimeoutError) as exc:
                if not failing:  # once per outage, not every second
                    error = describe(exc)
                    log.warning(f"telemetry not saved: {error}", extra={"error": error})
                failing = True

    async def publish(self) -> None:
        """Write the measurements of every owned shard now."""
        for group in self.worker.groups:
            documents = {
                shard: self._shard_document(group, shard, runner)
                for shard, (runner, _) in group.runners.items()
            }
            await publish_telemetry(
                self.worker.client, self.keys, group.stream, group.group.name, documents
            )

    def _shard_document(self, group: GroupRunner, shard: int, runner: Any) -> dict[str, Any]:
        telemetry = (group.telemetry or {}).get(shard)
        state = getattr(runner, "state", None)
        return {
            "worker": self.worker.id,
            "epoch": runner.lease.epoch,
            "state": plain(state) if state is not None else "running",
            "state_since": getattr(runner, "state_since", None),
            "last_error": getattr(runner, "last_error", "") or "",
            "stats": dataclasses.asdict(runner.stats),
            "tables": {
                table: dataclasses.asdict(counts)
                for table, counts in (telemetry.tables.items() if telemetry else ())
            },
            "hot_keys": telemetry.hot_keys(HOT_KEYS) if telemetry else [],
            "last_flush_ms": int(telemetry.last_flush * 1000) if telemetry else 0,
            "updated_ms": int(time.time() * 1000),
        }

    def _document(self) -> dict[str, Any]:
        return status_document(self._client(), self.keys, self.worker.config)

    def _client(self) -> SyncClient:
        if self._sync is None:
            self._sync = connect(self.worker.config.redis_url, CHECK_TIMEOUT_S)
        return self._sync

    def _uptime(self) -> float:
        return round(time.time() - self.started, 3)


async def _check(name: str, probe: Awaitable[Any]) -> Check:
    """Run `probe` with the check timeout: its error (or the timeout) fails the check."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            result = await probe
    except TimeoutError:
        return Check(name, f"no answer within {CHECK_TIMEOUT_S:g} s")
    except Exception as exc:
        return Check(name, f"{type(exc).__name__}: {str(exc).strip() or repr(exc)}")
    if isinstance(result, str) and result:
        return Check(name, result)
    return Check(name)


async def _leases(group: GroupRunner) -> str:
    """Held, or acquirable (a free shard), or all held by other live workers (a standby)."""
    if group.runners:
        return ""
    owners = await group.leases.owners(group.shards)
    if all(owner is not None for owner in owners):
        return ""  # every shard is another worker's: this one stands by
    return f"no shard lease held yet ({owners.count(None)} free)"


def _select_one(sink: Any) -> None:
    """`SELECT 1` on a connection of the sink's pool (raises if PostgreSQL is away)."""
    with sink.pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=str),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
