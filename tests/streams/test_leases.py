"""Shard leases on a real Redis: exclusive ownership, fencing epochs, expiry, heartbeats."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aredis

from streamsink.streams.keys import Keys
from streamsink.streams.leases import Lease, Leases
from streamsink.streams.scripts import lua
from tests.conftest import RedisServer

STREAM, GROUP = "tasks", "pg-writer"
TTL_MS = 300
EXPIRED_S = TTL_MS / 1000 + 0.1  # long enough for a TTL_MS lease or heartbeat to expire


def leases(client: aredis.Redis, keys: Keys, worker: str, ttl_ms: int = TTL_MS) -> Leases:
    return Leases(client, keys, STREAM, GROUP, worker, ttl_ms)


def owner(r: redis.Redis, keys: Keys, shard: int = 0) -> bytes | None:
    value = r.get(keys.lease(STREAM, shard, GROUP))
    assert value is None or isinstance(value, bytes)
    return value


async def test_acquire_a_free_shard_starts_at_epoch_1(ar: aredis.Redis, keys: Keys) -> None:
    lease = await leases(ar, keys, "w1").acquire(3)
    assert lease == Lease(shard=3, epoch=1)


async def test_acquire_sets_the_owner_and_the_ttl(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    await leases(ar, keys, "w1", ttl_ms=5000).acquire(0)
    assert owner(r, keys) == b"w1"
    assert 4000 < r.pttl(keys.lease(STREAM, 0, GROUP)) <= 5000
    assert r.ttl(keys.epoch(STREAM, 0, GROUP)) == -1  # the epoch never expires


async def test_owner_reacquiring_takes_a_new_epoch_and_extends(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    """A shard task cancelled and started again by the same worker is a new ownership:
    whatever the old task still has in flight is fenced by the old epoch."""
    w1 = leases(ar, keys, "w1", ttl_ms=1000)
    assert await w1.acquire(0) == Lease(0, 1)
    await asyncio.sleep(0.3)
    assert await w1.acquire(0) == Lease(0, 2)
    assert r.pttl(keys.lease(STREAM, 0, GROUP)) > 900  # extended to a whole TTL again


async def test_another_worker_cannot_acquire_a_held_lease(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    await leases(ar, keys, "w1").acquire(0)
    assert await leases(ar, keys, "w2").acquire(0) is None
    assert owner(r, keys) == b"w1"
    assert r.get(keys.epoch(STREAM, 0, GROUP)) == b"1"  # a refused acquire counts nothing


async def test_leases_of_shards_and_groups_are_independent(ar: aredis.Redis, keys: Keys) -> None:
    await leases(ar, keys, "w1").acquire(0)
    assert await leases(ar, keys, "w2").acquire(1) == Lease(1, 1)
    other_group = Leases(ar, keys, STREAM, "callbacks", "w2", TTL_MS)
    assert await other_group.acquire(0) == Lease(0, 1)
    other_stream = Leases(ar, keys, "likes", GROUP, "w2", TTL_MS)
    assert await other_stream.acquire(0) == Lease(0, 1)


async def test_renew_by_owner_extends_and_by_other_fails(ar: aredis.Redis, keys: Keys) -> None:
    w1, w2 = leases(ar, keys, "w1", ttl_ms=500), leases(ar, keys, "w2", ttl_ms=500)
    await w1.acquire(0)
    assert await w2.renew(0) is False
    for _ in range(2):  # renewing every 3/5 TTL keeps it for longer than one TTL
        await asyncio.sleep(0.3)
        assert await w1.renew(0) is True
        assert await w2.acquire(0) is None


async def test_renew_of_a_lease_never_taken_fails(ar: aredis.Redis, keys: Keys) -> None:
    assert await leases(ar, keys, "w1").renew(0) is False


async def test_expired_lease_goes_to_another_worker_with_the_next_epoch(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    w1, w2 = leases(ar, keys, "w1"), leases(ar, keys, "w2")
    assert await w1.acquire(0) == Lease(0, 1)
    await asyncio.sleep(EXPIRED_S)
    assert await w2.acquire(0) == Lease(0, 2)
    assert owner(r, keys) == b"w2"
    assert await w1.renew(0) is False  # the zombie learns it lost the lease
    assert await w1.acquire(0) is None
    assert owner(r, keys) == b"w2"


async def test_same_worker_after_expiry_gets_a_new_epoch(ar: aredis.Redis, keys: Keys) -> None:
    w1 = leases(ar, keys, "w1")
    assert await w1.acquire(0) == Lease(0, 1)
    await asyncio.sleep(EXPIRED_S)
    assert await w1.renew(0) is False
    assert await w1.acquire(0) == Lease(0, 2)  # work read under epoch 1 may be fenced off


async def test_release_by_owner_frees_the_shard(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    w1, w2 = leases(ar, keys, "w1"), leases(ar, keys, "w2")
    await w1.acquire(0)
    assert await w1.release(0) is True
    assert owner(r, keys) is None
    assert await w1.renew(0) is False
    assert await w2.acquire(0) == Lease(0, 2)


async def test_release_by_non_owner_does_nothing(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    w1, w2 = leases(ar, keys, "w1", ttl_ms=5000), leases(ar, keys, "w2", ttl_ms=5000)
    await w1.acquire(0)
    assert await w2.release(0) is False
    assert owner(r, keys) == b"w1"
    assert r.pttl(keys.lease(STREAM, 0, GROUP)) > 4000
    assert await w2.acquire(0) is None
    assert await w1.renew(0) is True


async def test_release_of_a_free_shard_does_nothing(ar: aredis.Redis, keys: Keys) -> None:
    assert await leases(ar, keys, "w1").release(0) is False


async def test_epoch_grows_by_one_at_every_new_owner(ar: aredis.Redis, keys: Keys) -> None:
    workers = [leases(ar, keys, f"w{n}", ttl_ms=200) for n in range(4)]
    seen: list[int] = []
    for turn in range(12):
        worker = workers[turn % len(workers)]
        lease = await worker.acquire(0)
        assert lease is not None
        again = await worker.acquire(0)  # re-acquiring while held: a new ownership too
        assert again == Lease(0, lease.epoch + 1)
        seen += [lease.epoch, again.epoch]
        if turn % 3 == 2:
            await asyncio.sleep(0.25)  # this owner dies: its lease expires
        else:
            assert await worker.release(0) is True
    assert seen == list(range(1, 25))


async def test_exactly_one_of_many_racing_workers_wins(redis_url: str, keys: Keys) -> None:
    clients = [aredis.Redis.from_url(redis_url) for _ in range(20)]
    try:
        racers = [leases(client, keys, f"w{n}", ttl_ms=5000) for n, client in enumerate(clients)]
        for client in clients:  # connect first, so the acquires really race
            await client.ping()
        results = await asyncio.gather(*(racer.acquire(0) for racer in racers))
        won = [(racer.worker, lease) for racer, lease in zip(racers, results, strict=True) if lease]
        assert len(won) == 1
        winner, lease = won[0]
        assert lease == Lease(0, 1)
        assert await racers[0].owners(1) == [winner]
    finally:
        for client in clients:
            await client.aclose()


async def test_owners_lists_every_shard(ar: aredis.Redis, keys: Keys) -> None:
    w1, w2 = leases(ar, keys, "w1"), leases(ar, keys, "w2")
    assert await w1.owners(3) == [None, None, None]
    await w1.acquire(0)
    await w2.acquire(2)
    assert await w1.owners(3) == ["w1", None, "w2"]
    await w2.release(2)
    assert await w2.owners(4) == ["w1", None, None, None]


async def test_heartbeat_counts_live_workers(ar: aredis.Redis, keys: Keys) -> None:
    w1, w2, w3 = (leases(ar, keys, f"w{n}") for n in (1, 2, 3))
    assert await w1.heartbeat() == 1
    assert await w1.heartbeat() == 1  # a worker counts once
    assert await w2.heartbeat() == 2
    assert await w3.heartbeat() == 3
    assert await w1.live_workers() == {"w1", "w2", "w3"}
    other_group = Leases(ar, keys, STREAM, "callbacks", "w9", TTL_MS)
    assert await other_group.heartbeat() == 1
    assert await other_group.live_workers() == {"w9"}


async def test_heartbeat_forgets_expired_workers(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    w1, w2 = leases(ar, keys, "w1", ttl_ms=500), leases(ar, keys, "w2", ttl_ms=500)
    await w1.heartbeat()
    await w2.heartbeat()
    await asyncio.sleep(0.3)
    await w1.heartbeat()
    await asyncio.sleep(0.3)  # w2's heartbeat is now older than its TTL, w1's is not
    assert await w1.live_workers() == {"w1"}
    assert r.zcard(keys.workers(STREAM, GROUP)) == 2  # listed, not yet forgotten
    assert await w1.heartbeat() == 1
    assert r.zrange(keys.workers(STREAM, GROUP), 0, -1) == [b"w1"]
    assert await w2.heartbeat() == 2  # back from the dead


async def test_heartbeats_key_expires_when_every_worker_is_gone(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    await leases(ar, keys, "w1").heartbeat()
    assert 0 < r.pttl(keys.workers(STREAM, GROUP)) <= 10 * TTL_MS


async def test_leave_removes_the_heartbeat_at_once(ar: aredis.Redis, keys: Keys) -> None:
    w1, w2 = leases(ar, keys, "w1", ttl_ms=5000), leases(ar, keys, "w2", ttl_ms=5000)
    await w1.heartbeat()
    await w2.heartbeat()
    await w2.leave()
    assert await w1.live_workers() == {"w1"}
    assert await w1.heartbeat() == 1
    await w2.leave()  # leaving twice is harmless
    await w1.leave()
    assert await w1.live_workers() == set()


async def test_heartbeat_and_renew_in_one_round_trip(
    ar: aredis.Redis, r: redis.Redis, keys: Keys
) -> None:
    one, two = leases(ar, keys, "w1", ttl_ms=5000), leases(ar, keys, "w2", ttl_ms=5000)
    await one.acquire(0)
    await one.acquire(1)
    await two.acquire(2)
    r.pexpire(keys.lease(STREAM, 0, GROUP), 50)
    await two.heartbeat()
    live, renewed = await one.heartbeat_and_renew([0, 1, 2, 3])
    assert live == 2
    assert renewed == [True, True, False, False]  # 2 is w2's, 3 nobody's
    assert r.pttl(keys.lease(STREAM, 0, GROUP)) > 4000  # extended, not left to expire
    assert owner(r, keys, 2) == b"w2"
    assert await one.heartbeat_and_renew([]) == (2, [])


async def test_a_renewal_cancelled_anywhere_leaves_no_pipeline_holding_a_connection(
    redis_server: RedisServer, keys: Keys
) -> None:
    """The lease loop's timeout may cancel a renewal at any await; redis-py then reported
    "Unclosed Pipeline client" (a bare line on stderr) when the pipeline was collected.
    (A Redis of its own: flushing the script cache of the shared one would break the
    scripts of tests running alongside between their load and their call.)"""
    import gc

    ar = aredis.Redis.from_url(redis_server.url)
    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    mine = leases(ar, keys, "w1")
    await mine.acquire(0)
    try:
        for delay in [0.0, 0.0001, 0.0002, 0.0005, 0.001, 0.002] * 5:
            await ar.script_flush()  # the renewal script must be loaded again: more awaits
            try:
                async with asyncio.timeout(delay):
                    await mine.heartbeat_and_renew([0])
            except TimeoutError:
                pass
            gc.collect()
        assert not [c for c in reported if "Unclosed" in str(c.get("message"))], reported
    finally:
        loop.set_exception_handler(None)
        await ar.aclose()


async def test_a_renewal_after_a_flushed_script_cache_loads_the_script_again(
    redis_server: RedisServer, keys: Keys
) -> None:
    """Renewals go by SHA in a pipeline; on NOSCRIPT (a restarted server, a promoted replica)
    the script is loaded and the pipeline runs again. (A Redis of its own, as above.)"""
    ar = aredis.Redis.from_url(redis_server.url)
    try:
        mine = leases(ar, keys, "w1", ttl_ms=5000)
        await mine.acquire(0)
        await ar.script_flush()
        assert await mine.heartbeat_and_renew([0, 1]) == (1, [True, False])
        assert await ar.script_exists(lua("leases.renew").sha) == [True]
    finally:
        await ar.aclose()
