"""Wait-until-applied latency: `publish(wait=True)` into PostgreSQL at default window settings.

    python bench/wait_applied.py [--events 200] [--runs 3] [--redis-url URL] [--database-url DSN]

One worker (this process, default group options) writes `tasks` to PostgreSQL (a schema of
the run's own, dropped after); one caller publishes events one after another with
`wait=True` and times each call. Prints p50 / p99 / max per run and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import psycopg2
import redis
import redis.asyncio as aredis

from streamsink import AsyncProducer, Config, Event, create_stream
from streamsink.consumers.worker import Worker, worker_client
from streamsink.schemas import Column, ColumnType, GroupSpec, SinkSpec, StreamSpec, Table
from streamsink.sinks.postgres import PostgresSink
from streamsink.sinks.postgres.schema import create_tables
from streamsink.streams import Keys


async def one_run(redis_url: str, dsn: str, count: int) -> list[float]:
    """Seconds each `publish(wait=True)` took."""
    run = uuid.uuid4().hex[:8]
    table = Table(
        "tasks",
        key=("id",),
        columns={"id": Column(ColumnType.INT, nullable=False), "status": Column(ColumnType.TEXT)},
        schema=f"bench_{run}",
    )
    config = Config(
        prefix=f"benchwait{run}",
        streams={"tasks": StreamSpec("tasks", 4, table="tasks")},
        tables={"tasks": table},
        groups={"g": GroupSpec("g", "tasks", ("db",))},  # default window settings
        sinks={"db": SinkSpec("db", "postgres")},
        postgres_dsn=dsn,
    )
    conn = psycopg2.connect(dsn)
    create_tables(conn, config, offsets_schema=f"bench_{run}")  # dropped with the run
    client = aredis.Redis.from_url(redis_url)

    create_stream(redis.Redis.from_url(redis_url), Keys(config.prefix), "tasks", 4)
    sink = PostgresSink.from_options("db", {"offsets_schema": f"bench_{run}"}, dsn)
    stop = asyncio.Event()
    wclient = worker_client(redis_url)
    worker = asyncio.create_task(Worker(wclient, config, {"db": sink}).run(stop))
    took: list[float] = []
    try:
        async with AsyncProducer(client, config) as producer:
            await producer.publish(
                "tasks", Event.make("0", "set", {"id": 0}), wait=True, timeout=60
            )  # the worker is up
            for n in range(count):
                started = time.perf_counter()
                event = Event.make(str(n % 50), "set", {"id": n % 50, "status": f"s{n}"})
                await producer.publish("tasks", event, wait=True, timeout=30)
                took.append(time.perf_counter() - started)
    finally:
        stop.set()
        await worker
        await sink.close()
        await wclient.aclose()
        async for key in client.scan_iter(match=f"{config.prefix}:*", count=1000):
            await client.unlink(key)
        await client.aclose()
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA bench_{run} CASCADE")
        conn.commit()
        conn.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    rows = []
    for _ in range(args.runs):
        took = sorted(asyncio.run(one_run(args.redis_url, args.database_url, args.events)))
        p50, p99 = took[len(took) // 2], took[min(len(took) - 1, int(len(took) * 0.99))]
        rows.append((p50, p99, took[-1]))
        print(f"run: p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms, max {1000 * took[-1]:.1f}")
    p50 = statistics.median(r[0] for r in rows)
    p99 = statistics.median(r[1] for r in rows)
    print(f"\nwait=True, default window settings, median of {args.runs} runs of {args.events}:")
    print(f"p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms")


if __name__ == "__main__":
    main()
