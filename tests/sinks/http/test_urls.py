"""Hostile callback URLs: refused before any connection, dead-lettered with a clear reason.

The end-to-end test runs a worker in this process on the real Redis, publishes hostile
calls with the producer and reads the dead letters; a TCP listener on loopback counts
connections, and the sink's transport counts the requests it was asked to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
import pytest
import redis

from streamsink.consumers.worker import Worker, worker_client
from streamsink.schemas import Config, Event, GroupSpec, SinkSpec, StreamSpec
from streamsink.sinks import Sink
from streamsink.sinks.http.urls import Refused, Vetter, address_refusal, check_url
from streamsink.streams import Keys, Producer, create_stream
from streamsink.streams.dead import dead_letters
from tests.sinks.http.receiver import Listener, Receiver, Window, build_sink

STREAM, GROUP, SHARDS = "hooks", "g", 2
FAST = {"lease_ttl_ms": 1500, "linger_ms": 20, "max_age_ms": 100, "block_ms": 100}


def config(keys: Keys, redis_url: str) -> Config:
    """The test's config, on the test Redis (REDIS_URL), not Config's default."""
    return Config(
        redis_url=redis_url,
        prefix=keys.prefix,
        streams={STREAM: StreamSpec(STREAM, SHARDS)},
        groups={GROUP: GroupSpec(GROUP, STREAM, ("hooks",), FAST)},
        sinks={"hooks": SinkSpec("hooks", "http")},
    )


@contextlib.asynccontextmanager
async def worker(redis_url: str, cfg: Config, sinks: Mapping[str, Sink]) -> AsyncIterator[None]:
    client = worker_client(redis_url)
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(client, cfg, sinks, worker="w1").run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await client.aclose()


async def dead_after(
    r: redis.Redis, keys: Keys, cfg: Config, calls: Sequence[dict[str, Any]], **options: Any
) -> dict[str, str]:
    """Publish `calls`, run a worker until each is dead-lettered: url -> reason."""
    create_stream(r, keys, STREAM, SHARDS)
    producer = Producer(r, cfg)
    producer.publish_many(STREAM, [Event.make(f"k{n}", "call", c) for n, c in enumerate(calls)])
    built = build_sink(cfg.redis_url, keys, options)
    reasons: dict[str, str] = {}
    try:
        async with worker(cfg.redis_url, cfg, {"hooks": built.sink}):
            deadline = time.monotonic() + 15
            while len(reasons) < len(calls):
                assert time.monotonic() < deadline, f"dead-lettered so far: {reasons}"
                await asyncio.sleep(0.05)
                for letter in dead_letters(r, keys, STREAM, GROUP):
                    reasons[orjson.loads(letter.fields[b"data"])["url"]] = letter.reason
        assert built.transport.posts == 0, "a request was sent for a refused URL"
    finally:
        await built.sink.close()
    for shard in range(SHARDS):  # acknowledged: dead letters are not retried
        assert int(r.xpending(keys.shard(STREAM, shard), GROUP)["pending"]) == 0
    return reasons


async def test_hostile_urls_are_dead_lettered_with_a_reason_and_never_connected(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    listener = Listener()
    port = listener.port
    hostile = {
        "file:///etc/passwd": "scheme 'file' is not allowed; only http and https",
        "http://169.254.169.254/latest/meta-data/": "169.254.169.254 is a cloud metadata address",
        f"http://localhost:{port}/hook": "localhost resolves to",
        f"http://127.0.0.1:{port}/hook": "127.0.0.1 is a loopback address (allow_private is off)",
        f"http://2130706433:{port}/": "2130706433 resolves to 127.0.0.1: 127.0.0.1 is a loopback",
        f"http://[::ffff:127.0.0.1]:{port}/": "127.0.0.1 is a loopback address",
        f"http://0.0.0.0:{port}/": "0.0.0.0 is an unspecified address",
        "http://10.1.2.3/": "10.1.2.3 is a private address (allow_private is off)",
        "http://example.com/" + "a" * 3000: "the URL is 3019 bytes long; the limit is 2048",
        "http://[::1": "malformed URL: Invalid IPv6 URL",
        "http://exa mple.com/": "malformed URL: it contains spaces or control characters",
        "http:///no-host": "malformed URL: it has no host",
        "http://user:secret@example.com/": "credentials in the URL are not allowed",
        "gopher://example.com/": "scheme 'gopher' is not allowed",
    }
    calls = [{"url": url, "payload": {"n": n}} for n, url in enumerate(hostile)]
    try:
        reasons = await dead_after(r, keys, config(keys, redis_url), calls, allow_private=False)
    finally:
        listener.stop()
    assert listener.connections == 0
    for url, expected in hostile.items():
        assert reasons[url].startswith("sink 'hooks': URL refused: "), reasons[url]
        assert expected in reasons[url], (url, reasons[url])
    assert "loopback address" in reasons[f"http://localhost:{port}/hook"]
    print("\n" + "\n".join(f"{url[:60]:<60} {why}" for url, why in reasons.items()))


async def test_the_development_flag_still_refuses_metadata_and_the_allowlist_holds(
    r: redis.Redis, keys: Keys, redis_url: str
) -> None:
    receiver = Receiver().start()
    calls = [
        {"url": "http://169.254.169.254/latest/meta-data/", "payload": 1},
        {"url": "http://[fd00:ec2::254]/latest/meta-data/", "payload": 2},
        {"url": "http://other.example/", "payload": 3},
    ]
    try:
        reasons = await dead_after(
            r,
            keys,
            config(keys, redis_url),
            calls,
            allow_private=True,
            allowed_hosts=["127.0.0.1", "169.254.169.254", "fd00:ec2::254", "*.example.com"],
        )
    finally:
        receiver.stop()
    assert sorted(reasons.values()) == [
        "sink 'hooks': URL refused: 169.254.169.254 is a cloud metadata address",
        "sink 'hooks': URL refused: fd00:ec2::254 is a cloud metadata address",
        "sink 'hooks': URL refused: host 'other.example' is not in allowed_hosts",
    ]
    assert receiver.records == []


def test_a_listener_counts_connections() -> None:
    """The control for the tests above: a connection to the listener is counted."""
    listener = Listener()
    try:
        socket.create_connection(("127.0.0.1", listener.port), timeout=2).close()
        deadline = time.monotonic() + 5
        while listener.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.connections == 1
    finally:
        listener.stop()


@pytest.mark.parametrize(
    ("address", "private_ok", "refused"),
    [
        ("8.8.8.8", False, None),
        ("2606:4700:4700::1111", False, None),
        ("127.0.0.1", False, "loopback"),
        ("127.0.0.1", True, None),
        ("::1", False, "loopback"),
        ("10.0.0.1", False, "private"),
        ("192.168.1.1", True, None),
        ("172.16.0.1", False, "private"),
        ("100.64.0.1", False, "non-public"),  # carrier-grade NAT
        ("169.254.1.1", False, "link-local"),
        ("fe80::1", False, "link-local"),
        ("fc00::1", False, "private"),
        ("224.0.0.1", True, "multicast"),
        ("ff02::1", True, "multicast"),
        ("240.0.0.1", True, "reserved"),
        ("0.0.0.0", True, "unspecified"),
        ("::", True, "unspecified"),
        ("169.254.169.254", True, "metadata"),
        ("fd00:ec2::254", True, "metadata"),
        ("100.100.100.200", True, "metadata"),
        ("::ffff:169.254.169.254", True, "metadata"),  # IPv4-mapped
        ("64:ff9b::a9fe:a9fe", True, "metadata"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", False, "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_address_policy(address: str, private_ok: bool, refused: str | None) -> None:
    reason = address_refusal(ipaddress.ip_address(address), private_ok)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        ("https://api.example.com/hook?x=1", (), True),
        ("https://API.Example.com./hook", ("api.example.com",), True),
        ("https://a.b.example.com/", ("*.example.com",), True),
        ("https://example.com/", ("*.example.com",), False),
        ("https://evil-example.com/", ("*.example.com",), False),
        ("https://api.example.com.evil.net/", ("api.example.com",), False),
        ("http://b\u00fccher.example/", (), True),  # IDN, sent as xn--bcher-kva
        ("javascript:alert(1)", (), False),
        ("//example.com/x", (), False),
        ("http://exa_mple.com/", (), True),
        ("http://-bad.example/", (), False),
        ("http://[fe80::1%25eth0]/", (), False),
        ("http://a\tb/", (), False),
    ],
)
def test_url_text_checks(url: str, allowed: tuple[str, ...], ok: bool) -> None:
    if ok:
        assert check_url(url, 2048, allowed).scheme in ("http", "https")
    else:
        with pytest.raises(Refused):
            check_url(url, 2048, allowed)


async def test_a_host_with_any_forbidden_address_is_refused() -> None:
    async def mixed(host: str, port: int) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
        ]

    with pytest.raises(Refused, match=r"evil.test resolves to 10.0.0.7: .* private"):
        await Vetter(getaddrinfo=mixed).vet("evil.test", 80)


async def test_the_connection_goes_to_the_vetted_address_not_a_second_dns_answer(
    redis_url: str, keys: Keys
) -> None:
    """DNS rebinding: the first answer is vetted; a second, different one is never asked for."""
    receiver = Receiver().start()
    answers = ["127.0.0.1", "169.254.169.254"]  # what a rebinding DNS would say next
    asked: list[str] = []

    async def rebinding(host: str, port: int) -> list[tuple[Any, ...]]:
        asked.append(host)
        address = answers[min(len(asked) - 1, 1)]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    built = build_sink(redis_url, keys, {"dns_cache_s": 60.0}, getaddrinfo=rebinding)
    try:
        window = Window()
        url = f"http://rebind.test:{receiver.port}/hook"
        entries = [window.entry(f"k{n}", url, {"n": n}) for n in range(5)]
        assert await built.sink.write(window.batch(entries)) == []
    finally:
        await built.sink.close()
        receiver.stop()
    assert asked == ["rebind.test"]  # vetted once; the connections used that answer
    assert len(receiver.records) == 5
    assert {record.headers["Host"] for record in receiver.records} == {
        f"rebind.test:{receiver.port}"
    }
