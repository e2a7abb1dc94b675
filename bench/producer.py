"""Producer benchmark: streamsink's producers against plain redis-py, same events, same run.

    python bench/producer.py [--events 50000] [--runs 5] [--redis-url URL]

Rows (events/s, median of --runs runs; each run publishes every row's events afresh; with
the µs of CPU an event took in this process and in Redis: INFO cpu, so use a Redis of the
bench's own for that column, e.g. `redis-server --port 6391 --save ''`):
  sync pipeline      plain redis-py: pipeline of 1,000 XADDs, orjson-encoded data (baseline)
  sync pipeline, hash          the same, with an HSET of the row's hash and its PEXPIRE beside
                               each XADD: what any read model costs Redis, without validation
  asyncio producer   AsyncProducer, 1,000 concurrent coroutines each awaiting its publishes
  sync producer      Producer.publish_many, 1,000 events a call
  awaited XADD       plain redis.asyncio: one coroutine, `await xadd(...)` per event (baseline)
  awaited publish    AsyncProducer: one coroutine, `await publish(...)` per event
  sync producer, read model     Producer.publish_many with the table's read model on
  asyncio producer, read model  AsyncProducer, 1,000 coroutines, the read model on
  asyncio producer, ids         AsyncProducer, 1,000 coroutines, an idempotency id per event
The targets: asyncio producer >= 80% of sync pipeline, with ids too (issue 18); awaited
publish >= awaited XADD; the read model costs < 25% of the producers' throughput (issue 16).
The summary gives each ratio within each run (rows compared run one after the other), their
median and range: on a shared machine the load drifts between rows far apart.
For the sync producer (client, then Redis, nothing overlapping) it also gives what the
read model would cost were its client work free: its Redis CPU alone, the design's floor.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import redis
import redis.asyncio as aredis

from streamsink import AsyncProducer, Config, Event, Op, Producer, create_stream
from streamsink.schemas import Column, ColumnType, StreamSpec, Table, shard_of
from streamsink.schemas.readmodel import ReadModel
from streamsink.streams import Keys

SHARDS = 8
TASKS = Table(
    "tasks",
    key=("id",),
    columns={
        "id": Column(ColumnType.INT, nullable=False),
        "status": Column(ColumnType.TEXT),
        "progress": Column(ColumnType.INT),
        "worker": Column(ColumnType.TEXT),
    },
)

MODEL = ReadModel(ttl_by="status", ttl={"running": 300, "done": 86400})


def make_events(count: int) -> list[Event]:
    """Task status updates over 1,000 tasks, like the seeds' render farm produced."""
    statuses = ("queued", "running", "rendering", "uploading", "done")
    return [
        Event(
            str(i % 1000),  # the row's id: what a table with a read model needs
            Op.SET,
            {"id": i % 1000, "status": statuses[i % 5], "progress": i % 101, "worker": "w-7"},
        )
        for i in range(count)
    ]


def with_ids(events: list[Event]) -> list[Event]:
    """The same events, each with an idempotency id (the safe way to retry a publish)."""
    run = uuid.uuid4().hex[:8]
    return [dataclasses.replace(e, id=f"{run}-{i}") for i, e in enumerate(events)]


def sync_pipeline(client: redis.Redis, keys: Keys, events: list[Event]) -> None:
    for start in range(0, len(events), 1000):
        pipe = client.pipeline(transaction=False)
        for event in events[start : start + 1000]:
            fields = {"key": event.key, "op": event.op.value, "data": orjson.dumps(event.data)}
            pipe.xadd(keys.shard("tasks", shard_of(event.key, SHARDS)), fields)  # type: ignore[arg-type]
        pipe.execute()


def sync_pipeline_hash(client: redis.Redis, keys: Keys, events: list[Event]) -> None:
    """The sync pipeline, with what any read model pays in Redis beside each XADD: the
    row's hash (HSET of its data) and its TTL (PEXPIRE), no validation: the floor."""
    for start in range(0, len(events), 1000):
        pipe = client.pipeline(transaction=False)
        for event in events[start : start + 1000]:
            fields = {"key": event.key, "op": event.op.value, "data": orjson.dumps(event.data)}
            shard = shard_of(event.key, SHARDS)
            pipe.xadd(keys.shard("tasks", shard), fields)  # type: ignore[arg-type]
            row = keys.row("tasks", shard, "tasks", event.key)
            pipe.hset(row, mapping=event.data)
            pipe.pexpire(row, MODEL.ttl_ms(event.data["status"]))
        pipe.execute()


def sync_producer(client: redis.Redis, config: Config, events: list[Event]) -> None:
    producer = Producer(client, config)
    for start in range(0, len(events), 1000):
        producer.publish_many("tasks", events[start : start + 1000])


async def asyncio_producer(client: aredis.Redis, config: Config, events: list[Event]) -> None:
    async with AsyncProducer(client, config) as producer:

        async def publisher(mine: list[Event]) -> None:
            for event in mine:
                await producer.publish("tasks", event)

        await asyncio.gather(*(publisher(events[i::1000]) for i in range(1000)))


async def awaited_xadd(client: aredis.Redis, keys: Keys, events: list[Event]) -> None:
    for event in events:
        fields = {"key": event.key, "op": event.op.value, "data": orjson.dumps(event.data)}
        await client.xadd(keys.shard("tasks", shard_of(event.key, SHARDS)), fields)  # type: ignore[arg-type]


async def awaited_publish(client: aredis.Redis, config: Config, events: list[Event]) -> None:
    async with AsyncProducer(client, config) as producer:
        for event in events:
            await producer.publish("tasks", event)


def run_once(url: str, count: int, single: int) -> dict[str, float]:
    """One run of every row, each on a fresh prefix; returns events/s per row, and µs of
    CPU an event in this process (`<row> cpu`) and in Redis (`<row> redis cpu`)."""
    results: dict[str, float] = {}
    sync_client = redis.Redis.from_url(url)
    events, few = make_events(count), make_events(single)
    identified = with_ids(events)

    def fresh(read_model: bool = False) -> tuple[Keys, Config]:
        keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
        create_stream(sync_client, keys, "tasks", SHARDS)
        streams = {"tasks": StreamSpec("tasks", SHARDS, "tasks")}
        models = {"tasks": MODEL} if read_model else {}
        config = Config(streams=streams, tables={"tasks": TASKS}, prefix=keys.prefix)
        return keys, dataclasses.replace(config, read_models=models)

    def clean(keys: Keys) -> None:
        for key in sync_client.scan_iter(match=f"{keys.prefix}:*", count=1000):
            sync_client.unlink(key)

    def redis_cpu() -> float:
        info = sync_client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def timed(
        name: str, n: int, work: Callable[[Keys, Config], Any], read_model: bool = False
    ) -> None:
        keys, config = fresh(read_model)
        server, client, started = redis_cpu(), time.process_time(), time.perf_counter()
        work(keys, config)
        results[name] = n / (time.perf_counter() - started)
        results[f"{name} cpu"] = 1e6 * (time.process_time() - client) / n
        results[f"{name} redis cpu"] = 1e6 * (redis_cpu() - server) / n
        assert sum(sync_client.xlen(keys.shard("tasks", s)) for s in range(SHARDS)) == n
        clean(keys)

    def in_loop(make: Callable[[aredis.Redis], Coroutine[Any, Any, None]]) -> None:
        async def main() -> None:
            client = aredis.Redis.from_url(url)
            try:
                await make(client)
            finally:
                await client.aclose()

        asyncio.run(main())

    def asyncio_rows(evs: list[Event]) -> Callable[[Keys, Config], None]:
        return lambda k, c: in_loop(lambda a: asyncio_producer(a, c, evs))

    # rows compared in the summary run one after the other (the load drifts)
    timed("sync pipeline", count, lambda k, c: sync_pipeline(sync_client, k, events))
    timed("sync pipeline, hash", count, lambda k, c: sync_pipeline_hash(sync_client, k, events))
    timed("asyncio producer", count, asyncio_rows(events))
    timed("asyncio producer, ids", count, asyncio_rows(identified))
    timed("asyncio producer, read model", count, asyncio_rows(events), read_model=True)
    producer = lambda k, c: sync_producer(sync_client, c, events)  # noqa: E731
    timed("sync producer", count, producer)
    timed("sync producer, read model", count, producer, read_model=True)
    timed("awaited XADD", single, lambda k, c: in_loop(lambda a: awaited_xadd(a, k, few)))
    timed("awaited publish", single, lambda k, c: in_loop(lambda a: awaited_publish(a, c, few)))
    sync_client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--single", type=int, default=5_000, help="events of one-coroutine rows")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    runs = [run_once(args.redis_url, args.events, args.single) for _ in range(args.runs)]
    median = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    print(
        f"\n{args.events} events ({args.single} for one-coroutine rows), {SHARDS} shards, "
        f"median of {args.runs} runs\n"
    )
    head = f"| {'row':<28} | {'events/s':>10} | {'min':>10} | {'max':>10} |"
    print(f"{head} client CPU µs/event | Redis CPU µs/event |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 21}|{'-' * 20}|")
    for name, value in median.items():
        if name.endswith(" cpu"):
            continue
        low, high = min(r[name] for r in runs), max(r[name] for r in runs)
        cpu, server = median[f"{name} cpu"], median[f"{name} redis cpu"]
        print(
            f"| {name:<28} | {value:>10,.0f} | {low:>10,.0f} | {high:>10,.0f} "
            f"| {cpu:>19.2f} | {server:>18.2f} |"
        )
    print("\nratios within each run (the machine's load drifts between runs), median (min-max):")
    ratios = [
        ("asyncio producer / sync pipeline", "asyncio producer", "sync pipeline", ">= 0.80"),
        (
            "asyncio producer, ids / sync pipeline",
            "asyncio producer, ids",
            "sync pipeline",
            ">= 0.80",
        ),
        ("awaited publish / awaited XADD", "awaited publish", "awaited XADD", ">= 1.00"),
    ]
    for label, top, bottom, target in ratios:
        each = sorted(r[top] / r[bottom] for r in runs)
        mid = statistics.median(each)
        print(f"  {label:<40} {mid:.2f} ({each[0]:.2f}-{each[-1]:.2f})  target {target}")
    for row, model_row, target in (
        ("sync pipeline", "sync pipeline, hash", "(redis-py, no validation: the floor)"),
        ("sync producer", "sync producer, read model", "target < 25%"),
        ("asyncio producer", "asyncio producer, read model", "target < 25%"),
    ):
        each = sorted(1 - r[model_row] / r[row] for r in runs)
        mid = statistics.median(each)
        what = "a hash and TTL per XADD cost" if row == "sync pipeline" else "the read model costs"
        print(
            f"  {row}: {what} {100 * mid:.0f}% "
            f"({100 * each[0]:.0f}-{100 * each[-1]:.0f}%)  {target}"
        )
        plain = [r[f"{row} cpu"] + r[f"{row} redis cpu"] for r in runs]
        model = [r[f"{model_row} cpu"] + r[f"{model_row} redis cpu"] for r in runs]
        each = sorted(1 - off / on for off, on in zip(plain, model, strict=True))
        print(
            f"    in CPU (client + Redis, what bounds a busy machine): "
            f"{100 * statistics.median(each):.0f}% ({100 * each[0]:.0f}-{100 * each[-1]:.0f}%)"
        )
        if row == "sync producer":  # client then Redis, one after the other
            alone = sorted(
                1
                - (r[f"{row} cpu"] + r[f"{row} redis cpu"])
                / (r[f"{row} cpu"] + r[f"{model_row} redis cpu"])
                for r in runs
            )
            print(
                f"    its Redis work alone, were the client's free: "
                f"{100 * statistics.median(alone):.0f}% "
                f"({100 * alone[0]:.0f}-{100 * alone[-1]:.0f}%)"
            )


if __name__ == "__main__":
    main()
