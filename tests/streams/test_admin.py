"""Stream creation and inspection against a real Redis."""

from __future__ import annotations

import pytest
import redis

from streamsink.errors import ShardCountMismatch, StreamNotFound
from streamsink.streams import Keys, create_stream, list_streams, stream_info
from streamsink.streams.admin import shard_count
from streamsink.streams.keys import META_CREATED, META_SHARDS


def test_create_records_the_shard_count(r: redis.Redis, keys: Keys) -> None:
    assert create_stream(r, keys, "tasks", 4) is True
    assert r.hget(keys.meta("tasks"), META_SHARDS) == b"4"
    assert int(r.hget(keys.meta("tasks"), META_CREATED) or 0) > 1_600_000_000_000
    assert shard_count(r, keys, "tasks") == 4


def test_create_again_with_the_same_count_is_a_no_op(r: redis.Redis, keys: Keys) -> None:
    create_stream(r, keys, "tasks", 4)
    created_ms = r.hget(keys.meta("tasks"), META_CREATED)
    assert create_stream(r, keys, "tasks", 4) is False
    assert r.hget(keys.meta("tasks"), META_CREATED) == created_ms
    assert list_streams(r, keys) == ["tasks"]


def test_create_again_with_another_count_is_refused(r: redis.Redis, keys: Keys) -> None:
    create_stream(r, keys, "tasks", 4)
    with pytest.raises(ShardCountMismatch, match="4 shards, not 8"):
        create_stream(r, keys, "tasks", 8)
    assert shard_count(r, keys, "tasks") == 4


@pytest.mark.parametrize(("name", "shards"), [("a:b", 1), ("{x}", 1), ("", 1), ("ok", 0)])
def test_create_refuses_bad_names_and_counts(
    r: redis.Redis, keys: Keys, name: str, shards: int
) -> None:
    with pytest.raises(ValueError):
        create_stream(r, keys, name, shards)
    assert list_streams(r, keys) == []
    assert not list(r.scan_iter(match=f"{keys.prefix}:*"))


def test_stream_info_gives_each_shard_length(r: redis.Redis, keys: Keys) -> None:
    create_stream(r, keys, "tasks", 3)
    assert stream_info(r, keys, "tasks").lengths == (0, 0, 0)
    for _ in range(2):
        r.xadd(keys.shard("tasks", 0), {"k": "v"})
    for _ in range(5):
        r.xadd(keys.shard("tasks", 2), {"k": "v"})
    info = stream_info(r, keys, "tasks")
    assert (info.name, info.shards, info.lengths, info.length) == ("tasks", 3, (2, 0, 5), 7)


def test_stream_info_of_a_missing_stream(r: redis.Redis, keys: Keys) -> None:
    with pytest.raises(StreamNotFound, match="nope"):
        stream_info(r, keys, "nope")


def test_list_streams_is_sorted_and_stays_under_its_prefix(r: redis.Redis, keys: Keys) -> None:
    assert list_streams(r, keys) == []
    for name in ("tasks", "likes", "counters"):
        create_stream(r, keys, name, 2)
    other = Keys(f"{keys.prefix}x")
    try:
        create_stream(r, other, "elsewhere", 1)
        assert list_streams(r, keys) == ["counters", "likes", "tasks"]
        assert list_streams(r, other) == ["elsewhere"]
    finally:
        r.delete(other.index(), other.meta("elsewhere"))


def test_each_shard_has_its_own_hash_tag(keys: Keys) -> None:
    """Each shard's keys share one hash tag (one cluster slot); shards have distinct tags."""
    tags = set()
    for shard in range(4):
        stream_key, dedup = keys.shard("tasks", shard), keys.dedup_prefix("tasks", shard)
        tag = stream_key[stream_key.index("{") : stream_key.index("}") + 1]
        assert tag == f"{{tasks:{shard}}}"
        assert dedup.startswith(f"{keys.prefix}:{tag}")
        tags.add(tag)
    assert len(tags) == 4
