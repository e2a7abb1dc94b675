"""`streamsink offsets reset`: line Redis up again with the offsets the sinks committed.

After Redis lost data (consumers/recovery.py stops the group, naming this), the reset
raises what Redis holds back above what the PostgreSQL sinks committed: the stream's
shard count, each shard's lease epoch counter (and the stored epochs with it: one past
them), its last generated ID (so new entries come after every offset) and the group's
last delivered ID. Running it again, or on a group that lost nothing, changes nothing.
Entries a shard already holds at or below an offset are the one thing it cannot decide
alone: applied before the loss (Redis restored from a backup), or published since (Redis
came back empty, on a clock behind the old one)? The operator says which (`BelowOffset`);
only `APPLY` moves anything back (those offsets, and the group to the shard's start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from streamsink.errors import ConfigError, ShardCountMismatch
from streamsink.schemas.config import Config
from streamsink.schemas.wire import parse_id
from streamsink.sinks.postgres.offsets import START, Position, Slot, reset_offset, stream_offsets
from streamsink.sinks.postgres.pool import PostgresSettings
from streamsink.streams.admin import create_stream
from streamsink.streams.keys import META_SHARDS, Keys
from streamsink.streams.recovery import ShardFacts, entries_up_to, read_shard_facts, realign

if TYPE_CHECKING:
    from streamsink.streams.connection import SyncClient


class BelowOffset(Enum):
    """What to do with entries a shard already holds at or below a committed offset."""

    APPLY = "apply"  # Redis came back empty: they were published since; the offsets go back
    SKIP = "skip"  # Redis was restored from a backup: they were applied before the loss


@dataclass(slots=True)
class ShardReset:
    """One shard of a reset: what Redis holds, what the group's sinks committed, what changes."""

    shard: int
    facts: ShardFacts
    commits: dict[str, Position]  # the group's sinks' offsets on the shard
    others: str  # the highest offset the other groups' sinks committed on the shard
    below: int  # entries in the shard at or below the group's highest offset (up to 1001)
    rewind: list[str] = field(default_factory=list)  # sinks whose offsets go back to START
    skip: bool = False  # the entries at or below the offsets are taken as applied

    def top(self) -> str:
        """The group's highest offset on the shard once the rewinds are done."""
        kept = [p.last_id for s, p in self.commits.items() if s not in self.rewind]
        return max(kept, key=parse_id, default=START)

    def epoch(self) -> int | None:
        """The lease epoch the reset takes if Redis' counter fell below the stored epochs:
        one past them, stored too, so that their owners (a worker paused since before the
        loss among them) can no longer commit. None if the counter is not behind."""
        stored = max((p.epoch for p in self.commits.values()), default=0)
        return stored + 1 if stored > self.facts.epoch else None

    def positions(self) -> dict[str, Position]:
        """The sinks' offsets once reset, for those that change."""
        epoch, changed = self.epoch(), {}
        for sink, seen in self.commits.items():
            now = Position(START if sink in self.rewind else seen.last_id, epoch or seen.epoch)
            if now != seen:
                changed[sink] = now
        return changed

    def changes(self) -> list[str]:
        """What the reset changes on this shard, one line each."""
        facts, top, lines = self.facts, self.top(), []
        floor = max(top, self.others, key=parse_id)
        if self.epoch() is not None:
            lines.append(
                f"lease epoch counter {facts.epoch} -> {self.epoch()}, above the stored epochs"
            )
        if not facts.exists and (self.commits or floor != START):
            lines.append("create the shard's stream")
        if parse_id(facts.last_id) < parse_id(floor):
            lines.append(
                f"last generated ID {facts.last_id} -> {floor}: new entries come after every "
                "committed offset"
            )
        if not self.commits:  # nothing to be behind of: a worker makes the group at start
            return lines
        if not facts.grouped:
            lines.append(f"create the consumer group at {top}")
        elif parse_id(facts.delivered) < parse_id(top) or (self.rewind and facts.delivered != top):
            lines.append(f"consumer group's last delivered ID {facts.delivered} -> {top}")
        for sink, now in self.positions().items():
            seen = self.commits[sink]
            if now.epoch != seen.epoch:
                lines.append(
                    f"sink {sink!r}: stored epoch {seen.epoch} -> {now.epoch}: an owner from "
                    "before the loss can no longer commit"
                )
            if now.last_id != seen.last_id:
                lines.append(
                    f"sink {sink!r}: offset {seen.last_id} -> {now.last_id}: the entries the "
                    "shard holds are applied"
                )
        if self.skip:
            lines.append(f"{self._count()} entries at or below {top} are taken as applied")
        return lines

    def _count(self) -> str:
        return "over 1000" if self.below > 1000 else str(self.below)

    def question(self) -> str:
        """Why the operator must choose `--below-offset` for this shard."""
        top = max((p.last_id for p in self.commits.values()), key=parse_id)
        return (
            f"shard {self.shard}: {self._count()} entries in the shard are at or below the "
            f"committed offset {top}: applied before the loss, or published since?"
        )


@dataclass(slots=True)
class ResetPlan:
    """What `streamsink offsets reset` changes for one group of one stream."""

    stream: str
    group: str
    shards: int
    stream_known: bool  # the stream's shard count is in Redis
    per_shard: list[ShardReset]
    choice: BelowOffset | None

    def undecided(self) -> list[ShardReset]:
        """Shards holding entries at or below an offset, with no choice made for them."""
        return [s for s in self.per_shard if s.below and self.choice is None]

    def changes(self) -> list[str]:
        """Every change, one line each."""
        lines = []
        if not self.stream_known:
            lines.append(f"stream {self.stream}: record it again with {self.shards} shards")
        for shard in self.per_shard:
            lines += [f"shard {shard.shard}: {line}" for line in shard.changes()]
        return lines


def _settings(config: Config) -> dict[str, PostgresSettings]:
    """The PostgreSQL sinks of the config, by name."""
    return {
        name: PostgresSettings.from_options(name, spec.options, config.postgres_dsn)
        for name, spec in config.sinks.items()
        if spec.type == "postgres"
    }


def plan_reset(
    client: SyncClient,
    keys: Keys,
    config: Config,
    stream: str,
    group: str,
    choice: BelowOffset | None = None,
) -> ResetPlan:
    """What a reset of `group` on `stream` would change, reading Redis and PostgreSQL."""
    spec, reader = config.streams.get(stream), config.groups.get(group)
    if spec is None or reader is None or reader.stream != stream:
        raise ConfigError(f"the config has no group {group!r} reading stream {stream!r}")
    recorded = client.hget(keys.meta(stream), META_SHARDS)
    if recorded is not None and int(recorded) != spec.shards:
        raise ShardCountMismatch(
            f"stream {stream!r} has {int(recorded)} shards in Redis, the config says {spec.shards}"
        )
    offsets = stream_offsets(_settings(config).values(), stream)
    plan = ResetPlan(stream, group, spec.shards, recorded is not None, [], choice)
    for shard in range(spec.shards):
        mine = {
            slot.sink: position
            for slot, position in offsets.items()
            if slot.shard == shard and slot.group == group and slot.sink in reader.sinks
        }
        others = [
            p.last_id
            for s, p in offsets.items()
            if s.shard == shard and (s.group, s.sink) not in {(group, name) for name in mine}
        ]
        facts = read_shard_facts(client, keys, stream, shard, group)
        top = max((p.last_id for p in mine.values()), key=parse_id, default=START)
        below = entries_up_to(client, keys, stream, shard, top) if top != START else 0
        reset = ShardReset(shard, facts, mine, max(others, key=parse_id, default=START), below)
        if below and choice is BelowOffset.APPLY:
            reset.rewind = sorted(s for s, p in mine.items() if p.last_id != START)
        reset.skip = bool(below) and choice is BelowOffset.SKIP
        plan.per_shard.append(reset)
    return plan


def apply_reset(client: SyncClient, keys: Keys, config: Config, plan: ResetPlan) -> None:
    """Make the plan's changes: PostgreSQL offsets first (new epoch, rewound), then Redis.

    Running it again after a failure half-way is safe: the plan is read again, and
    what was done already is no change any more.
    """
    if plan.undecided():
        raise ValueError(
            "some shards hold entries at or below their offsets: choose --below-offset"
        )
    settings = _settings(config)
    for shard in plan.per_shard:
        for sink, now in shard.positions().items():
            slot = Slot(sink, plan.group, plan.stream, shard.shard)
            if not reset_offset(settings[sink], slot, shard.commits[sink], now):
                raise ValueError(
                    f"shard {shard.shard}: sink {sink!r} committed meanwhile; stop the workers of "
                    f"group {plan.group!r} and run the reset again"
                )
    if not plan.stream_known:
        create_stream(client, keys, plan.stream, plan.shards)
    for shard in plan.per_shard:
        top = shard.top()
        realign(
            client,
            keys,
            plan.stream,
            shard.shard,
            plan.group,
            epoch=shard.epoch() or 0,
            stream_floor=max(top, shard.others, key=parse_id),
            group_floor=top if shard.commits else None,
            deliver_again=bool(shard.rewind),
        )
