"""Turning a window's calls into requests, grouped per endpoint: pure, no I/O.

"each" endpoints get one request per call, chained per event key (a key's callbacks go
one after the other, in stream order; different keys go concurrently). "batch"
endpoints get one request per (URL, headers) with the calls as items of a JSON body,
split to respect `max_batch_items` and `max_body_bytes`, the parts sent in order.
Calls that cannot be sent at all (URL text, headers, size) are refused here, with why.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from yarl import URL

from streamsink.schemas.merge import Entry
from streamsink.sinks.base import Batch
from streamsink.sinks.http.settings import EndpointSettings, HttpSettings
from streamsink.sinks.http.signing import batch_key, header_refusal, idempotency_key
from streamsink.sinks.http.urls import Refused, check_url

INVALID = "(invalid url)"
"""The endpoint name that `status` counts refused URLs under."""


@dataclass(slots=True)  # not frozen: one is made per call, and a frozen one costs 5x
class Request:
    """One HTTP POST to make, and the entries it delivers (never changed once made)."""

    endpoint: str
    settings: EndpointSettings
    url: URL
    body: bytes
    headers: dict[str, str]  # the call's own headers
    key: str  # Idempotency-Key
    entry_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call that is not sent: its endpoint (for the counts), entry ID and reason."""

    endpoint: str
    entry_id: str
    reason: str


@dataclass(slots=True)
class Plan:
    """Chains of requests (each chain in order, chains concurrently) and the refused calls."""

    chains: list[list[Request]] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Item:
    entry_id: str
    encoded: bytes


def plan(batch: Batch, settings: HttpSettings) -> Plan:
    """The requests that deliver the calls of `batch` (see the module docstring)."""
    result = Plan()
    by_key: dict[tuple[str, str], list[Request]] = {}
    grouped: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[_Item]] = {}
    targets: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[URL, EndpointSettings]] = {}
    checked: dict[str, tuple[URL, str, EndpointSettings] | str] = {}  # URL text -> its check
    for entry in batch.merged.calls:
        data = entry.event.data
        target = checked.get(data["url"])
        if target is None:
            target = checked[data["url"]] = _target(data["url"], settings)
        if isinstance(target, str):
            result.refused.append(Refusal(INVALID, entry.id, target))
            continue
        url, name, endpoint = target
        given = data.get("headers")
        headers: dict[str, str] = dict(given) if given else {}
        reason = header_refusal(headers) if headers else None
        if reason is not None:
            result.refused.append(Refusal(name, entry.id, f"call refused: {reason}"))
            continue
        key = idempotency_key(batch.stream, batch.shard, batch.origin(entry.id))
        if endpoint.mode == "each":
            body = orjson.dumps(data["payload"])
            if len(body) > endpoint.max_body_bytes:
                result.refused.append(Refusal(name, entry.id, _too_large(len(body), endpoint)))
                continue
            request = Request(name, endpoint, url, body, headers, key, (entry.id,))
            by_key.setdefault((name, entry.event.key), []).append(request)
        else:
            slot = (name, str(url), tuple(sorted(headers.items())))
            grouped.setdefault(slot, []).append(_Item(entry.id, _item(entry, key)))
            targets[slot] = (url, endpoint)
    result.chains.extend(by_key.values())
    for slot, items in grouped.items():
        url, endpoint = targets[slot]
        chain: list[Request] = []
        for part in _parts(batch, items, endpoint, result.refused, slot[0]):
            body = _envelope(batch, part)
            ids = tuple(item.entry_id for item in part)
            key = batch_key(batch.stream, batch.shard, ids[0], ids[-1])
            chain.append(Request(slot[0], endpoint, url, body, dict(slot[2]), key, ids))
        if chain:
            result.chains.append(chain)
    return result


def _target(text: str, settings: HttpSettings) -> tuple[URL, str, EndpointSettings] | str:
    """A call's URL, its endpoint's name and settings; or why the URL is refused."""
    try:
        url = check_url(text, settings.max_url_bytes, settings.allowed_hosts)
    except Refused as exc:
        return f"URL refused: {exc}"
    return (url, *settings.endpoint_for(url))


def _item(entry: Entry, key: str) -> bytes:
    item: dict[str, Any] = {
        "idempotency_key": key,
        "key": entry.event.key,
        "payload": entry.event.data["payload"],
    }
    return orjson.dumps(item)


_OPEN, _ITEMS, _CLOSE = b'{"idempotency_key":', b',"items":[', b"]}"


def _envelope(batch: Batch, items: Sequence[_Item]) -> bytes:
    """`{"idempotency_key": <batch key>, "items": [<item>, ...]}` from encoded items."""
    key = batch_key(batch.stream, batch.shard, items[0].entry_id, items[-1].entry_id)
    inner = b",".join(item.encoded for item in items)
    return _OPEN + orjson.dumps(key) + _ITEMS + inner + _CLOSE


def _size(batch: Batch, first: _Item, last: _Item, inner: int) -> int:
    """Bytes of the envelope of items from `first` to `last` whose joined items take `inner`."""
    key = batch_key(batch.stream, batch.shard, first.entry_id, last.entry_id)
    return len(_OPEN) + len(orjson.dumps(key)) + len(_ITEMS) + inner + len(_CLOSE)


def _parts(
    batch: Batch,
    items: Sequence[_Item],
    endpoint: EndpointSettings,
    refused: list[Refusal],
    name: str,
) -> Iterator[list[_Item]]:
    """Consecutive runs of items, each within the item count and body size limits."""
    limit = endpoint.max_body_bytes
    part: list[_Item] = []
    inner = 0  # bytes of the items of `part` joined by commas
    for item in items:
        alone = _size(batch, item, item, len(item.encoded))
        if alone > limit:
            refused.append(Refusal(name, item.entry_id, _too_large(alone, endpoint)))
            continue
        if part and (
            len(part) >= endpoint.max_batch_items
            or _size(batch, part[0], item, inner + 1 + len(item.encoded)) > limit
        ):
            yield part
            part, inner = [], 0
        inner += len(item.encoded) + (1 if part else 0)
        part.append(item)
    if part:
        yield part


def _too_large(size: int, endpoint: EndpointSettings) -> str:
    return f"payload refused: the body is {size} bytes; max_body_bytes is {endpoint.max_body_bytes}"
