"""Each owned shard's measurements, kept in Redis for `status` and the status page.

A worker with its HTTP endpoint on writes one JSON document per owned shard every
second (what its runner counted, its hot keys); `status` reads them. They expire soon
after the worker stops writing, so a gone worker's numbers do not linger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from streamsink.streams.connection import AsyncClient, SyncClient
from streamsink.streams.keys import Keys

TELEMETRY_TTL_S = 10
"""A shard's document outlives the last write of its owner this long."""


async def publish_telemetry(
    client: AsyncClient,
    keys: Keys,
    stream: str,
    group: str,
    documents: Mapping[int, Mapping[str, Any]],
) -> None:
    """Write the documents of the shards (by number) this worker owns, in one round trip."""
    if not documents:
        return
    async with client.pipeline(
        transaction=False
    ) as pipe:  # reset on exit: never left holding a connection
        for shard, document in documents.items():
            pipe.set(
                keys.telemetry(stream, shard, group), orjson.dumps(document), ex=TELEMETRY_TTL_S
            )
        await pipe.execute()


def read_telemetry(
    client: SyncClient, keys: Keys, stream: str, group: str, shards: int
) -> Sequence[dict[str, Any] | None]:
    """Each shard's last document (None where no worker wrote one lately)."""
    pipe = client.pipeline(transaction=False)  # not MGET: each shard has its own slot
    for shard in range(shards):
        pipe.get(keys.telemetry(stream, shard, group))
    raw: list[bytes | None] = pipe.execute()
    return [None if value is None else orjson.loads(value) for value in raw]
