"""The one client factory: URL forms, the no-retry policy, blocking reads bounded."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aredis

from streamsink.consumers.settings import GroupSettings
from streamsink.errors import ConfigError, StreamNotFound
from streamsink.streams import Keys
from streamsink.streams.connection import (
    MAX_BLOCK_MS,
    SOCKET_TIMEOUT_S,
    connect,
    connect_async,
    is_cluster_url,
    shard_count,
    shard_count_async,
)
from tests.conftest import free_port


def test_one_server_clients_never_retry_and_block_under_the_socket_timeout(
    redis_url: str,
) -> None:
    client = connect(redis_url)
    try:
        assert type(client) is redis.Redis and client.ping()
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == SOCKET_TIMEOUT_S
        assert kwargs["retry"].get_retries() == 0
        assert MAX_BLOCK_MS / 1000 < SOCKET_TIMEOUT_S
    finally:
        client.close()


async def test_the_async_client_and_the_shard_count_lookup(redis_url: str, keys: Keys) -> None:
    client = connect_async(redis_url)
    try:
        assert type(client) is aredis.Redis
        assert client.connection_pool.connection_kwargs["retry"].get_retries() == 0
        with pytest.raises(StreamNotFound, match="streams create items"):
            await shard_count_async(client, keys, "items")
        await client.hset(keys.meta("items"), "shards", 3)
        assert await shard_count_async(client, keys, "items") == 3
    finally:
        await client.aclose()
    sync = connect(redis_url)
    assert shard_count(sync, keys, "items") == 3
    sync.close()


def test_cluster_urls_are_told_apart_and_checked_before_connecting() -> None:
    assert is_cluster_url("redis+cluster://a:1,b:2")
    assert is_cluster_url("rediss+cluster://a:1")
    assert not is_cluster_url("redis://a:1/0")
    with pytest.raises(ConfigError, match="must be host:port"):
        connect("redis+cluster://127.0.0.1:7000,127.0.0.1")
    with pytest.raises(ConfigError, match="only database 0"):
        connect_async("redis+cluster://127.0.0.1:7000/3")


def test_a_block_longer_than_the_socket_allows_is_refused() -> None:
    assert GroupSettings.from_options("g", {"block_ms": MAX_BLOCK_MS}).block_ms == MAX_BLOCK_MS
    with pytest.raises(ConfigError, match="block_ms 10001 is too long"):
        GroupSettings.from_options("g", {"block_ms": MAX_BLOCK_MS + 1})


def cluster_url_at(url: str) -> str:
    """A redis+cluster:// URL naming the server of `url` (a single Redis, or nobody)."""
    parts = urlsplit(url)
    return f"redis+cluster://{parts.hostname}:{parts.port or 6379}"


async def test_a_cluster_nobody_answers_for_is_unreachable_for_now_not_a_crash() -> None:
    # redis-py raises its own RedisClusterException (not a RedisError: no retry of ours saw
    # it, and a worker started before its cluster crashed); a ConnectionError is waited out
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    with pytest.raises(redis.ConnectionError, match="Redis Cluster unreachable"):
        connect(url)
    client = connect_async(url)
    try:
        with pytest.raises(redis.ConnectionError, match="Redis Cluster unreachable"):
            await client.hget("k", "f")
        with pytest.raises(redis.ConnectionError, match="Redis Cluster unreachable"):
            await client.pipeline().hget("k", "f").execute()
    finally:
        await client.aclose()


async def test_a_cluster_url_at_a_single_server_is_a_config_error(redis_url: str) -> None:
    url = cluster_url_at(redis_url)
    with pytest.raises(ConfigError, match="not a Redis Cluster"):
        connect(url)
    client = connect_async(url)
    try:
        with pytest.raises(ConfigError, match="not a Redis Cluster"):
            await client.hget("k", "f")
    finally:
        await client.aclose()
