"""docs/wire-vectors.json: the script writes it, streamsink agrees with it, and so does Node."""

from __future__ import annotations

import binascii
import dataclasses
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from streamsink.schemas.config import Config, StreamSpec
from streamsink.schemas.event import Op
from streamsink.schemas.wire import decode, encode, shard_of
from streamsink.streams import Producer, ProducerSettings, create_stream
from streamsink.streams.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "docs" / "wire-vectors.json"
DOC: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "scripts/make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_vectors = _script()


def crc32_from_the_note(data: bytes) -> int:
    """CRC-32 written from the parameters the file documents, not from zlib."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_file_is_exactly_what_the_script_writes() -> None:
    assert VECTORS.read_text(encoding="utf-8") == make_vectors.render(), (
        "docs/wire-vectors.json is stale: run python scripts/make_vectors.py"
    )
    assert make_vectors.main(["--check"]) == 0


def test_note_documents_the_function() -> None:
    note = DOC["crc32"]
    for part in ("CRC-32/IEEE", "0xEDB88320", "init 0xFFFFFFFF", "final xor 0xFFFFFFFF"):
        assert part in note
    assert "utf8(key)" in note and "mod shards" in note
    assert "'<prefix>:{<S>:<s>}:events'" in note
    assert crc32_from_the_note(b"123456789") == 0xCBF43926  # the check value the note quotes
    assert "0xCBF43926" in note


def test_vectors_cover_what_they_promise() -> None:
    keys = [v["key"] for v in DOC["shards"]]
    assert len(keys) >= 20 and len(set(keys)) == len(keys) and all(keys)
    assert {"post:42:user:7", "é", "中文", "🎉"} <= set(keys)
    assert all(set(v["shards"]) == {"1", "4", "16", "64"} for v in DOC["shards"])
    assert {v["event"]["op"] for v in DOC["events"]} == {op.value for op in Op}
    assert {"table", "ts", "v", "id"} <= {name for v in DOC["events"] for name in v["event"]}


@pytest.mark.parametrize("vector", DOC["shards"], ids=lambda v: v["key"][:20])
def test_shard_vector(vector: dict[str, Any]) -> None:
    key = vector["key"]
    raw = key.encode("utf-8")
    assert vector["crc32"] == binascii.crc32(raw) == crc32_from_the_note(raw)
    assert shard_of(key, 2**32) == vector["crc32"]
    for count, shard in vector["shards"].items():
        assert shard_of(key, int(count)) == shard == vector["crc32"] % int(count)


@pytest.mark.parametrize("vector", DOC["stream_keys"], ids=lambda v: v["redis_key"])
def test_stream_key_vector(vector: dict[str, Any]) -> None:
    shard = shard_of(vector["key"], vector["shards"])
    assert Keys(vector["prefix"]).shard(vector["stream"], shard) == vector["redis_key"]
    assert vector["redis_key"] == f"{vector['prefix']}:{{{vector['stream']}:{shard}}}:events"


@pytest.mark.parametrize(
    "vector", DOC["events"], ids=lambda v: f"{v['event']['op']}-{v['event']['key']}"
)
def test_event_vector(vector: dict[str, Any]) -> None:
    event = make_vectors.event_of(vector["event"])
    fields = [(name.encode(), value.encode()) for name, value in vector["fields"]]
    assert encode(event) == [item for pair in fields for item in pair]
    assert decode(dict(fields)) == event
    data = dict(vector["fields"])["data"]
    assert json.loads(data) == vector["event"]["data"]
    assert json.dumps(vector["event"]["data"], ensure_ascii=False, separators=(",", ":")) == data


# Node re-derives every vector from the documented rules: a table-driven CRC-32 written from
# the note (and zlib.crc32 where Node has it), the key pattern, and JSON.stringify for data.
NODE_CHECK = r"""
const fs = require("fs");
const zlib = require("zlib");
const doc = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
const TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
const crc32 = (bytes) => {
  let c = 0xffffffff;
  for (const b of bytes) c = TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};
const fail = (what, got, want) => {
  console.error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  process.exitCode = 1;
};
let native = 0;
for (const v of doc.shards) {
  const bytes = Buffer.from(v.key, "utf8");
  const c = crc32(bytes);
  if (c !== v.crc32) fail(`crc32 ${v.key}`, c, v.crc32);
  if (typeof zlib.crc32 === "function") {
    native++;
    if (zlib.crc32(bytes) >>> 0 !== c) fail(`zlib.crc32 ${v.key}`, zlib.crc32(bytes), c);
  }
  for (const [n, s] of Object.entries(v.shards)) {
    if (c % Number(n) !== s) fail(`shard ${v.key} of ${n}`, c % Number(n), s);
  }
}
for (const v of doc.stream_keys) {
  const key = `${v.prefix}:{${v.stream}:${crc32(Buffer.from(v.key, "utf8")) % v.shards}}:events`;
  if (key !== v.redis_key) fail(`stream key ${v.key}`, key, v.redis_key);
}
for (const v of doc.events) {
  const e = v.event;
  const text = v.fields[2][1];
  let written = JSON.stringify(e.data);
  if ("javascript" in v) {  // JavaScript writes another text of the event, or cannot
    if (v.javascript === null ? written === text : written !== v.javascript) {
      fail(`javascript ${e.key}`, written, v.javascript);
    }
    written = text;
  }
  const fields = [["key", e.key], ["op", e.op], ["data", written]];
  if ("table" in e) fields.push(["table", e.table]);
  for (const n of ["ts", "v"]) if (n in e) fields.push([n, String(e[n])]);
  if ("id" in e) fields.push(["id", e.id]);
  if (JSON.stringify(fields) !== JSON.stringify(v.fields)) fail(e.key, fields, v.fields);
}
const d = doc.dedup;
const shard = crc32(Buffer.from(d.event.key, "utf8")) % d.shards;
const tag = `${d.prefix}:{${d.stream}:${shard}}`;
const dedupKeys = [`${tag}:events`, `${tag}:ids`, `${tag}:dedup:${d.event.id}`];
if (JSON.stringify(dedupKeys) !== JSON.stringify(d.keys)) fail("dedup keys", dedupKeys, d.keys);
const counts = [doc.shards.length, doc.stream_keys.length, doc.events.length, native];
console.log(`checked ${counts.join(" ")}`);
"""


def test_node_agrees_with_every_vector() -> None:
    node = shutil.which("node")
    assert node is not None, "node is required for the cross-language check (Node.js >= 20)"
    done = subprocess.run(
        [node, "-e", NODE_CHECK, str(VECTORS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    counts = (len(DOC["shards"]), len(DOC["stream_keys"]), len(DOC["events"]))
    checked = done.stdout.split()
    assert checked[0] == "checked" and tuple(map(int, checked[1:4])) == counts
    assert int(checked[4]) in (0, counts[0])  # zlib.crc32 is in Node >= 20.15 only


def test_vectors_show_what_a_foreign_producer_gets_wrong() -> None:
    notes = {v["event"]["key"]: v for v in DOC["events"] if "note" in v}
    whole = {name.encode(): value.encode() for name, value in notes["product:3"]["fields"]}
    assert whole[b"data"] == b'{"id":3,"price":2.0,"weight":0.25}'
    from_javascript = {**whole, b"data": notes["product:3"]["javascript"].encode()}
    assert decode(from_javascript) == decode(whole)  # 2 and 2.0: one value of a float column
    big = notes["account:9007199254740993"]
    assert big["javascript"] is None
    fields = {name.encode(): value.encode() for name, value in big["fields"]}
    assert decode(fields).data == {"id": 2**53 + 1, "balance": -(2**53) - 1}


def test_dedup_vector_publishes_once_and_agrees_with_the_producer(
    r: redis.Redis, keys: Keys
) -> None:
    vector = DOC["dedup"]
    stream, shards = vector["stream"], vector["shards"]
    event = make_vectors.event_of(vector["event"])
    shard = shard_of(event.key, shards)
    documented = Keys("ss")
    assert vector["keys"] == [
        documented.shard(stream, shard),
        documented.ids(stream, shard),
        documented.dedup_prefix(stream, shard) + str(event.id),
    ]
    ours = [keys.shard(stream, shard), keys.ids(stream, shard)]
    ours.append(keys.dedup_prefix(stream, shard) + str(event.id))
    create_stream(r, keys, stream, shards=shards)
    first = r.eval(vector["script"], 3, *ours, *vector["argv"])  # type: ignore[no-untyped-call]
    again = r.eval(vector["script"], 3, *ours, *vector["argv"])  # type: ignore[no-untyped-call]
    assert first == again and r.xlen(ours[0]) == 1
    [(bucket, ends)] = r.zrange(ours[1], 0, -1, withscores=True)
    assert r.hget(f"{ours[1]}:{bucket.decode()}", str(event.id)) == first
    assert r.object("encoding", f"{ours[1]}:{bucket.decode()}") == b"hashtable"
    assert r.pexpiretime(f"{ours[1]}:{bucket.decode()}") == ends
    assert vector["ttl_ms"] == ProducerSettings().dedup_ttl_ms
    [(entry_id, fields)] = r.xrange(ours[0])
    assert entry_id == first and decode(fields) == event
    assert [item.decode() for pair in fields.items() for item in pair] == vector["argv"][2:]
    config = Config(streams={stream: StreamSpec(stream, shards)}, prefix=keys.prefix)
    producer = Producer(r, config, ProducerSettings(dedup_ttl_ms=60_000))  # another TTL
    assert producer.publish(stream, event) == first.decode()  # the same id: once
    other = dataclasses.replace(event, id="order-99-shipped")
    shipped = producer.publish(stream, other)  # and the other way round
    argv = [vector["argv"][0], other.id, *vector["argv"][2:-1], other.id]
    old_key = keys.dedup_prefix(stream, shard) + str(other.id)
    assert r.eval(vector["script"], 3, *ours[:2], old_key, *argv).decode() == shipped  # type: ignore[no-untyped-call]
    assert r.xlen(ours[0]) == 2


def test_the_readme_shows_the_dedup_vectors_script() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    body = DOC["dedup"]["script"].split("\nlocal ", 1)[1]  # after its comment (given too)
    assert "\nlocal " + body + "```" in readme
