"""The config: streams, tables, groups and sinks, from Python or from a TOML file."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from streamsink.errors import ConfigError, ValidationError
from streamsink.schemas.event import Event, Op, check_call
from streamsink.schemas.readmodel import DEFAULT_TTL, ReadModel
from streamsink.schemas.table import Column, ColumnType, Mode, Policy, Table, validate
from streamsink.schemas.wire import DEFAULT_MAX_DATA_BYTES

E = TypeVar("E", ColumnType, Policy, Mode)

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""Stream, group and sink names: safe inside Redis keys and hash tags (no ':', '{', '}')."""

MAX_SHARDS = 1024

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_PREFIX = "ss"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A logical stream: its shard count and the table its events go to by default."""

    name: str
    shards: int
    table: str | None = None
    max_lag: int | None = None
    """Publishing refuses (`Backpressure`) while the slowest group has this many entries of a
    shard not yet committed (None: no limit)."""
    max_memory: float | None = None
    """Publishing refuses while Redis uses this fraction of its `maxmemory` or more."""


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """A named sink: its type and the options its implementation reads."""

    name: str
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A consumer group: the stream it reads, the sinks it feeds, its own options."""

    name: str
    stream: str
    sinks: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a producer or worker needs to know; build it in Python or with `load`."""

    streams: Mapping[str, StreamSpec] = field(default_factory=dict)
    tables: Mapping[str, Table] = field(default_factory=dict)
    groups: Mapping[str, GroupSpec] = field(default_factory=dict)
    sinks: Mapping[str, SinkSpec] = field(default_factory=dict)
    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = DEFAULT_PREFIX
    postgres_dsn: str = DEFAULT_POSTGRES_DSN
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES
    read_models: Mapping[str, ReadModel] = field(default_factory=dict)
    """Tables with a Redis read model, by table name (`read_model = true` in the file)."""
    http: str | None = None
    """`host:port` of the worker's HTTP endpoint (metrics, probes, the page); None: off."""

    def __post_init__(self) -> None:
        if not NAME.match(self.prefix):
            raise ConfigError(f"prefix {self.prefix!r} must match {NAME.pattern}")
        for spec in self.streams.values():
            _check_name("stream", spec.name)
            if not 1 <= spec.shards <= MAX_SHARDS:
                raise ConfigError(f"stream {spec.name!r}: shards must be 1..{MAX_SHARDS}")
            if spec.max_lag is not None and spec.max_lag < 1:
                raise ConfigError(f"stream {spec.name!r}: max_lag must be a positive integer")
            if spec.max_memory is not None and not 0 < spec.max_memory <= 1:
                raise ConfigError(f"stream {spec.name!r}: max_memory must be in (0, 1]")
            if spec.table is not None and spec.table not in self.tables:
                raise ConfigError(f"stream {spec.name!r}: table {spec.table!r} is not declared")
        for group in self.groups.values():
            _check_name("group", group.name)
            if group.stream not in self.streams:
                raise ConfigError(f"group {group.name!r}: stream {group.stream!r} is not declared")
            for sink in group.sinks:
                if sink not in self.sinks:
                    raise ConfigError(f"group {group.name!r}: sink {sink!r} is not declared")
        for sink_spec in self.sinks.values():
            _check_name("sink", sink_spec.name)
        for name, model in self.read_models.items():
            if name not in self.tables:
                raise ConfigError(f"read model of {name!r}: the table is not declared")
            model.check(self.tables[name])

    def read_model_stream(self, table: str) -> str:
        """The stream whose events feed the read model of `table` (its default table)."""
        streams = [s.name for s in self.streams.values() if s.table == table]
        if len(streams) != 1:
            raise ConfigError(
                f"table {table!r}: a read needs the one stream whose default table it is; "
                f"found {streams or 'none'}"
            )
        return streams[0]

    def table_for(self, stream: str, event: Event) -> Table | None:
        """The table `event` goes to on `stream`, or None for calls and table-less streams."""
        if event.op is Op.CALL:
            return None
        name = event.table
        if name is None:
            spec = self.streams.get(stream)
            name = spec.table if spec else None
            if name is None:
                if self.tables:
                    raise ValidationError("table", f"stream {stream!r} has no default table")
                return None
        table = self.tables.get(name)
        if table is None:
            raise ValidationError("table", f"{name!r} is not a declared table")
        return table

    def default_table(self, stream: str) -> Table | None:
        """The table events of `stream` go to when they name none (None: no default)."""
        spec = self.streams.get(stream)
        return self.tables.get(spec.table) if spec is not None and spec.table else None

    def validator(self, stream: str) -> Callable[[Event], Table | None]:
        """`validate` for one stream, with its default table looked up once (the hot path)."""
        default = self.default_table(stream)

        def check(event: Event) -> Table | None:
            if default is not None and event.table is None and event.op is not Op.CALL:
                validate(event, default)
                return default
            return self.validate(stream, event)

        return check

    def validate(self, stream: str, event: Event) -> Table | None:
        """Check `event` for `stream` against its table (or as a call); return the table."""
        if event.op is Op.CALL:
            check_call(event)
            return None
        table = self.table_for(stream, event)
        if table is not None:
            validate(event, table)
        return table


def load(path: str | os.PathLike[str]) -> Config:
    """Read a TOML config file; ConfigError names the file and what is wrong."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build a Config from the parsed TOML layout (see docs/config.md)."""
    _only(
        raw,
        "config",
        {"redis", "postgres", "limits", "streams", "tables", "groups", "sinks", "worker"},
    )
    redis = _section(raw, "redis", {"url", "prefix"})
    postgres = _section(raw, "postgres", {"dsn"})
    limits = _section(raw, "limits", {"max_data_bytes"})
    worker = _section(raw, "worker", {"http"})
    tables = {name: _table(name, spec) for name, spec in _section(raw, "tables").items()}
    read_models = {
        name: model
        for name, spec in _section(raw, "tables").items()
        if (model := _read_model(name, spec)) is not None
    }
    streams = {name: _stream(name, spec) for name, spec in _section(raw, "streams").items()}
    sinks = {name: _sink(name, spec) for name, spec in _section(raw, "sinks").items()}
    groups = {name: _group(name, spec) for name, spec in _section(raw, "groups").items()}
    return Config(
        streams=streams,
        tables=tables,
        groups=groups,
        sinks=sinks,
        redis_url=str(redis.get("url") or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL),
        prefix=str(redis.get("prefix", DEFAULT_PREFIX)),
        postgres_dsn=str(
            postgres.get("dsn") or os.environ.get("DATABASE_URL") or DEFAULT_POSTGRES_DSN
        ),
        max_data_bytes=_int(limits, "max_data_bytes", DEFAULT_MAX_DATA_BYTES, "limits"),
        read_models=read_models,
        http=_address(worker.get("http"), "[worker] http"),
    )


def _address(value: Any, where: str) -> str | None:
    """A `host:port` to listen on (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f'{where}: expected "host:port", got {value!r}')
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f'{where}: expected "host:port" (e.g. 127.0.0.1:9464), got {value!r}')
    return value


def _table(name: str, spec: Any) -> Table:
    where = f"table {name!r}"
    spec = _mapping(spec, where)
    allowed = {"key", "columns", "mode", "schema", "key_format", "read_model", "ttl_by", "ttl"}
    _only(spec, where, allowed)
    key = spec.get("key", [])
    if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
        raise ConfigError(f"{where}: key must be a list of column names")
    columns = {
        col: _column(f"{where} column {col!r}", c) for col, c in _section(spec, "columns").items()
    }
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, str):
        raise ConfigError(f"{where}: schema must be a schema name")
    key_format = spec.get("key_format")
    if key_format is not None and not isinstance(key_format, str):
        raise ConfigError(f'{where}: key_format must be a string such as "task:{{id}}"')
    for col in key:
        if col in columns and columns[col].nullable:
            columns[col] = replace(columns[col], nullable=False)
    return Table(
        name=name,
        key=tuple(key),
        columns=columns,
        mode=_enum(Mode, spec.get("mode", "upsert"), f"{where}: mode"),
        schema=schema,
        key_format=key_format,
    )


def _read_model(name: str, spec: Any) -> ReadModel | None:
    where = f"table {name!r}"
    spec = _mapping(spec, where)
    enabled = spec.get("read_model", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: read_model must be true or false")
    if not enabled:
        if "ttl_by" in spec or "ttl" in spec:
            raise ConfigError(f"{where}: ttl_by and ttl need read_model = true")
        return None
    ttl_by = spec.get("ttl_by")
    if ttl_by is not None and not isinstance(ttl_by, str):
        raise ConfigError(f"{where}: ttl_by must be a column name")
    ttl = dict(_mapping(spec.get("ttl", {}), f"{where} ttl"))
    default = ttl.pop("default", DEFAULT_TTL)
    return ReadModel(ttl_by=ttl_by, ttl=ttl, default=default)


def _column(where: str, spec: Any) -> Column:
    if isinstance(spec, str):
        spec = {"type": spec}
    spec = _mapping(spec, where)
    _only(spec, where, {"type", "policy", "nullable", "precision", "scale"})
    if "type" not in spec:
        raise ConfigError(f"{where}: needs a type")
    nullable = spec.get("nullable", True)
    if not isinstance(nullable, bool):
        raise ConfigError(f"{where}: nullable must be true or false")
    kind = _enum(ColumnType, spec["type"], f"{where}: type")
    if kind is ColumnType.NUMERIC and "precision" not in spec:
        raise ConfigError(
            f'{where}: numeric needs its digits, e.g. {{ type = "numeric", precision = 12, '
            "scale = 2 }"
        )
    return Column(
        type=kind,
        policy=_enum(Policy, spec.get("policy", "lww"), f"{where}: policy"),
        nullable=nullable,
        precision=spec.get("precision"),
        scale=spec.get("scale", 0 if kind is ColumnType.NUMERIC else None),
    )


def _stream(name: str, spec: Any) -> StreamSpec:
    where = f"stream {name!r}"
    spec = _mapping(spec, where)
    _only(spec, where, {"shards", "table", "max_lag", "max_memory"})
    table = spec.get("table")
    if table is not None and not isinstance(table, str):
        raise ConfigError(f"{where}: table must be a table name")
    memory = spec.get("max_memory")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int | float)):
        raise ConfigError(f"{where}: max_memory must be a fraction of maxmemory, e.g. 0.9")
    return StreamSpec(
        name=name,
        shards=_int(spec, "shards", 1, where),
        table=table,
        max_lag=_int(spec, "max_lag", 0, where) if "max_lag" in spec else None,
        max_memory=float(memory) if memory is not None else None,
    )


def _sink(name: str, spec: Any) -> SinkSpec:
    where = f"sink {name!r}"
    spec = dict(_mapping(spec, where))
    kind = spec.pop("type", None)
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: needs a type (postgres, http, redis-hash, function)")
    return SinkSpec(name=name, type=kind, options=spec)


def _group(name: str, spec: Any) -> GroupSpec:
    where = f"group {name!r}"
    spec = dict(_mapping(spec, where))
    stream = spec.pop("stream", None)
    sinks = spec.pop("sinks", None)
    if not isinstance(stream, str):
        raise ConfigError(f"{where}: needs the stream it reads")
    if not isinstance(sinks, list) or not sinks or not all(isinstance(s, str) for s in sinks):
        raise ConfigError(f"{where}: sinks must be a non-empty list of sink names")
    return GroupSpec(name=name, stream=stream, sinks=tuple(sinks), options=spec)


def _check_name(kind: str, name: str) -> None:
    if not NAME.match(name):
        raise ConfigError(f"{kind} name {name!r} must match {NAME.pattern}")


def _section(
    raw: Mapping[str, Any], name: str, allowed: set[str] | None = None
) -> Mapping[str, Any]:
    section = _mapping(raw.get(name, {}), f"[{name}]")
    if allowed is not None:
        _only(section, f"[{name}]", allowed)
    return section


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table of settings, got {type(value).__name__}")
    return value


def _only(raw: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; known: {sorted(allowed)}")


def _int(raw: Mapping[str, Any], name: str, default: int, where: str) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _enum(kind: type[E], value: Any, where: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in kind]}") from None
