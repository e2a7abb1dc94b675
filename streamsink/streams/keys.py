"""Every Redis key streamsink uses, in one place.

Keys of one shard share the hash tag `{stream:shard}`, so a shard's stream, its
idempotency keys and (later) its leases live in one Redis Cluster slot and one Lua
script may touch them all; shards spread over the cluster's nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamsink.schemas.config import DEFAULT_PREFIX


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (tests use a unique prefix each, so they run in parallel)."""

    prefix: str = DEFAULT_PREFIX

    def index(self) -> str:
        """SET of the names of every created stream (for listing and status)."""
        return f"{self.prefix}:streams"

    def meta(self, stream: str) -> str:
        """HASH of a stream: `shards` (fixed at creation) and `created_ms`."""
        return f"{self.prefix}:{{{stream}}}:meta"

    def shard(self, stream: str, shard: int) -> str:
        """STREAM holding the entries of one shard."""
        return f"{self.prefix}:{{{stream}:{shard}}}:events"

    def ids(self, stream: str, shard: int) -> str:
        """ZSET of the shard's idempotency-id buckets: member `<width>:<number>`, score the
        expiry (ms) of the HASH `<this key>:<width>:<number>`, which maps each id first
        published in that bucket of time to its entry ID.

        A bucket is `width` ms of Redis' clock (`TIME`), the width the power of two in
        [ttl / 2, ttl) of the publisher's dedup TTL, and the hash expires `ttl` after the
        bucket ends: an id is remembered at least `ttl`, at most `ttl + width` (< 2 ttl). A
        publish looks its ids up in every live bucket this index lists, whatever their width,
        so publishers with different TTLs find each other's ids.
        """
        return f"{self.prefix}:{{{stream}:{shard}}}:ids"

    def dedup_prefix(self, stream: str, shard: int) -> str:
        """Prefix of STRING keys `<prefix><id>` holding the entry ID of an idempotent publish,
        with the dedup TTL: how ids were remembered before the `ids` buckets. Producers still
        read them (never write them), so a retry across an upgrade, or an id published by
        the old one-key script, is found until the key expires."""
        return f"{self.prefix}:{{{stream}:{shard}}}:dedup:"

    def row(self, stream: str, shard: int, table: str, key: str) -> str:
        """HASH of the read model: the merged state of `key`'s row of `table`, written by
        the publish script with the XADD (same slot); fields per `schemas.readmodel`, the
        expiry chosen by the row's status."""
        return f"{self.row_prefix(stream, shard)}{table}:{key}"

    def row_prefix(self, stream: str, shard: int) -> str:
        """Prefix of the read model's HASH keys of a shard: `<prefix><table>:<key>`."""
        return f"{self.prefix}:{{{stream}:{shard}}}:row:"

    def lease(self, stream: str, shard: int, group: str) -> str:
        """STRING: id of the worker owning (group, shard), with the lease TTL as its expiry."""
        return f"{self.prefix}:{{{stream}:{shard}}}:lease:{group}"

    def epoch(self, stream: str, shard: int, group: str) -> str:
        """STRING counter: fencing epoch of (group, shard), +1 at each new owner; never expires."""
        return f"{self.prefix}:{{{stream}:{shard}}}:epoch:{group}"

    def dead(self, stream: str, shard: int, group: str) -> str:
        """STREAM of dead letters of (group, shard): entries that cannot be applied, with why.

        Same slot as the shard, so moving an entry here and acknowledging it is one script.
        """
        return f"{self.prefix}:{{{stream}:{shard}}}:dead:{group}"

    def applied(self, stream: str, shard: int, group: str) -> str:
        """STRING: the newest entry ID of the shard that (group) has committed to every sink
        and acknowledged (the watermark `wait until applied` blocks on); set by the fenced
        acknowledgement, so it only moves forward under the current lease."""
        return f"{self.prefix}:{{{stream}:{shard}}}:applied:{group}"

    def suspects(self, stream: str, shard: int, group: str) -> str:
        """HASH of (group, shard): entry ID -> tries of an entry delivered too often, applied
        alone; a field is removed once its entry is acknowledged or dead-lettered."""
        return f"{self.prefix}:{{{stream}:{shard}}}:suspects:{group}"

    def state(self, stream: str, shard: int, group: str) -> str:
        """HASH of (group, shard) as its owner runs it, for status: `state` (running,
        retrying, stopped), `since_ms`, `error` (the last one, while retrying or stopped),
        `worker` and `epoch` of the owner that wrote it; trust it only while that worker
        holds the lease."""
        return f"{self.prefix}:{{{stream}:{shard}}}:state:{group}"

    def telemetry(self, stream: str, shard: int, group: str) -> str:
        """STRING: JSON of what the owner of (group, shard) measured (counts, hot keys), for
        `status` and the page; written each second by a worker whose HTTP endpoint is on,
        expires a few seconds after it stops (streams/telemetry.py)."""
        return f"{self.prefix}:{{{stream}:{shard}}}:telemetry:{group}"

    def workers(self, stream: str, group: str) -> str:
        """ZSET of live workers of a group: member = worker id, score = heartbeat expiry (ms)."""
        return f"{self.prefix}:{{{stream}}}:workers:{group}"

    def rate(self, name: str) -> str:
        """HASH of one shared rate limit (GCRA): `tat` theoretical arrival time, `last` start,
        `hold` not-before (a Retry-After), all µs on Redis' clock; expires once idle.

        `name` is a hash tag, so the limit's two keys share a slot (one script uses both).
        """
        return f"{self.prefix}:rate:{{{name}}}"

    def rate_window(self, name: str) -> str:
        """ZSET of the sends of a rate limit in the last second: member = a send, score = when
        it was done, or (in flight) its start plus its timeout, µs on Redis' clock."""
        return f"{self.prefix}:rate:{{{name}}}:sends"

    def http_endpoints(self, sink: str) -> str:
        """HASH of an HTTP sink's endpoints: `<endpoint>|<counter>` -> count (sent, failed,
        retried, dead) and `<endpoint>|breaker` -> `state ms worker`; kept for `status`."""
        return f"{self.prefix}:http:{sink}:endpoints"

    def http_delivered(self, stream: str, shard: int, group: str, sink: str) -> str:
        """SET of the entry IDs of (group, shard) whose callbacks an HTTP sink delivered and
        whose window may not be acknowledged yet: a new owner skips them (a crash repeats
        only what was in flight). IDs below a newer window's first are removed by it."""
        return f"{self.prefix}:{{{stream}:{shard}}}:delivered:{group}:{sink}"

    def http_gate(self, sink: str, endpoint: str) -> str:
        """HASH of one endpoint's shared circuit breaker and Retry-After hold, for every
        worker of an HTTP sink (`endpoint`: a digest of its name): `failures` in a row,
        `last` failure, `until` (open until, µs on Redis' clock; absent: closed), `probe`
        (a half-open probe is out until, µs), `hold` (Retry-After: nothing before, µs).
        Expires a day after its last change (a forgotten endpoint leaves nothing)."""
        return f"{self.prefix}:http:{sink}:gate:{endpoint}"


META_SHARDS = b"shards"  # field of the meta hash: shard count
META_CREATED = b"created_ms"  # field of the meta hash: creation time, ms
