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

# XINFO's flat replies: the value after `name`. Shared by both scripts.
_FIELD = """
local function field(list, name)
  for i = 1, #list, 2 do
    if list[i] == name then return list[i + 1] end
  end
  return nil
end
"""

# KEYS: shard stream, epoch counter. ARGV: group.
# {stream exists (0/1), last generated ID, group exists (0/1), last delivered ID, epoch}
_FACTS = (
    _FIELD
    + """
local epoch = redis.call('GET', KEYS[2]) or '0'
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, '0-0', 0, '0-0', epoch} end
local last = field(redis.call('XINFO', 'STREAM', KEYS[1]), 'last-generated-id')
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == ARGV[1] then
    return {1, last, 1, field(group, 'last-delivered-id'), epoch}
  end
end
return {1, last, 0, '0-0', epoch}
"""
)

# KEYS: shard stream, epoch counter. ARGV: group, epoch floor, stream floor, group floor
# ('' to leave the group alone), '1' to set the group's last delivered ID to its floor even
# if that lowers it ('' not).
# Raises each to at least its floor in one step (a producer's XADD or a worker's INCR in
# between cannot be undone): the epoch counter; the stream's last generated ID (XSETID,
# the stream made if missing), so that new entries come after every offset; the group's
# last delivered ID (made at the floor if missing).
_REALIGN = (
    _FIELD
    + """
local function before(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] == '' and ARGV[3] == '0-0' then return 0 end
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
local last = field(redis.call('XINFO', 'STREAM', KEYS[1]), 'last-generated-id')
if before(last, ARGV[3]) then redis.call('XSETID', KEYS[1], ARGV[3]) end
if ARGV[4] == '' then return 1 end
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(group, 'name') == ARGV[1] then
    if ARGV[5] == '1' or before(field(group, 'last-delivered-id'), ARGV[4]) then
      redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[4])
    end
    return 1
  end
end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[4])
return 1
"""
)


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
    reply = await client.eval(_FACTS, 2, *_keys(keys, stream, shard, group), group)
    return _facts(known, reply)


def read_shard_facts(
    client: SyncClient, keys: Keys, stream: str, shard: int, group: str
) -> ShardFacts:
    """`shard_facts` with a synchronous client (the command line's view)."""
    known = client.hget(keys.meta(stream), META_SHARDS)
    reply = client.eval(_FACTS, 2, *_keys(keys, stream, shard, group), group)
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
    client.eval(_REALIGN, 2, *_keys(keys, stream, shard, group), *args)
