"""HTTP sink benchmark: mode `each` against a naive signed aiohttp loop, and mode `batch`.

    python bench/callbacks.py [--calls 3000] [--concurrency 4] [--runs 3] [--redis-url URL]
                         [--profile FILE]

Rows (callbacks/s, median of --runs runs; every run sends every row's calls afresh):
  naive loop    baseline: one aiohttp session, `concurrency` coroutines each taking the
                next call, orjson body, HMAC-SHA256 signature and timestamp, an
                Idempotency-Key, POST, read the reply
  each          HttpSink.write of one window of `calls` calls (distinct keys), mode
                "each", the same concurrency (one endpoint): breaker, delivered marks,
                counts and signing as in production
  batch         the same window, mode "batch" (100 calls a request)
The issue's target: each >= naive loop.

The receiver is an aiohttp server in a subprocess on 127.0.0.1 that answers 200 "ok" at
once. `--profile FILE` also writes a cProfile of one `each` write (pstats format), and
`FILE.naive` one of the naive loop's sending, to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import hmac
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import redis.asyncio as aredis
from aiohttp import web

from streamsink.schemas import Event
from streamsink.schemas.merge import Entry, merge
from streamsink.sinks.base import Batch
from streamsink.sinks.http import HttpSettings, HttpSink
from streamsink.streams import Keys

SECRET = b"bench-secret"


def serve(port: int) -> None:
    """The receiver: 200 "ok" to every POST."""

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", ok)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _us(cpu_started: float, calls: int) -> float:
    """This process' CPU time since `cpu_started`, in µs a callback."""
    return (time.process_time() - cpu_started) * 1e6 / calls


async def naive(
    url: str, calls: int, concurrency: int, profile: cProfile.Profile | None = None
) -> tuple[float, float]:
    """What a developer writes by hand: a signed POST per call, `concurrency` at a time."""
    numbers = iter(range(calls))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for n in numbers:
                body = orjson.dumps({"n": n, "status": "done"})
                stamp = int(time.time())
                mac = hmac.new(SECRET, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
                headers = {
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"bench:0:{n}",
                    "X-Streamsink-Timestamp": str(stamp),
                    "X-Streamsink-Signature": f"v1={mac}",
                }
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200

        started, cpu = time.perf_counter(), time.process_time()
        with profile or contextlib.nullcontext():
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return calls / (time.perf_counter() - started), _us(cpu, calls)


def window(url: str, calls: int) -> Batch:
    ms = int(time.time() * 1000)
    entries = [
        Entry(f"{ms}-{n}", Event.make(f"task-{n}", "call", {"url": url, "payload": {"n": n}}))
        for n in range(calls)
    ]
    return Batch("g", "bench", 0, 1, entries[0].id, entries[-1].id, entries, merge(entries))


async def sink_run(
    redis_url: str,
    url: str,
    calls: int,
    concurrency: int,
    mode: str,
    profile: cProfile.Profile | None = None,
) -> tuple[float, float]:
    """One window through a fresh HttpSink, built as `from_options` builds it."""
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    options = {"secret_env": "S", "allow_private": True, "concurrency": concurrency, "mode": mode}
    settings = HttpSettings.from_options("hooks", options)
    client = aredis.Redis.from_url(redis_url)
    sink = HttpSink.with_client("hooks", settings, {"S": SECRET}, client, keys)
    batch = window(url, calls)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        with profile or contextlib.nullcontext():
            assert await sink.write(batch) == []
        took, cpu_us = time.perf_counter() - started, _us(cpu, calls)
    finally:
        await sink.close()
        async for key in client.scan_iter(match=f"{keys.prefix}:*"):
            await client.delete(key)
        await client.aclose()
    return calls / took, cpu_us


async def main_async(args: argparse.Namespace, port: int) -> None:
    url = f"http://127.0.0.1:{port}/hook"
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "the receiver did not start"
            await asyncio.sleep(0.1)
    rows: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
        "naive loop": lambda: naive(url, args.calls, args.concurrency),
        "each": lambda: sink_run(args.redis_url, url, args.calls, args.concurrency, "each"),
        "batch": lambda: sink_run(args.redis_url, url, args.calls, args.concurrency, "batch"),
    }
    await rows["naive loop"]()  # warm up: connections, imports
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _, name in itertools.product(range(args.runs), rows):  # interleaved runs
        results[name].append(await rows[name]())
    if args.profile:  # the sending only, not the setup and clean-up around it
        profile = cProfile.Profile()
        await sink_run(args.redis_url, url, args.calls, args.concurrency, "each", profile)
        profile.dump_stats(args.profile)
        profile = cProfile.Profile()
        await naive(url, args.calls, args.concurrency, profile)
        profile.dump_stats(f"{args.profile}.naive")
    median = {name: statistics.median(r for r, _ in values) for name, values in results.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in results.items()}
    print(
        f"\n{args.calls} calls, concurrency {args.concurrency}, median of {args.runs} runs "
        "(callbacks/s, and the sender's CPU µs a callback: steadier on a shared machine)\n"
    )
    print(f"| {'row':<10} | {'callbacks/s':>11} | {'vs naive':>8} | {'CPU µs':>7} | runs")
    print(f"|{'-' * 12}|{'-' * 13}|{'-' * 10}|{'-' * 9}|------")
    for name, value in median.items():
        runs = ", ".join(f"{r:.0f}" for r, _ in results[name])
        ratio = value / median["naive loop"]
        print(f"| {name:<10} | {value:>11.0f} | {ratio:>7.2f}x | {cpu[name]:>7.0f} | {runs}")
    met = median["each"] >= median["naive loop"]
    print(f"\ntarget: each >= naive loop: {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--profile", help="write cProfiles of `each` and the naive loop here")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        asyncio.run(main_async(args, port))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
