"""The wire format: how an event is laid out in the fields of a stream entry.

This is the one place where events become bytes and bytes become events. An entry is
a few flat fields, readable with `redis-cli XRANGE` and writable with a plain `XADD`:

    key    the routing key (UTF-8); its shard is `shard_of(key, shards)`, one per row
           (a table's `key_format` spells it from the key columns)
    op     set | incr | del | append | call
    data   a JSON object (UTF-8), no NaN or Infinity
    table  optional: the table, when not the stream's default
    ts     optional: producer clock, integer milliseconds since the Unix epoch
    v      optional: schema version of `data`, a non-negative integer
    id     optional: idempotency id (producers de-duplicate on it)
    for    set by `dead replay` only: the group the entry is replayed for
    origin set by `dead replay` only: the entry ID the event first had
    sinks  set by `dead replay` only: the sinks of that group that apply it

The names and their positions are in `layout` (with the publish script's arguments and the
dead-letter fields).

Unknown fields are ignored, so newer producers can add fields without breaking workers;
a field of these given twice in one entry is refused (`entry_fields`).

A value of a numeric column is a JSON number or numeric text (a Python `Decimal` is written
as text); workers read it as the exact Decimal its JSON text writes, never through a float.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from streamsink.errors import DecodeError, EventError, PayloadTooLarge, ValidationError
from streamsink.schemas.event import (
    MAX_ID_BYTES,
    MAX_KEY_BYTES,
    MAX_NUMBER,
    Event,
    Op,
    check_finite,
    check_shape,
)
from streamsink.schemas.layout import (
    DATA_NAME,
    DATA_VALUE,
    F_DATA,
    F_FOR,
    F_ID,
    F_KEY,
    F_OP,
    F_ORIGIN,
    F_SINKS,
    F_TABLE,
    F_TS,
    F_VERSION,
    ID,
    IDENTIFIED,
    KEY_NAME,
    KEY_VALUE,
    OP_NAME,
    OP_VALUE,
    PACKED_FIELDS,
    PLAIN_ENTRY,
    PLAIN_VALUES,
    TABLE,
    TS,
    VERSION,
)
from streamsink.schemas.numeric import Numeric, decimals, literals
from streamsink.schemas.table import INT64_MAX, INT64_MIN, PLAIN_INT, Table

DEFAULT_MAX_DATA_BYTES = 256 * 1024
"""Largest encoded `data` accepted by default: events are changes, not documents."""

MAX_DEPTH = 254
"""Deepest nesting of arrays and objects in `data`, itself included: what orjson writes
(it refuses a 255th level), so what every sink and the dead-letter stream can encode."""

_SHALLOW_BYTES = 2 * (MAX_DEPTH + 1)
"""Shorter JSON cannot nest past MAX_DEPTH: each level takes an opening and a closing byte."""

_OPS = {op.value.encode(): op for op in Op}
_OP_BYTES = {op: name for name, op in _OPS.items()}


def op_bytes(op: Op) -> bytes:
    """How `op` is written in an entry's op field."""
    return _OP_BYTES[op]


def shard_of(key: str, shards: int) -> int:
    """The shard of `key`: CRC-32 (IEEE, as zlib) of its UTF-8 bytes, modulo `shards`."""
    return zlib.crc32(key.encode("utf-8")) % shards


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    """A stream entry ID as (milliseconds, sequence), for comparing IDs."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def pack(event: Event, max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> tuple[bytes, ...]:
    """The values of `event`'s fields in PACKED_FIELDS order, b"" for an absent one."""
    check_shape(event)
    try:
        data = _dumps(event.data)
    except TypeError as exc:
        if str(exc) == _TOO_DEEP:
            raise EventError("data", _DEPTH_REASON) from None
        raise EventError("data", f"cannot be encoded as JSON: {exc}") from None
    if b"null" in data:  # orjson writes NaN and infinities as null: look for them only then
        check_finite("data", event.data)
    if len(data) > max_data_bytes:
        raise PayloadTooLarge("data", f"is {len(data)} bytes; the limit is {max_data_bytes}")
    return (
        event.key.encode(),
        _OP_BYTES[event.op],
        data,
        b"" if event.table is None else event.table.encode(),
        b"" if event.ts is None else str(event.ts).encode(),
        b"" if event.version is None else str(event.version).encode(),
        b"" if event.id is None else event.id.encode(),
    )


def packer(
    table: Table | None,
    validate: Callable[[Event], object],
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    mark_ids: bool = False,
    then: Callable[[Event, tuple[bytes, ...]], tuple[bytes, ...]] | None = None,
    plain_set: Callable[[Event, bytes], tuple[bytes, ...] | None] | None = None,
) -> Callable[[Event], tuple[bytes, ...]]:
    """`pack` then `validate` (same errors), quick for plain events of `table`.

    The values are `pack`'s, only three (key, op, data) when the event has no table, ts,
    version or id; with `mark_ids`, a quick event with an id comes as the publish script
    takes it, `key, IDENTIFIED, op, data, id` (no second layout pass for the idempotent
    publish's usual event). Plain: a set (keyed `table`) or append (keyless one) bound for
    `table` without table, ts or version (an ASCII id may come), with an ASCII key, a dict
    of data holding every key column, each value of a type its column takes as is
    (`Table.plain`), and JSON free of null and NUL. Those pass every check, so one dict
    lookup and one type test a field replace them; any other event takes the full path.

    With `then`, every event's values go through `then(event, values)` (the producers'
    read-model layout). With `plain_set` too, a quick set without id goes to
    `plain_set(event, its JSON data)` first, and takes what it gives unless None: the
    layout of a read model's commonest event, without repeating the quick path's checks.
    """
    plain = table.plain if table is not None else {}
    key_columns = frozenset(table.key) if table is not None else frozenset()
    key_of = table.key_of if table is not None else None
    never = object()  # matches no op: the quick path is closed to it
    first = Op.SET if table is not None and table.key else never  # keyed: set, no append
    second = Op.APPEND if table is not None and not table.key else never

    def pack_validated(event: Event) -> tuple[bytes, ...]:
        key, op, data, ident = event.key, event.op, event.data, event.id
        if (
            (op is first or op is second)
            and type(data) is dict
            and type(key) is str
            and 0 < len(key) <= MAX_KEY_BYTES
            and key.isascii()
            and event.table is None
            and event.ts is None
            and event.version is None
            and (
                ident is None
                or (type(ident) is str and 0 < len(ident) <= MAX_ID_BYTES and ident.isascii())
            )
            and data.keys() >= key_columns
        ):
            try:
                encoded = memoryview(orjson.dumps(data)).tobytes()  # see _dumps
            except TypeError:
                encoded = b"null"  # the full path says why
            if (
                len(encoded) <= max_data_bytes
                and encoded.find(b"null") < 0  # NaN, infinities and None: the full path
                and encoded.find(b"\\u0000") < 0  # NUL in text (find: twice as quick as `in`)
                and _as_is(data, plain)
                and (key_of is None or key_of(data) == key)
            ):
                if ident is None:
                    if then is None:
                        return key.encode(), _OP_BYTES[op], encoded
                    if plain_set is not None and op is first:
                        shaped = plain_set(event, encoded)
                        if shaped is not None:
                            return shaped
                    return then(event, (key.encode(), _OP_BYTES[op], encoded))
                if mark_ids:
                    return key.encode(), IDENTIFIED, _OP_BYTES[op], encoded, ident.encode()
                with_id = key.encode(), _OP_BYTES[op], encoded, b"", b"", b"", ident.encode()
                return with_id if then is None else then(event, with_id)
        values = pack(event, max_data_bytes)
        validate(event)
        if not (values[TABLE] or values[TS] or values[VERSION] or values[ID]):
            values = values[:PLAIN_VALUES]
        return values if then is None else then(event, values)

    return pack_validated


def _as_is(data: dict[str, Any], plain: Mapping[str, frozenset[type]]) -> bool:
    """Whether every value of `data` is of a type its column takes as it is (`plain`, a
    table's `plain` or `plain_deltas`): the quick paths' test, the same both ways."""
    for name, value in data.items():
        types = plain.get(name)
        if types is None or type(value) not in types:
            return False
        if types is PLAIN_INT and not INT64_MIN <= value <= INT64_MAX:
            return False
    return True


class Replayed(NamedTuple):
    """Where a replayed entry goes: one group (some of its sinks), and its first ID."""

    group: str
    origin: str
    sinks: tuple[str, ...]  # empty: every sink of the group


def replayed(flat: Sequence[bytes]) -> Replayed | None:
    """The routing of a replayed entry from its flat fields; None for an ordinary entry."""
    names = flat[0::2]
    if F_FOR not in names:
        return None
    fields = dict(zip(names, flat[1::2], strict=True))
    sinks = fields.get(F_SINKS, b"").decode("utf-8", "replace")
    return Replayed(
        fields[F_FOR].decode("utf-8", "replace"),
        fields.get(F_ORIGIN, b"").decode("utf-8", "replace"),
        tuple(name for name in sinks.split(",") if name),
    )


def encode(event: Event, max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> list[bytes]:
    """The entry fields of `event`, as a flat [name, value, name, value, ...] list."""
    fields: list[bytes] = []
    for name, value in zip(PACKED_FIELDS, pack(event, max_data_bytes), strict=True):
        if value:
            fields += (name, value)
    return fields


def _dumps(data: Mapping[str, Any]) -> bytes:
    """`data` as JSON, in a copy of its own size.

    orjson hands back its 4 KiB working buffer as the bytes object (tracemalloc: 100 dumps
    of 55 bytes hold 410 KB). A batch of a thousand pins 4 MB, which the C heap returns to
    the OS when the batch is freed and faults back in for the next: 2.7 µs a dumps at 1,000
    alive against 0.2 µs at 10 (measured). The copy frees the buffer at once, so the next
    dumps reuses it: 0.35 µs, and a pending event holds 60 bytes, not 4 KiB.
    """
    return memoryview(orjson.dumps(data, default=_plain)).tobytes()


def _plain(value: Any) -> Any:
    # orjson writes only dicts as objects; an Event's data may be any Mapping. A Decimal
    # goes as its text: exact for every JSON reader, and a numeric column takes it.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def decode(fields: Mapping[bytes, bytes], max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> Event:
    """The event held by the fields of a stream entry; DecodeError says what is wrong."""
    key = _text(fields, F_KEY)
    if key is None:
        raise DecodeError("key", "is missing")
    raw_op = fields.get(F_OP)
    if raw_op is None:
        raise DecodeError("op", "is missing")
    op = _OPS.get(raw_op)
    if op is None:
        raise DecodeError(
            "op", f"unknown op {raw_op!r}; expected one of {', '.join(o for o in Op)}"
        )
    raw_data = fields.get(F_DATA)
    if raw_data is None:
        raise DecodeError("data", "is missing")
    if len(raw_data) > max_data_bytes:
        raise DecodeError("data", f"is {len(raw_data)} bytes; the limit is {max_data_bytes}")
    try:
        data: Any = orjson.loads(raw_data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("data", _json_reason(raw_data, exc)) from None
    if not isinstance(data, dict):
        raise DecodeError("data", f"must be a JSON object, got {type(data).__name__}")
    if len(raw_data) >= _SHALLOW_BYTES and not _shallow(raw_data) and _too_deep(data):
        raise DecodeError("data", _DEPTH_REASON)
    event = Event(
        key=key,
        op=op,
        data=data,
        table=_text(fields, F_TABLE),
        ts=_integer(fields, F_TS),
        version=_integer(fields, F_VERSION),
        id=_text(fields, F_ID),
    )
    try:
        check_shape(event)
    except EventError as exc:
        raise DecodeError(exc.field, exc.reason) from None
    return event


def unpacker(
    table: Table | None,
    validate: Callable[[Event], Table | None],
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    *,
    shard: tuple[int, int] | None = None,
    calls: bool = True,
    tables: Mapping[str, Table] = MappingProxyType({}),
) -> Callable[[Sequence[bytes]], tuple[Event, Table | None]]:
    """`decode` then `validate` of an entry's flat fields, quick for plain entries of `table`.

    The mirror of `packer`, for the worker's hot path: the fields come as Redis sent them,
    [name, value, ...], and the result is the event with its table (`validate`'s). Plain:
    exactly key, op and data in that order (what the producers write), an ASCII key, a set
    or incr (keyed `table`; incr: key values and deltas of lww or sum numbers) or append
    (keyless one), JSON free of `\\u0000` decoding to a dict that holds every key column,
    each value of a type its column takes as is, and the key `table.key_format` spells.
    Those pass every check; any other entry takes the full path, so both paths give the
    same event, or the same error.

    `shard`: (index, count) of the shard read; an entry whose key belongs to another is
    refused (its events would be ordered with another key's). `calls`: whether a sink of
    the group sends calls; if not, a call is refused rather than dropped unsent. `tables`:
    the declared tables, by name, for entries that name theirs.

    The values of numeric columns become Decimals (`Numeric.exact`); one that orjson read
    as a float is read again from the JSON text (`numeric.literals`), so no float ever rounds it.
    Tables without numeric columns never pay for this.
    """
    # Per op byte string: the op, the exact types each column takes, fields it must name.
    quick: dict[bytes, tuple[Op, Mapping[str, frozenset[type]], int]] = {}
    one_key: str | None = None  # every key column must be in data: one `in` for one key
    all_keys: frozenset[str] | None = None
    key_of = None
    numerics: Mapping[str, Numeric] = {}
    if table is not None:
        numerics = table.numerics
        plain, deltas = (
            _decimal_plain(table.plain, numerics),
            _decimal_plain(table.plain_deltas, numerics),
        )
        if table.key:  # keyed: set and incr; keyless: append only
            quick[_OP_BYTES[Op.SET]] = (Op.SET, plain, 0)
            quick[_OP_BYTES[Op.INCR]] = (Op.INCR, deltas, len(table.key) + 1)
        else:
            quick[_OP_BYTES[Op.APPEND]] = (Op.APPEND, plain, 0)
        if len(table.key) == 1:
            one_key = table.key[0]
        elif table.key:
            all_keys = frozenset(table.key)
        key_of = table.key_of
    index, shards = shard if shard is not None and shard[1] > 1 else (0, 0)  # 0: no check
    loads, crc32 = orjson.loads, zlib.crc32

    def unpack(flat: Sequence[bytes]) -> tuple[Event, Table | None]:
        if (
            len(flat) == PLAIN_ENTRY
            and flat[KEY_NAME] == F_KEY
            and flat[OP_NAME] == F_OP
            and flat[DATA_NAME] == F_DATA
        ):
            how, key, raw = quick.get(flat[OP_VALUE]), flat[KEY_VALUE], flat[DATA_VALUE]
            if (
                how is not None
                and 0 < len(key) <= MAX_KEY_BYTES
                and key.isascii()
                and (not shards or crc32(key) % shards == index)
                and len(raw) <= max_data_bytes
                and (len(raw) < _SHALLOW_BYTES or _shallow(raw))
                and raw.find(b"\\u0000") < 0  # NUL in text: the full path
            ):
                op, plain, least = how
                try:
                    data = loads(raw)
                except orjson.JSONDecodeError:
                    data = None  # the full path says why
                if (
                    type(data) is dict
                    and (one_key is None or one_key in data)
                    and (all_keys is None or data.keys() >= all_keys)
                    and len(data) >= least  # an incr names a delta
                    and (not numerics or decimals(data, numerics, raw))
                    and _as_is(data, plain)
                    and (key_of is None or key_of(data) == (text := key.decode()))
                ):
                    return Event(key.decode() if key_of is None else text, op, data), table
        fields = entry_fields(flat)
        event = decode(fields, max_data_bytes)
        if shards:
            _check_shard(event.key, index, shards)
        if event.op is Op.CALL:
            if not calls:
                raise ValidationError(
                    "op", "no sink of this group sends calls: give the group an HTTP sink"
                )
            return event, validate(event)
        target = table if event.table is None else tables.get(event.table)
        exact = target.numerics if target is not None else None
        data = event.data
        if exact and type(data) is dict:  # the literals first, so that the checks see no float
            literals(data, exact, fields[F_DATA])
        found = validate(event)
        if exact and found is target and type(data) is dict:
            decimals(data, exact, b"")  # valid now: every value fits
        return event, found

    return unpack


_DECIMAL = frozenset({Decimal})


def _decimal_plain(
    plain: Mapping[str, frozenset[type]], numerics: Mapping[str, Numeric]
) -> Mapping[str, frozenset[type]]:
    """`plain` where a numeric column takes the Decimals `numeric.decimals` made of its values."""
    if not numerics:
        return plain
    return {name: _DECIMAL if name in numerics else types for name, types in plain.items()}


def entry_fields(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """The fields of an entry as Redis sends them, [name, value, ...], by name.

    A field streamsink reads given twice is refused (which one the producer meant is
    anybody's guess); repeats of fields it ignores are ignored too.
    """
    pairs = iter(flat)  # names and values taken in turn
    fields = dict(zip(pairs, pairs, strict=True))
    if 2 * len(fields) != len(flat):
        names = flat[::2]
        for name in PACKED_FIELDS:
            if names.count(name) > 1:
                raise DecodeError(name.decode(), "appears more than once in the entry")
    return fields


def _check_shard(key: str, index: int, shards: int) -> None:
    """Refuse a key read from a shard that is not its own."""
    own = shard_of(key, shards)
    if own != index:
        raise ValidationError(
            "key",
            f"belongs to shard {own} of {shards} (crc32 of its UTF-8 bytes mod {shards}), "
            f"not to shard {index} it was added to: XADD it to shard {own}",
        )


_TOO_DEEP = "Recursion limit reached"  # orjson's TypeError past its 254th level
_DEPTH_REASON = f"nests arrays and objects deeper than {MAX_DEPTH} levels (data itself is one)"


def _shallow(raw: bytes) -> bool:
    """Whether JSON `raw` surely nests at most MAX_DEPTH deep: it opens no more arrays and
    objects than that (brackets inside strings count too, so this may say no wrongly)."""
    return raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH


def _too_deep(data: dict[str, Any]) -> bool:
    """Whether decoded `data` nests deeper than MAX_DEPTH: orjson, which every sink writes
    JSON with, says so (decoded JSON holds nothing else it could refuse)."""
    try:
        orjson.dumps(data)
    except TypeError:
        return True
    return False


def _text(fields: Mapping[bytes, bytes], name: bytes) -> str | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(name.decode(), "is not valid UTF-8") from None


def _json_reason(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    # orjson reports bad UTF-8 as "surrogates not allowed"; say what the producer must fix.
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"is not valid UTF-8 (byte {bad.start})"
    return f"is not valid JSON: {exc}"


def _integer(fields: Mapping[bytes, bytes], name: bytes) -> int | None:
    raw = fields.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_NUMBER:
        raise DecodeError(name.decode(), f"must be an integer in 0..2**63-1, got {raw!r}")
    return int(raw)
