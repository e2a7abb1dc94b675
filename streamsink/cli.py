"""streamsink: check a config, create streams and tables, publish, run workers, show status,
handle dead letters and rate limits, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, replace
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import redis
from tqdm import tqdm

from streamsink.checks import check_environment, load_checked
from streamsink.errors import ConfigError, EventError, StreamsinkError
from streamsink.schemas.config import Config, from_dict
from streamsink.schemas.event import Event
from streamsink.schemas.numeric import exact_numbers
from streamsink.schemas.wire import decode, encode
from streamsink.signals import catch_early
from streamsink.streams.admin import (
    ShardStatus,
    create_stream,
    group_status,
    list_streams,
    shard_count,
    stream_info,
)
from streamsink.streams.connection import SyncClient, connect, connect_async
from streamsink.streams.dead import check_group, choose, dead_letters, drop, replay
from streamsink.streams.keys import Keys
from streamsink.streams.producer import Producer
from streamsink.streams.ratelimit import RateLimiter
from streamsink.streams.rows import Rows
from streamsink.streams.state import ShardState

CHUNK = 1000

CONFIG_ENV = "STREAMSINK_CONFIG"
"""The config file of every command given no --config (docker-compose.yml sets it)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "worker":
        catch_early()  # a SIGTERM while it starts: a clean stop (serve), not a kill
    try:
        config = _config(args)
        result: int = args.run(args, config)
        return result
    except ConfigError as exc:  # one problem a line, each naming the file
        for line in str(exc).splitlines():
            print(f"streamsink: error: {line}", file=sys.stderr)
        return 1 if args.command == "check" else 2
    except (StreamsinkError, redis.RedisError, ValueError) as exc:
        print(f"streamsink: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file named on the command line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"streamsink: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """The options every command takes, before or after its name."""
    parser.add_argument(
        "--config",
        default=default,
        metavar="FILE",
        help=f"TOML config file (streams, tables, groups, sinks; default ${CONFIG_ENV})",
    )
    parser.add_argument(
        "--redis-url", default=default, metavar="URL", help="overrides the config and REDIS_URL"
    )
    parser.add_argument(
        "--prefix",
        default=default,
        metavar="P",
        help="Redis key prefix (default: the config's, else 'ss')",
    )
    parser.add_argument(
        "--database-url",
        default=default,
        metavar="URL",
        help="overrides the config and DATABASE_URL",
    )


def _command(
    commands: Any, name: str, text: str, run: Callable[[argparse.Namespace, Config], int]
) -> argparse.ArgumentParser:
    """A (sub)command running `run(args, config)`; it takes the global options too."""
    after = argparse.ArgumentParser(add_help=False)
    _global_options(after, argparse.SUPPRESS)  # given after the command: they override
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=text, description=text, parents=[after]
    )
    parser.set_defaults(run=run)
    return parser


def _group(commands: Any, name: str, text: str) -> Any:
    """A command with actions of its own (`streams create`, `tables check`)."""
    parser = commands.add_parser(name, help=text, description=text)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamsink", description=__doc__)
    _global_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = _command(commands, "check", "validate the config file fully (exit 1 if not)", _check)
    check.add_argument("file", nargs="?", help="the config file (same as --config)")

    streams = _group(commands, "streams", "create and inspect streams")
    create = _command(
        streams, "create", "create a stream with a fixed shard count", _streams_create
    )
    create.add_argument("name", nargs="?", help="stream name (default: every stream of --config)")
    create.add_argument("--shards", type=int, help="shard count (default: the config's)")
    _command(streams, "list", "streams with their shard counts and lengths", _streams_list)

    publish = _command(commands, "publish", "publish one event, or JSON lines", _publish)
    publish.add_argument("stream")
    publish.add_argument("--key", help="routing key of a single event")
    publish.add_argument("--op", default="set", help="set | incr | del | append | call")
    publish.add_argument("--data", help="JSON object of a single event")
    publish.add_argument("--table", help="target table, when not the stream's default")
    publish.add_argument("--id", help="idempotency id: publishing it again is a no-op")
    publish.add_argument(
        "--file", help="JSON lines ({key, op, data, table?, ts?, v?, id?}), '-' for stdin"
    )

    status = _command(
        commands, "status", "streams, groups, lag, pending, leases, dead letters", _status
    )
    status.add_argument(
        "--json", action="store_true", help="the status document (schema in the README)"
    )
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )

    dead = _command(commands, "dead", "list, replay or drop a group's dead letters", _dead)
    dead.add_argument("action", choices=("list", "replay", "drop"))
    dead.add_argument("stream")
    dead.add_argument("group")
    dead.add_argument(
        "ids", nargs="*", metavar="SHARD/ID", help="dead letters (replay/drop), or --all"
    )
    dead.add_argument("--all", action="store_true", help="every dead letter of the group")
    dead.add_argument("--limit", type=int, default=100, help="most listed per shard")
    dead.add_argument(
        "--data", help="replay one letter with this JSON data instead of its own (a fix)"
    )

    limits = _command(commands, "limits", "show or reset a shared rate limit", _limits)
    limits.add_argument("action", choices=("show", "reset"))
    limits.add_argument("key", help="the limit's name, as given to RateLimiter.allow")
    limits.add_argument("--json", action="store_true", help="print the state as JSON")

    worker = _command(commands, "worker", "run every group of the config until SIGTERM", _worker)
    worker.add_argument("--log-level", default="INFO")
    worker.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="log lines (default json)"
    )
    worker.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz, /readyz and the status page (or [worker] http)",
    )
    worker.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest a stop may drain before the worker exits anyway (default 30)",
    )

    tables = _group(commands, "tables", "create or check the config's PostgreSQL tables")
    _command(
        tables, "create", "create the tables and the offsets tables where missing", _tables_create
    )
    _command(
        tables, "check", "say how the database differs from the config (exit 1)", _tables_check
    )

    offsets = _group(
        commands, "offsets", "after Redis lost data: line it up with the offsets in PostgreSQL"
    )
    reset = _command(
        offsets,
        "reset",
        "print what lines Redis up with a group's offsets; --yes does it",
        _offsets_reset,
    )
    reset.add_argument("--stream", required=True, help="the stream the group reads")
    reset.add_argument("--group", required=True, help="the group the worker stopped")
    reset.add_argument(
        "--below-offset",
        choices=("apply", "skip"),
        help="entries a shard holds at or below an offset: apply them (Redis came back "
        "empty) or skip them (Redis restored from a backup)",
    )
    reset.add_argument("--yes", action="store_true", help="make the changes (default: print)")

    demo = _command(
        commands,
        "demo",
        "publish a realistic burst, drain it into PostgreSQL, show the rows",
        _demo,
    )
    demo.add_argument("--keep", action="store_true", help="keep earlier demo data")
    demo.add_argument("--publish-only", action="store_true", help="publish, show nothing")
    demo.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="status page and /metrics while draining ([worker] http)",
    )
    return parser


def _config(args: argparse.Namespace) -> Config:
    """The config of the command line: loaded, checked whole, then overridden by flags."""
    path = args.config or (args.file if args.command == "check" else None)
    if path is None and args.command == "demo":
        with resources.as_file(resources.files("streamsink") / "demo.toml") as demo:
            config = load_checked(demo)
    elif path := path or os.environ.get(CONFIG_ENV):
        config = load_checked(path)
    elif args.command == "check":
        raise ConfigError(f"name the config file: streamsink check FILE (or ${CONFIG_ENV})")
    else:
        config = from_dict({})  # the defaults, REDIS_URL and DATABASE_URL
    if args.redis_url:
        config = replace(config, redis_url=args.redis_url)
    if args.prefix:
        config = replace(config, prefix=args.prefix)
    if args.database_url:
        config = replace(config, postgres_dsn=args.database_url)
    return config


def _check(args: argparse.Namespace, config: Config) -> int:
    """Everything `_config` checks, plus what the worker's host must provide."""
    path = args.config or args.file or os.environ.get(CONFIG_ENV)
    check_environment(config, path)
    groups, sinks = len(config.groups), len(config.sinks)
    print(
        f"{path}: ok: {len(config.streams)} streams, {len(config.tables)} tables, "
        f"{groups} groups, {sinks} sinks"
    )
    return 0


def _client(config: Config) -> SyncClient:
    return connect(config.redis_url)


def _streams_create(args: argparse.Namespace, config: Config) -> int:
    client, keys = _client(config), Keys(config.prefix)
    if args.name is None:
        if not config.streams:
            raise ValueError("name a stream, or give --config with [streams]")
        wanted = [(s.name, s.shards) for s in config.streams.values()]
    else:
        declared = config.streams.get(args.name)
        shards = args.shards or (declared.shards if declared else None)
        if shards is None:
            raise ValueError(f"--shards is needed: {args.name!r} is not in the config")
        wanted = [(args.name, shards)]
    for name, shards in wanted:
        created = create_stream(client, keys, name, shards)
        print(f"{name}: {shards} shards ({'created' if created else 'already there'})")
    return 0


def _streams_list(args: argparse.Namespace, config: Config) -> int:
    client, keys = _client(config), Keys(config.prefix)
    _print_streams(client, keys, list_streams(client, keys))
    return 0


def _print_streams(client: SyncClient, keys: Keys, names: Iterable[str]) -> None:
    rows = [stream_info(client, keys, name) for name in names]
    print(f"{'stream':<12} {'shards':>6} {'entries':>9}  per shard")
    for info in rows:
        per_shard = " ".join(str(n) for n in info.lengths)
        print(f"{info.name:<12} {info.shards:>6} {info.length:>9}  {per_shard}")


def _publish(args: argparse.Namespace, config: Config) -> int:
    client = _client(config)
    producer = Producer(client, config)
    if args.file is None:
        if args.key is None or args.data is None:
            raise ValueError("give --key and --data for one event, or --file for JSON lines")
        record = {"key": args.key, "op": args.op, "table": args.table, "id": args.id}
        record["data"] = _json(args.data, "--data")
        event = _event(record, "--data")
        _exact(event, config, args.stream, args.data)
        print(producer.publish(args.stream, event))
        return 0
    shard_count(client, Keys(config.prefix), args.stream)  # StreamNotFound before reading
    if args.file == "-":
        events = list(_events(sys.stdin.buffer, config, args.stream))
        total = _publish_chunks(producer, args.stream, events, len(events))
    else:
        path = Path(args.file)
        with path.open("rb") as handle:  # first pass: every line valid, or nothing is sent
            count = sum(1 for _ in _events(handle, config, args.stream))
        with path.open("rb") as handle:  # checked again: the numbers are read as in the first
            total = _publish_chunks(
                producer, args.stream, _events(handle, config, args.stream), count
            )
    print(f"published {total} events to {args.stream}", file=sys.stderr)
    return 0


def _publish_chunks(producer: Producer, stream: str, events: Iterable[Event], count: int) -> int:
    source = iter(events)
    total = 0
    with tqdm(total=count, unit="ev", disable=None, file=sys.stderr) as bar:
        while chunk := list(islice(source, CHUNK)):
            producer.publish_many(stream, chunk)
            total += len(chunk)
            bar.update(len(chunk))
    return total


def _events(
    lines: Iterable[bytes], config: Config | None = None, stream: str = ""
) -> Iterator[Event]:
    """Events of JSON lines; with a config, each is also checked against its table."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"line {number}"
        event = _event(_json(line, where), where)
        if config is not None:
            try:
                _exact(event, config, stream, line, within="data")
                encode(event, config.max_data_bytes)
                config.validate(stream, event)
            except EventError as exc:
                raise ValueError(f"{where}: {exc}") from None
        yield event


def _exact(
    event: Event, config: Config, stream: str, raw: str | bytes, within: str | None = None
) -> None:
    """Numbers of numeric columns as JSON `raw` (the data, or the object holding it `within`)
    writes them, not as the floats orjson made of them: nothing is rounded on the way."""
    try:
        table = config.table_for(stream, event)
    except EventError:
        return  # no table to go by: the publish says what is wrong, in its own order
    data = event.data
    if table is None or not isinstance(data, dict):
        return
    floats = [name for name in table.numerics if type(data.get(name)) is float]
    if floats:
        exact = exact_numbers(raw)
        exact = exact if within is None else exact[within]
        for name in floats:
            data[name] = exact[name]


def _json(raw: str | bytes, where: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from None


def _event(record: Any, where: str) -> Event:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with key, op and data")
    unknown = set(record) - {"key", "op", "data", "table", "ts", "v", "id"}
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    try:
        return Event.make(
            record.get("key"),  # type: ignore[arg-type]
            record.get("op", "set"),
            record.get("data"),  # type: ignore[arg-type]
            table=record.get("table"),
            ts=record.get("ts"),
            version=record.get("v"),
            id=record.get("id"),
        )
    except EventError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _status(args: argparse.Namespace, config: Config) -> int:
    if args.watch is None:
        return _status_once(args, config)
    while True:  # until Ctrl-C (exit 130)
        started = time.monotonic()
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown):
            _status_once(args, config)
        sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
        sys.stdout.write(f"every {args.watch:g} s, {time.strftime('%H:%M:%S')}\n")
        sys.stdout.write(shown.getvalue())
        sys.stdout.flush()
        time.sleep(max(0.0, args.watch - (time.monotonic() - started)))


def _status_once(args: argparse.Namespace, config: Config) -> int:
    client, keys = _client(config), Keys(config.prefix)
    if args.json:
        from streamsink.ops.status import status_document

        document = status_document(client, keys, config)
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    _print_streams(client, keys, list_streams(client, keys))
    groups = [(g.stream, g.name) for g in config.groups.values()]
    behind: dict[str, dict[int, int]] = {}  # per stream and shard: the slowest group's lag
    for stream, group in groups:
        rows = group_status(client, keys, stream, group)
        _print_group(rows, stream, group)
        shards = behind.setdefault(stream, {})
        for row in rows:
            uncommitted = (row.length if row.lag is None else row.lag) + row.pending
            shards[row.shard] = max(shards.get(row.shard, 0), uncommitted)
    _print_backpressure(config, behind)
    for spec in config.sinks.values():
        if spec.type == "http":
            _print_http_sink(client, keys, spec.name)
    if not groups:
        print("\n(give --config to see the groups)")
    return 0


def _print_backpressure(config: Config, behind: Mapping[str, Mapping[int, int]]) -> None:
    """Per stream with a max_lag: its most lagging shard, and whether publishing refuses."""
    for name, spec in config.streams.items():
        if not spec.max_lag or not behind.get(name):
            continue
        shard, lag = max(behind[name].items(), key=lambda item: item[1])
        state = "publishing refused (Backpressure)" if lag >= spec.max_lag else "ok"
        print(
            f"\nbackpressure {name}: max_lag {spec.max_lag}, most behind shard {shard} with "
            f"{lag} uncommitted ({100 * lag / spec.max_lag:.0f}%): {state}"
        )


def _print_group(rows: list[ShardStatus], stream: str, group: str) -> None:
    """Per shard: length, lag, pending, dead, epoch, state, owner; a retrying or stopped
    shard's last error on the line below; then what the group has not acknowledged."""
    now_ms = int(time.time() * 1000)
    print(f"\ngroup {group} on {stream}")
    print(
        f"{'shard':>5} {'length':>8} {'lag':>8} {'pending':>8} {'dead':>6} {'epoch':>6}  "
        f"{'state':<15} owner"
    )
    for row in rows:
        state = row.state.value
        if row.since_ms and row.state in (ShardState.RETRYING, ShardState.STOPPED):
            state += f" {_duration(now_ms - row.since_ms)}"
        print(
            f"{row.shard:>5} {row.length:>8} {_lag(row):>8} {row.pending:>8} {row.dead:>6} "
            f"{row.epoch:>6}  {state:<15} {row.owner or '-'}"
        )
        if row.error and row.state in (ShardState.RETRYING, ShardState.STOPPED):
            print(f"{'':>6}{state}: {_printable(row.error)[:300]}")
    lags = [row.lag for row in rows if row.lag is not None]
    pending = sum(row.pending for row in rows)
    more = "≥" if any(row.lag_capped for row in rows) else ""
    if sum(lags) + pending:
        print(f"outstanding {more}{sum(lags) + pending}: lag {more}{sum(lags)} + pending {pending}")


def _lag(row: ShardStatus) -> str:
    if row.lag is None:
        return "?"
    return f"≥{row.lag}" if row.lag_capped else str(row.lag)


def _duration(ms: int) -> str:
    """12s, 4m05s, 3h07m."""
    seconds = max(0, ms) // 1000
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _printable(text: str) -> str:
    """One line: control characters escaped as Python would write them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _print_http_sink(client: SyncClient, keys: Keys, sink: str) -> None:
    """Per endpoint: callbacks sent, attempts failed and retried, dead-lettered; breaker."""
    from streamsink.streams.endpoints import endpoint_rows

    rows = endpoint_rows(client, keys, sink)
    width = max([len(row.endpoint) for row in rows] + [8])
    print(f"\nhttp sink {sink}")
    print(f"{'endpoint':<{width}} {'sent':>8} {'failed':>7} {'retried':>7} {'dead':>6}  breaker")
    for row in rows:
        breaker = row.breaker
        if row.breaker_since_ms:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.breaker_since_ms / 1000))
            breaker += f" since {since} ({row.breaker_by})"
        print(
            f"{row.endpoint:<{width}} {row.sent:>8} {row.failed:>7} {row.retried:>7} "
            f"{row.dead:>6}  {breaker}"
        )
    if not rows:
        print("(no callbacks yet)")


def _dead(args: argparse.Namespace, config: Config) -> int:
    client, keys = _client(config), Keys(config.prefix)
    limit = args.limit if args.action == "list" else None
    check_group(client, keys, args.stream, args.group)
    letters = list(dead_letters(client, keys, args.stream, args.group, limit))
    if args.action == "list":
        for letter in letters:
            data = letter.fields.get(b"data", b"")[:200].decode("utf-8", "replace")
            line = (letter.address, f"entry {letter.entry}", letter.reason, data)
            print("\t".join(_printable(part) for part in line))
        return 0
    if not args.all and not args.ids:
        raise ValueError(f"name the dead letters to {args.action} (SHARD/ID), or give --all")
    chosen = letters if args.all else choose(letters, args.ids)
    fix = _fixed_data(args, config, chosen)
    for letter in chosen:
        if args.action == "replay":
            new_id = replay(client, keys, args.stream, args.group, letter, fix)
            print(f"{letter.address} -> {new_id or 'nothing: replayed or dropped meanwhile'}")
        else:
            drop(client, keys, args.stream, args.group, letter)
    done = {"replay": "replayed", "drop": "dropped"}[args.action]
    print(f"{done} {len(chosen)} dead letters", file=sys.stderr)
    return 0


def _limits(args: argparse.Namespace, config: Config) -> int:
    with closing(_client(config)) as client:
        limiter = RateLimiter(client, Keys(config.prefix))
        if args.action == "reset":
            limiter.reset(args.key)
            print(f"limit {args.key!r} reset")
            return 0
        state = limiter.show(args.key)
    if args.json:
        print(orjson.dumps({"key": args.key, **asdict(state)}).decode())
    elif not state.exists:
        print(f"limit {args.key!r}: no state (idle: the full burst is free)")
    else:
        print(
            f"limit {args.key!r}: backlog {state.backlog:.3f} s, hold {state.hold:.3f} s, "
            f"{state.in_window} sends in the last second, expires in {state.ttl:.1f} s"
        )
    return 0


def _fixed_data(args: argparse.Namespace, config: Config, chosen: Sequence[Any]) -> bytes | None:
    """`--data` for a replay, checked as the worker will check the fixed event."""
    if args.data is None:
        return None
    if args.action != "replay" or len(chosen) != 1 or args.all:
        raise ValueError("--data fixes one dead letter: replay it by its ID")
    data = orjson.dumps(_json(args.data, "--data"))
    fields = {**chosen[0].fields, b"data": data}
    if config.streams.get(args.stream) is not None:
        config.validate(args.stream, decode(fields, config.max_data_bytes))
    else:
        decode(fields, config.max_data_bytes)
    return data


def _worker(args: argparse.Namespace, config: Config) -> int:
    from streamsink.consumers.worker import Worker
    from streamsink.logs import configure, route_loop_errors
    from streamsink.serve import serve

    if not config.groups:
        raise ValueError("the config declares no [groups]: give --config FILE")
    configure(args.log_level, args.log_format)
    address = args.http or config.http

    async def run() -> int:
        route_loop_errors(asyncio.get_running_loop())
        if address is None:
            return await serve(config, shutdown_timeout_s=args.shutdown_timeout)
        from streamsink.ops.http import endpoint

        def around(worker: Worker) -> contextlib.AbstractAsyncContextManager[object]:
            return endpoint(worker, address)

        return await serve(config, shutdown_timeout_s=args.shutdown_timeout, around=around)

    return asyncio.run(run())


def _tables_create(args: argparse.Namespace, config: Config) -> int:
    from streamsink.sinks.postgres.schema import create_tables

    for line in _on_postgres(config, create_tables):
        print(line)
    return 0


def _tables_check(args: argparse.Namespace, config: Config) -> int:
    from streamsink.sinks.postgres.schema import check_tables

    problems = _on_postgres(config, check_tables)
    for line in problems:
        print(line)
    if problems:
        return 1
    print(f"ok: {len(config.tables)} tables match")
    return 0


def _on_postgres(config: Config, work: Callable[[Any, Config], list[str]]) -> list[str]:
    """`work(connection, config)` on a connection of its own; PostgreSQL errors exit 2."""
    import psycopg2

    if not config.tables:
        raise ValueError("the config declares no [tables]: give --config FILE")
    try:
        with closing(psycopg2.connect(config.postgres_dsn, connect_timeout=10)) as conn:
            return work(conn, config)
    except psycopg2.Error as exc:
        raise ValueError(f"PostgreSQL: {str(exc).strip()}") from None


def _offsets_reset(args: argparse.Namespace, config: Config) -> int:
    """Print the reset's changes; make them with --yes. 1 if a choice is missing."""
    import psycopg2

    from streamsink.ops.reset import BelowOffset, apply_reset, plan_reset

    choice = None if args.below_offset is None else BelowOffset(args.below_offset)
    client, keys = _client(config), Keys(config.prefix)
    try:
        plan = plan_reset(client, keys, config, args.stream, args.group, choice)
        print(f"offsets reset of group {plan.group} on stream {plan.stream}:")
        changes = plan.changes()
        for line in changes or ["nothing to change: Redis holds what the sinks committed"]:
            print(f"  {line}")
        if plan.undecided():
            for shard in plan.undecided():
                print(shard.question(), file=sys.stderr)
            print(
                "choose --below-offset apply (Redis came back empty: they were published "
                "since the loss; those shards' offsets go back to 0-0 and they are applied) "
                "or --below-offset skip (Redis was restored from a backup: they were applied "
                "before the loss, and are skipped); nothing changed",
                file=sys.stderr,
            )
            return 1
        if changes and not args.yes:
            print("dry run: nothing changed; run again with --yes to make these changes")
        elif changes:
            apply_reset(client, keys, config, plan)
            print("done: restart the group's workers")
    except psycopg2.Error as exc:
        raise ValueError(f"PostgreSQL: {str(exc).strip()}") from None
    return 0


def _demo(args: argparse.Namespace, config: Config) -> int:
    import psycopg2

    from streamsink.demo import publish_burst
    from streamsink.sinks.postgres.schema import create_tables, reset_tables

    client, keys = _client(config), Keys(config.prefix)
    with closing(psycopg2.connect(config.postgres_dsn, connect_timeout=10)) as conn:
        if not args.keep:
            for key in client.scan_iter(match=f"{config.prefix}:*", count=1000):
                client.unlink(key)
            reset_tables(conn, config, config.sinks)
        create_tables(conn, config)
    for spec in config.streams.values():
        create_stream(client, keys, spec.name, spec.shards)

    async def run() -> Any:
        async_client = connect_async(config.redis_url)
        try:
            return await publish_burst(async_client, config)
        finally:
            await async_client.aclose()

    counts, seconds = asyncio.run(run())
    if args.publish_only:
        return 0
    total = sum(counts.values())
    print(f"published {total} events in {seconds:.2f} s ({total / seconds:,.0f} events/s)\n")
    for name, count in sorted(counts.items()):
        print(f"  {name:<18} {count:>7}")
    print()
    _print_streams(client, keys, config.streams)
    if "tasks" in config.read_models:
        task = Rows(client, config).read("tasks", 1)
        print(f"\nthe read model, before any worker ran: Rows.read('tasks', 1) = {task}")
    return _demo_drain(config, counts, args.http or config.http)


def _demo_drain(config: Config, counts: Mapping[str, int], address: str | None) -> int:
    """Drain the burst into PostgreSQL with one worker; show the writes saved and the rows."""
    import psycopg2

    from streamsink.consumers.worker import Worker, worker_client
    from streamsink.demo import drain, report
    from streamsink.sinks.postgres import PostgresSink

    sink = PostgresSink.from_options("db", config.sinks["db"].options, config.postgres_dsn)
    served: list[str] = []

    @contextlib.asynccontextmanager
    async def around(worker: Worker) -> AsyncIterator[None]:
        """The worker's endpoint while it drains, if its port is free."""
        from streamsink.ops.http import endpoint

        assert address is not None
        try:
            async with endpoint(worker, address):
                served.append(address)
                print(f"\nwhile it drains: status page http://{address}/, metrics at /metrics")
                yield
        except ValueError as exc:  # the port is taken: drain without it
            if served:
                raise
            print(f"\n(no status page: {exc})")
            yield

    async def work() -> float:
        async_client = worker_client(config.redis_url)
        try:
            return await drain(
                async_client, config, {"db": sink}, around=around if address else None
            )
        finally:
            await async_client.aclose()
            await sink.close()

    seconds = asyncio.run(work())
    events: dict[str, int] = {}
    for name, count in counts.items():
        table = config.streams[name.split()[0]].table or "-"
        events[table] = events.get(table, 0) + count
    written = sink.stats.by_table
    print(f"\na worker drained them into PostgreSQL in {seconds:.2f} s; one write per event")
    print("would have been this many row writes; merged per key in windows, they were:")
    print(f"\n  {'table':<14} {'events':>8} {'writes':>8} {'coalescing':>10} {'saved':>8}")
    for table in sorted(events):
        n, w = events[table], written.get(table, 0)
        print(f"  {table:<14} {n:>8} {w:>8} {n / max(w, 1):>9.1f}x {n - w:>8}")
    all_events, all_writes = sum(events.values()), sum(written.values())
    print(
        f"  {'all':<14} {all_events:>8} {all_writes:>8} "
        f"{all_events / max(all_writes, 1):>9.1f}x {all_events - all_writes:>8}"
    )
    print(
        f"\ncoalescing ratio {all_events / max(all_writes, 1):.1f} events per row write: "
        f"{all_events - all_writes} writes saved, "
        f"in {sink.stats.windows} transactions and {sink.stats.statements} SQL statements "
        f"(instead of {all_events}). In PostgreSQL now (schema streamsink_demo):\n"
    )
    with closing(psycopg2.connect(config.postgres_dsn, connect_timeout=10)) as conn:
        for line in report(conn):
            print(line)
    if served:
        print(
            f"\nRun `streamsink worker --config streamsink/demo.toml` to keep the status page at "
            f"http://{served[0]}/ and metrics at http://{served[0]}/metrics."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
