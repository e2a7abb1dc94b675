"""Write docs/wire-vectors.json: language-neutral test vectors of the wire format.

A service in another language checks its publisher against these: the shard of a key
and the exact stream fields of an event. tests/schemas/test_vectors.py checks that the
file and this script agree with streamsink, so the vectors cannot drift.

    python scripts/make_vectors.py          # rewrite the file
    python scripts/make_vectors.py --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from streamsink.schemas.event import Event
from streamsink.schemas.wire import encode, shard_of
from streamsink.streams.keys import Keys

OUT = Path(__file__).resolve().parent.parent / "docs" / "wire-vectors.json"

SHARD_COUNTS = (1, 4, 16, 64)

CRC32_NOTE = (
    "shard = crc32(utf8(key)) mod shards, where crc32 is CRC-32/IEEE (the zlib, gzip, PNG "
    "and Ethernet CRC): reflected polynomial 0xEDB88320 (0x04C11DB7 unreflected), init "
    "0xFFFFFFFF, input and output reflected, final xor 0xFFFFFFFF, taken as an unsigned "
    "32-bit integer; crc32('123456789') = 0xCBF43926. Python: zlib.crc32 or binascii.crc32; "
    "Node >= 20.15: zlib.crc32; Go: hash/crc32.ChecksumIEEE. The events of shard s of "
    "stream S go to the Redis stream key '<prefix>:{<S>:<s>}:events' (default prefix 'ss'); "
    "the braces are a Redis Cluster hash tag."
)

ABOUT = (
    "Wire test vectors of streamsink, written by scripts/make_vectors.py. An event is one "
    "XADD entry whose fields are, in this order: key, op, data, then table, ts, v, id when "
    "present (readers must ignore fields they do not know and must not depend on order). "
    "data is a JSON object in UTF-8, no NaN or Infinity; the bytes shown are what streamsink "
    "writes (orjson: compact, no spaces, non-ASCII unescaped), a reader compares it as JSON. "
    "ts is milliseconds since the Unix epoch and v a schema version, both decimal integers "
    "in 0..2**63-1. Integers in data may use the signed 64-bit range, written as exact JSON "
    "integers (no fraction, no exponent); the vectors stay within 2**53, which JavaScript's "
    "JSON.parse reads exactly, except the one that shows why. A vector's 'javascript', when "
    "there, is the data JSON.stringify writes for its event: another text of the same event "
    "(a string), or none that is (null). 'dedup' shows an idempotent publish from any "
    "language: one Lua script that returns the entry ID of the first publish of an id."
)

DEDUP_SCRIPT = """\
-- KEYS[1]: the shard's stream; KEYS[2]: <prefix>:{<stream>:<shard>}:ids, the index of the
-- shard's id buckets; KEYS[3]: <prefix>:{<stream>:<shard>}:dedup:<id>, where ids were kept
-- before the buckets (read only). ARGV[1]: how long the id is remembered at least (ms);
-- ARGV[2]: the id; ARGV[3..]: field, value, field, value, ... (the id among them)
local ttl, id = tonumber(ARGV[1]), ARGV[2]
local first = redis.call('GET', KEYS[3])
if first then
  return first
end
local time = redis.call('TIME')
local now = time[1] * 1000 + math.floor(time[2] / 1000)
local live = redis.call('ZRANGE', KEYS[2], '(' .. string.format('%d', now), '+inf', 'BYSCORE')
for _, bucket in ipairs(live) do
  first = redis.call('HGET', KEYS[2] .. ':' .. bucket, id)
  if first then
    return first
  end
end
local entry = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
local width = 1
while width * 2 < ttl do width = width * 2 end  -- the power of two in [ttl / 2, ttl)
local number = math.floor(now / width)
local bucket = string.format('%d:%d', width, number)
local ends = string.format('%d', (number + 1) * width + ttl)
if redis.call('ZADD', KEYS[2], 'GT', ends, bucket) == 1 then  -- a new bucket: a value past 64
  -- bytes (under the field '', which is no id) makes it a hash table, not a listpack
  -- searched field by field
  redis.call('HSET', KEYS[2] .. ':' .. bucket, '', string.rep('-', 65))
end
ends = redis.call('ZSCORE', KEYS[2], bucket)  -- the latest end any publisher gave it
redis.call('HSET', KEYS[2] .. ':' .. bucket, id, entry)
redis.call('PEXPIREAT', KEYS[2] .. ':' .. bucket, ends)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%d', now))
if redis.call('PEXPIRETIME', KEYS[2]) < tonumber(ends) then
  redis.call('PEXPIREAT', KEYS[2], ends)
end
return entry
"""
"""An idempotent publish as a foreign producer writes it: atomic (one script), every key in
the shard's hash slot; streamsink's producers do the same in their batch script (the
buckets are `Keys.ids`)."""

DEDUP_TTL_MS = 3_600_000  # ProducerSettings.dedup_ttl_ms, the Python producers' default

SHARD_KEYS = (
    "a",
    "z",
    "0",
    "1",
    "42",
    "123456789",
    "task:1",
    "task:2",
    "task:1000000",
    "post:42:user:7",
    "user:7",
    "order-2024-0001",
    "The quick brown fox jumps over the lazy dog",
    "key with spaces",
    'tab\tand "quote"',
    "é",
    "café:3",
    "中文",
    "用户:42",
    "🎉",
    "emoji:🚀:7",
    "k" * 200,
)

EVENTS: tuple[dict[str, Any], ...] = (
    {"key": "task:1", "op": "set", "data": {"id": 1, "status": "running", "progress": 40}},
    {
        "key": "用户:42",
        "op": "set",
        "data": {
            "id": 42,
            "name": "Zoë 中文 🎉",
            "note": 'tab\there\nnew line "quoted" back\\slash',
            "ctl": "\x01\x1f",
            "empty": "",
        },
        "table": "users",
        "ts": 1700000000000,
        "v": 2,
        "id": "evt-0001",
    },
    {"key": "post:42", "op": "incr", "data": {"post_id": 42, "views": 1, "likes": -1}},
    {
        "key": "player:7",
        "op": "incr",
        "data": {"id": 7, "score": 2.5, "balance": -0.125},
        "ts": 1714564800123,
    },
    {"key": "post:42:user:7", "op": "del", "data": {"post_id": 42, "user_id": 7}},
    {
        "key": "user:7",
        "op": "append",
        "data": {
            "user_id": 7,
            "action": "login",
            "at": "2024-05-01T12:00:00+00:00",
            "meta": {"ip": "203.0.113.5", "tags": ["a", "b"], "ok": True, "none": None},
        },
        "table": "activity_log",
        "v": 1,
    },
    {
        "key": "order:99",
        "op": "call",
        "data": {
            "url": "https://example.com/hooks/order",
            "payload": {"order": 99, "status": "paid", "total": 12.5},
            "headers": {"X-Tenant": "acme"},
            "coalesce": "order:99",
        },
        "ts": 1714564800000,
        "id": "order-99-paid",
    },
    {"key": "webhook:1", "op": "call", "data": {"url": "https://example.com/h", "payload": None}},
    {
        "key": "product:3",
        "op": "set",
        "data": {"id": 3, "price": 2.0, "weight": 0.25},
        "javascript": '{"id":3,"price":2,"weight":0.25}',
        "note": "a float with a zero fraction: streamsink writes 2.0, JavaScript 2; a float "
        "column takes both as the same value (an int column refuses 2.0: write integers "
        "without a fraction or an exponent)",
    },
    {
        "key": "account:9007199254740993",
        "op": "incr",
        "data": {"id": 9007199254740993, "balance": -9007199254740993},
        "javascript": None,
        "note": "integers beyond 2**53 (up to the signed 64-bit range) must be sent as exact "
        "JSON integers: JavaScript's JSON.parse and JSON.stringify round 9007199254740993 to "
        "9007199254740992, another row; write such integers' digits from a BigInt or a string",
    },
)

DEDUP = {"prefix": "ss", "stream": "orders", "shards": 4, "id": "order-99-paid"}
"""The de-duplicated publish: the event of EVENTS with this id, on a stream of 4 shards."""

_NOTES = ("javascript", "note")

STREAM_KEY_EXAMPLES = (("ss", "tasks", "task:1", 4), ("app1", "likes", "post:42:user:7", 16))


def event_of(spec: dict[str, Any]) -> Event:
    """The Event a vector describes (its `v` is the event's `version`; notes aside)."""
    extra = {"table": spec.get("table"), "ts": spec.get("ts"), "version": spec.get("v")}
    return Event.make(spec["key"], spec["op"], spec["data"], id=spec.get("id"), **extra)


def build() -> dict[str, Any]:
    """The whole vector document, from streamsink's own functions."""
    shards = [
        {
            "key": key,
            "crc32": shard_of(key, 2**32),
            "shards": {str(n): shard_of(key, n) for n in SHARD_COUNTS},
        }
        for key in SHARD_KEYS
    ]
    events = []
    for spec in EVENTS:
        event = {name: value for name, value in spec.items() if name not in _NOTES}
        notes = {name: spec[name] for name in _NOTES if name in spec}
        events.append({"event": event, "fields": _fields(event_of(event)), **notes})
    stream_keys = []
    for prefix, stream, key, count in STREAM_KEY_EXAMPLES:
        shard = shard_of(key, count)
        stream_keys.append(
            {
                "prefix": prefix,
                "stream": stream,
                "key": key,
                "shards": count,
                "redis_key": Keys(prefix).shard(stream, shard),
            }
        )
    return {
        "about": ABOUT,
        "crc32": CRC32_NOTE,
        "stream_keys": stream_keys,
        "shards": shards,
        "events": events,
        "dedup": _dedup(),
    }


def _fields(event: Event) -> list[list[str]]:
    flat = encode(event)
    return [[n.decode(), v.decode()] for n, v in zip(flat[::2], flat[1::2], strict=True)]


def _dedup() -> dict[str, Any]:
    """An idempotent publish: the script, its keys and arguments, what Redis holds after."""
    prefix, stream, shards = str(DEDUP["prefix"]), str(DEDUP["stream"]), int(DEDUP["shards"])
    spec = next(e for e in EVENTS if e.get("id") == DEDUP["id"])
    event = event_of(spec)
    assert event.id is not None
    keys, shard = Keys(prefix), shard_of(event.key, shards)
    fields = _fields(event)
    return {
        "about": "Publish once whatever the retries: run the script with the three keys and "
        "ARGV = [ttl_ms, id, field, value, ...]; a repeat within ttl_ms adds nothing and "
        "returns the first entry ID. The id is remembered per shard (so per key), at least "
        "ttl_ms and less than twice that, in a hash of ids per bucket of Redis' time that the "
        "shard's index lists; any publisher finds the ids of every other, whatever its ttl_ms. "
        "The Python producers use the same keys, so they de-duplicate against each other.",
        "prefix": prefix,
        "stream": stream,
        "shards": shards,
        "event": spec,
        "keys": [
            keys.shard(stream, shard),
            keys.ids(stream, shard),
            keys.dedup_prefix(stream, shard) + event.id,
        ],
        "argv": [str(DEDUP_TTL_MS), event.id, *(item for pair in fields for item in pair)],
        "ttl_ms": DEDUP_TTL_MS,
        "dedup_value": "in the hash <ids key>:<width>:<number>, field <id>: the entry ID XADD "
        "gave the first publish, e.g. 1714564800000-0",
        "script": DEDUP_SCRIPT,
    }


def render() -> str:
    """The file's exact text: stable key order, UTF-8, short values on one line."""
    return _pretty(build(), 0) + "\n"


def _pretty(value: Any, indent: int) -> str:
    flat = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    if indent + len(flat) <= 96 or not isinstance(value, dict | list) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(k, ensure_ascii=False)}: {_pretty(v, indent + 2)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + _pretty(v, indent + 2) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def main(argv: list[str]) -> int:
    """Write the vectors, or with --check report whether the file is up to date."""
    text = render()
    if "--check" in argv:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python scripts/make_vectors.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
