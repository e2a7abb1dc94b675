"""The HTTP sink's pure parts: options, endpoint matching, planning, Retry-After."""

from __future__ import annotations

import email.utils
from typing import Any

import orjson
import pytest
from yarl import URL

from streamsink.errors import ConfigError
from streamsink.schemas import Config, GroupSpec, SinkSpec, StreamSpec
from streamsink.sinks import build_sinks
from streamsink.sinks.http import HttpSettings, HttpSink
from streamsink.sinks.http.deliver import backoff_delay, retry_after_seconds
from streamsink.sinks.http.plan import INVALID, plan
from streamsink.sinks.http.settings import EndpointSettings
from tests.sinks.http.receiver import Window

BASE = {"secret_env": "S"}


def settings(**options: Any) -> HttpSettings:
    return HttpSettings.from_options("hooks", {**BASE, **options})


def test_endpoint_matching_prefers_the_longest_url_prefix_then_host_then_origin() -> None:
    s = settings(
        rate=5.0,
        endpoints={
            "https://api.example.com/hooks": {"rate": 50},
            "https://api.example.com/hooks/slow/": {"rate": 1, "mode": "batch"},
            "api.example.com": {"concurrency": 9},
            "other.example:8443": {"timeout_s": 2},
        },
    )

    def at(url: str) -> tuple[str, EndpointSettings]:
        return s.endpoint_for(URL(url))

    assert at("https://api.example.com/hooks/slow/x")[0] == "https://api.example.com/hooks/slow/"
    assert at("https://api.example.com/hooks/slow/x")[1].mode == "batch"
    assert at("https://api.example.com/hooks?x=1")[1].rate == 50
    assert at("https://api.example.com/hooks/a")[1].rate == 50
    # A prefix is a path boundary, not just the first characters:
    assert at("https://api.example.com/hooksmith")[0] == "api.example.com"
    assert at("https://API.example.com/else")[1].concurrency == 9
    assert at("https://api.example.com/else")[1].rate == 5.0  # the sink's value
    assert at("https://other.example:8443/")[1].timeout_s == 2
    assert at("https://other.example/") == ("https://other.example:443", s.defaults)


def test_endpoint_options_inherit_the_sinks() -> None:
    s = settings(concurrency=2, endpoints={"a.example": {"rate": 3}})
    assert s.endpoints["a.example"].concurrency == 2
    assert s.endpoints["a.example"].rate == 3.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": "fast"}, "rate must be a float"),
        ({"rate": -1}, "rate must be >= 0"),
        ({"mode": "bulk"}, "mode must be one of"),
        ({"concurrency": 0}, "concurrency must be > 0"),
        ({"max_attempts": True}, "max_attempts must be a int"),
        ({"allow_private": "yes"}, "allow_private must be a bool"),
        ({"allowed_hosts": "a.example"}, "allowed_hosts must be a list"),
        ({"retries": 3}, "unknown options ['retries']"),
        ({"endpoints": {"a.example": {"colour": 1}}}, "endpoint 'a.example': unknown options"),
        ({"endpoints": {"ftp://a.example/": {}}}, "must be http(s)://host"),
        ({"endpoints": {"a.example": 5}}, "must be a table of options"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings(**options)
    assert message in str(error.value)


def test_every_endpoint_needs_a_secret_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="set secret_env"):
        HttpSettings.from_options("hooks", {}).secrets("hooks", {})
    with pytest.raises(ConfigError, match="environment variable S is not set"):
        settings().secrets("hooks", {})
    s = settings(endpoints={"a.example": {"secret_env": "T"}})
    with pytest.raises(ConfigError, match=r"endpoint 'a\.example': environment variable T"):
        s.secrets("hooks", {"S": "x"})
    assert s.secrets("hooks", {"S": "x", "T": "y"}) == {"S": b"x", "T": b"y"}


async def test_build_sinks_makes_an_http_sink_from_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = Config(
        streams={"hooks": StreamSpec("hooks", 2)},
        groups={"g": GroupSpec("g", "hooks", ("hooks",))},
        sinks={"hooks": SinkSpec("hooks", "http", {"secret_env": "HOOKS_TEST_SECRET"})},
    )
    with pytest.raises(ConfigError, match="HOOKS_TEST_SECRET is not set"):
        build_sinks(config)
    monkeypatch.setenv("HOOKS_TEST_SECRET", "s3cret")
    sink = build_sinks(config)["hooks"]
    assert isinstance(sink, HttpSink)
    await sink.close()


def test_plan_refuses_what_cannot_be_sent_and_chains_each_key() -> None:
    window = Window()
    url = "https://a.example/hook"
    entries = [
        window.entry("k1", url, {"n": 1}),
        window.entry("k2", url, {"n": 2}),
        window.entry("k1", url, {"n": 3}),
        window.entry("k3", "ftp://a.example/", {"n": 4}),
        window.entry("k4", url, {"n": 5}, headers={"Host": "evil.example"}),
        window.entry("k5", url, {"n": 6}, headers={"X-Streamsink-Signature": "forged"}),
        window.entry("k6", url, {"n": 7}, headers={"X-Ok": "a\r\nInjected: 1"}),
        window.entry("k7", url, {"blob": "x" * 2000}),
        window.entry("k8", url, {"n": 8}, headers={"X-Ok": "a\x01b"}),  # aiohttp would raise
        window.entry("k9", url, {"n": 9}, headers={"Bad Name": "v"}),
    ]
    work = plan(window.batch(entries), settings(max_body_bytes=1000))
    refused = {r.entry_id: (r.endpoint, r.reason) for r in work.refused}
    assert refused[entries[3].id] == (
        INVALID,
        "URL refused: scheme 'ftp' is not allowed; only http and https",
    )
    assert "header 'Host' is set by the sink" in refused[entries[4].id][1]
    assert "'X-Streamsink-Signature' is set by the sink" in refused[entries[5].id][1]
    assert "line break" in refused[entries[6].id][1]
    assert "control character" in refused[entries[8].id][1]
    assert "not a valid HTTP token" in refused[entries[9].id][1]
    assert refused[entries[7].id] == (
        "https://a.example:443",
        "payload refused: the body is 2011 bytes; max_body_bytes is 1000",
    )
    chains = [[orjson.loads(r.body)["n"] for r in chain] for chain in work.chains]
    assert sorted(chains) == [[1, 3], [2]]


def test_batch_requests_group_by_url_and_headers_and_keep_order() -> None:
    window = Window()
    a, b = "https://a.example/x", "https://a.example/y"
    entries = [
        window.entry("k", a, 1),
        window.entry("k", b, 2),
        window.entry("k", a, 3, headers={"X-T": "1"}),
        window.entry("k", a, 4),
    ]
    work = plan(window.batch(entries), settings(mode="batch"))
    bodies = sorted(
        (
            str(r.url),
            sorted(r.headers.items()),
            [i["payload"] for i in orjson.loads(r.body)["items"]],
        )
        for chain in work.chains
        for r in chain
    )
    assert bodies == [(a, [], [1, 4]), (a, [("X-T", "1")], [3]), (b, [], [2])]
    assert work.refused == []


def test_a_batch_item_too_large_alone_is_refused_and_the_rest_sent() -> None:
    window = Window()
    url = "https://a.example/x"
    entries = [window.entry("k", url, "s"), window.entry("k", url, "x" * 900)]
    work = plan(window.batch(entries), settings(mode="batch", max_body_bytes=500))
    assert [r.entry_id for r in work.refused] == [entries[1].id]
    ((request,),) = work.chains
    assert request.entry_ids == (entries[0].id,)
    assert len(request.body) <= 500


def test_retry_after_in_seconds_or_an_http_date() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds(" 0 ", now) == 0.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds(date, now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds("-5", now) is None
    assert retry_after_seconds(None, now) is None


def test_backoff_is_full_jitter_under_a_doubling_capped_bound() -> None:
    s = EndpointSettings(backoff_ms=100, max_backoff_ms=1000)
    for attempt, bound in ((1, 0.1), (2, 0.2), (4, 0.8), (5, 1.0), (40, 1.0)):
        delays = [backoff_delay(attempt, s) for _ in range(300)]
        assert all(0 <= d <= bound for d in delays)
        assert min(delays) < bound * 0.2 and max(delays) > bound * 0.8  # spread over [0, bound]
