"""The read model's repopulation (`Rows`) runs by SHA in a pipeline: on NOSCRIPT it loads
the script and runs the pipeline again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis

from streamsink.schemas import Config, StreamSpec
from streamsink.schemas.readmodel import Row
from streamsink.schemas.table import Table
from streamsink.streams import Keys, Rows, create_stream
from streamsink.streams.scripts import lua
from tests.conftest import RedisServer
from tests.sinks.postgres.test_read_model import JOBS, MODEL


def test_a_miss_after_a_flushed_script_cache_loads_the_script_and_repopulates(
    redis_server: RedisServer, keys: Keys
) -> None:
    """(A Redis of its own: flushing the shared one's script cache would break the scripts
    of tests running alongside.)"""
    r = redis.Redis.from_url(redis_server.url)
    config = Config(
        prefix=keys.prefix,
        streams={"jobs": StreamSpec("jobs", 2, table="jobs")},
        tables={"jobs": JOBS},
        read_models={"jobs": MODEL},
    )
    create_stream(r, keys, "jobs", 2)
    asked: list[Sequence[Any]] = []

    def fallback(table: Table, values: Sequence[Any]) -> Mapping[str, Row]:
        asked.append(values)
        return {"1": {"id": 1, "status": "success", "n": 5}}

    try:
        r.script_flush()
        rows = Rows(r, config, fallback)
        assert rows.read("jobs", 1) is not None
        assert r.script_exists(lua("rows.repopulate").sha) == [True]
        assert Rows(r, config).read("jobs", 1) == rows.read("jobs", 1)  # from Redis now
        assert asked == [[1]]
    finally:
        r.close()
