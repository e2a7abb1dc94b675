"""After Redis lost data: the worker finds out and stops the group, naming the fix.

Whenever it takes a shard (and when a shard is fenced or its group vanishes under it),
the worker compares what Redis holds (streams/recovery.py) with what the group's sinks
committed (`Committed`, from sinks that keep offsets: PostgreSQL). Redis behind means
Redis lost data, and the group stops with one line naming `streamsink offsets reset`
(ops/reset.py; README, "Recovery").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from streamsink.consumers.writing import SINK_TRANSIENT
from streamsink.errors import RedisDataLost
from streamsink.sinks.base import Committed, Sink
from streamsink.streams.keys import Keys
from streamsink.streams.recovery import ShardFacts, shard_facts
from streamsink.streams.retry import retrying

if TYPE_CHECKING:
    from streamsink.streams.connection import AsyncClient


def reset_command(stream: str, group: str) -> str:
    """The command line an operator runs after a Redis data loss."""
    return f"streamsink offsets reset --config FILE --stream {stream} --group {group}"


def lost_message(stream: str, group: str, shard: int, reason: str) -> str:
    """The one line the worker stops the group with."""
    return (
        f"Redis lost data of group {group!r} on stream {stream!r} (shard {shard}: {reason}): "
        "it was restarted without persistence, restored from an older backup, or keys were "
        f"deleted; run `{reset_command(stream, group)}` to see what a reset changes, again "
        "with --yes to make the changes, then restart the worker (unless another deployment "
        "keeps offsets of the same sink, group and stream in this database: then give one "
        "its own offsets_schema, and reset nothing)"
    )


def lost(facts: ShardFacts, commits: Mapping[str, Committed], expected: bool) -> str | None:
    """Why Redis is behind what the sinks committed on a shard; None if it is not.

    `expected`: the worker created the stream's groups at start, so the stream and the
    group must be there even where no sink keeps offsets.
    """
    if not facts.stream_known and (expected or commits):
        return "the stream's shard count is gone from Redis"
    if expected and not facts.grouped:
        return "the consumer group is gone from the shard"
    for sink, commit in sorted(commits.items()):
        why = facts.behind(commit.last_id, commit.epoch)
        if why is not None:
            return (
                f"sink {sink!r} committed {commit.last_id} under lease epoch {commit.epoch}; {why}"
            )
    return None


async def committed(
    sinks: Mapping[str, Sink], group: str, stream: str
) -> dict[str, dict[int, Committed]]:
    """What each sink that keeps offsets has committed of `group`, by sink and shard.

    Retried while a sink is away; SinkMisconfigured is raised (the group stops).
    """
    found: dict[str, dict[int, Committed]] = {}
    for name, sink in sinks.items():
        read = getattr(sink, "committed", None)
        if read is not None:
            found[name] = await retrying(
                lambda read=read: read(group, stream),  # type: ignore[misc]
                f"offsets of {name}",
                SINK_TRANSIENT,
            )
    return found


def on_shard(commits: Mapping[str, Mapping[int, Committed]], shard: int) -> dict[str, Committed]:
    """The commits of one shard, by sink."""
    return {sink: rows[shard] for sink, rows in commits.items() if shard in rows}


async def check_shard(
    client: AsyncClient,
    keys: Keys,
    stream: str,
    shard: int,
    group: str,
    commits: Mapping[str, Committed],
    expected: bool = False,
) -> None:
    """RedisDataLost, naming the reset command, if Redis is behind the commits of `shard`."""
    facts = await retrying(lambda: shard_facts(client, keys, stream, shard, group), "read shard")
    reason = lost(facts, commits, expected)
    if reason is not None:
        raise RedisDataLost(lost_message(stream, group, shard, reason))
