"""What Redis holds of a shard for a group, to compare with what the sinks committed; and
lining it up again after Redis lost data (`streamsink offsets reset`).

While Redis keeps its data, four things only ever grow past what a sink has committed:
the shard's last generated entry ID and the group's last delivered ID (the committed
offset is an entry that was generated and delivered), and the lease epoch counter (a
stored epoch was handed out by it). Redis restarted without persistence, restored from
an older backup, or with keys deleted, can have any of them behind: that is how the
worker tells a data loss from a newer owner. `realign` raises them again, never lowers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamsink.schemas.wire import parse_id
from streamsink.streams.connection import AsyncClient, SyncClient
from streamsink.streams.keys import META_SHARDS, Keys
from streamsink.streams.scripts import lua


@dataclass(frozen=True, slots=True)
class ShardFacts:
    """What Redis holds of one shard for one group (with the stream's shard count)."""

    stream_known: bool  # the stream's meta hash records a shard count
    exists: bool  # the shard's stream key
    last_id: str  # the newest entry ID the shard has given out, "0-0" if none
    grouped: bool  # the group exists on the shard
    delivered: str  # the group's last delivered entry ID, "0-0" if no group
    epoch: int  # the lease epoch counter of (group, shard): the last one handed out

    def behind(self, offset: str, epoch: int) -> str | None:
        """Why Redis is behind an offset a sink committed under `epoch`; None if it is not."""
        if epoch > self.epoch:
            return f"its lease epoch counter is {self.epoch}, below epoch {epoch} stored with it"
        if offset == "0-0":
            return None
        if parse_id(self.last_id) < parse_id(offset):
            return f"the shard's newest entry ID is {self.last_id}, below it"
        if not self.grouped:
            return "the consumer group is gone from the shard"
        if parse_id(self.delivered) < parse_id(offset):
            return f"the consumer group was last delivered {self.delivered}, below it"
        return None


def _facts(known: Any, reply: Any) -> ShardFacts:
    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    return ShardFacts(
        stream_known=known is not None,
        exists=bool(int(reply[0])),
        last_id=text(reply[1]),
        grouped=bool(int(reply[2])),
        delivered=text(reply[3]),
        epoch=int(reply[4]),
    )


def _keys(keys: Keys, stream: str, shard: int, group: str) -> list[str]:
    return [keys.shard(stream, shard), keys.epoch(stream, shard, group)]


async def shard_facts(
    client: AsyncClient, keys: Keys, stream: str, shard: int, group: str
) -> ShardFacts:
    """What Redis holds of `shard` for `group` now (the worker's view)."""
    known = await client.hget(keys.meta(stream), META_SHARDS)
    facts = client.register_script(lua("recovery.field", "recovery.facts").text)
    reply = await facts(_keys(keys, stream, shard, group), [group])
    return _facts(known, reply)


def read_shard_facts(
    client: SyncClient, keys: Keys, stream: str, shard: int, group: str
) -> ShardFacts:
    """`shard_facts` with a synchronous client (the command line's view)."""
    known = client.hget(keys.meta(stream), META_SHARDS)
    facts = client.register_script(lua("recovery.field", "recovery.facts").text)
    reply = facts(_keys(keys, stream, shard, group), [group])
    return _facts(known, reply)


def entries_up_to(client: SyncClient, keys: Keys, stream: str, shard: int, last: str) -> int:
    """How many entries the shard holds at or below `last`, counted up to 1001."""
    found: Any = client.xrange(keys.shard(stream, shard), "-", last, count=1001)
    return len(found)


def realign(
    client: SyncClient,
    keys: Keys,
    stream: str,
    shard: int,
    group: str,
    *,
    epoch: int,
    stream_floor: str,
    group_floor: str | None,
    deliver_again: bool = False,
) -> None:
    """Raise the shard's epoch counter, last generated ID and the group's last delivered
    ID to at least these floors (creating the stream and group where missing; the group
    left alone if `group_floor` is None); with `deliver_again`, set the group's last
    delivered ID to its floor even if it is lower."""
    args = (group, epoch, stream_floor, group_floor or "", "1" if deliver_again else "")
    script = client.register_script(lua("recovery.field", "recovery.realign").text)
    script(_keys(keys, stream, shard, group), args)
