"""The one place Redis clients are made: sync and asyncio, one server or a Redis Cluster.

URLs:

- `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS), `unix:///path`: one server.
- `redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` with TLS):
  a Redis Cluster; the hosts are seed nodes, any one that answers tells the rest.

Every client has the same policy, for the reasons below:

- `socket_timeout` is `SOCKET_TIMEOUT_S`, and reads block at most `MAX_BLOCK_MS`, well under
  it: a blocked XREADGROUP/XREAD is never mistaken for a dead connection.
- No silent retries (`Retry(NoBackoff(), 0)`): redis-py 8 retries a command after a socket
  timeout by default, and a retried `XADD *` publishes twice, a retried dead-letter script
  writes two letters. Callers retry on their own terms (the worker with backoff and a claim
  of what it may have read; producers only with idempotency ids). A cluster client still
  follows MOVED and ASK (the command did not run) and reads the cluster again (slot map,
  and the node it asks where a command's keys are) after any lost connection: see
  `_AsyncCluster`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import ClusterPipeline as AsyncClusterPipeline
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    RedisClusterException,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)
from redis.retry import Retry

from streamsink.errors import ConfigError, StreamNotFound
from streamsink.streams.keys import META_SHARDS, Keys
from streamsink.streams.retry import describe

log = logging.getLogger("streamsink.cluster")

SyncClient: TypeAlias = redis.Redis | redis.RedisCluster
"""What streamsink's sync code talks to: one server or a cluster."""
AsyncClient: TypeAlias = aredis.Redis | aredis.RedisCluster
"""What streamsink's asyncio code talks to: one server or a cluster."""

SOCKET_TIMEOUT_S = 15.0
"""A reply taking longer means a dead or stuck server (the connection is then dropped)."""
CONNECT_TIMEOUT_S = 5.0
MAX_BLOCK_MS = 10_000
"""Longest blocking read allowed: a third under the socket timeout, for the reply's travel."""
HEALTH_CHECK_S = 30
"""A connection idle this long is PINGed before use (a load balancer may have cut it)."""
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster (`redis+cluster://` or `rediss+cluster://`)."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def _options(timeout: float, asyncio: bool = False) -> dict[str, Any]:
    # An asyncio client takes redis.asyncio's Retry: redis-py 8.2 warns of (and converts) a
    # sync one
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, CONNECT_TIMEOUT_S),
        "retry": AsyncRetry(NoBackoff(), 0) if asyncio else Retry(NoBackoff(), 0),
        "health_check_interval": HEALTH_CHECK_S,
    }


def _cluster_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """The single-node URL redis-py parses (credentials, TLS, options) and the seed nodes."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError(f"cluster URL {url!r}: seed {host!r} must be host:port")
        seeds.append((unquote(name).strip("[]"), int(port)))
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(f"cluster URL {url!r}: a Redis Cluster has only database 0")
    first = f"{seeds[0][0]}:{seeds[0][1]}"
    netloc = f"{credentials}@{first}" if credentials else first
    single = f"{CLUSTER_SCHEMES[parts.scheme]}://{netloc}"
    return (f"{single}?{parts.query}" if parts.query else single), seeds


def connect(url: str, timeout: float = SOCKET_TIMEOUT_S) -> SyncClient:
    """A sync client for `url` (see the module docstring for the forms and the policy).

    A cluster's sync client reads the slot map here: ConnectionError if no seed answers,
    ConfigError if the server is no cluster (`cluster_error`)."""
    if is_cluster_url(url):
        single, seeds = _cluster_url(url)
        nodes = [ClusterNode(h, p) for h, p in seeds]  # type: ignore[no-untyped-call]
        with _unreachable():
            return _SyncCluster.from_url(single, startup_nodes=nodes, **_options(timeout))
    return redis.Redis.from_url(url, **_options(timeout))


NOT_A_CLUSTER = "Cluster mode is not enabled"
"""What redis-py's cluster client says of a seed that is a single server."""


def cluster_error(exc: RedisClusterException) -> Exception:
    """What a cluster client's own error (not a RedisError: no caller's retry would see it)
    stands for. A seed that is a single server is the URL's mistake: ConfigError, which
    waiting cannot clear. Anything else (no seed answers, a slot without a master) is a
    cluster unreachable for now: ConnectionError, which every caller treats as transient,
    as it does a single Redis that is down (a worker then waits for it, and says so)."""
    if NOT_A_CLUSTER in str(exc):
        return ConfigError(
            "a redis+cluster:// URL names a server that is not a Redis Cluster (cluster mode "
            "is not enabled there); give a single server as redis://host:port"
        )
    return ConnectionError(f"Redis Cluster unreachable: {exc}")


class _SyncCluster(redis.RedisCluster):
    """redis-py's sync cluster client, its own errors as `cluster_error` says."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _unreachable():
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]


LOST = (ConnectionError, TimeoutError, ClusterDownError, SlotNotCoveredError, OSError)
"""Errors after which a cluster client must read the cluster again before its next command."""


def reread(client: aredis.RedisCluster) -> None:
    """Have `client` read the cluster again (slot map, default node, and the node it asks
    where a command's keys are) before its next command or pipeline: redis-py's own
    `initialize`, which every command and pipeline runs first when so marked."""
    client._initialize = True


class _ClusterPipeline(AsyncClusterPipeline):
    """A pipeline after whose lost node or failing-over slot the client reads the cluster again.

    redis-py's does so only when it retries a pipeline, and ours never retry: without it a
    client would keep sending a dead master's slots to it after its replica took over.
    """

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except LOST:
            reread(self.cluster_client)
            raise
        except RedisClusterException as exc:  # nothing answered when it read the cluster
            raise cluster_error(exc) from exc


class _AsyncCluster(aredis.RedisCluster):
    """redis-py's asyncio cluster client, reading the cluster again after any lost connection.

    redis-py marks itself for that only when the node a command was sent to fails. A
    command whose keys are not at a fixed place (XREAD, XREADGROUP: `movablekeys`) is
    routed by first asking one node, `COMMAND GETKEYS`: the default node of the client's
    last full initialisation. Once that node is killed, this question fails with
    ConnectionError before any node is chosen, nothing is marked, and it fails so for good
    while commands with fixed keys go through (their slots learnt from a pipeline or a
    MOVED): a worker then could not read any shard after a failover (issue 18; reproduced
    in tests/test_cluster.py). Marking the client after every lost connection makes its
    next command read the cluster again and ask a live node.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (ConnectionError, TimeoutError, OSError) as exc:
            if not self._initialize:  # not a node's error (redis-py marks those): the keys' node
                asked = getattr(self.commands_parser, "node", None)
                if asked is not None:  # asked last when the next initialisation picks one
                    self.nodes_manager.move_node_to_end_of_cached_nodes(asked.name)
                log.warning(
                    "Redis Cluster: a command failed before reaching a node; reading the "
                    "cluster again",
                    extra={"command": str(args[0]), "error": describe(exc)},
                )
                reread(self)
            raise
        except RedisClusterException as exc:  # nothing answered when it read the cluster
            raise cluster_error(exc) from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise ValueError("shard_hint has no meaning in a cluster")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


def connect_async(url: str, timeout: float = SOCKET_TIMEOUT_S) -> AsyncClient:
    """An asyncio client for `url` (see the module docstring for the forms and the policy)."""
    if is_cluster_url(url):
        single, seeds = _cluster_url(url)
        return _AsyncCluster.from_url(
            single,
            startup_nodes=[AsyncClusterNode(h, p) for h, p in seeds],
            **_options(timeout, asyncio=True),
        )
    return aredis.Redis.from_url(url, **_options(timeout, asyncio=True))


def check_block(block_ms: int) -> None:
    """Refuse a blocking read long enough to be taken for a dead connection."""
    if block_ms > MAX_BLOCK_MS:
        raise ConfigError(
            f"block_ms {block_ms} is too long: at most {MAX_BLOCK_MS}, so that a blocking "
            f"read ends well before the {SOCKET_TIMEOUT_S:g} s socket timeout"
        )


def _recorded(stream: str, keys: Keys, value: bytes | str | None) -> int:
    if value is None:
        raise StreamNotFound(
            f"stream {stream!r} does not exist under prefix {keys.prefix!r}; "
            f"create it with `streamsink streams create {stream} --shards N`"
        )
    return int(value)


def shard_count(client: SyncClient, keys: Keys, stream: str) -> int:
    """The shard count recorded for `stream`; StreamNotFound if it was never created."""
    return _recorded(stream, keys, client.hget(keys.meta(stream), META_SHARDS))


async def shard_count_async(client: AsyncClient, keys: Keys, stream: str) -> int:
    """The shard count recorded for `stream`; StreamNotFound if it was never created."""
    return _recorded(stream, keys, await client.hget(keys.meta(stream), META_SHARDS))


REDIRECTED = (AskError, TryAgainError, ClusterDownError)
"""Replies of a cluster node that did not run the command (MOVED is an AskError): the slot
lives elsewhere now, or the cluster is failing over; the slot map must be read again."""


@contextlib.contextmanager
def _unreachable() -> Iterator[None]:
    """A cluster client's own errors as `cluster_error` says (most: unreachable for now)."""
    try:
        yield
    except RedisClusterException as exc:
        raise cluster_error(exc) from exc


def sync_pool(client: SyncClient, key: str) -> redis.ConnectionPool:
    """The connection pool of the server holding `key` (its slot's primary in a cluster)."""
    if isinstance(client, redis.RedisCluster):
        with _unreachable():
            node = client.nodes_manager.get_node_from_slot(client.keyslot(key))  # type: ignore[no-untyped-call]
        pool: redis.ConnectionPool = client.get_redis_connection(node).connection_pool
        return pool
    return client.connection_pool


def refresh_sync(client: SyncClient) -> None:
    """Read a cluster's slot map again after a redirect or a lost node (no-op otherwise)."""
    if isinstance(client, redis.RedisCluster):
        with contextlib.suppress(redis.RedisError, RedisClusterException, OSError):
            client.nodes_manager.initialize()


class AsyncLinks:
    """Connections taken for as long as their owner wants, one per server its keys live on
    (one in all for a single Redis; per slot primary in a cluster), for raw pipelining."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._conns: dict[str, tuple[Connection, Any]] = {}

    async def open(self, refresh: bool = False) -> None:
        """Make sure a cluster client knows its slot map (read again with `refresh`)."""
        client = self.client
        if isinstance(client, aredis.RedisCluster):
            if refresh:
                reread(client)
            with _unreachable():
                await client.initialize()

    async def connection(self, key: str) -> Connection:
        """The connection to the server holding `key`, taken on first use."""
        client = self.client
        if isinstance(client, aredis.RedisCluster):
            with _unreachable():
                node = client.nodes_manager.get_node_from_slot(client.keyslot(key))
            name = node.name
        else:
            node, name = None, ""
        held = self._conns.get(name)
        if held is None:
            if node is None:
                conn = await client.connection_pool.get_connection()  # type: ignore[union-attr]
            else:
                conn = node.acquire_connection()
            held = self._conns[name] = (conn, node)
        return held[0]

    async def close(self, drop: bool) -> None:
        """Give every connection back (`drop`: disconnected first, its replies lost)."""
        conns, self._conns = self._conns, {}
        for conn, node in conns.values():
            if drop:
                await conn.disconnect(nowait=True)
            if node is None:
                await self.client.connection_pool.release(conn)  # type: ignore[union-attr]
            else:
                node.release(conn)
