"""A realistic burst, as the seeds' platform produced it: task statuses, likes, counters, logs."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import redis.asyncio as aredis

from streamsink.schemas.config import Config
from streamsink.schemas.event import Event, Op
from streamsink.streams.aio import AsyncProducer

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
            yield "tasks", Event(f"task:{task}", Op.SET, data)


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


async def publish_burst(client: aredis.Redis, config: Config) -> tuple[Counter[str], float]:
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
