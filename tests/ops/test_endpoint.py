"""The worker's HTTP endpoint, in this process on the real Redis and PostgreSQL: /metrics
counts exactly what was published and written; /readyz follows PostgreSQL; /healthz stays."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2
import redis
from prometheus_client.parser import text_string_to_metric_families

from streamsink.consumers.worker import Worker, worker_client
from streamsink.ops.http import endpoint
from streamsink.schemas import Config
from streamsink.sinks import build_sinks
from tests.conftest import free_port
from tests.ops.conftest import GROUP, KEYS, PER_KEY, SHARDS, STREAM, Setup, publish_mix, until
from tests.ops.proxy import Proxy

PUBLISHED = KEYS * PER_KEY
README = Path(__file__).resolve().parents[2] / "README.md"
LABELS = {"group", "stream", "shard", "table", "sink", "endpoint", "state", "error_class"}
LABELS |= {"outcome", "status_class", "le"}


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Worker, str]]:
    """A worker of `config` with its endpoint on a free port; drained and closed after."""
    client = worker_client(config.redis_url)
    sinks = build_sinks(config)
    worker = Worker(client, config, sinks, telemetry=True)
    stop = asyncio.Event()
    address = f"127.0.0.1:{free_port()}"
    try:
        async with endpoint(worker, address):
            task = asyncio.create_task(worker.run(stop))
            try:
                yield worker, f"http://{address}"
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        for sink in sinks.values():
            await sink.close()
        await client.aclose()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client, by (name, labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(parsed: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of `name` over the samples carrying `labels`."""
    return sum(
        value
        for (sample, where), value in parsed.items()
        if sample == name and set(labels.items()) <= set(where)
    )


async def test_metrics_count_what_was_published_and_written(setup: Setup, r: redis.Redis) -> None:
    dead_shard = publish_mix(r, setup)
    async with running(setup.config) as (worker, url), aiohttp.ClientSession() as http:

        async def drained() -> bool:
            async with http.get(f"{url}/metrics") as reply:
                parsed = samples(await reply.text())
            return total(parsed, "streamsink_events_read_total") == PUBLISHED + 1 and (
                total(parsed, "streamsink_pending") == 0
                and total(parsed, "streamsink_events_applied_total") == PUBLISHED
            )

        await until(drained, "every entry read and acknowledged")
        async with http.get(f"{url}/metrics") as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            parsed = samples(await reply.text())
        sink = worker.sinks["db"]
    written = sink.stats.by_table["tasks"]  # type: ignore[attr-defined]

    g = {"group": GROUP}
    assert total(parsed, "streamsink_events_read_total", **g) == PUBLISHED + 1
    assert total(parsed, "streamsink_events_applied_total", **g) == PUBLISHED
    assert total(parsed, "streamsink_events_dead_lettered_total", **g) == 1
    assert total(parsed, "streamsink_events_dead_lettered_total", shard=str(dead_shard)) == 1
    # Everything was published before the worker started: one window per shard, so each
    # row is written once.
    assert written == KEYS
    assert total(parsed, "streamsink_rows_written_total", sink="db", table="tasks") == KEYS
    assert total(parsed, "streamsink_table_events_total", table="tasks") == PUBLISHED
    assert total(parsed, "streamsink_table_row_writes_total", table="tasks") == KEYS
    assert total(parsed, "streamsink_writes_saved_total", table="tasks") == PUBLISHED - KEYS
    assert total(parsed, "streamsink_coalescing_ratio", table="tasks") == PER_KEY
    assert total(parsed, "streamsink_batch_events_count") == SHARDS
    assert total(parsed, "streamsink_batch_events_sum") == PUBLISHED
    assert total(parsed, "streamsink_publish_commit_latency_seconds_count") == PUBLISHED
    assert total(parsed, "streamsink_flush_duration_seconds_count") == SHARDS
    assert total(parsed, "streamsink_lag", stream=STREAM) == 0
    assert total(parsed, "streamsink_leases_held", group=GROUP) == SHARDS
    assert total(parsed, "streamsink_group_stopped") == 0
    assert total(parsed, "streamsink_shard_state", state="running") == SHARDS
    for (name, labels), _ in parsed.items():  # bounded labels only: never a key
        assert name.startswith("streamsink_"), name
        assert not {key for key, _ in labels} - LABELS, name
        family = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        assert family.removesuffix("_total") in README.read_text(), f"{name} not in the README"


async def test_readyz_follows_postgresql_and_healthz_stays(
    setup: Setup, r: redis.Redis, database_url: str
) -> None:
    params = psycopg2.extensions.parse_dsn(database_url)
    proxy = Proxy(int(params.get("port", 5432)))
    await proxy.open()
    proxied = psycopg2.extensions.make_dsn(**{**params, "host": "127.0.0.1", "port": proxy.port})
    config = replace(setup.config, postgres_dsn=proxied)
    publish_mix(r, setup)
    try:
        async with running(config) as (worker, url), aiohttp.ClientSession() as http:

            async def probe(path: str) -> tuple[int, Any]:
                async with http.get(f"{url}{path}") as reply:
                    return reply.status, await reply.json()

            async def ready() -> bool:
                return (await probe("/readyz"))[0] == 200

            await until(ready, "ready with PostgreSQL up")
            await proxy.close()

            async def unready() -> bool:
                return (await probe("/readyz"))[0] == 503

            await until(unready, "not ready with PostgreSQL away")
            status, body = await probe("/readyz")
            assert status == 503 and body["ready"] is False
            assert [line for line in body["failed"] if line.startswith("postgresql db")], body
            assert body["checks"]["redis"] == "ok"
            assert (await probe("/healthz"))[0] == 200

            await proxy.open()
            await until(ready, "ready again with PostgreSQL back")
            status, body = await probe("/readyz")
            assert body["checks"]["postgresql db"] == "ok"
            assert (await probe("/healthz"))[0] == 200

            # A group stopped on a configuration error (GroupRunner.stopped) is not ready.
            worker.groups[0].stopped = "SinkMisconfigured: table tasks has no column views"  # type: ignore[attr-defined]
            status, body = await probe("/readyz")
            assert status == 503
            assert body["failed"] == [f"group {GROUP}: stopped: {worker.groups[0].stopped}"]  # type: ignore[attr-defined]
            worker.groups[0].stopped = None  # type: ignore[attr-defined]
    finally:
        await proxy.close()
