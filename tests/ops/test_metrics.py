"""The collector on its own: HTTP sink series, error classes, bounded labels."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from streamsink.ops.metrics import Facts, WorkerCollector, error_class
from streamsink.sinks.http.deliver import status_class
from streamsink.streams.endpoints import EndpointRow


def scrape(worker: Any, facts: Facts) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker, facts))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_http_sink_requests_waits_callbacks_and_breakers() -> None:
    sender = SimpleNamespace(
        requests=Counter({("render", "2xx"): 7, ("render", "5xx"): 2, ("render", "error"): 1}),
        permit_wait_s={"render": 1.5},
    )
    worker = SimpleNamespace(groups=[], sinks={"hooks": SimpleNamespace(sender=sender)})
    facts = Facts(endpoints={"hooks": [EndpointRow("render", sent=7, failed=3, breaker="open")]})
    got = scrape(worker, facts)
    key = (("endpoint", "render"), ("sink", "hooks"))
    assert got["streamsink_http_requests_total", (*key, ("status_class", "5xx"))] == 2
    assert got["streamsink_http_requests_total", (*key, ("status_class", "error"))] == 1
    assert got["streamsink_http_rate_limit_wait_seconds_total", key] == 1.5
    assert got["streamsink_http_callbacks_total", (key[0], ("outcome", "failed"), key[1])] == 3
    assert got["streamsink_http_breaker_open", key] == 1.0


def test_error_and_status_classes_are_bounded() -> None:
    assert error_class("ConnectionError('Connection refused')") == "ConnectionError"
    assert error_class("psycopg2.OperationalError: server closed") == "OperationalError"
    assert error_class("something odd happened with key 42") == "Error"
    assert [status_class(s) for s in (0, 200, 204, 429, 503, 999)] == [
        "error",
        "2xx",
        "2xx",
        "4xx",
        "5xx",
        "error",
    ]
