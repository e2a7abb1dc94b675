"""A realistic burst, as the seeds' platform produced it: task statuses, likes, counters, logs."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from streamsink.consumers.worker import Worker
from streamsink.schemas.config import Config
from streamsink.schemas.event import Event, Op
from streamsink.sinks.base import Sink
from streamsink.streams.aio import AsyncProducer
from streamsink.streams.connection import AsyncClient
from streamsink.streams.keys import Keys

if TYPE_CHECKING:  # only streams/ talks to Redis: the demo names the client's type
    pass

STATUSES = ("queued", "running", "rendering", "uploading", "done")


def burst(
    tasks: int = 2000, posts: int = 200, users: int = 500, seed: int = 7
) -> Iterator[tuple[str, Event]]:
    """(stream, event) pairs of one busy minute, interleaved as real traffic is."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    sources = [
        _tasks(rng, tasks, start),
        _likes(rng, posts, users, start),
        _logs(rng, users, start),
    ]
    while sources:
        source = rng.choice(sources)
        try:
            yield next(source)
        except StopIteration:
            sources.remove(source)


def _at(start: datetime, seconds: float) -> str:
    return (start + timedelta(seconds=seconds)).isoformat()


def _tasks(rng: random.Random, count: int, start: datetime) -> Iterator[tuple[str, Event]]:
    for step in range(40):
        for task in range(1, count + 1):
            status = STATUSES[min(step // 10 + (task % 2), len(STATUSES) - 1)]
            data = {"id": task, "status": status, "progress": min(100, step * 3 + task % 5)}
            data["updated_at"] = _at(start, step)
            if status == "done":
                data["result_url"] = f"https://cdn.example.com/results/{task}.png"
            yield "tasks", Event(str(task), Op.SET, data)  # the id: tasks has a read model


def _likes(
    rng: random.Random, posts: int, users: int, start: datetime
) -> Iterator[tuple[str, Event]]:
    for second in range(20_000):
        post, user = rng.randint(1, posts), rng.randint(1, users)
        key = f"{post}:{user}"
        if rng.random() < 0.6:
            yield (
                "likes",
                Event(
                    key,
                    Op.SET,
                    {"post_id": post, "user_id": user, "liked_at": _at(start, second / 300)},
                ),
            )
            yield "stats", Event(str(post), Op.INCR, {"post_id": post, "likes": 1})
        else:
            yield "likes", Event(key, Op.DEL, {"post_id": post, "user_id": user})
        yield "stats", Event(str(post), Op.INCR, {"post_id": post, "views": 1})


def _logs(rng: random.Random, users: int, start: datetime) -> Iterator[tuple[str, Event]]:
    actions = ("open_editor", "apply_filter", "crop", "export", "share")
    for line in range(10_000):
        user = rng.randint(1, users)
        yield (
            "activity",
            Event(
                f"user:{user}",
                Op.APPEND,
                {
                    "user_id": user,
                    "action": rng.choice(actions),
                    "at": _at(start, line / 200),
                    "meta": {
                        "client": rng.choice(("web", "ios", "android")),
                        "ms": rng.randint(5, 900),
                    },
                },
            ),
        )


async def publish_burst(client: AsyncClient, config: Config) -> tuple[Counter[str], float]:
    """Publish the burst with the asyncio producer from 200 concurrent senders."""
    counts: Counter[str] = Counter()
    queue: asyncio.Queue[tuple[str, Event] | None] = asyncio.Queue(maxsize=10_000)
    started = time.perf_counter()
    async with AsyncProducer(client, config) as producer:

        async def sender() -> None:
            while (item := await queue.get()) is not None:
                stream, event = item
                await producer.publish(stream, event)
                counts[f"{stream} {event.op}"] += 1

        senders = [asyncio.create_task(sender()) for _ in range(200)]
        for item in burst():
            await queue.put(item)
        for _ in senders:
            await queue.put(None)
        await asyncio.gather(*senders)
    return counts, time.perf_counter() - started


def report(conn: Connection) -> list[str]:
    """What the burst left in PostgreSQL, as a reader of the demo's tables sees it."""
    schema = "streamsink_demo"
    queries = [
        ("tasks by status", "SELECT status, count(*) FROM {}.tasks GROUP BY 1 ORDER BY 1"),
        (
            "busiest posts",
            "SELECT post_id, views, likes FROM {}.post_stats ORDER BY views DESC, post_id LIMIT 3",
        ),
        ("likes standing", "SELECT count(*) FROM {}.post_likes"),
        ("activity rows", "SELECT count(*) FROM {}.activity_log"),
    ]
    lines = []
    with conn.cursor() as cur:
        for title, query in queries:
            cur.execute(sql.SQL(query).format(sql.Identifier(schema)))
            found = cur.fetchall()
            names = [d[0] for d in cur.description or ()]
            cells = "; ".join(
                ", ".join(f"{n}={v}" for n, v in zip(names, row, strict=True)) for row in found
            )
            lines.append(f"  {title:<16} {cells}")
    conn.commit()
    return lines


async def drain(
    client: AsyncClient,
    config: Config,
    sinks: Mapping[str, Sink],
    stall_s: float = 30.0,
    around: Callable[[Worker], contextlib.AbstractAsyncContextManager[object]] | None = None,
) -> float:
    """Run a worker over the burst until every group has acknowledged everything.

    If nothing moves for `stall_s` seconds the demo stops with the stacks of its tasks
    instead of hanging: a demo that hangs teaches nothing. `around(worker)` (the HTTP
    endpoint) is entered while it runs.
    """
    async with contextlib.AsyncExitStack() as ops:
        worker = Worker(client, config, sinks, telemetry=around is not None)
        if around is not None:
            await ops.enter_async_context(around(worker))
        return await _drain(client, config, worker, stall_s)


async def _drain(client: AsyncClient, config: Config, worker: Worker, stall_s: float) -> float:
    stop = asyncio.Event()
    started = time.perf_counter()
    running = asyncio.create_task(worker.run(stop))
    keys = Keys(config.prefix)
    last, moved = -1, time.monotonic()
    while not running.done():
        await asyncio.sleep(0.2)
        left = await _left(client, keys, config)
        if left == 0:
            break
        if left != last:
            last, moved = left, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            _dump_tasks()
            running.cancel()
            raise RuntimeError(f"the worker made no progress for {stall_s:.0f} s ({left} left)")
    stop.set()
    done, _ = await asyncio.wait([running], timeout=stall_s)
    if not done:
        _dump_tasks()
        running.cancel()
        raise RuntimeError(f"the worker did not stop within {stall_s:.0f} s of being asked")
    running.result()
    return time.perf_counter() - started


async def _left(client: AsyncClient, keys: Keys, config: Config) -> int:
    """Entries not yet acknowledged (pending) or not yet read (lag), over every group."""
    left = 0
    for group in config.groups.values():
        for shard in range(config.streams[group.stream].shards):
            key = keys.shard(group.stream, shard)
            info: Any = await client.xinfo_groups(key)
            mine = [g for g in info if g["name"] in (group.name, group.name.encode())]
            if not mine:
                return -1
            left += int(mine[0]["pending"]) + int(mine[0].get("lag") or 0)
    return left


def _dump_tasks() -> None:
    """Every task with its whole chain of awaits, innermost last."""
    for task in asyncio.all_tasks():
        print(
            f"--- {task.get_name()} {'(cancelling)' if task.cancelling() else ''}", file=sys.stderr
        )
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                print(
                    f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                    file=sys.stderr,
                )
            else:
                print(f"  {awaited!r}", file=sys.stderr)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
