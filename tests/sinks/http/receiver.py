"""A real HTTP receiver for the HTTP sink tests, and helpers to build sinks and windows.

`Receiver` runs an aiohttp.web server on 127.0.0.1 in a thread with its own event loop
(so the sink under test and the server never share a loop), records every request
(arrival time, path, headers, body) and answers with what `answer(record)` says; the
default answers 200. `Listener` only accepts TCP connections and counts them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aredis
from aiohttp import web

from streamsink.schemas import Event
from streamsink.schemas.merge import Entry, merge
from streamsink.sinks.base import Batch
from streamsink.sinks.http import AiohttpTransport, HttpSettings, HttpSink, Reply, Vetter
from streamsink.sinks.http.urls import GetAddrInfo
from streamsink.streams import Keys

SECRET_ENV = "STREAMSINK_TEST_SECRET"
SECRET = "test-secret-\u00e9"


@dataclass
class Record:
    """One request as the receiver saw it, and the status it answered."""

    at: float  # time.monotonic() on arrival
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0

    @property
    def key(self) -> str:
        return self.headers.get("Idempotency-Key", "")

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Answer:
    """What the receiver answers: status, headers, body, after `delay` seconds."""

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0


Behaviour = Callable[[Record, "Receiver"], Answer]


class Receiver:
    """An HTTP server on 127.0.0.1 recording every request (see the module docstring)."""

    def __init__(self, answer: Behaviour | None = None) -> None:
        self.answer: Behaviour = answer or (lambda record, receiver: Answer())
        self.records: list[Record] = []
        self.tries: Counter[str] = Counter()  # requests seen per idempotency key
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def start(self, port: int = 0) -> Receiver:
        """Serve on `port` (0: a free one); again after `stop`, to end an outage."""
        started = threading.Event()
        self.port = port
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10), "the receiver did not start"
        return self

    def _serve(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def up() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        loop.run_until_complete(up())
        started.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())  # type: ignore[union-attr]
        loop.close()

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        body = await request.read()
        record = Record(at, request.path, dict(request.headers), body)
        with self._lock:
            self.tries[record.key] += 1
            answer = self.answer(record, self)
            record.status = answer.status
            self.records.append(record)
        if answer.delay:
            await asyncio.sleep(answer.delay)
        return web.Response(status=answer.status, headers=dict(answer.headers), body=answer.body)

    def accepted(self) -> list[Record]:
        """The requests answered 2xx, in arrival order."""
        with self._lock:
            return [r for r in self.records if 200 <= r.status < 300]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


class Listener:
    """A TCP listener on 127.0.0.1 that only counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class CountingTransport(AiohttpTransport):
    """The real transport, counting the posts it was asked to make."""

    def __init__(self, vetter: Vetter) -> None:
        super().__init__(vetter)
        self.posts = 0

    async def post(self, *args: Any, **kwargs: Any) -> Reply:
        self.posts += 1
        return await super().post(*args, **kwargs)


@dataclass
class Built:
    """A sink built for a test, with its parts."""

    sink: HttpSink
    transport: CountingTransport
    vetter: Vetter
    client: aredis.Redis


def build_sink(
    redis_url: str,
    keys: Keys,
    options: Mapping[str, Any],
    name: str = "hooks",
    getaddrinfo: GetAddrInfo | None = None,
) -> Built:
    """An HttpSink from `options` (secret_env and allow_private default to the tests'),
    resolving hosts with `getaddrinfo` when given (a DNS the test controls)."""
    settings = HttpSettings.from_options(
        name, {"secret_env": SECRET_ENV, "allow_private": True, **options}
    )
    client = aredis.Redis.from_url(redis_url)
    vetter = Vetter(settings.allow_private, settings.dns_cache_s, getaddrinfo)
    transport = CountingTransport(vetter)
    secrets = settings.secrets(name, {SECRET_ENV: SECRET})
    sink = HttpSink.with_client(
        name,
        settings,
        secrets,
        client,
        keys,
        vetter=vetter,
        transport=transport,
        on_close=[client.aclose],
    )
    return Built(sink, transport, vetter, client)


class Window:
    """Makes windows of call events with realistic, increasing entry IDs."""

    def __init__(self, stream: str = "hooks", shard: int = 0) -> None:
        self.stream, self.shard = stream, shard
        self.ms = int(time.time() * 1000)
        self.seq = 0

    def entry(self, key: str, url: str, payload: Any, **extra: Any) -> Entry:
        self.seq += 1
        data = {"url": url, "payload": payload, **extra}
        return Entry(f"{self.ms}-{self.seq}", Event.make(key, "call", data))

    def batch(self, entries: Sequence[Entry]) -> Batch:
        return Batch(
            group="g",
            stream=self.stream,
            shard=self.shard,
            epoch=1,
            first_id=entries[0].id,
            last_id=entries[-1].id,
            entries=entries,
            merged=merge(entries),
        )
