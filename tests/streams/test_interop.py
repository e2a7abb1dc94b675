"""A plain `redis-cli XADD`, as the README documents it, is an event like any other.

The commands below are shell text, verbatim as a user types them against the default
prefix `ss` and a 4-shard `tasks` stream (`task-42` is on shard 0); the test only points
them at its own Redis URL and key prefix before running them with `sh -c`.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import zlib
from pathlib import Path

import redis
import redis.asyncio as aredis

from streamsink.schemas import Config, Event, decode, encode, shard_of
from streamsink.streams import AsyncProducer, Keys, Producer
from tests.streams.conftest import SHARDS, entries, flat

# fmt: off
XADD_SET = """redis-cli XADD 'ss:{tasks:0}:events' '*' key task-42 op set data '{"id":42,"status":"done","progress":100}' ts 1700000000000 v 1"""  # noqa: E501
XADD_INCR = """redis-cli XADD 'ss:{tasks:0}:events' '*' key task-42 op incr data '{"id":42,"progress":5}'"""  # noqa: E501
XADD_CALL = """redis-cli XADD 'ss:{tasks:0}:events' '*' key task-42 op call data '{"url":"https://example.com/hooks/task","payload":{"task":42,"status":"done"}}' id task-42-done"""  # noqa: E501
# fmt: on
README = Path(__file__).resolve().parents[2] / "README.md"

SAME_AS_CLI = {
    XADD_SET: Event.make(
        "task-42",
        "set",
        {"id": 42, "status": "done", "progress": 100},
        ts=1_700_000_000_000,
        version=1,
    ),
    XADD_INCR: Event.make("task-42", "incr", {"id": 42, "progress": 5}),
    XADD_CALL: Event.make(
        "task-42",
        "call",
        {"url": "https://example.com/hooks/task", "payload": {"task": 42, "status": "done"}},
        id="task-42-done",
    ),
}


def redis_cli(command: str, url: str, prefix: str) -> str:
    """Run a documented command against `url` and `prefix`; return the entry ID it printed."""
    assert shutil.which("redis-cli"), "redis-cli must be installed for the interop tests"
    target = "redis-cli XADD 'ss:"
    assert command.startswith(target)
    command = f"redis-cli -u {shlex.quote(url)} XADD '{prefix}:" + command[len(target) :]
    done = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=10, check=True
    )
    assert done.stderr == ""
    return done.stdout.strip()


def test_the_readme_shows_the_command_tested_here() -> None:
    assert XADD_SET in README.read_text(encoding="utf-8")
    assert shard_of("task-42", 4) == 0  # as the README says, and as the commands assume


def test_the_shard_function_is_plain_crc32() -> None:
    """What a Node or Go service must compute: IEEE CRC-32 of the UTF-8 key, modulo shards."""
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the standard CRC-32 check value
    assert shard_of("123456789", 1024) == 0xCBF43926 % 1024
    assert shard_of("task-42", 4) == 1474194016 % 4
    assert shard_of("tâche-é", 8) == zlib.crc32("tâche-é".encode()) % 8 == 7


async def test_redis_cli_events_decode_like_the_producers(
    redis_url: str, r: redis.Redis, ar: aredis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    shard = shard_of("task-42", SHARDS)
    assert shard == 0  # where the commands write
    producer = Producer(r, config)
    async with AsyncProducer(ar, config) as aproducer:
        for command, event in SAME_AS_CLI.items():
            cli_id = redis_cli(command, redis_url, keys.prefix)
            sync_id = producer.publish("tasks", event)
            async_id = await aproducer.publish("tasks", event)
            stored = dict(entries(r, keys, "tasks", shard))
            if event.id is None:
                assert len({cli_id, sync_id, async_id}) == 3
            else:  # the CLI's XADD bypasses de-duplication; producers de-duplicate
                assert async_id == sync_id != cli_id
            from_cli, from_sync, from_async = (stored[i] for i in (cli_id, sync_id, async_id))
            assert decode(from_cli) == decode(from_sync) == decode(from_async) == event
            # Byte for byte: the README's JSON is exactly what the producers write.
            assert flat(from_cli) == flat(from_sync) == flat(from_async) == encode(event)
    ops = [fields[b"op"] for _, fields in entries(r, keys, "tasks", shard)]
    assert ops == [b"set"] * 3 + [b"incr"] * 3 + [b"call"] * 2
    others = [n for s in range(SHARDS) if s != shard for n in [r.xlen(keys.shard("tasks", s))]]
    assert others == [0] * (SHARDS - 1)


def test_redis_cli_entry_ids_order_with_producer_ones(
    redis_url: str, r: redis.Redis, keys: Keys, config: Config, tasks_stream: str
) -> None:
    """A key published from both sides keeps one order: the shard's."""
    shard = shard_of("task-42", SHARDS)
    producer = Producer(r, config)
    first = producer.publish("tasks", Event.make("task-42", "set", {"id": 42, "status": "a"}))
    middle = redis_cli(XADD_SET, redis_url, keys.prefix)
    last = producer.publish("tasks", Event.make("task-42", "set", {"id": 42, "status": "b"}))
    stored = entries(r, keys, "tasks", shard)
    assert [i for i, _ in stored] == [first, middle, last]
    assert [decode(f).data["status"] for _, f in stored] == ["a", "done", "b"]
