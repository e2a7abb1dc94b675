"""The status document: `streamsink status --json` prints it, the page's /status.json serves it.

Schema (version 1, documented in the README's "Operating" section): new fields may be
added; none is renamed or removed without a new `schema` number. Records of Redis-backed
status (streams.admin.ShardStatus, streams.endpoints.EndpointRow, dead letters) are turned
into JSON field by field, so fields added to them show up here without a change.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

from streamsink.schemas.config import Config
from streamsink.streams.admin import group_status, list_streams, stream_info
from streamsink.streams.connection import SyncClient
from streamsink.streams.dead import dead_letters
from streamsink.streams.endpoints import endpoint_rows
from streamsink.streams.keys import Keys
from streamsink.streams.telemetry import read_telemetry

if TYPE_CHECKING:  # only streams/ talks to Redis: this module names the client's type
    pass

SCHEMA = 1
DEAD_LETTERS = 20
"""Dead letters listed per group (the newest), with their reasons."""
HOT_KEYS = 10


def plain(record: Any) -> Any:
    """A dataclass record as a JSON-ready dict (every field, present and future)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        fields = {f.name: plain(getattr(record, f.name)) for f in dataclasses.fields(record)}
        derived = {  # its properties too (ShardStatus.outstanding)
            name: plain(getattr(record, name))
            for name, value in vars(type(record)).items()
            if isinstance(value, property) and not name.startswith("_")
        }
        return {**fields, **derived}
    if isinstance(record, Mapping):
        return {str(k): plain(v) for k, v in record.items()}
    if isinstance(record, list | tuple):
        return [plain(v) for v in record]
    if isinstance(record, bytes):
        return record.decode("utf-8", "replace")
    if isinstance(record, Enum):
        return record.value
    if isinstance(record, str | int | float | bool) or record is None:
        return record
    return str(record)


def status_document(client: SyncClient, keys: Keys, config: Config) -> dict[str, Any]:
    """Streams, groups (shards, totals, tables, hot keys, dead letters) and HTTP sinks."""
    streams = []
    for name in list_streams(client, keys):
        info = stream_info(client, keys, name)
        streams.append({**plain(info), "length": info.length})
    groups = [
        _group(client, keys, group.name, group.stream, group.sinks)
        for group in config.groups.values()
    ]
    http = [
        {"name": spec.name, "endpoints": plain(endpoint_rows(client, keys, spec.name))}
        for spec in config.sinks.values()
        if spec.type == "http"
    ]
    return {
        "schema": SCHEMA,
        "generated_ms": int(time.time() * 1000),
        "prefix": keys.prefix,
        "streams": streams,
        "groups": groups,
        "http_sinks": http,
    }


def _group(
    client: SyncClient, keys: Keys, name: str, stream: str, sinks: Sequence[str]
) -> dict[str, Any]:
    rows = group_status(client, keys, stream, name)
    measured = read_telemetry(client, keys, stream, name, len(rows))
    shards = [{**plain(row), "telemetry": doc} for row, doc in zip(rows, measured, strict=True)]
    docs = [doc for doc in measured if doc is not None]
    tables = _tables(doc.get("tables", {}) for doc in docs)
    events = sum(t["events"] for t in tables.values())
    written = sum(t["rows"] for t in tables.values())
    letters = sorted(dead_letters(client, keys, stream, name, DEAD_LETTERS), key=_dead_order)
    return {
        "name": name,
        "stream": stream,
        "sinks": list(sinks),
        "totals": {
            "length": sum(row.length for row in rows),
            "lag": sum(row.lag or 0 for row in rows),
            "lag_known": all(row.lag is not None for row in rows),
            "lag_capped": any(getattr(row, "lag_capped", False) for row in rows),
            "pending": sum(row.pending for row in rows),
            "outstanding": sum((row.lag or 0) + row.pending for row in rows),
            "dead": sum(row.dead for row in rows),
            "owned": sum(1 for row in rows if row.owner),
            "read": sum(doc.get("stats", {}).get("read", 0) for doc in docs),
            "applied": sum(doc.get("stats", {}).get("applied", 0) for doc in docs),
            "events": events,
            "rows": written,
            "coalescing_ratio": round(events / written, 3) if written else None,
            "writes_saved": events - written,
        },
        "tables": tables,
        "hot_keys": sorted(
            (hot for doc in docs for hot in doc.get("hot_keys", [])),
            key=lambda hot: -int(hot["count"]),
        )[:HOT_KEYS],
        "shards": shards,
        "dead_letters": [
            {k: v for k, v in plain(letter).items() if k != "fields"}
            for letter in letters[-DEAD_LETTERS:]
        ],
    }


def _tables(per_shard: Iterable[Mapping[str, Mapping[str, int]]]) -> dict[str, dict[str, Any]]:
    """Events in and rows out per table, summed over shards, with ratio and writes saved."""
    totals: dict[str, dict[str, Any]] = {}
    for tables in per_shard:
        for table, counts in tables.items():
            into = totals.setdefault(table, {"events": 0, "rows": 0})
            into["events"] += int(counts.get("events", 0))
            into["rows"] += int(counts.get("rows", 0))
    for counts in totals.values():
        rows = counts["rows"]
        counts["coalescing_ratio"] = round(counts["events"] / rows, 3) if rows else None
        counts["writes_saved"] = counts["events"] - rows
    return dict(sorted(totals.items()))


def _dead_order(letter: Any) -> tuple[int, int]:
    ms, _, seq = str(letter.id).partition("-")
    return int(ms or 0), int(seq or 0)
