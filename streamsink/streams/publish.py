"""What both producers share: the publish script and the preparation of a batch.

Producers send one EVAL of `publish_script()` per shard and batch instead of one XADD
per event: one command per shard keeps a cluster slot per script, runs the idempotency
check and the XADD atomically, and costs Redis and the client far less than N XADDs.

Redis hashes the script's 15 kB on every EVAL (~40 µs; 0.3-0.6 µs an event in a full batch,
all of it for a lone event), so a call goes by SHA (EVALSHA) wherever it is the only one of
its shard in flight: every call of the sync producer, and the asyncio producer's calls sent
from the caller when nothing else is in flight. A call Redis refuses with NOSCRIPT (a
restarted Redis, SCRIPT FLUSH, a new cluster node) wrote nothing and goes again as EVAL,
nothing of its shard having been sent after it. The asyncio producer's pipelined batches go
as EVAL: several of a shard are in flight, and one refused with NOSCRIPT sent again after a
later one ran would put the shard's events out of order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from hashlib import sha1
from typing import Any
from zlib import crc32

from streamsink.errors import Backpressure, ConfigError, ShardCountMismatch
from streamsink.schemas.config import Config
from streamsink.schemas.event import Event, Op
from streamsink.schemas.layout import (
    DATA,
    EVAL_ARGV,
    EVAL_SHAPES,
    EVAL_SHARD,
    FIRST_EVENT,
    FULL,
    ID,
    IDENTIFIED,
    IDENTIFIED_ALL,
    KEY,
    MARK,
    MODEL,
    MODEL_PLAIN,
    MODEL_SHORT,
    OP,
    PACKED_FIELDS,
    PLAIN_VALUES,
    TABLE,
    TS,
    VERSION,
)
from streamsink.schemas.readmodel import Changer, changer
from streamsink.schemas.table import Column, ColumnType
from streamsink.schemas.wire import op_bytes, packer
from streamsink.streams.applied import Receipt
from streamsink.streams.keys import Keys
from streamsink.streams.scripts import lua


def _hset_by_arity(most: int) -> bytes:
    """Lua: the HSET of a shape's key field and its `k` fields, their values read from the
    data by the shape's pattern, written out up to `most` fields (no table to build), with
    a table beyond."""
    lines = []
    for k in range(1, most + 1):
        got = ", ".join(f"v{m}" for m in range(1, k + 1))
        pairs = "".join(f", shape[{m}], v{m}" for m in range(1, k + 1))
        lines += [
            f"    {'if' if k == 1 else 'elseif'} k == {k} then",
            f"      local {got} = string.match(ARGV[i + 2], shape.pattern)",
            f"      redis.call('HSET', row, shape.key, ARGV[i]{pairs})",
        ]
    lines += [
        "    else",
        "      local got = {string.match(ARGV[i + 2], shape.pattern)}",
        "      local assigns = {shape.key, ARGV[i]}",
        "      for m = 1, k do",
        "        assigns[m + m + 1], assigns[m + m + 2] = shape[m], got[m]",
        "      end",
        "      redis.call('HSET', row, unpack(assigns))",
        "    end",
    ]
    return "\n".join(lines).encode()


@cache
def publish_script() -> bytes:
    """The publish script (`publish.lua`: what it takes and returns), its two holes filled:
    the stream field names in wire order, the op of a set, and the HSET of a plain
    read-model set."""
    text = lua("publish").text.encode()
    names = b", ".join(b"'%s'" % name for name in PACKED_FIELDS)
    filled = (
        text.replace(b"--[[NAMES]]", names)
        .replace(b"--[[SET]]", b"'%s'" % op_bytes(Op.SET))
        .replace(b"    --[[HSET_BY_ARITY]]", _hset_by_arity(8))
    )
    if b"--[[" in filled or filled == text:
        raise AssertionError("publish.lua: its holes are not where publish.py expects")
    return filled


@cache
def publish_sha() -> str:
    """The publish script's SHA1, the name EVALSHA runs it by."""
    return sha1(publish_script()).hexdigest()


FIRST_RETRY = 0.005
LAST_RETRY = 0.1
"""Under backpressure with a timeout, producers try again after 5 ms, doubling to 100 ms."""

MAX_SHAPES = 1024
"""Most shapes (table, field names in order, TTL) of plain read-model sets a producer
numbers; events of further shapes go in the general layout."""

MAX_MARKS = 4 * MAX_SHAPES
"""Most (field names, status value) pairs a producer remembers the shape's mark of."""

MAX_SHAPE_FIELDS = 32
"""Most fields of a shape (key included): a Lua pattern holds at most 32 captures."""

_SHAPE_MARK = MODEL_PLAIN[0]

_NUMBER, _TEXT = b"[^,}]*", b'"[^"]*"'
_PATTERNS = {
    ColumnType.INT: (b"(%s)" % _NUMBER, _NUMBER),
    ColumnType.FLOAT: (b"(%s)" % _NUMBER, _NUMBER),
    ColumnType.TEXT: (b'"([^"]*)"', _TEXT),
    ColumnType.UUID: (b'"([^"]*)"', _TEXT),
    ColumnType.TIMESTAMP: (b'"([^"]*)"', _TEXT),
}
"""Per column type a shape can hold, the Lua pattern of its JSON value: captured, and
skipped (the key column, whose value is the key). Numbers hold no ',' or '}'; text without
escapes holds no '"'. Classes, not `.-`: Lua matches them without backtracking."""


def shape_pattern(columns: Mapping[str, Column], key: str, names: tuple[str, ...]) -> bytes:
    """The Lua pattern that reads the values of a plain set's fields from its data, as
    orjson writes it (`{"name":value,...}`, in the data's order, no spaces) when the data
    has no escape (no backslash): every field's value but the key column's, captured as
    the hash holds it (text without its quotes, numbers as written)."""
    parts = []
    for name in names:
        captured, skipped = _PATTERNS[columns[name].type]
        parts.append(b'"%s":%s' % (name.encode(), skipped if name == key else captured))
    return b"^{" + b",".join(parts) + b"}$"


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    """How producers batch; what they validate comes from the Config."""

    dedup_ttl_ms: int = 3_600_000
    """How long an idempotency id is remembered: retries must come within this time."""
    max_batch: int = 500
    """Asyncio producer: most events in one batch (smaller batches in flight together let
    Python prepare the next while Redis runs the last)."""
    max_in_flight: int = 4
    """Asyncio producer: batches sent before the reply of the first has come back."""
    max_wait: float = 0.0
    """Asyncio producer: seconds to wait for more events before sending (0: send at once;
    events still gather while the previous round trip is in flight)."""
    queue_size: int = 10_000
    """Asyncio producer: pending publish calls before publish() waits for room (backpressure)."""

    def __post_init__(self) -> None:
        for name in ("dedup_ttl_ms", "max_batch", "max_in_flight", "queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"producer setting {name} must be a positive integer, got {value!r}"
                )
        if not self.max_wait >= 0:  # also refuses NaN
            raise ConfigError(
                f"producer setting max_wait must be >= 0 seconds, got {self.max_wait!r}"
            )


Prepared = tuple[bytes, ...]
"""An event ready to send: its values from `wire.packer` (key, op, data and, if any of
them is present, table, ts, v and id; or an event with only an id already laid out as
IDENTIFIED)."""


@dataclass(slots=True)
class Command:
    """One EVAL for one shard, and which event of the batch each of its replies is for."""

    args: list[bytes | str | int]
    slots: list[int] = field(default_factory=list)
    """Per reply, its event's place in the batch (the requests' events one after another)."""
    plain: bool = False
    guarded: bool = False
    """The script checks backpressure or writes a read model: never sent as a plain XADD."""
    shapes: set[bytes] = field(default_factory=set)
    """The marks of the shapes its plain read-model sets name (sent after the events)."""
    identified: int = 0
    """How many of its events are laid out as IDENTIFIED (all of them: sent as one run)."""

    @property
    def key(self) -> str:
        """The shard stream it writes (where a cluster routes it)."""
        return str(self.args[1] if self.plain else self.args[EVAL_SHARD])

    def plain_xadd(self) -> None:
        """Send a lone event without idempotency id as a plain XADD: the same effect, and
        Redis runs it six times faster than the script (measured: 1.6 µs against 9 µs)."""
        values = self.args[FIRST_EVENT:]
        if values[MARK] == FULL:
            del values[MARK]
        named = zip(PACKED_FIELDS, values, strict=False)  # three values: no table, ..., id
        self.args = [
            "XADD",
            self.args[EVAL_SHARD],
            "*",
            *[p for pair in named if pair[1] for p in pair],
        ]
        self.plain = True

    def by_text(self) -> None:
        """Send the script's text (EVAL) instead of its SHA1: Redis did not know it."""
        self.args[0:2] = ["EVAL", publish_script()]

    def entry_ids(self, reply: Any) -> list[str]:
        """The entry IDs in this command's reply, one per slot, as text."""
        raws: list[Any] = [reply] if self.plain else reply
        if raws and type(raws[0]) is bytes:
            return list(map(bytes.decode, raws))  # whatever the client's decode_responses
        return raws


class Preparer:
    """Validates and encodes events, and lays them out as per-shard script calls."""

    def __init__(self, config: Config, settings: ProducerSettings) -> None:
        self.config = config
        self.settings = settings
        self.keys = Keys(config.prefix)
        self.shards: dict[str, int] = {}
        self.packers: dict[str, Callable[[Event], Prepared]] = {}
        """Per stream whose shards are known: validate and pack one event (`wire.packer`)."""
        self.shapes: dict[str, dict[tuple[tuple[str, ...], int], bytes]] = {}
        """Per table, the marks of the shapes of its plain read-model sets, by (field names
        in order, TTL)."""
        self.marks: dict[str, dict[tuple[tuple[str, ...], Any], bytes]] = {}
        """Per table, the marks of its plain sets by (field names in order, status value):
        at most MAX_MARKS, found in one lookup (`_plain_set`)."""
        self.shape_names: dict[bytes, tuple[str, tuple[str, ...], int, bytes]] = {}
        """Per shape's mark: the key column, the other fields in order, the TTL (ms;
        negative: only for a hash without one), the pattern (`shape_pattern`)."""
        self._numbers = itertools.count()

    def check_shards(self, stream: str, shards: int) -> int:
        """Remember the shard count Redis recorded for `stream`, or raise if unusable."""
        declared = self.config.streams.get(stream)
        if declared is not None and declared.shards != shards:
            raise ShardCountMismatch(
                f"stream {stream!r} has {shards} shards in Redis but the config says "
                f"{declared.shards}; a stream's shard count is fixed when it is created"
            )
        self.shards[stream] = shards
        validate = self.config.validator(stream)
        table = self.config.default_table(stream)
        limit, read_models = self.config.max_data_bytes, self.config.read_models
        then, plain_set = self._read_model(stream) if read_models else (None, None)
        self.packers[stream] = packer(table, validate, limit, not read_models, then, plain_set)
        return shards

    def _read_model(
        self, stream: str
    ) -> tuple[
        Callable[[Event, Prepared], Prepared], Callable[[Event, bytes], Prepared | None] | None
    ]:
        """The packer's read-model steps for `stream` (`wire.packer`'s `then` and
        `plain_set`): each event laid out with its table's changes, and the plain sets of
        the stream's default table by shape."""
        config = self.config
        default = config.streams[stream].table if stream in config.streams else None
        changers = {name: changer(config.tables[name], m) for name, m in config.read_models.items()}
        plain_sets = {name: self._plain_set(name, c) for name, c in changers.items() if c.plain}
        layouts = {
            name: self._layout(changes, plain_sets.get(name)) for name, changes in changers.items()
        }

        def then(event: Event, values: Prepared) -> Prepared:
            layout = layouts.get(event.table or default)  # type: ignore[arg-type]
            return values if layout is None else layout(event, values)

        return then, plain_sets.get(default) if default is not None else None

    def _plain_set(self, table: str, changes: Changer) -> Callable[[Event, bytes], Prepared | None]:
        """The layout of a valid set without null of a `plain` read-model table by its
        shape (`key, mark, data`), or None for the general layout (`_layout`). The packer's
        quick path calls it first: the commonest event of such a table, so the mark is found
        by (field names, status value) in one lookup, its TTL worked out once."""
        shapes = self.shapes.setdefault(table, {})
        marks = self.marks.setdefault(table, {})
        key, as_text, ttl_of, status = changes.key, changes.key_text, changes.ttl, changes.status
        check_key = changes.check_key

        def plain_set(event: Event, encoded: bytes) -> Prepared | None:
            data = event.data
            if len(data) < 2 or b"\\" in encoded:  # only the key, or JSON with escapes
                return None
            if key not in data or as_text(data[key]) != event.key:
                check_key(event)  # raises
            names = tuple(data)
            mark = marks.get((names, data.get(status)))  # type: ignore[arg-type]
            if mark is None:
                ttl = ttl_of(data)
                mark = shapes.get((names, ttl)) or self._shape(table, key, names, ttl)
                if mark is None:  # no shape left, or one the script cannot read
                    return None
                if len(marks) < MAX_MARKS:  # status values may be many: the TTL sorts them
                    marks[(names, data.get(status))] = mark  # type: ignore[arg-type]
            return event.key.encode(), mark, encoded

        return plain_set

    def _layout(
        self, changes: Changer, plain_set: Callable[[Event, bytes], Prepared | None] | None
    ) -> Callable[[Event, Prepared], Prepared]:
        """How an event of a table with a read model (packed as `values`) goes with its
        changes.

        A plain set (no table, ts, v or id; a `plain` table, no null, JSON without
        escapes) goes by its shape (`plain_set`): `key, mark, data`, the script reading the
        values from the data (`shape_pattern`); any other set, incr or del with its changes
        (`MODEL_SHORT` or `MODEL`); other ops as they are."""
        set_op, incr_op, del_op = Op.SET, Op.INCR, Op.DEL

        def layout(event: Event, values: Prepared) -> Prepared:
            op, data = event.op, event.data
            if op is not set_op and op is not incr_op and op is not del_op:
                return values
            if len(values) != PLAIN_VALUES:
                return (values[KEY], MODEL, *values[OP:], *changes(event))
            if (
                plain_set is not None
                and op is set_op
                and not (b"null" in (encoded := values[DATA]) and None in data.values())
                and (shaped := plain_set(event, encoded)) is not None
            ):
                return shaped
            return (values[KEY], MODEL_SHORT, values[OP], values[DATA], *changes(event))

        return layout

    def _shape(self, table: str, key: str, names: tuple[str, ...], ttl: int) -> bytes | None:
        """A new shape's mark, or None once MAX_SHAPES are numbered or if the script cannot
        read its values from the data (a column that is not int, float, text, uuid or
        timestamp, or more than MAX_SHAPE_FIELDS fields).

        Safe for threads sharing a producer: a number is never given twice (two threads
        numbering one shape at once give it two, both right), and a shape is named before
        any event can carry its mark."""
        columns = self.config.tables[table].columns
        if (
            len(self.shape_names) >= MAX_SHAPES
            or len(names) > MAX_SHAPE_FIELDS
            or any(columns[name].type not in _PATTERNS for name in names)
        ):
            return None
        fields = tuple(name for name in names if name != key)
        mark = MODEL_PLAIN + b"%d" % next(self._numbers)
        self.shape_names[mark] = (key, fields, ttl, shape_pattern(columns, key, names))
        self.shapes[table][(names, ttl)] = mark
        return mark

    def encode(self, stream: str, events: Iterable[Event]) -> list[Prepared]:
        """Validate and pack every event (all or nothing)."""
        return list(map(self.packers[stream], events))

    def commands(
        self, requests: Sequence[tuple[str, list[Prepared], object]], by_sha: bool = False
    ) -> list[Command]:
        """One script call per (stream, shard), keeping each shard's events in order.

        `requests` are (stream, prepared events, anything) for each publish call. With
        `by_sha` the calls name the script by its SHA1 (EVALSHA): only for a caller with
        nothing else of these shards in flight, which sends a call Redis answers NOSCRIPT
        again as text (`Command.by_text`)."""
        by_stream: dict[str, list[Command | None]] = {}
        made: list[Command] = []
        slot = 0
        shaped = bool(self.shape_names)  # else no event carries a shape's mark
        for stream, prepared, _ in requests:
            shards = self.shards[stream]
            by_shard = by_stream.get(stream)
            if by_shard is None:
                by_shard = by_stream[stream] = [None] * shards
            for values in prepared:
                shard = crc32(values[KEY]) % shards  # shard_of, the key encoded
                command = by_shard[shard]
                if command is None:
                    command = by_shard[shard] = self._command(stream, shard, by_sha)
                    made.append(command)
                if len(values) == PLAIN_VALUES:
                    command.args += values
                    if shaped and values[MARK][0] == _SHAPE_MARK:  # a read-model set by shape
                        command.guarded = True
                        command.shapes.add(values[MARK])
                elif values[MARK] is IDENTIFIED:  # laid out by the packer
                    command.args += values
                    command.identified += 1
                elif values[MARK] == MODEL_SHORT or values[MARK] == MODEL:
                    command.args += values  # read model: laid out by the packer, marker too
                    command.guarded = True
                elif values[ID] and not (values[TABLE] or values[TS] or values[VERSION]):
                    command.args += (values[KEY], IDENTIFIED, values[OP], values[DATA], values[ID])
                    command.identified += 1
                else:
                    command.args += (values[KEY], FULL, *values[OP:])
                command.slots.append(slot)
                slot += 1
        for command in made:
            if 1 < command.identified == len(command.slots):  # one mark for them all
                del command.args[FIRST_EVENT + MARK :: 5]
                command.args.insert(FIRST_EVENT + MARK, IDENTIFIED_ALL)
            elif command.shapes:  # after the events, the shapes they name
                command.args[EVAL_SHAPES] = len(command.args) - EVAL_ARGV  # its place in ARGV
                for mark in command.shapes:
                    key, names, ttl, pattern = self.shape_names[mark]
                    nx = b"1" if ttl < 0 else b"0"
                    command.args += (mark, key, b"%d" % abs(ttl), nx, pattern, len(names), *names)
            if (
                len(command.slots) == 1
                and not command.guarded
                and (len(command.args) == FIRST_EVENT + PLAIN_VALUES or not command.args[-1])
            ):
                command.plain_xadd()  # one event, and without id
        return made

    def receipts(self, stream: str, prepared: list[Prepared], ids: list[str]) -> list[Receipt]:
        """The receipt of each published event (prepared values start with the key)."""
        shards = self.shards[stream]
        return [Receipt.of(stream, shards, v[KEY], i) for v, i in zip(prepared, ids, strict=True)]

    def _command(self, stream: str, shard: int, by_sha: bool) -> Command:
        keys, ttl = self.keys, self.settings.dedup_ttl_ms
        shard_key, dedup = keys.shard(stream, shard), keys.dedup_prefix(stream, shard)
        spec = self.config.streams.get(stream)
        lag = spec.max_lag if spec is not None and spec.max_lag else 0
        memory = spec.max_memory if spec is not None and spec.max_memory else 0
        ids = keys.ids(stream, shard)
        head = ("EVALSHA", publish_sha()) if by_sha else ("EVAL", publish_script())
        args: list[bytes | str | int] = [*head, 2, shard_key, ids, dedup, ttl]
        args += [lag, repr(memory) if memory else 0, *self._rows(stream, shard), 0]
        return Command(args, guarded=bool(lag or memory))

    def _rows(self, stream: str, shard: int) -> tuple[str, str]:
        """The shard's read-model key prefix and the stream's default table ('' if none)."""
        spec = self.config.streams.get(stream)
        default = spec.table if spec is not None and spec.table else ""
        return self.keys.row_prefix(stream, shard), default


def refusal(error: Exception) -> Backpressure | None:
    """The Backpressure a script error stands for, or None for any other error."""
    words = str(error).split()
    if len(words) != 4 or words[0] != "BACKPRESSURE":
        return None
    return Backpressure(words[1], int(words[2]), int(words[3]))
