"""The config: TOML layout, environment fallbacks, cross-checks, the table of an event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamsink.errors import ConfigError, EventError, ValidationError
from streamsink.schemas.config import (
    DEFAULT_POSTGRES_DSN,
    DEFAULT_REDIS_URL,
    Config,
    GroupSpec,
    SinkSpec,
    StreamSpec,
    from_dict,
    load,
)
from streamsink.schemas.event import Event
from streamsink.schemas.table import Column, ColumnType, Mode, Policy, Table
from streamsink.schemas.wire import DEFAULT_MAX_DATA_BYTES
from tests.schemas.expect import expect

T = ColumnType

REALISTIC = """\
# The write patterns of the seeds, one stream each.
[redis]
url = "redis://cache.internal:6380/2"
prefix = "app1"

[postgres]
dsn = "postgresql://writer@db.internal:5432/app"

[limits]
max_data_bytes = 65536

[streams.tasks]
shards = 8
table = "tasks"

[streams.likes]
shards = 4
table = "post_likes"

[streams.hooks]
shards = 2

[tables.tasks]
key = ["id"]
schema = "jobs"

[tables.tasks.columns]
id = "int"
status = "text"
progress = { type = "int", policy = "max" }
updated_at = "timestamp"

[tables.post_likes]
key = ["post_id", "user_id"]
mode = "update"
columns.post_id = { type = "int", nullable = true }
columns.user_id = "int"
columns.liked_at = { type = "timestamp", nullable = false }

[tables.post_stats]
key = ["post_id"]
columns.post_id = "int"
columns.views = { type = "int", policy = "sum" }
columns.rating = { type = "float", policy = "min", nullable = true }
columns.meta = "json"
columns.ref = "uuid"
columns.hidden = "bool"

[tables.activity_log]
key = []
columns = { user_id = "int", action = "text", at = "timestamp", meta = "json" }

[sinks.postgres]
type = "postgres"

[sinks.notify]
type = "http"
rate_per_second = 50
secret_env = "HOOK_SECRET"

[groups.pg-writer]
stream = "tasks"
sinks = ["postgres"]
max_events = 500

[groups.callbacks]
stream = "hooks"
sinks = ["notify", "postgres"]
"""


def write(tmp_path: Path, text: str) -> Path:
    """`text` as a config file in tmp_path."""
    path = tmp_path / "streamsink.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither REDIS_URL nor DATABASE_URL is set."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)


@pytest.fixture
def config(tmp_path: Path, no_env: None) -> Config:
    """The realistic config, loaded from a file."""
    return load(write(tmp_path, REALISTIC))


def test_load_reads_connection_settings(config: Config) -> None:
    assert config.redis_url == "redis://cache.internal:6380/2"
    assert config.prefix == "app1"
    assert config.postgres_dsn == "postgresql://writer@db.internal:5432/app"
    assert config.max_data_bytes == 65536


def test_load_reads_streams(config: Config) -> None:
    assert config.streams == {
        "tasks": StreamSpec("tasks", 8, "tasks"),
        "likes": StreamSpec("likes", 4, "post_likes"),
        "hooks": StreamSpec("hooks", 2, None),
    }


def test_load_reads_tables(config: Config) -> None:
    assert set(config.tables) == {"tasks", "post_likes", "post_stats", "activity_log"}
    assert config.tables["activity_log"].key == ()
    assert config.tables["activity_log"].value_columns == ("user_id", "action", "at", "meta")
    assert config.tables["tasks"] == Table(
        name="tasks",
        key=("id",),
        columns={
            "id": Column(T.INT, Policy.LWW, nullable=False),
            "status": Column(T.TEXT),
            "progress": Column(T.INT, Policy.MAX),
            "updated_at": Column(T.TIMESTAMP),
        },
        schema="jobs",
    )
    assert list(config.tables["tasks"].columns) == ["id", "status", "progress", "updated_at"]
    likes = config.tables["post_likes"]
    assert likes.mode is Mode.UPDATE
    assert likes.key == ("post_id", "user_id")
    # A key column is never nullable, even when declared so.
    assert likes.columns["post_id"] == Column(T.INT, nullable=False)
    assert likes.columns["liked_at"] == Column(T.TIMESTAMP, nullable=False)
    stats = config.tables["post_stats"]
    assert stats.mode is Mode.UPSERT and stats.schema is None
    assert stats.columns["views"] == Column(T.INT, Policy.SUM)
    assert stats.columns["rating"] == Column(T.FLOAT, Policy.MIN, nullable=True)
    assert {name: c.type for name, c in stats.columns.items()} == {
        "post_id": T.INT,
        "views": T.INT,
        "rating": T.FLOAT,
        "meta": T.JSON,
        "ref": T.UUID,
        "hidden": T.BOOL,
    }
    assert stats.value_columns == ("views", "rating", "meta", "ref", "hidden")


def test_load_reads_sinks_and_groups(config: Config) -> None:
    assert config.sinks == {
        "postgres": SinkSpec("postgres", "postgres", {}),
        "notify": SinkSpec("notify", "http", {"rate_per_second": 50, "secret_env": "HOOK_SECRET"}),
    }
    assert config.groups == {
        "pg-writer": GroupSpec("pg-writer", "tasks", ("postgres",), {"max_events": 500}),
        "callbacks": GroupSpec("callbacks", "hooks", ("notify", "postgres"), {}),
    }


def test_empty_file_gives_the_defaults(tmp_path: Path, no_env: None) -> None:
    config = load(write(tmp_path, ""))
    assert config == Config()
    assert config.redis_url == DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"
    assert config.postgres_dsn == DEFAULT_POSTGRES_DSN
    assert config.prefix == "ss"
    assert config.max_data_bytes == DEFAULT_MAX_DATA_BYTES


def test_urls_fall_back_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/5")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env@pg/envdb")
    config = load(write(tmp_path, '[redis]\nprefix = "p"\n'))
    assert config.redis_url == "redis://from-env:6379/5"
    assert config.postgres_dsn == "postgresql://env@pg/envdb"


def test_file_urls_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/5")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env@pg/envdb")
    config = load(write(tmp_path, REALISTIC))
    assert config.redis_url == "redis://cache.internal:6380/2"
    assert config.postgres_dsn == "postgresql://writer@db.internal:5432/app"


def test_empty_environment_values_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "")
    monkeypatch.setenv("DATABASE_URL", "")
    config = from_dict({})
    assert (config.redis_url, config.postgres_dsn) == (DEFAULT_REDIS_URL, DEFAULT_POSTGRES_DSN)


# --- bad files -----------------------------------------------------------------------------


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[streams.tasks]\nshards = 4\ntable = "tasks\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid TOML")
    assert "line 3" in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read: No such file or directory") as caught:
        load(path)
    assert str(caught.value).startswith(str(path))


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[redis]\nprefix = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 21\)"):
        load(path)


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[redsi]\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}: config: unknown setting 'redsi'")


CASES: list[tuple[str, str, str]] = [
    # (name, toml, a part of the message)
    ("unknown top-level section", "[redsi]\n", "config: unknown setting 'redsi'; known: "),
    ("unknown redis setting", '[redis]\nhost = "x"\n', "[redis]: unknown setting 'host'"),
    ("unknown limit", "[limits]\nmax_events = 3\n", "[limits]: unknown setting 'max_events'"),
    ("unknown stream setting", "[streams.s]\nshard = 4\n", "stream 's': unknown setting 'shard'"),
    (
        "unknown table setting",
        '[tables.t]\nkeys = ["id"]\ncolumns = { id = "int" }\n',
        "table 't': unknown setting 'keys'",
    ),
    (
        "unknown column setting",
        '[tables.t]\ncolumns = { id = { type = "int", default = 0 } }\n',
        "table 't' column 'id': unknown setting 'default'",
    ),
    (
        "unknown column type",
        '[tables.t]\nkey = ["id"]\ncolumns = { id = "integer" }\n',
        "table 't' column 'id': type: 'integer' is not one of ['int', 'float', 'text'",
    ),
    (
        "unknown policy",
        '[tables.t]\ncolumns = { id = "int", n = { type = "int", policy = "avg" } }\n',
        "column 'n': policy: 'avg' is not one of ['lww', 'sum', 'max', 'min']",
    ),
    (
        "unknown mode",
        '[tables.t]\nmode = "insert"\ncolumns = { id = "int" }\n',
        "table 't': mode: 'insert' is not one of ['upsert', 'update']",
    ),
    (
        "column without type",
        '[tables.t]\ncolumns = { id = { policy = "lww" } }\n',
        "table 't' column 'id': needs a type",
    ),
    (
        "nullable not a boolean",
        '[tables.t]\ncolumns = { id = { type = "int", nullable = "no" } }\n',
        "nullable must be true or false",
    ),
    ("columns not a table", '[tables.t]\ncolumns = ["id"]\n', "[columns]: expected a table"),
    (
        "key not a list",
        '[tables.t]\nkey = "id"\ncolumns = { id = "int" }\n',
        "table 't': key must be a list of column names",
    ),
    (
        "schema not a name",
        '[tables.t]\nschema = 5\ncolumns = { id = "int" }\n',
        "table 't': schema must be a schema name",
    ),
    (
        "sum policy on text",
        '[tables.t]\ncolumns = { id = "int", s = { type = "text", policy = "sum" } }\n',
        "table 't': column 's': sum needs int, float or numeric",
    ),
    (
        "key column undeclared",
        '[tables.t]\nkey = ["uid"]\ncolumns = { id = "int" }\n',
        "table 't': key column 'uid' is not declared",
    ),
    ("table with no columns", "[tables.t]\n", "table 't': declares no columns"),
    (
        "table name not an identifier",
        '[tables.my-table]\ncolumns = { id = "int" }\n',
        "'my-table' is not a valid identifier",
    ),
    (
        "stream default table undeclared",
        '[streams.s]\ntable = "nope"\n',
        "stream 's': table 'nope' is not declared",
    ),
    ("stream table not a name", "[streams.s]\ntable = 3\n", "table must be a table name"),
    ("zero shards", "[streams.s]\nshards = 0\n", "shards must be a positive integer, got 0"),
    ("shards as text", '[streams.s]\nshards = "4"\n', "shards must be a positive integer"),
    ("shards as boolean", "[streams.s]\nshards = true\n", "got True"),
    ("too many shards", "[streams.s]\nshards = 1025\n", "stream 's': shards must be 1..1024"),
    ("stream name unsafe in keys", '[streams."a:b"]\n', "stream name 'a:b' must match"),
    ("stream name with braces", '[streams."{s}"]\n', "stream name '{s}' must match"),
    ("bad prefix", '[redis]\nprefix = "a b"\n', "prefix 'a b' must match"),
    ("limit not positive", "[limits]\nmax_data_bytes = -1\n", "max_data_bytes must be a positive"),
    (
        "group names an undeclared sink",
        '[streams.s]\n[sinks.pg]\ntype = "postgres"\n'
        '[groups.g]\nstream = "s"\nsinks = ["pg", "http"]\n',
        "group 'g': sink 'http' is not declared",
    ),
    (
        "group names an undeclared stream",
        '[sinks.pg]\ntype = "postgres"\n[groups.g]\nstream = "s"\nsinks = ["pg"]\n',
        "group 'g': stream 's' is not declared",
    ),
    (
        "group without stream",
        '[groups.g]\nsinks = ["pg"]\n',
        "group 'g': needs the stream it reads",
    ),
    (
        "group with no sinks",
        '[streams.s]\n[groups.g]\nstream = "s"\nsinks = []\n',
        "group 'g': sinks must be a non-empty list of sink names",
    ),
    ("sink without type", "[sinks.pg]\ndsn = 'x'\n", "sink 'pg': needs a type"),
    (
        "section not a table",
        'streams = "tasks"\n',
        "[streams]: expected a table of settings, got str",
    ),
]


@pytest.mark.parametrize(("toml", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert f"{path}: " in str(caught.value)
    assert message in str(caught.value)


def test_python_built_config_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="group 'g': sink 'pg' is not declared"):
        Config(streams={"s": StreamSpec("s", 1)}, groups={"g": GroupSpec("g", "s", ("pg",))})


# --- which table an event goes to ----------------------------------------------------------


def test_stream_default_table(config: Config) -> None:
    event = Event.make("task:1", "set", {"id": 1, "status": "done"})
    assert config.table_for("tasks", event) is config.tables["tasks"]
    assert config.validate("tasks", event) is config.tables["tasks"]


def test_event_table_overrides_the_default(config: Config) -> None:
    event = Event.make("post:1", "incr", {"post_id": 1, "views": 1}, table="post_stats")
    assert config.validate("tasks", event) is config.tables["post_stats"]


def test_event_on_a_stream_without_default_table_needs_one(config: Config) -> None:
    event = Event.make("k", "set", {"id": 1})
    with expect(ValidationError, "table", "stream 'hooks' has no default table"):
        config.validate("hooks", event)
    with expect(ValidationError, "table", "stream 'unknown' has no default table"):
        config.validate("unknown", event)


def test_event_naming_an_undeclared_table(config: Config) -> None:
    event = Event.make("k", "set", {"id": 1}, table="nope")
    with expect(ValidationError, "table", "'nope' is not a declared table"):
        config.validate("tasks", event)


def test_validate_checks_the_event_against_its_table(config: Config) -> None:
    event = Event.make("task:1", "set", {"id": 1, "progress": "half"})
    with expect(ValidationError, "data.progress", "expected an integer, got a string"):
        config.validate("tasks", event)


def test_calls_are_checked_as_calls_and_have_no_table(config: Config) -> None:
    good = Event.make("order:1", "call", {"url": "https://x/h", "payload": {"a": 1}})
    assert config.table_for("hooks", good) is None
    assert config.validate("tasks", good) is None
    bad = Event.make("order:1", "call", {"payload": {"a": 1}})
    with expect(EventError, "data.url", "endpoint URL"):
        config.validate("hooks", bad)


def test_config_without_tables_takes_any_event() -> None:
    config = Config(streams={"s": StreamSpec("s", 2)})
    assert config.validate("s", Event.make("k", "set", {"anything": [1]})) is None


def test_from_dict_takes_the_parsed_layout(no_env: None) -> None:
    raw: dict[str, Any] = {
        "streams": {"s": {"shards": 2, "table": "t"}},
        "tables": {"t": {"key": ["id"], "columns": {"id": "int", "n": {"type": "float"}}}},
    }
    config = from_dict(raw)
    assert config.streams["s"] == StreamSpec("s", 2, "t")
    assert config.tables["t"].columns["n"] == Column(T.FLOAT)


def test_worker_http_address(tmp_path: Path, no_env: None) -> None:
    assert load(write(tmp_path, "")).http is None
    config = load(write(tmp_path, '[worker]\nhttp = "127.0.0.1:9464"\n'))
    assert config.http == "127.0.0.1:9464"
    for bad in ('"9464"', '"host:port"', "9464"):
        with pytest.raises(ConfigError, match=r"\[worker\] http"):
            load(write(tmp_path, f"[worker]\nhttp = {bad}\n"))


def test_from_dict_reads_key_format() -> None:
    table = {"key": ["id"], "columns": {"id": "int"}, "key_format": "task:{id}"}
    config = from_dict({"tables": {"t": table}})
    assert config.tables["t"].key_format == "task:{id}"
    assert config.tables["t"].key_of is not None
    assert config.tables["t"].key_of({"id": 42}) == "task:42"
    with pytest.raises(ConfigError, match="key_format must be a string"):
        from_dict({"tables": {"t": {**table, "key_format": 5}}})
    with pytest.raises(ConfigError, match="must name every key column: id"):
        from_dict({"tables": {"t": {**table, "key_format": "task"}}})
